"""An agent's reading of its desired-state subject: snapshots and deltas in order.

Pure: `take` decides what a message does to the state the agent holds. The
daemon, the benchmark's simulated agents and `read_desired` feed it messages and act on the
outcome; see events/PROTOCOL.md for the rules.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from events.desired import DesiredDelta, DesiredMessage, DesiredState, apply_delta


class Outcome(enum.Enum):
    TAKEN = "taken"  # the state moved
    STALE = "stale"  # at or below what we hold (or skipped while resyncing)
    GAP = "gap"  # a delta that does not follow: re-read the subject from its snapshot
    FOREIGN = "foreign"  # for another host


@dataclass
class DesiredFeed:
    host_id: str
    state: DesiredState | None = None
    # After a gap: the subject is being re-read from its start, which is the
    # latest snapshot; deltas before it are skipped and that snapshot is taken
    # even if older than what we hold (the deltas after it bring it forward).
    resyncing: bool = False

    @property
    def revision(self) -> int:
        return self.state.revision if self.state is not None else 0

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
            self.resyncing = True
            return Outcome.GAP
        self.state = apply_delta(self.state, delta)
        return Outcome.TAKEN
