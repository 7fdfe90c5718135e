"""plan(desired, actual): golden op lists for a table of situations."""

from __future__ import annotations

import pytest

from agent.backend import DeviceState, PeerState
from agent.link import LinkState
from agent.plan import Actual, plan
from events.desired import DesiredState, PeerEntry
from tests.desired_states import desired_state

ME = "me" + "A" * 42
PK = {n: f"peer{n}" + "B" * 39 for n in range(1, 4)}


def peer(n: int, endpoint: str | None = None, keepalive: int = 25) -> tuple[str, PeerEntry]:
    return PK[n], PeerEntry(
        allowed_ips=(f"10.0.0.{n + 1}/32",),
        endpoint=endpoint or f"192.0.2.{n}:51820",
        persistent_keepalive=keepalive,
        name=f"p{n}",
    )


def desired(
    *peers: tuple[str, PeerEntry],
    addresses: tuple[str, ...] = ("10.0.0.1/24",),
    routes: tuple[str, ...] = (),
) -> DesiredState:
    return desired_state(addresses=addresses, peers=peers, routes=routes)


def state_of(d: DesiredState, **link_changes: object) -> Actual:
    """The machine exactly as `d` wants it (with optional link differences)."""
    link = dict(index=3, mtu=d.interface.mtu, up=True, addresses=d.addresses, routes=())
    link.update(link_changes)
    return Actual(
        device=DeviceState(
            public_key=ME,
            listen_port=d.interface.listen_port,
            peers=tuple(
                PeerState(
                    public_key=key,
                    allowed_ips=p.allowed_ips,
                    endpoint=p.endpoint,
                    persistent_keepalive=p.persistent_keepalive,
                )
                for key, p in d.peers.items()
            ),
        ),
        link=LinkState(**link),  # type: ignore[arg-type]
    )


def lines(want: DesiredState, actual: Actual, previous: DesiredState | None = None) -> list[str]:
    return [str(op) for op in plan(want, actual, public_key=ME, previous=previous)]


def test_fresh_interface_gets_everything_in_order() -> None:
    assert lines(desired(peer(1)), Actual(device=None, link=None)) == [
        "create interface",
        f"set private key (public {ME})",
        "set listen port 51820",
        "set mtu 1420",
        "add address 10.0.0.1/24",
        "set link up",
        f"add peer p1 {PK[1]} allowed 10.0.0.2/32 endpoint 192.0.2.1:51820 keepalive 25",
    ]


def test_identical_state_plans_nothing() -> None:
    d = desired(peer(1), peer(2))
    assert lines(d, state_of(d), previous=d) == []


@pytest.mark.parametrize(
    ("want", "have", "previous", "expected"),
    [
        pytest.param(
            desired(peer(1), peer(2), peer(3)),
            desired(peer(1), peer(2)),
            desired(peer(1), peer(2)),
            [f"add peer p3 {PK[3]} allowed 10.0.0.4/32 endpoint 192.0.2.3:51820 keepalive 25"],
            id="one peer added touches only it",
        ),
        pytest.param(
            desired(peer(1)),
            desired(peer(1), peer(2)),
            desired(peer(1), peer(2)),
            [f"remove peer {PK[2]}"],
            id="one peer removed",
        ),
        pytest.param(
            desired(peer(1, keepalive=10), peer(2)),
            desired(peer(1), peer(2)),
            desired(peer(1), peer(2)),
            [f"update peer p1 {PK[1]} allowed 10.0.0.2/32 keepalive 10"],
            id="changed in place, endpoint left to roaming",
        ),
        pytest.param(
            desired(peer(1, endpoint="198.51.100.1:51820")),
            desired(peer(1)),
            desired(peer(1)),
            [
                f"update peer p1 {PK[1]} allowed 10.0.0.2/32 endpoint 198.51.100.1:51820 "
                "keepalive 25"
            ],
            id="endpoint moved by the control plane",
        ),
        pytest.param(
            desired(peer(1)),
            desired(peer(1, endpoint="203.0.113.5:4000")),  # WireGuard roamed
            desired(peer(1)),
            [],
            id="roaming is not fought",
        ),
        pytest.param(
            desired(peer(1), addresses=("10.0.0.1/24", "10.9.0.1/24")),
            desired(peer(1), addresses=("10.0.0.1/24", "10.8.0.1/24")),
            desired(peer(1), addresses=("10.0.0.1/24", "10.8.0.1/24")),
            ["add address 10.9.0.1/24", "remove address 10.8.0.1/24"],
            id="address added before the old one goes",
        ),
        pytest.param(
            desired(peer(1), addresses=("fd00:1::1/48",)),
            desired(peer(1), addresses=("fd00:1::1/64",)),
            desired(peer(1), addresses=("fd00:1::1/64",)),
            ["remove address fd00:1::1/64", "add address fd00:1::1/48"],
            id="same address, new prefix: removed first",
        ),
    ],
)
def test_changes(
    want: DesiredState, have: DesiredState, previous: DesiredState, expected: list[str]
) -> None:
    assert lines(want, state_of(have), previous=previous) == expected


def test_drift_is_planned_back() -> None:
    d = desired(peer(1), peer(2))
    actual = state_of(d, up=False, addresses=(), mtu=1500)
    assert lines(d, actual, previous=d) == [
        "set mtu 1420",
        "add address 10.0.0.1/24",
        "set link up",
    ]
    hand_removed = state_of(desired(peer(1)))
    assert lines(d, hand_removed, previous=d) == [
        f"add peer p2 {PK[2]} allowed 10.0.0.3/32 endpoint 192.0.2.2:51820 keepalive 25"
    ]


def test_foreign_key_on_device_is_replaced() -> None:
    d = desired()
    actual = state_of(d)
    assert actual.device is not None
    other = Actual(device=DeviceState(public_key="x", listen_port=1), link=actual.link)
    assert lines(d, other) == [f"set private key (public {ME})", "set listen port 51820"]


def test_a_link_without_a_device_is_planned_as_new() -> None:
    """An interface whose device cannot be reached is replaced by the interface
    reconciler: the link ops are planned for the new one, not the old reading."""
    d = desired(peer(1), routes=("192.168.5.0/24",))
    orphan = state_of(d)
    assert orphan.link is not None
    assert lines(d, Actual(device=None, link=orphan.link)) == lines(
        d, Actual(device=None, link=None)
    )
    assert "add route 192.168.5.0/24" in lines(d, Actual(device=None, link=orphan.link))
