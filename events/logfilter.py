"""Which events of the log a reader asked for: `events log --since/--until
SEQ|TIME --type PATTERN --network NET` (pure; the CLI feeds it the log in
order).

A point of the log is a stream sequence or a time (an event's envelope time).
`--network NET` keeps the network's own events and those of the hosts that
were its members when they happened (an endpoint move of a member is part of
the network's story): membership is followed from the start of the log, so
the filter must see every event, even those before `--since`.
"""

from __future__ import annotations

import datetime as dt
import fnmatch

import msgspec

from events.envelope import RecordedEvent
from events.model import NetworkDeleted, NodeJoined, NodeRemoved, aggregate_of
from events.schema import event_tags, unknown_type


class BadFilter(ValueError):
    """A point or pattern that cannot be read (the message says why, in one line)."""


class Point(msgspec.Struct, frozen=True):
    """A point of the log: after event `seq`, or after the last event at or before `time`."""

    seq: int | None = None
    time: float | None = None

    def __str__(self) -> str:
        if self.seq is not None:
            return f"#{self.seq}"
        assert self.time is not None
        return dt.datetime.fromtimestamp(self.time, dt.UTC).isoformat().replace("+00:00", "Z")


def parse_point(text: str) -> Point:
    """ "42" -> after event 42; an ISO 8601 time ("2026-12-02T07:00:00Z", or as
    `events log` prints it, "2026-12-02 07:00:00Z"; no zone: UTC) -> then.
    Raises BadFilter."""
    text = text.strip()
    if text.isdigit():
        return Point(seq=int(text))
    try:
        when = dt.datetime.fromisoformat(text)
    except ValueError:
        raise BadFilter(
            f"{text!r} is neither an event sequence nor a time "
            "(e.g. 42, 2026-12-02T07:00:00Z, 2026-12-02)"
        ) from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=dt.UTC)
    return Point(time=when.timestamp())


def beyond_the_log(seq: int, head: int) -> str:
    return f"event #{seq} is beyond the log (its last event is #{head})"


def check_type_pattern(pattern: str) -> str:
    """A shell-style pattern over event types ("node.*", "policy.set"), which
    must match at least one type this version knows. Raises BadFilter."""
    known = event_tags()
    if not any(fnmatch.fnmatchcase(tag, pattern) for tag in known):
        raise BadFilter(unknown_type(pattern))
    return pattern


class LogFilter:
    """Feed it every event in order; `wanted` says which to show."""

    def __init__(
        self,
        since: Point | None = None,
        until: Point | None = None,
        type_pattern: str | None = None,
        network: str | None = None,
    ) -> None:
        self.since = since
        self.until = until
        self.type_pattern = type_pattern
        self.network = network
        self._members: dict[str, int] = {}  # host id -> its nodes in the network
        self._ended = False

    def past_until(self, recorded: RecordedEvent) -> bool:
        """Whether this event, and so every later one, lies after `until`."""
        until = self.until
        if until is None:
            return False
        if until.seq is not None:
            return recorded.seq > until.seq
        assert until.time is not None
        return recorded.envelope.time > until.time

    def wanted(self, recorded: RecordedEvent) -> bool:
        in_network = self._follow_membership(recorded)
        if self._ended or self.past_until(recorded):
            self._ended = True
            return False
        since = self.since
        if since is not None:
            if since.seq is not None and recorded.seq < since.seq:
                return False
            if since.time is not None and recorded.envelope.time < since.time:
                return False
        if self.type_pattern is not None and not fnmatch.fnmatchcase(
            recorded.envelope.type, self.type_pattern
        ):
            return False
        return in_network

    def _follow_membership(self, recorded: RecordedEvent) -> bool:
        """Whether the event is the network's (with no --network: every event
        is), keeping the network's members current."""
        network = self.network
        event = recorded.envelope.data
        if network is None:
            return True
        if event is None:  # not an event (garbage on the stream): no one's
            return False
        kind, name = aggregate_of(event)
        if kind == "network":
            if name != network:
                return False
            match event:
                case NodeJoined(host_id=host):
                    self._members[host] = self._members.get(host, 0) + 1
                case NodeRemoved(host_id=host):
                    left = self._members.get(host, 0) - 1
                    if left > 0:
                        self._members[host] = left
                    else:
                        self._members.pop(host, None)
                case NetworkDeleted():
                    self._members.clear()
            return True
        return kind == "host" and name in self._members
