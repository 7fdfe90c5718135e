"""The pure half of broker access: nkeys and JWTs, and who gets which grant."""

from __future__ import annotations

import base64

import nkeys
import pytest
from nacl.signing import SigningKey

from controlplane.brokerauth import (
    BrokerKeys,
    Grant,
    Refused,
    delivery_problem,
    grant_for,
    names_at_stake,
    still_admitted,
    user_claims,
)
from controlplane.throttle import FailureWindow
from events import natsid
from events.model import AdminRemoved, NodeRemoved
from events.signing import public_text
from events.tokens import InvalidToken, make_token, parse_token, secret_digest
from projections.topology import Admin, EnrollmentKey, Host, Node, Topology

NONCE = "n0nce-from-the-server"


def test_nkeys_match_the_nats_library() -> None:
    key = SigningKey.generate()
    pair = nkeys.from_seed(bytearray(natsid.seed_text(key).encode()))
    assert pair.public_key.decode() == natsid.public_nkey(key)
    assert natsid.verify_key_of_nkey(natsid.public_nkey(key)) == key.verify_key
    with pytest.raises(natsid.JwtError):
        natsid.verify_key_of_nkey(natsid.public_nkey(key, natsid.ACCOUNT))  # wrong role
    broken = natsid.public_nkey(key)[:-2] + "AA"
    with pytest.raises(natsid.JwtError):
        natsid.verify_key_of_nkey(broken)


def test_jwt_round_trip_and_tampering() -> None:
    issuer = SigningKey.generate()
    token = natsid.encode({"sub": "x", "nats": {"type": "user"}}, issuer, natsid.SERVER)
    claims = natsid.decode_verified(token, natsid.SERVER)
    assert claims["sub"] == "x" and claims["iss"] == natsid.public_nkey(issuer, natsid.SERVER)
    head, _, signature = token.split(".")
    other = natsid.encode({"sub": "y"}, issuer, natsid.SERVER).split(".")[1]
    with pytest.raises(natsid.JwtError):
        natsid.decode_verified(f"{head}.{other}.{signature}", natsid.SERVER)
    with pytest.raises(natsid.JwtError):
        natsid.decode_verified("not-a-jwt", natsid.SERVER)


def test_replicas_derive_the_same_broker_identities() -> None:
    root = SigningKey.generate()
    one, two = BrokerKeys.derive(root), BrokerKeys.derive(SigningKey(bytes(root)))
    assert one == two
    assert len({bytes(one.issuer), bytes(one.controlplane), bytes(one.system)}) == 3


def opts(key: SigningKey, token: str | None = None, nonce: str = NONCE) -> dict[str, object]:
    signature = base64.urlsafe_b64encode(key.sign(nonce.encode()).signature).decode()
    found: dict[str, object] = {"nkey": natsid.public_nkey(key), "sig": signature.rstrip("=")}
    if token:
        found["auth_token"] = token
    return found


def world() -> tuple[Topology, SigningKey, SigningKey, str]:
    topology = Topology()
    admin = SigningKey.generate()
    topology.admins[public_text(admin)] = Admin("root", public_text(admin), "admin")
    host = SigningKey.generate()
    topology.hosts["h1"] = Host("h1", "one", "pub1", 51820, (), 0.0, signing_key=public_text(host))
    topology.nodes["n1"] = Node("n1", "office", "h1", "one", "10.0.0.1", 0.0)
    topology.nodes_by_host["h1"] = {"n1"}
    topology.nodes_by_network["office"] = {"n1"}
    topology.keys["k1"] = EnrollmentKey("k1", "office", secret_digest("s3cret"), None, None, 0.0)
    topology.retired_keys["k0"] = "gone"
    return topology, admin, host, make_token("tls://cp:4222", "k1", "s3cret")


def decide(
    topology: Topology, options: dict[str, object], failures: FailureWindow | None = None
) -> Grant:
    return grant_for(topology, options, NONCE, 1000.0, failures or FailureWindow())


def test_each_identity_gets_its_own_grant() -> None:
    topology, admin, host, token = world()
    assert decide(topology, opts(admin)).name == "admin:root"
    granted = decide(topology, opts(host))
    assert granted.name == "host:h1"
    assert "netmesh.report.h1.applied" in granted.publish
    assert "netmesh.consume.h1" in granted.publish
    assert not any(p.startswith("$JS") for p in granted.publish)  # no consumers of its own
    assert granted.subscribe == (f"_INBOX_{natsid.public_nkey(host)}.>",)
    newcomer = decide(topology, opts(SigningKey.generate(), token))
    assert newcomer.name == "enroll:k1" and newcomer.publish == ("netmesh.cmd.join",)
    claims = user_claims(newcomer, "UXYZ", 1000.0)
    assert claims["nats"]["pub"] == {"allow": ["netmesh.cmd.join"]}
    assert claims["exp"] == 1000 + 120  # an enrolling connection is short-lived
    assert "exp" not in user_claims(granted, "UXYZ", 1000.0)  # a host's lasts while admitted


def test_auditor_gets_no_commands() -> None:
    topology, _, _, _ = world()
    auditor = SigningKey.generate()
    topology.admins[public_text(auditor)] = Admin("eve", public_text(auditor), "auditor")
    granted = decide(topology, opts(auditor))
    assert not any(p.startswith("netmesh.cmd") for p in granted.publish)
    assert "netmesh.query.>" in granted.publish


@pytest.mark.parametrize(
    "case",
    [
        "anonymous",
        "nonce signed by another key",
        "other nonce",
        "unknown key",
        "host in no network",
    ],
)
def test_refusals(case: str) -> None:
    topology, _, host, _ = world()
    stranger = SigningKey.generate()
    options: dict[str, object] = {
        "anonymous": {},
        "nonce signed by another key": {**opts(stranger), "nkey": natsid.public_nkey(host)},
        "other nonce": opts(host, nonce="replayed"),
        "unknown key": opts(stranger),
        "host in no network": opts(host),
    }[case]
    if case == "host in no network":
        topology.nodes_by_host["h1"] = set()
    with pytest.raises(Refused):
        decide(topology, options)


def test_tokens_that_do_not_authenticate_are_refused_then_throttled() -> None:
    topology, _, _, token = world()
    failures = FailureWindow(limit=3)
    parts = parse_token(token)
    forged = make_token(parts.server, "k1", "guess")
    for _ in range(3):
        with pytest.raises(Refused, match="not recognised"):
            decide(topology, opts(SigningKey.generate(), forged), failures)
    with pytest.raises(Refused, match="rate limited"):
        decide(topology, opts(SigningKey.generate(), token), failures)
    # Made-up key ids share one window: they do not crowd out real keys' counts.
    other = FailureWindow(limit=3)
    for n in range(5):
        with pytest.raises(Refused):
            decide(
                topology, opts(SigningKey.generate(), make_token("x", f"k-made-up-{n}", "s")), other
            )
    assert len(other._failures) == 1
    # A key of a deleted network: admitted to join, which explains the refusal.
    retired = make_token(parts.server, "k0", "whatever")
    assert decide(topology, opts(SigningKey.generate(), retired)).name == "enroll:k0"


def test_consumers_deliver_only_into_the_hosts_own_inbox() -> None:
    topology, _, host, _ = world()
    inbox = f"_INBOX_{natsid.public_nkey(host)}"
    assert delivery_problem(topology, "h1", f"{inbox}.abc") is None
    for bad in (
        "netmesh.cmd.network.delete",
        f"{inbox}.>",
        f"{inbox}.*",
        f"{inbox}..x",
        f"_INBOX_{natsid.public_nkey(SigningKey.generate())}.abc",
    ):
        assert delivery_problem(topology, "h1", bad) is not None, bad
    assert delivery_problem(topology, "nobody", f"{inbox}.abc") is not None
    topology.nodes_by_host["h1"] = set()
    assert delivery_problem(topology, "h1", f"{inbox}.abc") is not None


def test_who_loses_access() -> None:
    topology, _, _, _ = world()
    event = NodeRemoved(network="office", node_id="n1", host_id="h1")
    assert names_at_stake(topology, event) == {"host:h1"}
    assert still_admitted(topology, "host:h1")
    topology.nodes_by_host["h1"] = set()
    assert not still_admitted(topology, "host:h1")
    assert names_at_stake(topology, AdminRemoved(name="root")) == {"admin:root"}
    topology.admins.clear()
    assert not still_admitted(topology, "admin:root")


def test_token_carries_the_broker_ca() -> None:
    der = b"\x30\x82fake-der"
    token = make_token("tls://cp:4222", "k1", "s", "", der)
    assert parse_token(token).ca_der() == der
    assert parse_token(make_token("nats://cp:4222", "k1", "s")).ca_der() is None
    body = parse_token(token)
    with pytest.raises(InvalidToken):
        parse_token(
            "nmt1."
            + base64.urlsafe_b64encode(
                f'{{"server":"x","key_id":"k","secret":"s","ca":"{body.ca}!!"}}'.encode()
            )
            .decode()
            .rstrip("=")
        )


def test_a_signing_key_reused_by_a_new_host_logs_in_as_the_one_in_a_network() -> None:
    topology, _, host, _ = world()
    topology.hosts["h0"] = Host("h0", "old", "pub0", 51820, (), 0.0, signing_key=public_text(host))
    topology.hosts = {"h0": topology.hosts["h0"], "h1": topology.hosts["h1"]}  # h0 first
    assert decide(topology, opts(host)).name == "host:h1"


def test_refused_connections_are_counted_and_logged_once_a_minute() -> None:
    from structlog.testing import capture_logs

    from controlplane.brokerauth import RefusalLog

    now = [1000.0]
    refusals = RefusalLog(interval=60, clock=lambda: now[0])
    with capture_logs() as logs:
        for _ in range(20):  # a removed host retrying every few seconds
            refusals.refused("host h1 is in no network", "192.0.2.1")
            now[0] += 3
        refusals.refused("enrollment token not recognised", "192.0.2.9")
        refusals.flush()
        refusals.flush()  # nothing new: nothing logged
    lines = [e for e in logs if e["event"] == "broker connections refused"]
    # The first at once; the 19 retries of the next minute and the token refusal
    # that comes when it is over in one line; then nothing more to say.
    assert [line["refused"] for line in lines] == [1, 20]
    assert lines[1]["by_reason"] == {
        "host h1 is in no network": 19,
        "enrollment token not recognised": 1,
    }
