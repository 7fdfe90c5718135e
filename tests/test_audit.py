"""`events verify` on hand-made logs: what a genuine log looks like, and the
forgeries it must catch."""

from __future__ import annotations

import base64
import time

import msgspec
from nacl.signing import SigningKey

from controlplane.audit import verify_log
from events.envelope import RecordedEvent, make_envelope
from events.model import AdminAdded, AnyEvent, NetworkCreated, NetworkDeleted
from events.signing import public_text, sign, signed_command

ROOT = SigningKey.generate()
AUDITOR = SigningKey.generate()


class Log:
    def __init__(self) -> None:
        self.events: list[RecordedEvent] = []

    def add(
        self,
        event: AnyEvent,
        command_id: str = "",
        signer: SigningKey | None = None,
        verb: str = "",
        payload: dict[str, object] | None = None,
    ) -> None:
        env = make_envelope(event, event_id="e", time=1.0, actor="t", command_id=command_id)
        if signer is not None:
            body = msgspec.json.encode({**(payload or {}), "command_id": command_id})
            text = signed_command(verb, body)
            env = msgspec.structs.replace(
                env, signed=text.decode(), signer=public_text(signer), signature=sign(signer, text)
            )
        self.events.append(
            RecordedEvent(seq=len(self.events) + 1, subject="netmesh.ev.x.y", envelope=env)
        )


def genuine() -> Log:
    log = Log()
    log.add(AdminAdded(name="admin", public_key=public_text(ROOT)))
    log.add(
        NetworkCreated(network="office", cidr="10.10.0.0/24"),
        "c1",
        ROOT,
        "network.create",
        {"name": "office", "cidr": "10.10.0.0/24", "signed_at": time.time()},
    )
    return log


def test_a_genuine_log_verifies() -> None:
    report = verify_log(genuine().events, root=public_text(ROOT))
    assert report.problems == [] and report.signed_commands == 1


def test_a_wrong_root_is_caught() -> None:
    report = verify_log(genuine().events, root=public_text(SigningKey.generate()))
    assert report.problems and "root" in report.problems[0][1]


def test_an_altered_field_is_caught() -> None:
    log = Log()
    log.add(AdminAdded(name="admin", public_key=public_text(ROOT)))
    log.add(
        NetworkCreated(network="office", cidr="10.99.0.0/16"),  # not what was signed
        "c1",
        ROOT,
        "network.create",
        {"name": "office", "cidr": "10.10.0.0/24"},
    )
    assert [why for _, why in verify_log(log.events).problems] == [
        "the event's cidr is not the signed one",
        "NetworkCreated without a valid admin signature",
    ]


def test_a_reused_proof_and_an_unproven_admin_event_are_caught() -> None:
    log = genuine()
    first = log.events[1].envelope
    # The same proof again, on a second event: reuse.
    log.events.append(RecordedEvent(seq=3, subject="netmesh.ev.x.y", envelope=first))
    # An event of an earlier, proven command, not next to it: not covered.
    log.add(NetworkDeleted(network="office"), "c1")
    problems = [why for _, why in verify_log(log.events).problems]
    assert problems == [
        "a proof already used by an earlier command",
        "NetworkCreated without a valid admin signature",
        "NetworkDeleted without a valid admin signature",
    ]


def test_an_auditor_signature_does_not_authorize_a_change() -> None:
    log = genuine()
    log.add(
        AdminAdded(name="aldo", public_key=public_text(AUDITOR), role="auditor"),
        "c2",
        ROOT,
        "admin.add",
        {"name": "aldo", "public_key": public_text(AUDITOR), "role": "auditor", "networks": []},
    )
    log.add(NetworkDeleted(network="office"), "c3", AUDITOR, "network.delete", {"name": "office"})
    problems = [why for _, why in verify_log(log.events).problems]
    assert problems == [
        "signed by an auditor, who may not network.delete",
        "NetworkDeleted without a valid admin signature",
    ]


def test_a_tampered_signature_is_caught() -> None:
    log = genuine()
    env = log.events[1].envelope
    bad = base64.b64encode(b"\0" * 64).decode()
    log.events[1] = RecordedEvent(
        seq=2, subject="netmesh.ev.x.y", envelope=msgspec.structs.replace(env, signature=bad)
    )
    problems = [why for _, why in verify_log(log.events).problems]
    assert problems[0] == "bad signature on the command"


def test_a_network_admin_outside_their_networks_is_caught() -> None:
    """The control plane refuses this; a log that holds it was written by
    someone else, and verify says so."""
    ops = SigningKey.generate()
    log = genuine()
    log.add(
        AdminAdded(
            name="ops", public_key=public_text(ops), role="network-admin", networks=("lab",)
        ),
        "c2",
        ROOT,
        "admin.add",
        {
            "name": "ops",
            "public_key": public_text(ops),
            "role": "network-admin",
            "networks": ["lab"],
        },
    )
    log.add(NetworkDeleted(network="office"), "c3", ops, "network.delete", {"name": "office"})
    assert [why for _, why in verify_log(log.events).problems] == [
        "signed by a network admin of lab, not of 'office'",
        "NetworkDeleted without a valid admin signature",
    ]
    inside = genuine()
    inside.events = log.events[:3]
    inside.add(NetworkDeleted(network="lab"), "c4", ops, "network.delete", {"name": "lab"})
    assert verify_log(inside.events).problems == []
