"""The relay forwarder (agent/relay.py): the planner and the datagram shape
check with tables, then the real thing on loopback sockets."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator
from pathlib import Path

import msgspec
import pytest
from nacl.public import PrivateKey
from prometheus_client import generate_latest

from agent.daemon import Agent
from agent.fake import FakeBackend, FakeDns, FakeFirewall, FakeLink, FakeMachine
from agent.local import local_status
from agent.metrics import PrometheusAgentMetrics
from agent.reconcile import reconcile
from agent.relay import (
    LOOPS,
    Forwarder,
    OpenRelay,
    RelayError,
    RelayState,
    is_wireguard,
    plan_relays,
)
from agent.statedir import Identity, StateDir, private_key_b64, public_key_of
from events.desired import DesiredState, RelayEntry, Sections
from events.feed import Outcome
from tests.desired_states import desired_state
from tests.netns import wait_until

KEY = PrivateKey(bytes(range(32)))


def wg(kind: int, size: int) -> bytes:
    """A datagram shaped like a WireGuard message (its content is noise)."""
    return bytes([kind, 0, 0, 0]) + bytes((7 + i) % 256 for i in range(size - 4))


def transport(size: int = 128) -> bytes:
    return bytes([4, 0, 0, 0]) + b"\xab" * (size - 4)


@pytest.mark.parametrize(
    ("data", "shaped"),
    [
        (wg(1, 148), True),  # handshake initiation
        (wg(2, 92), True),  # response
        (wg(3, 64), True),  # cookie reply
        (wg(4, 32), True),  # keepalive: header and tag, no payload
        (wg(4, 1456), True),  # transport data padded to 16
        # A full packet at MTU 1420: padding stops at the MTU (the bench found it).
        (wg(4, 1452), True),
        (wg(1, 147), False),
        (wg(1, 149), False),
        (wg(2, 148), False),
        (wg(3, 92), False),
        (wg(4, 16), False),  # shorter than header and tag
        (wg(4, 31), False),
        (b"\x05\x00\x00\x00" + bytes(60), False),  # no type 5
        (b"\x00\x00\x00\x00" + bytes(60), False),
        (b"\x01\x00\x01\x00" + bytes(144), False),  # a reserved byte set
        (b"\x01\x00\x00", False),
        (b"", False),
        (b"GET / HTTP/1.1\r\n\r\n" + bytes(14), False),
    ],
)
def test_only_wireguard_shaped_datagrams_pass(data: bytes, shaped: bool) -> None:
    assert is_wireguard(data) is shaped


AB = RelayEntry(hosts=("a", "b"), ports=(41001, 41002), names=("alpha", "beta"))
AC = RelayEntry(hosts=("a", "c"), ports=(41003, 41004))


@pytest.mark.parametrize(
    ("wanted", "open_now", "printed"),
    [
        ({}, {}, []),
        ({"a,b": AB}, {"a,b": AB}, []),  # as wanted: untouched, addresses kept
        ({"a,b": AB}, {}, ["relay alpha (port 41001) <-> beta (port 41002)"]),
        ({}, {"a,b": AB}, ["stop relaying alpha (port 41001) <-> beta (port 41002)"]),
        # A changed port: closed, then opened again on the new ports.
        (
            {"a,b": RelayEntry(hosts=("a", "b"), ports=(41001, 41009))},
            {"a,b": AB},
            [
                "stop relaying alpha (port 41001) <-> beta (port 41002)",
                "relay a (port 41001) <-> b (port 41009)",
            ],
        ),
        # A port handed from one pair to another: closed before it is bound again.
        (
            {"a,c": RelayEntry(hosts=("a", "c"), ports=(41002, 41004))},
            {"a,b": AB},
            [
                "stop relaying alpha (port 41001) <-> beta (port 41002)",
                "relay a (port 41002) <-> c (port 41004)",
            ],
        ),
        (
            {"a,b": AB, "a,c": AC},
            {"a,c": AC},
            ["relay alpha (port 41001) <-> beta (port 41002)"],
        ),
    ],
)
def test_plan_relays(
    wanted: dict[str, RelayEntry], open_now: dict[str, RelayEntry], printed: list[str]
) -> None:
    ops = plan_relays(wanted, RelayState(open_now))
    assert [str(op) for op in ops] == printed


def test_without_relay_control_only_a_state_without_relays_plans_nothing() -> None:
    assert plan_relays({}, None) == []
    assert plan_relays({"a,b": AB}, None) == [OpenRelay("a,b", AB)]


# -- the real thing on loopback ----------------------------------------------


def free_ports(count: int) -> list[int]:
    """Ports free on loopback now (bound then released; the forwarder binds them next)."""
    sockets = [socket.socket(socket.AF_INET, socket.SOCK_DGRAM) for _ in range(count)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


class UdpHost:
    """A UDP socket standing for one host's WireGuard device."""

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.setblocking(False)

    @property
    def address(self) -> str:
        host, port = self.sock.getsockname()
        return f"{host}:{port}"

    def send(self, data: bytes, port: int) -> None:
        self.sock.sendto(data, ("127.0.0.1", port))

    async def receive(self, timeout: float = 5.0) -> tuple[bytes, int]:
        """The next datagram and the port it came from."""
        loop = asyncio.get_running_loop()
        async with asyncio.timeout(timeout):
            data, (_, port) = await loop.sock_recvfrom(self.sock, 65535)
        return data, port

    async def nothing(self, hold: float = 0.5) -> bool:
        """Whether nothing arrives for `hold` seconds."""
        try:
            await self.receive(hold)
        except TimeoutError:
            return True
        return False

    def rebind(self) -> None:
        """A new source port, as a NAT's new mapping gives."""
        self.sock.close()
        self.__init__()  # type: ignore[misc]

    def close(self) -> None:
        self.sock.close()


@pytest.fixture(name="forwarder", params=LOOPS)
async def forwarder_fixture(request: pytest.FixtureRequest) -> AsyncIterator[Forwarder]:
    """A forwarder on loopback, each way of reading its sockets in turn."""
    forwarder = Forwarder(bind="127.0.0.1", loop=request.param)
    try:
        yield forwarder
    finally:
        await forwarder.close()


def port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


async def test_datagrams_cross_the_relay_both_ways_as_they_are(forwarder: Forwarder) -> None:
    pa, pb = free_ports(2)
    entry = RelayEntry(hosts=("a", "b"), ports=(pa, pb), names=("alpha", "beta"))
    await forwarder.open("a,b", entry)
    a, b = UdpHost(), UdpHost()
    try:
        # a speaks first: b's address is unknown, so it is dropped (counted).
        a.send(wg(1, 148), pa)
        await wait_until(lambda: forwarder.status()[0].sides[0].dropped_unknown == 1)
        assert await b.nothing()
        # b speaks: a's address is known, so it reaches a, from the port a sends to.
        response = wg(2, 92)
        b.send(response, pb)
        assert await a.receive() == (response, pa)
        # Now both ways, byte for byte.
        data = transport(256)
        a.send(data, pa)
        assert await b.receive() == (data, pb)
        sides = forwarder.status()[0].sides
        assert (sides[0].address, sides[1].address) == (a.address, b.address)
        assert (sides[0].forwarded, sides[0].forwarded_bytes) == (1, 256)
        assert (sides[1].forwarded, sides[1].forwarded_bytes) == (1, 92)
        assert (sides[0].name, sides[1].port) == ("alpha", pb)

        # Junk from elsewhere: not forwarded, and a's address stays learned.
        stranger = UdpHost()
        stranger.send(b"hello relay, move a's address here", pa)
        stranger.send(bytes([4, 0, 0, 0]) + bytes(26), pa)  # transport, too short
        await wait_until(lambda: forwarder.status()[0].sides[0].dropped_junk == 2)
        assert await b.nothing()
        b.send(transport(64), pb)
        assert await a.receive() == (transport(64), pa)
        assert await stranger.nothing(0.2)
        stranger.close()

        # a moves to a new source port (its NAT's new mapping): followed.
        old = a.address
        a.rebind()
        assert a.address != old
        a.send(transport(48), pa)
        assert await b.receive() == (transport(48), pb)
        b.send(transport(80), pb)
        assert await a.receive() == (transport(80), pa)
        assert forwarder.status()[0].sides[0].address == a.address

        # The same counters, as the agent's Prometheus metrics show them.
        metrics = PrometheusAgentMetrics()
        metrics.relaying(forwarder.status)
        text = generate_latest(metrics.registry).decode()
        forwarded = forwarder.status()[0].sides[0].forwarded
        assert (
            f'netmesh_agent_relay_forwarded_datagrams_total{{pair="a,b",side="alpha"}} '
            f"{float(forwarded)}" in text
        )
        assert (
            'netmesh_agent_relay_dropped_datagrams_total{pair="a,b",reason="junk",side="alpha"} 2.0'
            in text
        )
    finally:
        a.close()
        b.close()


async def test_a_removed_pair_closes_its_ports_and_a_busy_port_fails_only_its_pair(
    forwarder: Forwarder,
) -> None:
    pa, pb, pc, pd = free_ports(4)
    busy = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    busy.bind(("127.0.0.1", 0))
    taken = busy.getsockname()[1]
    ab = RelayEntry(hosts=("a", "b"), ports=(pa, pb))
    cd = RelayEntry(hosts=("c", "d"), ports=(pc, pd))
    clash = RelayEntry(hosts=("e", "f"), ports=(taken, pd + 0))
    desired = DesiredState(
        host_id="r", revision=1, sections=Sections(relays={"a,b": ab, "c,d": cd, "e,f": clash})
    )
    machine = FakeMachine()
    try:
        result = await reconcile(
            desired,
            FakeBackend("nm0", machine),
            FakeLink("nm0", machine),
            firewall=FakeFirewall(),
            relays=forwarder,
            public_key=public_key_of(KEY),
            private_key=private_key_b64(KEY),
            previous={},
        )
    finally:
        busy.close()
    (outcome,) = [o for o in result.outcomes if o.name == "relays"]
    # e,f's first port is taken (and its second is c,d's): it alone fails, said why.
    assert outcome.error is not None and f"cannot bind UDP port {taken}" in outcome.error
    assert sorted((await forwarder.read()).open) == ["a,b", "c,d"]
    shown = {pair.key: pair.error for pair in forwarder.status()}
    assert shown["a,b"] is None and shown["c,d"] is None
    assert shown["e,f"] is not None and str(taken) in shown["e,f"]
    assert not port_free(pa) and not port_free(pc)

    # a,b still forwards.
    a, b = UdpHost(), UdpHost()
    try:
        b.send(transport(32), pb)
        await wait_until(lambda: forwarder.status()[0].sides[1].address == b.address)
        a.send(transport(32), pa)
        assert await b.receive() == (transport(32), pb)
    finally:
        a.close()
        b.close()

    # The entry of a,b removed: its ports are closed, c,d's stay open.
    desired = DesiredState(host_id="r", revision=2, sections=Sections(relays={"c,d": cd}))
    result = await reconcile(
        desired,
        FakeBackend("nm0", machine),
        FakeLink("nm0", machine),
        firewall=FakeFirewall(),
        relays=forwarder,
        public_key=public_key_of(KEY),
        private_key=private_key_b64(KEY),
        previous={},
    )
    (outcome,) = [o for o in result.outcomes if o.name == "relays"]
    assert outcome.ok, outcome.error
    assert [str(op) for op in outcome.ops] == [f"stop relaying a (port {pa}) <-> b (port {pb})"]
    assert port_free(pa) and port_free(pb)
    assert not port_free(pc)
    await forwarder.close()
    assert port_free(pc) and port_free(pd)
    assert forwarder.status() == []


async def test_opening_a_pair_on_a_taken_port_leaves_nothing_open(forwarder: Forwarder) -> None:
    (free,) = free_ports(1)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as busy:
        busy.bind(("127.0.0.1", 0))
        taken = busy.getsockname()[1]
        with pytest.raises(RelayError, match=f"port {taken}"):
            await forwarder.open("a,b", RelayEntry(hosts=("a", "b"), ports=(free, taken)))
    assert port_free(free)
    assert (await forwarder.read()).open == {}


async def test_the_agent_relays_what_its_desired_state_says_and_shows_it(tmp_path: Path) -> None:
    """The daemon's wiring: the relays section enforced by a pass, the pairs in
    `agent status --json` (the status file), every port closed when the agent stops."""
    pa, pb = free_ports(2)
    machine = FakeMachine()
    agent = Agent(
        identity=Identity(host_id="r", name="relay", server="nats://127.0.0.1:1"),
        state=StateDir(tmp_path),
        backend=FakeBackend("nm0", machine),
        link=FakeLink("nm0", machine),
        firewall=FakeFirewall(),
        dns=FakeDns(),
        relays=Forwarder(bind="127.0.0.1"),
        private_key=private_key_b64(KEY),
        public_key=public_key_of(KEY),
    )
    entry = RelayEntry(hosts=("a", "b"), ports=(pa, pb), names=("alpha", "beta"))
    plain = desired_state(host_id="r", revision=4)
    sections = msgspec.structs.replace(plain.sections, relays={"a,b": entry})
    desired = msgspec.structs.replace(plain, sections=sections)
    try:
        assert agent.offer(desired) is Outcome.TAKEN
        assert await agent.reconcile_once()
        assert not port_free(pa) and not port_free(pb)
        b = UdpHost()
        b_address = b.address
        b.send(transport(32), pb)
        relays = agent.relays
        assert relays is not None
        await wait_until(lambda: relays.status()[0].sides[1].address)
        agent.write_status()
        b.close()
        info = await local_status(tmp_path, "nm0")
        (pair,) = info["relays"]
        assert pair["key"] == "a,b" and pair["error"] is None
        assert [s["name"] for s in pair["sides"]] == ["alpha", "beta"]
        assert pair["sides"][1]["address"] == b_address
        assert pair["sides"][1]["dropped_unknown"] == 1  # a not heard from yet
    finally:
        await agent.close()
    assert port_free(pa) and port_free(pb)
