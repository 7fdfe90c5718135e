"""The agent's DNS: the zone's answers (pure, a table), the server on real
loopback sockets (UDP, TCP, forwarding, garbage and fuzzing), the plan, and
split DNS: resolv.conf's block given back byte for byte, and the resolvectl
commands systemd-resolved gets (on a fake: this machine runs no systemd)."""

from __future__ import annotations

import asyncio
import os
import socket
import struct
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from dnslib import QTYPE, RCODE, DNSRecord
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent.dns import DnsState, PointResolver, RestoreResolver, ServeDns, plan_dns
from agent.dnsserver import DnsServer
from agent.dnszone import Zone, answer
from agent.resolver import BEGIN, END, ResolvConf, Resolved, ResolverError, Routing
from events.desired import DesiredState, DnsEntry, DnsZoneEntry, Sections
from tests.dnsupstream import Upstream

ZONE = Zone.of(
    {
        "web.office.internal": DnsEntry(a=("10.10.0.2",)),
        "v6.office.internal": DnsEntry(aaaa=("fd00::2",)),
        "both.office.internal": DnsEntry(a=("10.10.0.3",), aaaa=("fd00::3",)),
        "www.office.internal": DnsEntry(cname="web.office.internal"),
        "out.office.internal": DnsEntry(cname="example.com"),
        "loop1.office.internal": DnsEntry(cname="loop2.office.internal"),
        "loop2.office.internal": DnsEntry(cname="loop1.office.internal"),
        "a.deep.office.internal": DnsEntry(a=("10.10.0.4",)),
        "db.lab.internal": DnsEntry(a=("10.20.0.5",)),
    },
    {
        "office.internal": DnsZoneEntry(network="office"),
        "lab.internal": DnsZoneEntry(network="lab"),
    },
)


def ask(name: str, qtype: str = "A") -> tuple[str, list[str], int] | None:
    reply = answer(ZONE, DNSRecord.question(name, qtype))
    if reply is None:
        return None
    return (
        RCODE.get(reply.header.rcode),
        [f"{r.rname} {QTYPE.get(r.rtype)} {r.rdata}" for r in reply.rr],
        len(reply.auth),
    )


@pytest.mark.parametrize(
    ("name", "qtype", "expected"),
    [
        ("web.office.internal", "A", ("NOERROR", ["web.office.internal. A 10.10.0.2"], 0)),
        ("WEB.Office.Internal.", "A", ("NOERROR", ["web.office.internal. A 10.10.0.2"], 0)),
        ("web.office.internal", "AAAA", ("NOERROR", [], 1)),  # no data, SOA for the cache
        ("v6.office.internal", "AAAA", ("NOERROR", ["v6.office.internal. AAAA fd00::2"], 0)),
        (
            "both.office.internal",
            "ANY",
            (
                "NOERROR",
                ["both.office.internal. A 10.10.0.3", "both.office.internal. AAAA fd00::3"],
                0,
            ),
        ),
        (
            "www.office.internal",
            "A",
            (
                "NOERROR",
                [
                    "www.office.internal. CNAME web.office.internal.",
                    "web.office.internal. A 10.10.0.2",
                ],
                0,
            ),
        ),
        (
            "www.office.internal",
            "CNAME",
            ("NOERROR", ["www.office.internal. CNAME web.office.internal."], 0),
        ),
        ("out.office.internal", "A", ("NOERROR", ["out.office.internal. CNAME example.com."], 0)),
        ("loop1.office.internal", "A", None),  # checked below: ends, does not spin
        ("nope.office.internal", "A", ("NXDOMAIN", [], 1)),
        ("deep.office.internal", "A", ("NOERROR", [], 1)),  # a name exists below it
        ("office.internal", "A", ("NOERROR", [], 1)),
        ("db.lab.internal", "A", ("NOERROR", ["db.lab.internal. A 10.20.0.5"], 0)),
        ("db.office.internal", "A", ("NXDOMAIN", [], 1)),
    ],
)
def test_the_zone_answers(name: str, qtype: str, expected: object) -> None:
    if expected is None:
        found = ask(name, qtype)
        assert found is not None and found[0] == "NOERROR" and len(found[1]) == 2
        return
    assert ask(name, qtype) == expected


def test_a_query_with_edns_gets_edns_back_and_one_without_does_not() -> None:
    from dnslib import EDNS0, QTYPE

    from agent.dnszone import EDNS_PAYLOAD

    plain = answer(ZONE, DNSRecord.question("web.office.internal"))
    assert plain is not None and not [rr for rr in plain.ar if rr.rtype == QTYPE.OPT]
    query = DNSRecord.question("web.office.internal")
    query.add_ar(EDNS0(udp_len=4096))
    reply = answer(ZONE, query)
    assert reply is not None
    (opt,) = [rr for rr in DNSRecord.parse(reply.pack()).ar if rr.rtype == QTYPE.OPT]
    assert opt.rclass == EDNS_PAYLOAD  # an OPT record's class is its UDP payload size
    assert [str(rr.rdata) for rr in reply.rr] == ["10.10.0.2"]


def test_names_outside_every_zone_are_for_the_upstream() -> None:
    assert ask("example.com") is None
    assert ask("internal") is None
    assert ask("xoffice.internal") is None  # a suffix of the text, not of the labels


def test_other_opcodes_and_many_questions_are_refused() -> None:
    query = DNSRecord.question("web.office.internal")
    query.header.opcode = 2  # STATUS
    reply = answer(ZONE, query)
    assert reply is not None and reply.header.rcode == RCODE.NOTIMP
    query = DNSRecord.question("web.office.internal")
    query.add_question(DNSRecord.question("www.office.internal").q)
    reply = answer(ZONE, query)
    assert reply is not None and reply.header.rcode == RCODE.FORMERR


# -- the server, on loopback ---------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def udp(port: int, data: bytes, address: str = "127.0.0.1") -> bytes:
    loop = asyncio.get_running_loop()
    got: asyncio.Future[bytes] = loop.create_future()

    class Client(asyncio.DatagramProtocol):
        def datagram_received(self, reply: bytes, addr: object) -> None:
            if not got.done():
                got.set_result(reply)

    transport, _ = await loop.create_datagram_endpoint(Client, remote_addr=(address, port))
    try:
        transport.sendto(data)
        async with asyncio.timeout(3):
            return await got
    finally:
        transport.close()


async def tcp(port: int, data: bytes) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(struct.pack("!H", len(data)) + data)
        (size,) = struct.unpack("!H", await reader.readexactly(2))
        return await reader.readexactly(size)
    finally:
        writer.close()


Served = tuple[DnsServer, Upstream]


@pytest.fixture
async def served() -> AsyncIterator[Served]:
    upstream_port = free_port()
    upstream = Upstream({"example.com": "192.0.2.80"})
    await upstream.start("127.0.0.2", upstream_port)
    server = DnsServer(
        lambda: ["127.0.0.1", "127.0.0.2"],  # its own address is skipped
        port=free_port(),
        upstream_port=upstream_port,
        forward_timeout=1.0,
    )
    await server.serve(("127.0.0.1",), ZONE)
    yield server, upstream
    await server.close()
    upstream.close()


async def test_the_server_answers_over_udp_and_tcp_and_forwards_the_rest(
    served: Served,
) -> None:
    server, upstream = served
    for send in (udp, tcp):
        reply = DNSRecord.parse(
            await send(server.port, DNSRecord.question("web.office.internal").pack())
        )
        assert [str(r.rdata) for r in reply.rr] == ["10.10.0.2"] and reply.header.aa == 1
        reply = DNSRecord.parse(await send(server.port, DNSRecord.question("example.com").pack()))
        assert [str(r.rdata) for r in reply.rr] == ["192.0.2.80"]
        reply = DNSRecord.parse(
            await send(server.port, DNSRecord.question("gone.office.internal").pack())
        )
        assert reply.header.rcode == RCODE.NXDOMAIN
    # Only the names outside the zones reached the upstream.
    assert upstream.asked == ["example.com", "example.com"]


async def test_no_upstream_answering_is_servfail(served: Served) -> None:
    server, upstream = served
    upstream.close()
    reply = DNSRecord.parse(await udp(server.port, DNSRecord.question("example.org").pack()))
    assert reply.header.rcode == RCODE.SERVFAIL


async def test_garbage_gets_formerr_or_nothing_and_the_server_goes_on(
    served: Served,
) -> None:
    server, _ = served
    reply = DNSRecord.parse(await udp(server.port, b"\xab\xcd" + b"\x01\x00" + b"\xff" * 30))
    assert reply.header.id == 0xABCD and reply.header.rcode == RCODE.FORMERR
    # Short garbage and replies are dropped; a TCP client sending half a
    # message is closed after its idle time, not waited on by the rest.
    for data in (b"", b"\x00", b"\x12\x34\x81\x80" + b"\x00" * 8):
        assert await server.resolve(data, tcp=False) is None
    _, writer = await asyncio.open_connection("127.0.0.1", server.port)
    writer.write(b"\x00\x40abc")
    reply = DNSRecord.parse(
        await udp(server.port, DNSRecord.question("web.office.internal").pack())
    )
    assert reply.header.rcode == RCODE.NOERROR
    writer.close()


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.binary(max_size=600)
    | st.builds(
        lambda head, tail: head + tail,
        st.just(DNSRecord.question("web.office.internal").pack()[:12]),
        st.binary(max_size=80),
    )
    | st.builds(
        lambda packet, at, byte: packet[:at] + bytes([byte]) + packet[at + 1 :],
        st.just(bytes(DNSRecord.question("www.office.internal", "ANY").pack())),
        st.integers(0, 40),
        st.integers(0, 255),
    )
)
def test_fuzzed_queries_never_raise(data: bytes) -> None:
    """Any bytes: an answer or nothing, never an exception (the server's
    `resolve` is what every UDP datagram and TCP message goes through)."""
    server = DnsServer(lambda: [], forward_timeout=0.01)
    server.zone = ZONE
    out = asyncio.run(server.resolve(data, tcp=False))
    assert out is None or DNSRecord.parse(out).header.qr == 1


async def test_a_flood_of_fuzz_leaves_the_server_answering(
    served: Served,
) -> None:
    server, _ = served
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        for i in range(2000):
            sock.sendto(os.urandom(i % 300), ("127.0.0.1", server.port))
    finally:
        sock.close()
    # And over TCP: garbage behind a length, a length with nothing behind it,
    # a query cut short, bytes with no framing at all.
    for data in (
        b"\x00\x20" + os.urandom(32),
        b"\xff\xff",
        b"\x00\x30" + bytes(DNSRecord.question("web.office.internal").pack())[:20],
        os.urandom(700),
    ):
        _, writer = await asyncio.open_connection("127.0.0.1", server.port)
        writer.write(data)
        await writer.drain()
        writer.close()
    assert await tcp(server.port, bytes(DNSRecord.question("web.office.internal").pack()))
    # UDP is lossy (the flood may fill the socket's buffer): a client asks
    # again, as every resolver does, and is answered once the flood is through.
    for _ in range(10):
        try:
            data = await udp(server.port, DNSRecord.question("web.office.internal").pack())
        except TimeoutError:
            continue
        reply = DNSRecord.parse(data)
        assert [str(r.rdata) for r in reply.rr] == ["10.10.0.2"]
        break
    else:
        raise AssertionError("the server stopped answering after the flood")


async def test_serving_moves_with_the_addresses(served: Served) -> None:
    server, _ = served
    await server.serve(("127.0.0.3",), ZONE)
    assert server.listening == ("127.0.0.3",)
    reply = DNSRecord.parse(
        await udp(server.port, DNSRecord.question("web.office.internal").pack(), "127.0.0.3")
    )
    assert reply.rr
    await server.serve((), Zone())
    assert not server.listening


# -- the plan -------------------------------------------------------------------


def dns_state(*, zones: bool = True) -> DesiredState:
    return DesiredState(
        host_id="h",
        revision=1,
        sections=Sections(
            addresses={"10.10.0.1/24": {}} if zones else {},  # type: ignore[dict-item]
            dns={"web.office.internal": DnsEntry(a=("10.10.0.2",))} if zones else {},
            dns_zones={"office.internal": DnsZoneEntry(network="office")} if zones else {},
        ),
    )


def test_the_plan_serves_then_points_and_then_does_nothing() -> None:
    desired = dns_state()
    ops = plan_dns(desired, DnsState())
    assert [str(op) for op in ops] == [
        "serve DNS on 10.10.0.1 port 53: 1 name(s) in office.internal",
        "point the host's resolver at 10.10.0.1 for office.internal",
    ]
    assert isinstance(ops[0], ServeDns) and isinstance(ops[1], PointResolver)
    done = DnsState(ops[0].addresses, ops[0].zone, ops[1].routing)
    assert plan_dns(desired, done) == []
    # Leaving the last network: the resolver first, then the server.
    ops = plan_dns(dns_state(zones=False), done)
    assert [type(op) for op in ops] == [RestoreResolver, ServeDns] and str(
        ops[1]
    ) == "stop serving DNS"
    # With no DNS control, only a state without zones needs nothing.
    assert plan_dns(dns_state(zones=False), None) == []
    assert plan_dns(desired, None) != []


# -- split DNS: resolv.conf -------------------------------------------------------

ROUTING = Routing("10.10.0.1", ("lab.internal", "office.internal"))


@pytest.mark.parametrize(
    "original",
    [
        b"nameserver 192.0.2.53\nsearch example.net\noptions edns0\n",
        b"# no newline at the end\nnameserver 192.0.2.53",
        b"nameserver 192.0.2.53\r\nnameserver 2001:db8::53\r\n",
        b"",
        "# caf\u00e9 \xff\n".encode("utf-8", "surrogateescape") + b"nameserver 192.0.2.1\n",
    ],
)
async def test_the_block_goes_first_and_comes_out_byte_for_byte(
    tmp_path: Path, original: bytes
) -> None:
    path = tmp_path / "resolv.conf"
    path.write_bytes(original)
    path.chmod(0o640)
    conf = ResolvConf(path)
    assert await conf.read() is None
    await conf.point(ROUTING)
    text = path.read_text()
    assert text.startswith(BEGIN) and f"nameserver 10.10.0.1\n{END}\n" in text
    assert await conf.read() == ROUTING
    # The host's own nameservers, for everything else (not ours).
    assert conf.upstreams() == [
        line.split()[1]
        for line in original.decode(errors="replace").splitlines()
        if line.startswith("nameserver")
    ]
    await conf.point(ROUTING)  # again: one block, not two
    assert path.read_text().count(BEGIN) == 1
    await conf.point(Routing("10.10.0.1", ("office.internal",)))
    assert (await conf.read()) == Routing("10.10.0.1", ("office.internal",))
    await conf.restore()
    assert path.read_bytes() == original
    assert path.stat().st_mode & 0o777 == 0o640
    await conf.restore()  # nothing of ours: nothing written
    assert path.read_bytes() == original


async def test_a_symlinked_resolv_conf_stays_a_symlink(tmp_path: Path) -> None:
    target = tmp_path / "real.conf"
    target.write_bytes(b"nameserver 192.0.2.53\n")
    link = tmp_path / "resolv.conf"
    link.symlink_to(target)
    conf = ResolvConf(link)
    await conf.point(ROUTING)
    assert link.is_symlink() and target.read_text().startswith(BEGIN)
    await conf.restore()
    assert link.is_symlink() and target.read_bytes() == b"nameserver 192.0.2.53\n"


async def test_an_unwritable_resolv_conf_is_one_clear_error(tmp_path: Path) -> None:
    conf = ResolvConf(tmp_path / "missing" / "resolv.conf")
    with pytest.raises(ResolverError, match="cannot write"):
        await conf.point(ROUTING)


# -- split DNS: systemd-resolved (the commands, on a fake resolvectl) ------------


class FakeResolvectl:
    """resolvectl's per-link settings as systemd-resolved keeps them, printed
    as resolvectl prints them; every call recorded."""

    def __init__(self, links: tuple[str, ...] = ("netmesh0",)) -> None:
        self.calls: list[str] = []
        self.links = {name: {"dns": [], "domain": [], "default-route": "yes"} for name in links}

    async def __call__(self, *args: str) -> str:
        self.calls.append(" ".join(args))
        verb, link, *values = args
        if link not in self.links:
            raise ResolverError(f"resolvectl {' '.join(args)}: Failed to resolve interface")
        settings = self.links[link]
        if verb == "revert":
            settings.update({"dns": [], "domain": [], "default-route": "yes"})
            return ""
        if values:
            settings[verb] = values if verb != "default-route" else values[0]
            return ""
        shown = settings[verb]
        return f"Link 7 ({link}): {' '.join(shown) if isinstance(shown, list) else shown}\n"


async def test_resolved_gets_a_per_link_server_and_routing_domains_only() -> None:
    resolvectl = FakeResolvectl()
    resolved = Resolved("netmesh0", resolvectl, upstream_file=Path("/nonexistent"))
    assert await resolved.read() is None
    await resolved.point(ROUTING)
    assert resolvectl.calls == [
        "dns netmesh0",
        "domain netmesh0",
        "dns netmesh0 10.10.0.1",
        "domain netmesh0 ~lab.internal ~office.internal",
        "default-route netmesh0 false",
    ]
    assert await resolved.read() == ROUTING
    resolvectl.calls.clear()
    await resolved.restore()
    assert resolvectl.calls == ["revert netmesh0"]
    assert await resolved.read() is None
    # A link already gone (agent down after the interface went): nothing to do.
    gone = Resolved("other0", resolvectl, upstream_file=Path("/nonexistent"))
    await gone.restore()
    assert await gone.read() is None


def test_resolved_upstreams_are_its_own_not_its_stub(tmp_path: Path) -> None:
    upstream_file = tmp_path / "resolv.conf"
    upstream_file.write_text("nameserver 192.0.2.53\nnameserver 192.0.2.54\n")
    assert Resolved("netmesh0", FakeResolvectl(), upstream_file).upstreams() == [
        "192.0.2.53",
        "192.0.2.54",
    ]


async def test_an_unreadable_resolv_conf_fails_the_dns_reconciler_only(tmp_path: Path) -> None:
    from agent.dns import AgentDns

    unreadable = tmp_path / "resolv.conf"
    unreadable.mkdir()  # reading it fails (a directory): EISDIR
    dns = AgentDns(ResolvConf(unreadable), DnsServer(lambda: [], port=free_port()))
    try:
        state = await dns.read()  # no exception: the pass goes on
        assert state.routing is None
        with pytest.raises(ResolverError, match="cannot"):
            await dns.point(ROUTING)
    finally:
        await dns.close()
