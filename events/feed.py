"""An agent's reading of its desired-state subject: snapshots and deltas in order.

Pure: `take` decides what a message does to the state the agent holds. The
daemon, the benchmark's simulated agents and `read_desired` feed it messages
and act on the outcome; see events/PROTOCOL.md for the rules.

A delta that does not follow the state held (a gap) is not fatal by itself:
with several control-plane replicas, two chains of deltas can interleave on a
subject, and the next message may fill in. Only when everything pending has
been read and the state is still behind a revision seen is the subject re-read
from its snapshot (`behind`).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from events.desired import DesiredDelta, DesiredMessage, DesiredState, apply_delta


class Outcome(enum.Enum):
    TAKEN = "taken"  # the state moved
    STALE = "stale"  # at or below what we hold (or skipped while resyncing)
    GAP = "gap"  # a delta that does not follow what we hold: skipped, remembered
    FOREIGN = "foreign"  # for another host


@dataclass
class DesiredFeed:
    host_id: str
    state: DesiredState | None = None
    # While re-reading the subject from its start (the latest snapshot): deltas
    # before the snapshot are skipped and the snapshot is taken even if older
    # than what we hold (the deltas after it bring it forward).
    resyncing: bool = False
    # The highest revision seen in a delta we could not apply.
    seen: int = 0
    # The state held when a re-read began: the re-read must not leave us older.
    _before_resync: DesiredState | None = None

    @property
    def revision(self) -> int:
        return self.state.revision if self.state is not None else 0

    @property
    def behind(self) -> bool:
        """A revision newer than ours was announced and we could not reach it."""
        return self.seen > self.revision

    def begin_resync(self) -> None:
        """The subject is about to be re-read from its start."""
        self.resyncing = True
        if self._before_resync is None:
            self._before_resync = self.state

    def settle(self) -> bool:
        """Everything pending has been read. A finished re-read that left us
        older than before (an old snapshot replayed onto the subject, rolling up
        the newer messages) is undone. True when it was."""
        before = self._before_resync
        if before is None or self.resyncing:
            return False
        self._before_resync = None
        if self.revision < before.revision:
            self.state = before
            return True
        return False

    def take(self, message: DesiredMessage) -> Outcome:
        if message.host_id != self.host_id:
            return Outcome.FOREIGN
        if isinstance(message, DesiredState):
            if message.revision <= self.revision and not self.resyncing:
                return Outcome.STALE
            self.state = message
            self.resyncing = False
            return Outcome.TAKEN
        return self._take_delta(message)

    def _take_delta(self, delta: DesiredDelta) -> Outcome:
        if self.resyncing or delta.revision <= self.revision:
            return Outcome.STALE
        if self.state is None or delta.base != self.state.revision:
            self.seen = max(self.seen, delta.revision)
            return Outcome.GAP
        self.state = apply_delta(self.state, delta)
        return Outcome.TAKEN
