"""Builders for pure-core tests: fold commands into a topology without NATS."""

from __future__ import annotations

import base64
import hashlib

from controlplane.decide import Context, Decision, decide
from events.commands import AnyCommand
from events.envelope import RecordedEvent, make_envelope
from projections.desired import fold
from projections.topology import Topology, Touched


def public_key(n: int) -> str:
    return base64.b64encode(hashlib.sha256(f"host-{n}".encode()).digest()).decode()


class World:
    """A topology plus the events that made it, advanced by deciding commands."""

    def __init__(self, now: float = 1_000_000.0) -> None:
        self.topology = Topology()
        self.log: list[RecordedEvent] = []
        self.now = now
        self._keys = 0

    def context(self) -> Context:
        self._keys += 1
        return Context(
            now=self.now, actor="test", new_key_id=f"k{self._keys}", new_secret=f"s{self._keys}"
        )

    def run(self, command: AnyCommand) -> tuple[Decision, list[Touched]]:
        """Decide and fold (raises Rejected like the service would answer it)."""
        decision = decide(self.topology, command, self.context())
        touched = []
        for subject, event in decision.events:
            recorded = RecordedEvent(
                seq=len(self.log) + 1,
                subject=subject,
                envelope=make_envelope(
                    event,
                    event_id=str(len(self.log)),
                    time=self.now,
                    actor="test",
                    command_id="c",
                ),
            )
            self.log.append(recorded)
            touched.append(fold(self.topology, recorded))
        return decision, touched
