"""A WireGuard device, link, firewall and DNS in memory, recording every change.

For unit tests of the agent's logic and for simulating thousands of agents in
one process (the scale benchmark). It honours the same contract as the real
backends (tests/test_backend_contract.py runs against both).
"""

from __future__ import annotations

import base64
import ipaddress
from dataclasses import replace
from typing import Any

from nacl.public import PrivateKey

from agent.backend import BackendError, DeviceState, PeerSpec, PeerState
from agent.dns import DnsState
from agent.dnszone import Zone
from agent.firewall import FAMILY, TABLE, FirewallError, FirewallState, Ruleset, state_of
from agent.link import LinkState
from agent.resolver import Routing


class FakeMachine:
    """One host's kernel, as far as the agent can see: interfaces and a log."""

    def __init__(self) -> None:
        self.devices: dict[str, FakeDevice] = {}
        self.ops: list[str] = []


class FakeDevice:
    def __init__(self, index: int) -> None:
        self.index = index
        self.public_key: str | None = None
        self.listen_port = 0
        self.fwmark = 0
        self.peers: dict[str, PeerState] = {}
        self.mtu = 1420
        self.up = False
        self.addresses: set[str] = set()
        self.routes: set[str] = set()


class FakeBackend:
    def __init__(self, interface: str, machine: FakeMachine | None = None) -> None:
        self.interface = interface
        self.machine = machine or FakeMachine()

    def _device(self) -> FakeDevice:
        device = self.machine.devices.get(self.interface)
        if device is None:
            raise BackendError(f"{self.interface}: no such device")
        return device

    async def exists(self) -> bool:
        return self.interface in self.machine.devices

    async def create(self) -> None:
        if self.interface not in self.machine.devices:
            self.machine.devices[self.interface] = FakeDevice(len(self.machine.devices) + 1)
            self.machine.ops.append(f"create {self.interface}")

    async def destroy(self) -> None:
        if self.machine.devices.pop(self.interface, None) is not None:
            self.machine.ops.append(f"destroy {self.interface}")

    async def read(self) -> DeviceState:
        device = self._device()
        return DeviceState(
            public_key=device.public_key,
            listen_port=device.listen_port,
            fwmark=device.fwmark,
            peers=tuple(device.peers[k] for k in sorted(device.peers)),
        )

    async def configure(
        self,
        *,
        private_key: str | None = None,
        listen_port: int | None = None,
        fwmark: int | None = None,
        upsert_peers: tuple[PeerSpec, ...] = (),
        remove_peers: tuple[str, ...] = (),
    ) -> None:
        device = self._device()
        if private_key is not None:
            raw = base64.b64decode(private_key)
            device.public_key = base64.b64encode(bytes(PrivateKey(raw).public_key)).decode()
            self.machine.ops.append("set private_key")
        if listen_port is not None:
            device.listen_port = listen_port
            self.machine.ops.append(f"set listen_port {listen_port}")
        if fwmark is not None:
            device.fwmark = fwmark
            self.machine.ops.append(f"set fwmark {fwmark}")
        for key in remove_peers:
            if device.peers.pop(key, None) is not None:
                self.machine.ops.append(f"remove peer {key[:8]}")
        for spec in upsert_peers:
            old = device.peers.get(spec.public_key)
            endpoint = (
                spec.endpoint if spec.endpoint is not None else (old.endpoint if old else None)
            )
            device.peers[spec.public_key] = PeerState(
                public_key=spec.public_key,
                allowed_ips=tuple(sorted(str(ipaddress.ip_network(a)) for a in spec.allowed_ips)),
                endpoint=endpoint,
                persistent_keepalive=spec.persistent_keepalive,
                last_handshake=old.last_handshake if old else 0.0,
                rx_bytes=old.rx_bytes if old else 0,
                tx_bytes=old.tx_bytes if old else 0,
            )
            self.machine.ops.append(
                f"{'update' if old else 'add'} peer {spec.public_key[:8]} "
                f"allowed {','.join(spec.allowed_ips)}"
                + (f" endpoint {spec.endpoint}" if spec.endpoint else "")
            )

    async def close(self) -> None:
        return None


class FakeLink:
    """`agent.link.Link` over a FakeMachine."""

    def __init__(self, interface: str, machine: FakeMachine) -> None:
        self.interface = interface
        self.machine = machine

    def _device(self) -> FakeDevice:
        device = self.machine.devices.get(self.interface)
        if device is None:
            raise BackendError(f"{self.interface}: no such link")
        return device

    async def exists(self) -> bool:
        return self.interface in self.machine.devices

    async def state(self) -> LinkState:
        d = self._device()
        return LinkState(
            index=d.index,
            mtu=d.mtu,
            up=d.up,
            addresses=tuple(sorted(d.addresses)),
            routes=tuple(sorted(d.routes)),
        )

    async def set_mtu(self, mtu: int) -> None:
        self._device().mtu = mtu
        self.machine.ops.append(f"link mtu {mtu}")

    async def set_up(self) -> None:
        self._device().up = True
        self.machine.ops.append("link up")

    async def add_address(self, cidr: str) -> None:
        self._device().addresses.add(cidr)
        self.machine.ops.append(f"addr add {cidr}")

    async def remove_address(self, cidr: str) -> None:
        self._device().addresses.discard(cidr)
        self.machine.ops.append(f"addr del {cidr}")

    async def add_route(self, cidr: str) -> None:
        self._device().routes.add(cidr)
        self.machine.ops.append(f"route add {cidr}")

    async def remove_route(self, cidr: str) -> None:
        self._device().routes.discard(cidr)
        self.machine.ops.append(f"route del {cidr}")

    async def delete(self) -> None:
        if self.machine.devices.pop(self.interface, None) is not None:
            self.machine.ops.append(f"link del {self.interface}")

    async def close(self) -> None:
        return None


class FakeDns:
    """`agent.dns.AgentDns` in memory: what the server would serve and the
    resolver would hold, recording each change (the zone's answers are
    tested on `agent.dnszone`, the server and resolvers on real sockets and
    files)."""

    def __init__(self) -> None:
        self.state = DnsState()
        self.ops: list[str] = []

    async def read(self) -> DnsState:
        return self.state

    async def serve(self, addresses: tuple[str, ...], zone: Zone) -> None:
        self.state = replace(self.state, listening=addresses, zone=zone)
        self.ops.append(f"serve dns on {','.join(addresses) or 'nothing'}: {len(zone.names)} names")

    async def point(self, routing: Routing) -> None:
        self.state = replace(self.state, routing=routing)
        self.ops.append(f"point resolver at {routing.server} for {','.join(routing.domains)}")

    async def restore(self) -> None:
        if self.state.routing is not None:
            self.ops.append("restore resolver")
        self.state = replace(self.state, routing=None)

    async def close(self) -> None:
        await self.serve((), Zone())


class FakeFirewall:
    """`agent.firewall.NftFirewall` in memory: a machine's nftables tables, kept
    as nft keeps them, with a verdict for a packet (what the kernel would do).

    It carries out the JSON batches the planner makes (add/delete table, add
    set, chain, rule), each all-or-nothing, and lists its table in nft's JSON
    form, so the read-back goes through the same `state_of` as the real one.
    Tables of other names are someone else's (`add_foreign_table`)."""

    def __init__(self) -> None:
        # (family, name) -> {"sets": {name: [elements]}, "chains": {name: (spec, [rules])}}
        self.tables: dict[tuple[str, str], dict[str, Any]] = {}
        self.ops: list[str] = []
        self.fail: str | None = None  # set to make every call fail, as a missing nft would

    async def read(self) -> FirewallState | None:
        self._check()
        table = self.tables.get((FAMILY, TABLE))
        return None if table is None else state_of(_listing(table))

    async def replace(self, ruleset: Ruleset) -> None:
        self._check()
        self._batch(ruleset.commands)
        self.ops.append(f"replace table {FAMILY} {TABLE} {ruleset.digest[:12]}")

    async def remove(self) -> None:
        self._check()
        if self.tables.pop((FAMILY, TABLE), None) is not None:
            self.ops.append(f"delete table {FAMILY} {TABLE}")

    def add_foreign_table(self, family: str, name: str, rules: int = 1) -> None:
        """Someone else's table, with a base chain holding `rules` accept rules."""
        chain = {"type": "filter", "hook": "input", "prio": 0, "policy": "accept"}
        self.tables[(family, name)] = {
            "sets": {},
            "chains": {"input": (chain, [[{"accept": None}] for _ in range(rules)])},
        }

    def verdict(
        self,
        *,
        iifname: str,
        source: str,
        protocol: str,
        port: int = 0,
        established: bool = False,
    ) -> str:
        """ "accept" or "drop" for one packet arriving (input hook), through every
        table (as in the kernel, a drop anywhere drops). `protocol` is "tcp",
        "udp" or "icmp" (ICMPv6 for an IPv6 source)."""
        address = ipaddress.ip_address(source)
        if protocol == "icmp" and address.version == 6:
            protocol = "ipv6-icmp"
        packet = _Packet(iifname, address, protocol, port, established)
        for table in self.tables.values():
            for spec, rules in table["chains"].values():
                if spec.get("hook") == "input":
                    verdict = _run_chain(table, rules, packet) or spec.get("policy", "accept")
                    if verdict == "drop":
                        return "drop"
        return "accept"

    def _check(self) -> None:
        if self.fail is not None:
            raise FirewallError(self.fail)

    def _batch(self, commands: tuple[dict[str, Any], ...]) -> None:
        tables = {key: _copy_table(t) for key, t in self.tables.items()}
        for command in commands:
            ((verb, body),) = command.items()
            ((kind, spec),) = body.items()
            key = (spec["family"], spec.get("table", spec.get("name")))
            if kind == "table":
                if verb == "add":
                    tables.setdefault(key, {"sets": {}, "chains": {}})
                elif key not in tables:
                    raise FirewallError(f"delete table {key}: No such file or directory")
                else:
                    del tables[key]
                continue
            if key not in tables:
                raise FirewallError(f"add {kind} in {key}: No such file or directory")
            table = tables[key]
            if kind == "set":
                table["sets"][spec["name"]] = list(spec.get("elem", ()))
            elif kind == "chain":
                extra = {k: v for k, v in spec.items() if k not in ("family", "table", "name")}
                table["chains"].setdefault(spec["name"], (extra, []))
            elif kind == "rule":
                if spec["chain"] not in table["chains"]:
                    raise FirewallError(f"add rule: no chain {spec['chain']}")
                for expr in spec["expr"]:
                    right = expr.get("match", {}).get("right")
                    if (
                        isinstance(right, str)
                        and right.startswith("@")
                        and right[1:] not in table["sets"]
                    ):
                        raise FirewallError(f"add rule: no set {right[1:]}")
                rule = list(spec["expr"])
                if "comment" in spec:
                    rule.append({"comment": spec["comment"]})
                table["chains"][spec["chain"]][1].append(rule)
            else:
                raise FirewallError(f"{kind}: not something this fake knows")
        self.tables = tables  # all or nothing, like one nft transaction


class _Packet:
    def __init__(
        self,
        iifname: str,
        source: ipaddress.IPv4Address | ipaddress.IPv6Address,
        protocol: str,
        port: int,
        established: bool,
    ) -> None:
        self.iifname = iifname
        self.source = source
        self.protocol = protocol
        self.port = port
        self.established = established


def _copy_table(table: dict[str, Any]) -> dict[str, Any]:
    return {
        "sets": {name: list(elements) for name, elements in table["sets"].items()},
        "chains": {
            name: (spec, [list(rule) for rule in rules])
            for name, (spec, rules) in table["chains"].items()
        },
    }


def _listing(table: dict[str, Any]) -> dict[str, Any]:
    """The table as `nft -j list table` shows it."""
    items: list[dict[str, Any]] = [{"table": {"family": FAMILY, "name": TABLE}}]
    for name, elements in table["sets"].items():
        items.append({"set": {"family": FAMILY, "table": TABLE, "name": name, "elem": elements}})
    for name, (_, rules) in table["chains"].items():
        items.append({"chain": {"family": FAMILY, "table": TABLE, "name": name}})
        for rule in rules:
            comments = [e["comment"] for e in rule if "comment" in e]
            entry: dict[str, Any] = {"family": FAMILY, "table": TABLE, "chain": name}
            if comments:
                entry["comment"] = comments[0]
            items.append({"rule": entry})
    return {"nftables": items}


def _run_chain(table: dict[str, Any], rules: list[list[dict[str, Any]]], packet: _Packet) -> str:
    """The verdict a chain reaches, or "" when the packet falls through it."""
    for rule in rules:
        for expr in rule:
            if "comment" in expr:
                continue
            if "match" in expr:
                if not _matches(table, expr["match"], packet):
                    break
            elif "jump" in expr:
                verdict = _run_chain(table, table["chains"][expr["jump"]["target"]][1], packet)
                if verdict:
                    return verdict
                break
            elif "accept" in expr:
                return "accept"
            elif "drop" in expr:
                return "drop"
    return ""


def _matches(table: dict[str, Any], match: dict[str, Any], packet: _Packet) -> bool:
    left, right = match["left"], match["right"]
    if "meta" in left and left["meta"]["key"] == "iifname":
        return bool(packet.iifname == right)
    if "meta" in left and left["meta"]["key"] == "l4proto":
        return bool(packet.protocol == right)
    if "ct" in left:
        return packet.established and set(right) <= {"established", "related"}
    payload = left["payload"]
    if payload["field"] == "saddr":
        if payload["protocol"] != ("ip" if packet.source.version == 4 else "ip6"):
            return False
        return any(_in_element(packet.source, e) for e in table["sets"][right[1:]])
    if payload["field"] == "dport":
        if payload["protocol"] != packet.protocol:
            return False
        items = right["set"] if isinstance(right, dict) and "set" in right else [right]
        return any(_port_in(packet.port, item) for item in items)
    raise FirewallError(f"match {match}: not something this fake knows")


def _in_element(address: ipaddress.IPv4Address | ipaddress.IPv6Address, element: Any) -> bool:
    if isinstance(element, str):
        return address == ipaddress.ip_address(element)
    if "prefix" in element:
        prefix = element["prefix"]
        return address in ipaddress.ip_network(f"{prefix['addr']}/{prefix['len']}")
    low, high = (ipaddress.ip_address(a) for a in element["range"])
    return low.version == address.version and low <= address <= high  # type: ignore[operator]


def _port_in(port: int, item: Any) -> bool:
    if isinstance(item, int):
        return port == item
    low, high = item["range"]
    return bool(low <= port <= high)
