"""The agent's firewall: the pure planner (golden tables), what its table lets
in (through the fake's packet verdict), the reconciler, and one contract run
against the fake and against real nftables in a network namespace."""

from __future__ import annotations

import re
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, Protocol

import msgspec
import pytest
from nacl.public import PrivateKey

from agent.fake import FakeBackend, FakeFirewall, FakeLink, FakeMachine
from agent.firewall import (
    FirewallControl,
    NftFirewall,
    cached_ruleset_for,
    in_force,
    normalize_allow,
    ruleset_for,
)
from agent.local import interface_down
from agent.reconcile import reconcile
from agent.statedir import private_key_b64, public_key_of
from events.desired import (
    DesiredState,
    FirewallEntry,
    ForwardEntry,
    ForwardRule,
    Sections,
    decode_message,
)
from tests.desired_states import desired_state
from tests.netns import TestNet, require_netns, run

KEY = PrivateKey(bytes(range(32)))


def section(**entries: tuple[str, ...]) -> dict[str, FirewallEntry]:
    """Keys as keyword names: `s10_10_0_5_32=("22/tcp",)` is 10.10.0.5/32 (and
    `fd00__5_128` is fd00::5/128)."""
    return {_cidr(name): FirewallEntry(allow=allow) for name, allow in entries.items()}


def _cidr(name: str) -> str:
    body = name.removeprefix("s")
    address, _, length = body.rpartition("_")
    if "__" in address:
        return address.replace("__", "::").replace("_", ":") + "/" + length
    return address.replace("_", ".") + "/" + length


def render(entries: dict[str, FirewallEntry], interface: str = "nm0") -> list[str]:
    """The ruleset as short lines (sets with their elements, then the rules)."""
    return _lines(ruleset_for(entries, interface).commands)


def _lines(commands: tuple[dict[str, Any], ...]) -> list[str]:
    lines = []
    for command in commands:
        ((verb, body),) = command.items()
        ((kind, spec),) = body.items()
        if kind == "set":
            elements = [e if isinstance(e, str) else _element(e) for e in spec["elem"]]
            lines.append(f"set {spec['name']} ({spec['comment']}): {' '.join(elements)}")
        elif kind == "rule":
            lines.append(f"{spec['chain']}: {' '.join(_expr(e) for e in spec['expr'])}")
        else:
            lines.append(f"{verb} {kind} {spec.get('name', '')}".rstrip())
    return lines


def _element(element: dict[str, Any]) -> str:
    if "prefix" in element:
        return f"{element['prefix']['addr']}/{element['prefix']['len']}"
    return "-".join(element["range"])


def _expr(expr: dict[str, Any]) -> str:
    if "match" in expr:
        left, right = expr["match"]["left"], expr["match"]["right"]
        what = next(iter(left.values()))
        name = what.get("key") or f"{what['protocol']} {what['field']}"
        return f"{name} {msgspec.json.encode(right).decode()}"
    ((verdict, arg),) = expr.items()
    return verdict if arg is None else f"{verdict} {arg['target']}"


# -- the planner -------------------------------------------------------------


def test_golden_ruleset() -> None:
    entries = section(
        s10_10_0_5_32=("22/tcp", "icmp"),
        s10_10_0_4_32=("icmp", "22/tcp"),  # the same list: the same set
        s10_20_0_0_16=("80/tcp", "443/tcp", "8000-8080/tcp", "53/udp"),
        fd00__5_128=("22/tcp", "icmp"),
        s10_30_0_9_32=("any", "22/tcp"),  # any swallows the rest
    )
    assert render(entries) == [
        "add table netmesh",
        "delete table netmesh",
        "add table netmesh",
        "set g0_v4 (80/tcp,443/tcp,8000-8080/tcp,53/udp): 10.20.0.0/16",
        "set g1_v4 (icmp,22/tcp): 10.10.0.4/31",
        "set g1_v6 (icmp,22/tcp): fd00::5",
        "set g2_v4 (any): 10.30.0.9",
        "add chain input",
        "add chain overlay",
        'overlay: state ["established","related"] accept',
        'overlay: ip saddr "@g0_v4" tcp dport {"set":[80,443,{"range":[8000,8080]}]} accept',
        'overlay: ip saddr "@g0_v4" udp dport 53 accept',
        'overlay: ip saddr "@g1_v4" l4proto "icmp" accept',
        'overlay: ip saddr "@g1_v4" tcp dport 22 accept',
        'overlay: ip6 saddr "@g1_v6" l4proto "ipv6-icmp" accept',
        'overlay: ip6 saddr "@g1_v6" tcp dport 22 accept',
        'overlay: ip saddr "@g2_v4" accept',
        "overlay: drop",
        'input: iifname "nm0" jump overlay',
    ]
    ruleset = ruleset_for(entries, "nm0")
    assert (ruleset.sources, ruleset.groups, ruleset.skipped) == (5, 3, ())
    assert ruleset.shape.rules == (("input", 1), ("overlay", 9))
    jump = ruleset.commands[-1]["add"]["rule"]
    assert jump["comment"] == f"netmesh {ruleset.digest}"


def test_an_empty_section_lets_replies_in_and_nothing_new() -> None:
    assert render({})[-4:] == [
        "add chain overlay",
        'overlay: state ["established","related"] accept',
        "overlay: drop",
        'input: iifname "nm0" jump overlay',
    ]


@pytest.mark.parametrize(
    ("specs", "normal"),
    [
        (("22/tcp",), "22/tcp"),
        (("81/tcp", "80/tcp", "79-80/tcp", "100-200/tcp", "150-160/tcp"), "79-81/tcp,100-200/tcp"),
        (("53/udp", "53/tcp", "icmp", "icmp"), "icmp,53/tcp,53/udp"),
        (("icmp", "any"), "any"),
        ((), ""),
    ],
)
def test_allow_lists_are_normalized(specs: tuple[str, ...], normal: str) -> None:
    assert str(normalize_allow(specs)) == normal
    assert normalize_allow(specs) == normalize_allow(reversed(specs))


def test_deterministic_whatever_the_order() -> None:
    entries = section(s10_0_0_1_32=("22/tcp",), s10_0_0_2_32=("80/tcp",), fd00__1_128=("icmp",))
    backwards = dict(reversed(list(entries.items())))
    assert ruleset_for(entries, "nm0") == ruleset_for(backwards, "nm0")
    assert ruleset_for(entries, "nm0").digest != ruleset_for(entries, "nm1").digest
    changed = {**entries, "10.0.0.2/32": FirewallEntry(allow=("81/tcp",))}
    assert ruleset_for(entries, "nm0").digest != ruleset_for(changed, "nm0").digest


def test_overlapping_and_adjacent_sources_are_collapsed() -> None:
    entries = section(
        s10_20_0_0_16=("22/tcp",),
        s10_20_1_5_32=("22/tcp",),  # inside the /16
        s10_20_1_5_24=("22/tcp",),  # host bits set: taken as its network
        s10_21_0_0_16=("22/tcp",),  # adjacent: 10.20.0.0/15
        s10_9_0_1_32=("22/tcp",),
        s10_9_0_3_32=("22/tcp",),  # not adjacent to .1: two elements
    )
    assert render(entries)[3] == "set g0_v4 (22/tcp): 10.9.0.1 10.9.0.3 10.20.0.0/15"


def test_malformed_entries_are_left_out_and_named() -> None:
    entries = {
        "10.0.0.1/32": FirewallEntry(allow=("22/tcp",)),
        "not-a-cidr": FirewallEntry(allow=("22/tcp",)),
        "10.0.0.2/32": FirewallEntry(allow=("99999/tcp",)),
        "10.0.0.3/32": FirewallEntry(allow=()),  # nothing allowed: nothing to add
    }
    ruleset = ruleset_for(entries, "nm0")
    assert [s.split(":")[0] for s in ruleset.skipped] == ["10.0.0.2/32", "not-a-cidr"]
    assert ruleset.sources == 1
    assert "1 sources in 1 allow lists, 4 rules, 2 skipped" in str(ruleset)


def test_thousands_of_sources_stay_a_few_rules() -> None:
    lists = [(f"{1000 + n}/tcp", "icmp") for n in range(50)]
    entries = {
        f"10.{n >> 8 & 255}.{n & 255}.{n % 7}/32": FirewallEntry(allow=lists[n % 50])
        for n in range(5000)
    }
    entries |= {f"fd00::{n:x}/128": FirewallEntry(allow=lists[n % 50]) for n in range(5000)}
    start = time.perf_counter()
    ruleset = ruleset_for(entries, "nm0")
    took = time.perf_counter() - start
    assert ruleset.sources == 10000 and ruleset.groups == 50
    # established + drop, and per allow list and family: icmp and tcp.
    assert dict(ruleset.shape.rules)["overlay"] == 2 + 50 * 2 * 2
    assert took < 2.0, took
    # The same section object again (an unchanged section): not made again.
    assert cached_ruleset_for(entries, "nm0") is cached_ruleset_for(entries, "nm0")
    assert cached_ruleset_for(entries, "nm0") == ruleset
    assert cached_ruleset_for(entries, "nm1").digest != ruleset.digest


# -- what the table lets in (the fake's verdict, which the netns test checks
# against the kernel for the same kinds of packet) ------------------------------

POLICY = section(
    s10_10_0_5_32=("22/tcp", "icmp"),
    s10_20_0_0_16=("8000-8080/tcp", "53/udp"),
    fd00__5_128=("443/tcp",),
    s10_10_0_9_32=("any",),
)


@pytest.mark.parametrize(
    ("iifname", "source", "protocol", "port", "established", "verdict"),
    [
        ("nm0", "10.10.0.5", "tcp", 22, False, "accept"),
        ("nm0", "10.10.0.5", "tcp", 23, False, "drop"),  # a denied port
        ("nm0", "10.10.0.5", "udp", 22, False, "drop"),  # tcp only
        ("nm0", "10.10.0.5", "icmp", 0, False, "accept"),
        ("nm0", "10.10.0.6", "tcp", 22, False, "drop"),  # a denied source
        ("nm0", "10.10.0.6", "tcp", 22, True, "accept"),  # a reply to what we opened
        ("nm0", "10.20.3.4", "tcp", 8080, False, "accept"),  # a range of sources and ports
        ("nm0", "10.20.3.4", "tcp", 8081, False, "drop"),
        ("nm0", "10.20.3.4", "udp", 53, False, "accept"),
        ("nm0", "10.20.3.4", "icmp", 0, False, "drop"),
        ("nm0", "fd00::5", "tcp", 443, False, "accept"),
        ("nm0", "fd00::5", "icmp", 0, False, "drop"),  # ICMPv6 not allowed for it
        ("nm0", "fd00::6", "tcp", 443, False, "drop"),
        ("nm0", "10.10.0.9", "udp", 9999, False, "accept"),  # any
        ("eth0", "10.10.0.6", "tcp", 22, False, "accept"),  # other interfaces: untouched
        ("lo", "fd00::6", "udp", 1, False, "accept"),
    ],
)
async def test_what_the_table_lets_in(
    iifname: str, source: str, protocol: str, port: int, established: bool, verdict: str
) -> None:
    firewall = FakeFirewall()
    await firewall.replace(ruleset_for(POLICY, "nm0"))
    packet = dict(iifname=iifname, source=source, protocol=protocol, port=port)
    assert firewall.verdict(**packet, established=established) == verdict  # type: ignore[arg-type]


async def test_a_v3_snapshot_lets_everything_in() -> None:
    old = {"kind": "snapshot", "host_id": "h", "revision": 3, "protocol": 3, "sections": {}}
    desired = decode_message(msgspec.json.encode(old))
    assert isinstance(desired, DesiredState)
    firewall = FakeFirewall()
    await firewall.replace(ruleset_for(desired.sections.firewall, "nm0"))
    for source in ("10.1.2.3", "fd00::77"):
        for protocol in ("tcp", "udp", "icmp"):
            assert firewall.verdict(iifname="nm0", source=source, protocol=protocol, port=9) == (
                "accept"
            )


# -- the reconciler ---------------------------------------------------------------


async def one_pass(
    machine: FakeMachine, firewall: FirewallControl, entries: dict[str, FirewallEntry]
) -> dict[str, Any]:
    desired = desired_state(addresses=("10.10.0.1/24",))
    desired = msgspec.structs.replace(
        desired, sections=msgspec.structs.replace(desired.sections, firewall=entries)
    )
    result = await reconcile(
        desired,
        FakeBackend("nm0", machine),
        FakeLink("nm0", machine),
        firewall=firewall,
        public_key=public_key_of(KEY),
        private_key=private_key_b64(KEY),
        previous={},
    )
    return {
        "ops": {o.name: [str(op) for op in o.ops] for o in result.outcomes if o.ops},
        "errors": result.errors(),
    }


async def test_the_reconciler_installs_once_and_repairs_drift() -> None:
    machine, firewall = FakeMachine(), FakeFirewall()
    first = await one_pass(machine, firewall, POLICY)
    ruleset = ruleset_for(POLICY, "nm0")
    # Before the interface: whatever the pass brings up meets the filter.
    assert list(first["ops"]) == ["firewall", "interface", "link"]
    assert first["ops"]["firewall"] == [f"replace firewall on nm0: {ruleset}"]
    assert (await one_pass(machine, firewall, POLICY))["ops"] == {}
    # A rule deleted by hand: the shape differs, the table is put back.
    firewall.tables[("inet", "netmesh")]["chains"]["overlay"][1].pop(1)
    assert list((await one_pass(machine, firewall, POLICY))["ops"]) == ["firewall"]
    assert (await one_pass(machine, firewall, POLICY))["ops"] == {}
    # A new policy: replaced; an empty one still installs a table.
    assert list((await one_pass(machine, firewall, {}))["ops"]) == ["firewall"]
    assert await firewall.read() is not None
    assert firewall.verdict(iifname="nm0", source="10.10.0.5", protocol="tcp", port=22) == "drop"


async def test_a_failing_firewall_is_reported_and_the_others_still_run() -> None:
    machine, firewall = FakeMachine(), FakeFirewall()
    firewall.fail = "cannot run /usr/sbin/nft: No such file or directory"
    result = await one_pass(machine, firewall, POLICY)
    assert result["errors"] == {
        "firewall": f"replace firewall on nm0: {ruleset_for(POLICY, 'nm0')}: {firewall.fail}"
    }
    assert set(result["ops"]) == {"firewall", "interface", "link"}
    assert machine.devices["nm0"].addresses == {"10.10.0.1/24"}
    firewall.fail = None
    assert (await one_pass(machine, firewall, POLICY))["errors"] == {}


async def test_a_missing_nft_is_a_firewall_error() -> None:
    machine = FakeMachine()
    firewall = NftFirewall(["/nonexistent/nft"])
    desired = msgspec.structs.replace(desired_state(), sections=Sections(firewall=POLICY))
    result = await reconcile(
        desired,
        FakeBackend("nm0", machine),
        FakeLink("nm0", machine),
        firewall=firewall,
        public_key=public_key_of(KEY),
        private_key=private_key_b64(KEY),
        previous={},
    )
    assert result.actual.firewall_error is not None
    assert "cannot run /nonexistent/nft" in result.errors()["firewall"]
    assert "nm0" in machine.devices  # the interface was still made


# -- one contract, two firewalls ----------------------------------------------------


class Machine(Protocol):
    """A firewall and a way to see someone else's table beside ours."""

    firewall: FirewallControl

    async def add_foreign_table(self) -> None: ...

    async def foreign_rules(self) -> int | None:
        """Rules in `table inet other`, None if it is gone."""
        ...


class FakeSide:
    def __init__(self) -> None:
        self.fake = FakeFirewall()
        self.firewall: FirewallControl = self.fake

    async def add_foreign_table(self) -> None:
        self.fake.add_foreign_table("inet", "other", rules=2)

    async def foreign_rules(self) -> int | None:
        table = self.fake.tables.get(("inet", "other"))
        return None if table is None else sum(len(r) for _, r in table["chains"].values())


class RealSide:
    def __init__(self, netns: str) -> None:
        self.nft = ("ip", "netns", "exec", netns, "nft")
        self.firewall: FirewallControl = NftFirewall(self.nft)

    async def add_foreign_table(self) -> None:
        await run(*self.nft, "add", "table", "inet", "other")
        await run(
            *self.nft,
            *("add", "chain", "inet", "other", "input"),
            "{ type filter hook input priority 10 ; policy accept ; }",
        )
        await run(*self.nft, "add", "rule", "inet", "other", "input", "tcp", "dport", "9", "accept")
        await run(*self.nft, "add", "rule", "inet", "other", "input", "udp", "dport", "9", "accept")

    async def foreign_rules(self) -> int | None:
        listed = await run(*self.nft, "-j", "list", "table", "inet", "other", check=False)
        if listed.returncode != 0:
            return None
        return sum("rule" in item for item in msgspec.json.decode(listed.stdout)["nftables"])


@pytest.fixture(params=["fake", pytest.param("real", marks=pytest.mark.netns)])
async def machine(request: pytest.FixtureRequest) -> AsyncIterator[Machine]:
    if request.param == "fake":
        yield FakeSide()
        return
    require_netns()
    async with TestNet() as net:
        host = await net.add_host("fw")
        yield RealSide(host.netns)


SECTIONS = [
    POLICY,
    {},
    section(s10_20_0_0_16=("22/tcp",), s10_20_1_5_32=("22/tcp",), s10_21_0_0_16=("22/tcp",)),
    {"0.0.0.0/0": FirewallEntry(allow=("any",)), "::/0": FirewallEntry(allow=("any",))},
    {
        **{f"10.1.{n >> 8}.{n & 255}/32": FirewallEntry(allow=("22/tcp",)) for n in range(300)},
        **{f"fd00::{n:x}/128": FirewallEntry(allow=("1-1024/udp", "icmp")) for n in range(300)},
        "10.2.0.1/32": FirewallEntry(allow=("1-100/tcp", "50-200/tcp", "9000/udp")),
    },
]


async def test_contract_replace_read_remove(machine: Machine) -> None:
    firewall = machine.firewall
    assert await firewall.read() is None
    await firewall.remove()  # no table: fine
    await machine.add_foreign_table()
    for entries in [*SECTIONS, SECTIONS[0]]:
        ruleset = ruleset_for(entries, "t0")
        await firewall.replace(ruleset)
        # What is read back is what was installed: no false diff.
        assert in_force(await firewall.read(), ruleset), entries
        await firewall.replace(ruleset)  # again: the same
        assert in_force(await firewall.read(), ruleset)
        assert await machine.foreign_rules() == 2
    assert not in_force(await firewall.read(), ruleset_for({}, "t0"))
    await firewall.remove()
    assert await firewall.read() is None
    await firewall.remove()
    assert await machine.foreign_rules() == 2


GATEWAY = {
    "192.168.1.0/24": ForwardEntry(
        nat=True,
        rules=(
            ForwardRule(sources=("10.10.0.0/24",), destination="192.168.1.0/24", allow=("any",)),
        ),
    ),
    "172.16.0.0/16": ForwardEntry(
        nat=False,
        rules=(
            ForwardRule(
                sources=("10.10.0.5/32", "10.10.0.6/32"),
                destination="172.16.4.0/24",
                allow=("22/tcp", "icmp", "53/udp"),
            ),
            ForwardRule(sources=("10.10.0.0/28",), destination="172.16.0.0/16", allow=("443/tcp",)),
        ),
    ),
}


# An ingress gateway's client under a policy: only what the rules allow reaches it.
CLIENT = {
    "10.10.0.9/32": ForwardEntry(
        nat=False,
        rules=(
            ForwardRule(sources=("10.10.0.5/32",), destination="10.10.0.9/32", allow=("22/tcp",)),
        ),
        exclusive=True,
    ),
}


async def test_contract_a_gateway_table_reads_back_as_installed(machine: Machine) -> None:
    cases: list[tuple[dict[str, ForwardEntry], tuple[str, ...]]] = [
        (GATEWAY, ("t1",)),
        (GATEWAY, ()),
        ({**GATEWAY, **CLIENT}, ()),
        ({}, ()),
    ]
    for forward, guarded in cases:
        ruleset = ruleset_for(POLICY, "t0", forward, ("10.10.0.0/24",), guarded)
        await machine.firewall.replace(ruleset)
        assert in_force(await machine.firewall.read(), ruleset), (forward, guarded)
    await machine.firewall.remove()


def test_golden_gateway_chains() -> None:
    two = '{"set":["10.10.0.5","10.10.0.6"]}'
    lines = render_gateway(GATEWAY, guarded=("eth1",))
    assert [line for line in lines if line.startswith(("forward", "egress", "masquerade"))] == [
        'forward: iifname "nm0" jump egress',
        'forward: oifname "nm0" state ["established","related"] accept',
        'forward: oifname "nm0" drop',
        'forward: iifname "eth1" drop',
        'egress: state ["established","related"] accept',
        f'egress: ip saddr {two} ip daddr 172.16.4.0/24 l4proto "icmp" accept',
        f"egress: ip saddr {two} ip daddr 172.16.4.0/24 tcp dport 22 accept",
        f"egress: ip saddr {two} ip daddr 172.16.4.0/24 udp dport 53 accept",
        "egress: ip saddr 10.10.0.0/28 ip daddr 172.16.0.0/16 tcp dport 443 accept",
        "egress: ip saddr 10.10.0.0/24 ip daddr 192.168.1.0/24 accept",
        "egress: drop",
        "masquerade: ip saddr 10.10.0.0/24 ip daddr 192.168.1.0/24 masquerade",
    ]
    # A host that forwards nothing has no forward chain: the table as before.
    assert render(POLICY) == render_gateway({}, guarded=())
    # An exclusive entry (an ingress gateway's client) comes first, closed by a drop.
    lines = render_gateway({**GATEWAY, **CLIENT}, guarded=())
    assert [line for line in lines if line.startswith("egress")][1:3] == [
        'egress: ip saddr "10.10.0.5" ip daddr "10.10.0.9" tcp dport 22 accept',
        'egress: ip daddr "10.10.0.9" drop',
    ]


def render_gateway(forward: dict[str, ForwardEntry], guarded: tuple[str, ...]) -> list[str]:
    ruleset = ruleset_for(POLICY, "nm0", forward, ("10.10.0.0/24",), guarded)
    prefix = re.compile(r'\{"prefix":\{"addr":"([^"]+)","len":(\d+)\}\}')
    return [prefix.sub(r"\1/\2", line) for line in _lines(ruleset.commands)]


async def test_contract_a_refused_batch_changes_nothing(machine: Machine) -> None:
    firewall = machine.firewall
    good = ruleset_for(POLICY, "t0")
    await firewall.replace(good)
    broken = msgspec.structs.replace(
        good,
        commands=(*good.commands, {"add": {"rule": {**_OVERLAY, "expr": [_NO_SUCH_SET]}}}),
    )
    with pytest.raises(Exception, match="set"):
        await firewall.replace(broken)
    assert in_force(await firewall.read(), good)


_OVERLAY = {"family": "inet", "table": "netmesh", "chain": "overlay"}
_NO_SUCH_SET = {
    "match": {"op": "==", "left": {"payload": {"protocol": "ip", "field": "saddr"}}, "right": "@x"}
}


async def test_contract_agent_down_removes_only_our_table(machine: Machine, tmp_path: Path) -> None:
    await machine.add_foreign_table()
    await machine.firewall.replace(ruleset_for(POLICY, "t0"))
    # No such interface here: down still takes the table away.
    assert await interface_down(tmp_path, "nmt-absent0", firewall=machine.firewall) is False
    assert await machine.firewall.read() is None
    assert await machine.foreign_rules() == 2


async def test_without_nft_a_network_without_a_policy_still_applies() -> None:
    """Nothing to filter (every entry allows any): a host without nftables is
    not failing; one that must filter is."""
    machine = FakeMachine()
    open_network = {"10.10.0.0/24": FirewallEntry(allow=("any",))}
    for section, failing in ((open_network, False), (POLICY, True)):
        result = await one_pass(machine, NftFirewall(["/nonexistent/nft"]), section)
        assert ("firewall" in result["errors"]) is failing
