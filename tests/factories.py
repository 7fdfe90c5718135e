"""Builders for pure-core tests: fold commands into a topology without NATS."""

from __future__ import annotations

import base64
import hashlib

import msgspec
from nacl.signing import SigningKey

from controlplane.decide import Context, Decision, decide
from controlplane.pipeline import Proof, pending_events
from controlplane.rules import spec_for
from events.commands import AnyCommand, command_verb
from events.envelope import Envelope, RecordedEvent, make_envelope
from events.model import AdminAdded
from events.signing import public_text, sign, signed_command
from events.subjects import aggregate_subject
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
        self._commands = 0

    def context(self) -> Context:
        self._keys += 1
        return Context(
            now=self.now, actor="test", new_key_id=f"k{self._keys}", new_secret=f"s{self._keys}"
        )

    def run(
        self, command: AnyCommand, signed_by: SigningKey | None = None
    ) -> tuple[Decision, list[Touched]]:
        """Decide and fold (raises Rejected like the service would answer it).

        Signed, the command gets a fresh id and the time, and its proof goes
        with its first event, as the service records it (who may sign it is
        not checked: that is `authorize`'s, before deciding)."""
        proof = None
        command_id = "c"
        if signed_by is not None:
            command, proof = self.signed(command, signed_by)
            command_id = command.command_id
        ctx = self.context()
        decision = decide(self.topology, command, ctx)
        declared = spec_for(command).produces
        assert {type(e) for _, e in decision.events} <= set(declared.events), decision.events
        if decision.events:
            assert isinstance(decision.events[0][1], declared.first), decision.events
        touched = []
        for pending in pending_events(decision, ctx, command_id, proof):
            envelope = msgspec.structs.replace(pending.envelope, event_id=str(len(self.log)))
            touched.append(self.record(pending.subject, envelope))
        return decision, touched

    def signed(self, command: AnyCommand, key: SigningKey) -> tuple[AnyCommand, Proof]:
        """The command as its signer sends it (a fresh id, the time) and its proof."""
        self._commands += 1
        command = msgspec.structs.replace(
            command, command_id=f"c{self._commands}", signed_at=self.now
        )
        fields = msgspec.to_builtins(command)
        del fields["type"]  # the verb is the subject, not a field
        text = signed_command(command_verb(command), msgspec.json.encode(fields))
        return command, Proof(text.decode(), public_text(key), sign(key, text))

    def add_root_admin(self, key: SigningKey) -> None:
        """The first admin, as the control plane registers it on its first start."""
        event = AdminAdded(name="admin", public_key=public_text(key))
        envelope = make_envelope(
            event, event_id="root", time=self.now, actor="bootstrap", command_id=""
        )
        self.record(aggregate_subject("admin", "admin"), envelope)

    def record(self, subject: str, envelope: Envelope) -> Touched:
        recorded = RecordedEvent(seq=len(self.log) + 1, subject=subject, envelope=envelope)
        self.log.append(recorded)
        return fold(self.topology, recorded)
