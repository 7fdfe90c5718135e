"""KernelBackend: the netlink encoding checked byte by byte against what the kernel
module parses (no module needed), the request flow against a fake socket, the
"no module" paths for real, then real kernel tunnels (marked netns; skipped
without the wireguard module)."""

from __future__ import annotations

import asyncio
import base64
import errno
import os
import socket
import struct
from collections.abc import AsyncIterator, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import msgspec
import pytest
from nacl.public import PrivateKey
from pyroute2.netlink import ctrlmsg
from pyroute2.netlink.exceptions import NetlinkError
from pyroute2.netlink.generic import AsyncGenericNetlinkSocket
from pyroute2.netlink.generic.wireguard import wgmsg

import agent.kernel
from agent.backend import BackendError, DeviceState, PeerSpec, PeerState, WireGuardBackend
from agent.kernel import (
    MAX_MESSAGE_BYTES,
    KernelBackend,
    build_set_messages,
    kernel_wireguard_available,
    parse_get,
)
from tests.netns import (
    Driver,
    Host,
    RemoteError,
    TestNet,
    ping,
    testnet_fixture,  # noqa: F401  (the `testnet` fixture)
)

# From include/uapi/linux/wireguard.h, written out rather than imported: the
# tests check the wire format, not pyroute2's idea of it.
WG_CMD_GET_DEVICE, WG_CMD_SET_DEVICE = 0, 1
(DEV_IFINDEX, DEV_IFNAME, DEV_PRIVATE_KEY, DEV_PUBLIC_KEY) = (1, 2, 3, 4)
(DEV_FLAGS, DEV_LISTEN_PORT, DEV_FWMARK, DEV_PEERS) = (5, 6, 7, 8)
(PEER_UNSPEC, PEER_PUBLIC_KEY, PEER_PRESHARED_KEY, PEER_FLAGS, PEER_ENDPOINT) = (0, 1, 2, 3, 4)
(PEER_KEEPALIVE, PEER_HANDSHAKE, PEER_RX, PEER_TX, PEER_ALLOWEDIPS, PEER_PROTOCOL) = (
    5,
    6,
    7,
    8,
    9,
    10,
)
AIP_FAMILY, AIP_IPADDR, AIP_CIDR = 1, 2, 3
F_REMOVE_ME, F_REPLACE_ALLOWEDIPS = 0x1, 0x2
NLA_F_NESTED = 0x8000
NLM_F_REQUEST, NLM_F_ACK, NLM_F_MULTI, NLM_F_DUMP_INTR = 0x1, 0x4, 0x2, 0x10

K1 = base64.b64encode(bytes(range(32))).decode()
K2 = base64.b64encode(bytes(range(100, 132))).decode()
K3 = base64.b64encode(bytes([0xFF] * 32)).decode()
PRIV = base64.b64encode(bytes(range(200, 232))).decode()


# --- a wire decoder of our own -----------------------------------------------


@dataclass
class Attr:
    type: int
    nested: bool
    length: int  # nla_len: header + payload, without padding
    payload: bytes

    def children(self) -> list[Attr]:
        assert self.nested, f"attribute {self.type} lacks NLA_F_NESTED"
        return attrs_of(self.payload)


def attrs_of(data: bytes) -> list[Attr]:
    out, offset = [], 0
    while offset < len(data):
        length, kind = struct.unpack_from("=HH", data, offset)
        assert length >= 4 and offset + length <= len(data), "attribute overruns"
        out.append(
            Attr(
                kind & 0x3FFF, bool(kind & NLA_F_NESTED), length, data[offset + 4 : offset + length]
            )
        )
        offset += (length + 3) // 4 * 4
    assert offset == len(data), "trailing bytes"
    return out


def leaf(attr: Attr, length: int) -> bytes:
    """A non-nested attribute of an exact nla_len (the kernel's strict policy)."""
    assert not attr.nested, f"attribute {attr.type} has NLA_F_NESTED"
    assert attr.length == length, f"attribute {attr.type}: nla_len {attr.length} != {length}"
    return attr.payload


def sockaddr(payload: bytes) -> str:
    (family,) = struct.unpack_from("=H", payload)
    if family == socket.AF_INET:
        assert len(payload) == 16  # sizeof(struct sockaddr_in)
        port, addr, zero = struct.unpack("!2xH4s8s", payload)
        assert zero == bytes(8)
        return f"{socket.inet_ntop(socket.AF_INET, addr)}:{port}"
    assert family == socket.AF_INET6 and len(payload) == 28  # sizeof(struct sockaddr_in6)
    port, flowinfo, addr, scope = struct.unpack("!2xHI16sI", payload)
    assert (flowinfo, scope) == (0, 0)
    return f"[{socket.inet_ntop(socket.AF_INET6, addr)}]:{port}"


def allowed_ip(attr: Attr) -> str:
    fields = {a.type: a for a in attr.children()}
    assert set(fields) == {AIP_FAMILY, AIP_IPADDR, AIP_CIDR}
    (family,) = struct.unpack("=H", leaf(fields[AIP_FAMILY], 6))
    size = 4 if family == socket.AF_INET else 16
    address = socket.inet_ntop(family, leaf(fields[AIP_IPADDR], 4 + size))
    return f"{address}/{leaf(fields[AIP_CIDR], 5)[0]}"


def peer_view(attr: Attr) -> dict[str, Any]:
    view: dict[str, Any] = {}
    types = [a.type for a in attr.children()]
    assert len(types) == len(set(types)), "an attribute appears twice"
    for a in attr.children():
        if a.type == PEER_PUBLIC_KEY:
            view["public_key"] = base64.b64encode(leaf(a, 36)).decode()
        elif a.type == PEER_FLAGS:
            view["flags"] = struct.unpack("=I", leaf(a, 8))[0]
        elif a.type == PEER_ENDPOINT:
            assert not a.nested
            view["endpoint"] = sockaddr(a.payload)
        elif a.type == PEER_KEEPALIVE:
            view["keepalive"] = struct.unpack("=H", leaf(a, 6))[0]
        elif a.type == PEER_ALLOWEDIPS:
            view["allowed_ips"] = [allowed_ip(item) for item in a.children()]
        else:
            raise AssertionError(f"unexpected peer attribute {a.type}")
    return view


def wire(msg: Any) -> tuple[bytes, dict[str, Any]]:
    """Encode a message as pyroute2 would send it; its bytes and a plain view."""
    msg["header"]["type"] = 0x1D  # the family id, known only at run time
    msg["header"]["flags"] = NLM_F_REQUEST | NLM_F_ACK
    msg.encode()
    data = bytes(msg.data)
    length, _, _, _, _ = struct.unpack_from("=IHHII", data)
    assert length == len(data)
    cmd, version = data[16], data[17]
    assert (cmd, version) == (WG_CMD_SET_DEVICE, 1)
    view: dict[str, Any] = {}
    types = [a.type for a in attrs_of(data[20:])]
    assert len(types) == len(set(types)), "an attribute appears twice"
    for a in attrs_of(data[20:]):
        if a.type == DEV_IFNAME:
            payload = a.payload
            assert payload.endswith(b"\0") and not a.nested  # NLA_NUL_STRING
            view["ifname"] = payload[:-1].decode()
        elif a.type == DEV_PRIVATE_KEY:
            view["private_key"] = base64.b64encode(leaf(a, 36)).decode()
        elif a.type == DEV_LISTEN_PORT:
            view["listen_port"] = struct.unpack("=H", leaf(a, 6))[0]
        elif a.type == DEV_PEERS:
            view["peers"] = [peer_view(item) for item in a.children()]
        else:
            raise AssertionError(f"unexpected device attribute {a.type}")
    return data, view


def views(*args: Any, **kwargs: Any) -> list[dict[str, Any]]:
    return [wire(msg)[1] for msg in build_set_messages(*args, **kwargs)]


# --- set: table ----------------------------------------------------------------

REPLACE = F_REPLACE_ALLOWEDIPS

SET_CASES: list[tuple[str, dict[str, Any], list[dict[str, Any]]]] = [
    ("nothing", {}, []),
    ("private key", {"private_key": PRIV}, [{"ifname": "wg0", "private_key": PRIV}]),
    ("listen port", {"listen_port": 51820}, [{"ifname": "wg0", "listen_port": 51820}]),
    ("port zero", {"listen_port": 0}, [{"ifname": "wg0", "listen_port": 0}]),
    (
        "remove",
        {"remove_peers": (K1, K2)},
        [
            {
                "ifname": "wg0",
                "peers": [
                    {"public_key": K1, "flags": F_REMOVE_ME},
                    {"public_key": K2, "flags": F_REMOVE_ME},
                ],
            }
        ],
    ),
    (
        "upsert ipv4 endpoint",
        {
            "upsert_peers": (
                PeerSpec(
                    public_key=K1,
                    allowed_ips=("10.0.0.2/32", "fd00::2/128", "10.1.0.0/16"),
                    endpoint="192.0.2.1:51820",
                    persistent_keepalive=25,
                ),
            )
        },
        [
            {
                "ifname": "wg0",
                "peers": [
                    {
                        "public_key": K1,
                        "flags": REPLACE,
                        "endpoint": "192.0.2.1:51820",
                        "keepalive": 25,
                        "allowed_ips": ["10.0.0.2/32", "fd00::2/128", "10.1.0.0/16"],
                    }
                ],
            }
        ],
    ),
    (
        "upsert ipv6 endpoint",
        {
            "upsert_peers": (
                PeerSpec(public_key=K2, allowed_ips=("::/0",), endpoint="[2001:db8::1]:65535"),
            )
        },
        [
            {
                "ifname": "wg0",
                "peers": [
                    {
                        "public_key": K2,
                        "flags": REPLACE,
                        "endpoint": "[2001:db8::1]:65535",
                        "keepalive": 0,
                        "allowed_ips": ["::/0"],
                    }
                ],
            }
        ],
    ),
    (
        "endpoint None leaves it alone; no allowed IPs clears them",
        {"upsert_peers": (PeerSpec(public_key=K1, allowed_ips=()),)},
        [{"ifname": "wg0", "peers": [{"public_key": K1, "flags": REPLACE, "keepalive": 0}]}],
    ),
    (
        "host bits dropped",
        {"upsert_peers": (PeerSpec(public_key=K1, allowed_ips=("10.0.0.5/24", "fd00::5/64")),)},
        [
            {
                "ifname": "wg0",
                "peers": [
                    {
                        "public_key": K1,
                        "flags": REPLACE,
                        "keepalive": 0,
                        "allowed_ips": ["10.0.0.0/24", "fd00::/64"],
                    }
                ],
            }
        ],
    ),
    (
        "everything: device first, then removals, then upserts",
        {
            "private_key": PRIV,
            "listen_port": 51821,
            "upsert_peers": (PeerSpec(public_key=K2, allowed_ips=("10.0.0.3/32",)),),
            "remove_peers": (K3,),
        },
        [
            {
                "ifname": "wg0",
                "private_key": PRIV,
                "listen_port": 51821,
                "peers": [
                    {"public_key": K3, "flags": F_REMOVE_ME},
                    {
                        "public_key": K2,
                        "flags": REPLACE,
                        "keepalive": 0,
                        "allowed_ips": ["10.0.0.3/32"],
                    },
                ],
            }
        ],
    ),
]


@pytest.mark.parametrize(
    ("kwargs", "expected"), [c[1:] for c in SET_CASES], ids=[c[0] for c in SET_CASES]
)
def test_set_messages(kwargs: dict[str, Any], expected: list[dict[str, Any]]) -> None:
    assert views("wg0", **kwargs) == expected


def test_set_raw_bytes() -> None:
    """One message spelled out: keys as raw bytes, sockaddr_in in network order."""
    spec = PeerSpec(public_key=K1, allowed_ips=("10.0.0.0/24",), endpoint="192.0.2.1:51820")
    (msg,) = build_set_messages("wg0", listen_port=51820, upsert_peers=(spec,))
    data, _ = wire(msg)
    (peers,) = (a for a in attrs_of(data[20:]) if a.type == DEV_PEERS)
    (peer,) = peers.children()
    fields = {a.type: a.payload for a in peer.children()}
    assert fields[PEER_PUBLIC_KEY] == bytes(range(32))
    assert fields[PEER_ENDPOINT] == (
        struct.pack("=H", socket.AF_INET) + b"\xca\x6c" + bytes([192, 0, 2, 1]) + bytes(8)
    )
    assert data[20:].startswith(struct.pack("=HH", 8, DEV_IFNAME) + b"wg0\0")


def _up(**fields: Any) -> dict[str, Any]:
    """Keyword arguments upserting one peer K1 (no allowed IPs unless given)."""
    return {"upsert_peers": (PeerSpec(**{"public_key": K1, "allowed_ips": (), **fields}),)}


BAD_INPUT: list[tuple[str, dict[str, Any]]] = [
    ("key not base64", {"private_key": "not a key!"}),
    ("key too short", {"remove_peers": (base64.b64encode(bytes(31)).decode(),)}),
    ("port too big", {"listen_port": 65536}),
    ("port negative", {"listen_port": -1}),
    ("keepalive too big", _up(persistent_keepalive=70000)),
    ("bad cidr", _up(allowed_ips=("10.0.0.0/33",))),
    ("not a cidr", _up(allowed_ips=("x",))),
    ("endpoint name", _up(endpoint="example.com:1")),
    ("endpoint no port", _up(endpoint="192.0.2.1")),
    ("endpoint port 0", _up(endpoint="192.0.2.1:0")),
    ("endpoint port +1", _up(endpoint="192.0.2.1:+1")),
    ("v6 unbracketed", _up(endpoint="2001:db8::1:5")),
    ("v4 bracketed", _up(endpoint="[192.0.2.1]:5")),
    ("v6 zone", _up(endpoint="[fe80::1%eth0]:5")),
    ("newline", _up(endpoint="192.0.2.1:5\n")),
    ("both upserted and removed", {**_up(), "remove_peers": (K1,)}),
]


@pytest.mark.parametrize("kwargs", [c[1] for c in BAD_INPUT], ids=[c[0] for c in BAD_INPUT])
def test_set_rejects_bad_input(kwargs: dict[str, Any]) -> None:
    with pytest.raises(BackendError) as info:
        build_set_messages("wg0", **kwargs)
    assert info.value.retryable is False


@pytest.mark.parametrize("name", ["", "a-name-too-long-x"])
def test_set_rejects_bad_interface_name(name: str) -> None:
    with pytest.raises(BackendError):
        build_set_messages(name, listen_port=1)


# --- set: splitting ------------------------------------------------------------


def _key(n: int) -> str:
    return base64.b64encode(n.to_bytes(32, "big")).decode()


def _merge(all_views: list[dict[str, Any]]) -> dict[str, tuple[list[int], list[str], Any]]:
    """Per peer: the flags of each of its entries, all its allowed IPs, its endpoint."""
    merged: dict[str, tuple[list[int], list[str], Any]] = {}
    for view in all_views:
        for peer in view.get("peers", []):
            flags, ips, _ = merged.setdefault(peer["public_key"], ([], [], None))
            flags.append(peer["flags"])
            ips.extend(peer.get("allowed_ips", []))
            if "endpoint" in peer:
                merged[peer["public_key"]] = (flags, ips, peer["endpoint"])
    return merged


def test_many_peers_split_into_messages_that_fit() -> None:
    peers = tuple(
        PeerSpec(
            public_key=_key(n),
            allowed_ips=(f"10.{n // 256}.{n % 256}.0/24", f"fd00::{n:x}/128", "10.255.0.0/16"),
            endpoint=f"[2001:db8::{n:x}]:51820",
            persistent_keepalive=25,
        )
        for n in range(1, 501)
    )
    removed = tuple(_key(n) for n in range(1000, 1200))
    messages = build_set_messages(
        "wg0", private_key=PRIV, listen_port=51820, upsert_peers=peers, remove_peers=removed
    )
    encoded = [wire(msg) for msg in messages]
    sizes = [len(data) for data, _ in encoded]
    assert max(sizes) <= MAX_MESSAGE_BYTES
    assert min(sizes[:-1]) > MAX_MESSAGE_BYTES - 200  # full, not one peer each
    all_views = [view for _, view in encoded]
    assert all(view["ifname"] == "wg0" for view in all_views)
    assert [("private_key" in v, "listen_port" in v) for v in all_views] == [(True, True)] + [
        (False, False)
    ] * (len(all_views) - 1)
    order = [p["public_key"] for v in all_views for p in v["peers"]]
    assert order == [*removed, *(p.public_key for p in peers)]
    merged = _merge(all_views)
    for peer in peers:
        flags, ips, endpoint = merged[peer.public_key]
        assert flags == [REPLACE]
        assert ips == list(peer.allowed_ips)
        assert endpoint == peer.endpoint


def test_a_peer_with_many_allowed_ips_continues_without_replace() -> None:
    ips = (*(f"fd00::{n:x}/128" for n in range(1, 2001)), "10.0.0.0/8")
    spec = PeerSpec(public_key=K1, allowed_ips=ips, endpoint="192.0.2.1:1", persistent_keepalive=5)
    encoded = [wire(msg) for msg in build_set_messages("wg0", upsert_peers=(spec,))]
    assert max(len(data) for data, _ in encoded) <= MAX_MESSAGE_BYTES
    assert len(encoded) == 10  # about 200 IPv6 /128s (40 bytes each) per 8 KiB message
    first, *rest = (view["peers"] for _, view in encoded)
    # Only the first entry replaces and sets endpoint and keepalive; the rest add.
    assert first[0]["flags"] == REPLACE and first[0]["keepalive"] == 5
    assert all(peers == [{**peers[0], "flags": 0}] for peers in rest)
    assert all(set(peers[0]) == {"public_key", "flags", "allowed_ips"} for peers in rest)
    assert _merge([v for _, v in encoded])[K1][1] == list(ips)


# --- get -----------------------------------------------------------------------


def nla(kind: int, payload: bytes) -> bytes:
    length = 4 + len(payload)
    return struct.pack("=HH", length, kind) + payload + bytes(-length % 4)


def nest(kind: int, *parts: bytes) -> bytes:
    return nla(kind | NLA_F_NESTED, b"".join(parts))


@dataclass
class KPeer:
    key: str
    endpoint: tuple[int, str, int] | None = None  # family, address, port
    handshake: tuple[int, int] = (0, 0)
    keepalive: int = 0
    rx: int = 0
    tx: int = 0
    allowed_ips: list[str] = field(default_factory=list)
    pad: bool = False  # nla_put_u64_64bit's alignment pad (WGPEER_A_UNSPEC)
    continuation: bool = False  # only the key and more allowed IPs


def kernel_allowed_ip(cidr: str) -> bytes:
    address, prefix = cidr.split("/")
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    # The kernel's order: cidr, family, address (get_allowedips()).
    return nest(
        0,
        nla(AIP_CIDR, bytes([int(prefix)])),
        nla(AIP_FAMILY, struct.pack("=H", family)),
        nla(AIP_IPADDR, socket.inet_pton(family, address)),
    )


def kernel_peer(peer: KPeer) -> bytes:
    parts = [nla(PEER_PUBLIC_KEY, base64.b64decode(peer.key))]
    if not peer.continuation:
        parts += [
            nla(PEER_PRESHARED_KEY, bytes(32)),
            nla(PEER_HANDSHAKE, struct.pack("=qq", *peer.handshake)),  # __kernel_timespec
            nla(PEER_KEEPALIVE, struct.pack("=H", peer.keepalive)),
            nla(PEER_UNSPEC, b"") if peer.pad else b"",
            nla(PEER_TX, struct.pack("=Q", peer.tx)),
            nla(PEER_RX, struct.pack("=Q", peer.rx)),
            nla(PEER_PROTOCOL, struct.pack("=I", 1)),
        ]
        if peer.endpoint is not None:
            family, address, port = peer.endpoint
            raw = socket.inet_pton(family, address)
            if family == socket.AF_INET:
                addr = struct.pack("=H", family) + struct.pack("!H4s8x", port, raw)
            else:
                addr = struct.pack("=H", family) + struct.pack("!HI16sI", port, 0, raw, 0)
            parts.append(nla(PEER_ENDPOINT, addr))
    if peer.allowed_ips:
        parts.append(nest(PEER_ALLOWEDIPS, *(kernel_allowed_ip(c) for c in peer.allowed_ips)))
    return nest(0, *parts)


def kernel_message(
    peers: list[KPeer],
    *,
    first: bool = True,
    private_key: str | None = None,
    listen_port: int = 51820,
    flags: int = NLM_F_MULTI,
) -> Any:
    """One message of a WG_CMD_GET_DEVICE dump as drivers/net/wireguard/netlink.c
    writes it, decoded by pyroute2's wgmsg as the socket would."""
    parts = []
    if first:
        parts += [
            nla(DEV_LISTEN_PORT, struct.pack("=H", listen_port)),
            nla(DEV_FWMARK, struct.pack("=I", 0)),
            nla(DEV_IFINDEX, struct.pack("=I", 7)),
            nla(DEV_IFNAME, b"wg0\0"),
        ]
        if private_key is not None:
            secret = PrivateKey(base64.b64decode(private_key))
            parts += [
                nla(DEV_PRIVATE_KEY, bytes(secret)),
                nla(DEV_PUBLIC_KEY, bytes(secret.public_key)),
            ]
    if peers:
        parts.append(nest(DEV_PEERS, *(kernel_peer(p) for p in peers)))
    body = bytes([WG_CMD_GET_DEVICE, 1, 0, 0]) + b"".join(parts)
    data = struct.pack("=IHHII", 16 + len(body), 0x1D, flags, 1, 0) + body
    msg = wgmsg(data)
    msg.decode()
    return msg


def public_of(private_key: str) -> str:
    secret = PrivateKey(base64.b64decode(private_key))
    return base64.b64encode(bytes(secret.public_key)).decode()


def test_get_device_without_key_or_peers() -> None:
    state = parse_get([kernel_message([], listen_port=0)])
    assert state == DeviceState(public_key=None, listen_port=0, peers=())


def test_get_realistic_dump() -> None:
    peers = [
        KPeer(
            key=K3,
            endpoint=(socket.AF_INET6, "2001:db8::7", 51820),
            handshake=(1_700_000_000, 250_000_000),
            keepalive=25,
            rx=123_456_789_012,
            tx=42,
            allowed_ips=["fd00::7/128", "10.0.0.7/32", "10.10.0.0/16"],
            pad=True,
        ),
        KPeer(key=K2, allowed_ips=["10.0.0.2/32"]),  # never handshaken, no endpoint
        KPeer(
            key=K1,
            endpoint=(socket.AF_INET, "192.0.2.1", 51820),
            handshake=(1_700_000_100, 0),
            rx=1,
            tx=2,
        ),
    ]
    state = parse_get([kernel_message(peers, private_key=PRIV)])
    assert state == DeviceState(
        public_key=public_of(PRIV),
        listen_port=51820,
        peers=(  # sorted by key as a string: "/" < "A" < "Z"
            PeerState(
                public_key=K3,
                allowed_ips=("10.0.0.7/32", "10.10.0.0/16", "fd00::7/128"),
                endpoint="[2001:db8::7]:51820",
                persistent_keepalive=25,
                last_handshake=1_700_000_000.25,
                rx_bytes=123_456_789_012,
                tx_bytes=42,
            ),
            PeerState(
                public_key=K1,
                endpoint="192.0.2.1:51820",
                last_handshake=1_700_000_100.0,
                rx_bytes=1,
                tx_bytes=2,
            ),
            PeerState(public_key=K2, allowed_ips=("10.0.0.2/32",)),
        ),
    )


def test_get_merges_a_peer_split_across_messages() -> None:
    messages = [
        kernel_message(
            [KPeer(key=K2, keepalive=25, rx=9, allowed_ips=["10.0.0.1/32", "10.0.0.2/32"])],
            private_key=PRIV,
        ),
        kernel_message(
            [
                KPeer(key=K2, allowed_ips=["10.0.0.3/32"], continuation=True),
                KPeer(
                    key=K1, allowed_ips=["fd00::1/128"], endpoint=(socket.AF_INET, "192.0.2.9", 9)
                ),
            ],
            first=False,
        ),
        kernel_message([KPeer(key=K1, allowed_ips=["fd00::/64"], continuation=True)], first=False),
    ]
    state = parse_get(messages)
    assert state.public_key == public_of(PRIV)
    assert state.listen_port == 51820
    assert state.peers == (
        PeerState(public_key=K1, allowed_ips=("fd00::/64", "fd00::1/128"), endpoint="192.0.2.9:9"),
        PeerState(
            public_key=K2,
            allowed_ips=("10.0.0.1/32", "10.0.0.2/32", "10.0.0.3/32"),
            persistent_keepalive=25,
            rx_bytes=9,
        ),
    )


def test_get_refuses_an_interrupted_dump() -> None:
    first = kernel_message([KPeer(key=K1)], private_key=PRIV)
    second = kernel_message([KPeer(key=K2)], first=False, flags=NLM_F_MULTI | NLM_F_DUMP_INTR)
    with pytest.raises(BackendError, match="changed") as info:
        parse_get([first, second])
    assert info.value.retryable is True


def test_get_rejects_malformed_answers() -> None:
    # (pyroute2's decoder already refuses an address whose length does not fit
    # its family, so that cannot reach parse_get.)
    no_cidr = nest(0, nla(AIP_FAMILY, struct.pack("=H", socket.AF_INET)), nla(AIP_IPADDR, bytes(4)))
    no_key = nest(0, nla(PEER_KEEPALIVE, struct.pack("=H", 1)))
    for peer in (nest(0, nla(PEER_PUBLIC_KEY, bytes(32)), nest(PEER_ALLOWEDIPS, no_cidr)), no_key):
        body = bytes([WG_CMD_GET_DEVICE, 1, 0, 0]) + nest(DEV_PEERS, peer)
        msg = wgmsg(struct.pack("=IHHII", 16 + len(body), 0x1D, NLM_F_MULTI, 1, 0) + body)
        msg.decode()
        with pytest.raises(BackendError, match="malformed"):
            parse_get([msg])


# --- the request flow, against a fake socket ------------------------------------


class FakeWireGuard:
    """Stands in for pyroute2's AsyncWireGuard: records, answers from a script."""

    prid = 0x1D

    def __init__(self, script: Script) -> None:
        self.script = script
        self.module_err_level = "error"
        self.closed = False
        script.sockets.append(self)

    async def setup_endpoint(self) -> None:
        if self.script.setup_error is not None:
            raise NetlinkError(self.script.setup_error)

    async def info(self, interface: str) -> AsyncIterator[Any]:
        self.script.requests.append(("get", interface))
        return self._answer(self.script.dump)

    async def nlm_request(self, msg: Any, msg_type: int, msg_flags: int) -> AsyncIterator[Any]:
        msg["header"]["type"], msg["header"]["flags"] = msg_type, msg_flags
        self.script.requests.append(("set", msg))
        return self._answer([])

    async def _answer(self, messages: list[Any]) -> AsyncIterator[Any]:
        if self.script.hang:
            await asyncio.sleep(3600)
        if self.script.error is not None:
            raise NetlinkError(self.script.error)
        for msg in messages:
            yield msg

    def close(self) -> None:
        self.closed = True


@dataclass
class Script:
    setup_error: int | None = None
    error: int | None = None
    hang: bool = False
    dump: list[Any] = field(default_factory=list)
    requests: list[tuple[str, Any]] = field(default_factory=list)
    sockets: list[FakeWireGuard] = field(default_factory=list)


@pytest.fixture
def script(monkeypatch: pytest.MonkeyPatch) -> Iterator[Script]:
    fake = Script()
    monkeypatch.setattr(agent.kernel, "AsyncWireGuard", lambda: FakeWireGuard(fake))
    yield fake
    assert all(s.closed for s in fake.sockets[:-1]), "a replaced socket was left open"


async def test_read_and_configure_share_one_socket(script: Script) -> None:
    script.dump = [kernel_message([KPeer(key=K1, allowed_ips=["10.0.0.1/32"])], private_key=PRIV)]
    wg = KernelBackend("wg0")
    state = await wg.read()
    assert state.public_key == public_of(PRIV)
    assert [p.public_key for p in state.peers] == [K1]
    assert await wg.exists() is True
    await wg.configure()  # nothing to change: nothing sent
    peers = tuple(PeerSpec(public_key=_key(n), allowed_ips=("10.0.0.0/8",)) for n in range(200))
    await wg.configure(listen_port=51820, upsert_peers=peers)
    assert len(script.sockets) == 1
    assert script.sockets[0].module_err_level == "debug"
    sets = [msg for kind, msg in script.requests if kind == "set"]
    assert len(sets) > 1  # split, and sent in order
    assert [p["public_key"] for msg in sets for p in wire(msg)[1]["peers"]] == [
        p.public_key for p in peers
    ]
    assert all(m["header"]["flags"] == NLM_F_REQUEST | NLM_F_ACK for m in sets)
    assert all(m["header"]["type"] == FakeWireGuard.prid for m in sets)
    assert [r for r in script.requests if r[0] == "get"] == [("get", "wg0")] * 2
    await wg.close()
    assert script.sockets[0].closed
    await wg.close()  # idempotent


async def test_bad_input_fails_before_any_io(script: Script) -> None:
    wg: WireGuardBackend = KernelBackend("wg0")  # mypy checks the Protocol here
    with pytest.raises(BackendError):
        await wg.configure(listen_port=1, remove_peers=("nope",))
    assert script.sockets == []


@pytest.mark.parametrize(
    ("code", "retryable", "text"),
    [
        (errno.ENODEV, True, "no such interface"),
        (errno.EOPNOTSUPP, False, "Operation not supported"),
        (errno.EPERM, False, "EPERM"),
        (errno.EINVAL, False, "EINVAL"),
        (errno.ENOMEM, True, "ENOMEM"),
    ],
)
async def test_netlink_errors(script: Script, code: int, retryable: bool, text: str) -> None:
    script.error = code
    wg = KernelBackend("wg0")
    for call in (wg.read, lambda: wg.configure(listen_port=1)):
        with pytest.raises(BackendError, match=text) as info:
            await call()
        assert info.value.retryable is retryable
    assert await wg.exists() is False
    await wg.close()


async def test_missing_family_is_permanent(script: Script) -> None:
    script.setup_error = errno.ENOENT
    wg = KernelBackend("wg0")
    with pytest.raises(BackendError, match="no wireguard kernel module") as info:
        await wg.read()
    assert info.value.retryable is False
    assert all(s.closed for s in script.sockets)
    await wg.close()


async def test_timeout_drops_the_socket(script: Script) -> None:
    script.hang = True
    wg = KernelBackend("wg0", timeout=0.05)
    with pytest.raises(BackendError, match="timed out") as info:
        await wg.read()
    assert info.value.retryable is True
    assert script.sockets[0].closed  # a late answer must not reach the next request
    script.hang = False
    await wg.read()
    assert len(script.sockets) == 2
    await wg.close()


# --- without the module, for real ------------------------------------------------


async def test_a_real_socket_carries_the_set_and_its_error(monkeypatch: pytest.MonkeyPatch) -> None:
    """Our set message through a real generic-netlink socket and the real kernel:
    bound to nlctrl (always there) instead of wireguard, command 1 means
    CTRL_CMD_NEWFAMILY, which the kernel refuses: the error ack must come back
    matched to the request and mapped to a permanent BackendError."""

    async def open_nlctrl() -> Any:
        sock = AsyncGenericNetlinkSocket()
        await sock.bind("nlctrl", ctrlmsg)
        return sock

    monkeypatch.setattr(agent.kernel, "_open_wireguard_socket", open_nlctrl)
    wg = KernelBackend("wg0")
    with pytest.raises(BackendError, match="Operation not supported") as info:
        await wg.configure(listen_port=51820)
    assert info.value.retryable is False
    await wg.close()


async def test_availability_check_answers_without_raising() -> None:
    available = await kernel_wireguard_available()
    assert isinstance(available, bool)
    # The lookup autoloads the module where there is one; after it, the family
    # exists exactly when the module is in (built-in modules with a version, like
    # wireguard, are listed under /sys/module too). Here: no module, False.
    assert available == os.path.isdir("/sys/module/wireguard")


async def test_without_module_everything_fails_cleanly() -> None:
    if await kernel_wireguard_available():
        pytest.skip("the wireguard kernel module is present")
    wg = KernelBackend("nmk0")
    assert await wg.exists() is False
    with pytest.raises(BackendError, match="no wireguard kernel module") as info:
        await wg.read()
    assert info.value.retryable is False
    with pytest.raises(BackendError) as info:
        await wg.configure(listen_port=51820)
    assert info.value.retryable is False
    # rtnetlink refuses the link kind (EOPNOTSUPP), or the caller (EPERM).
    with pytest.raises(BackendError) as info:
        await wg.create()
    assert info.value.retryable is False
    await wg.destroy()  # nothing to delete
    await wg.close()


# --- real kernel tunnels (need root, namespaces and the module) ---------------------


@pytest.fixture
async def kernel_module() -> None:
    if not await kernel_wireguard_available():
        pytest.skip("no wireguard kernel module")


def _keypair() -> tuple[str, str]:
    key = PrivateKey.generate()
    return base64.b64encode(bytes(key)).decode(), base64.b64encode(bytes(key.public_key)).decode()


async def _read(driver: Driver) -> DeviceState:
    return msgspec.convert(await driver.call("wg", "read"), DeviceState)


async def _start(host: Host, private_key: str, address: str, peers: list[PeerSpec]) -> Driver:
    driver = await host.driver()
    await driver.new("wg", "agent.kernel:KernelBackend", "wg0")
    await driver.new("link", "agent.link:Link", "wg0")
    assert await driver.call("wg", "exists") is False
    await driver.call("wg", "create")
    await driver.call("wg", "create")  # idempotent
    await driver.call(
        "wg", "configure", private_key=private_key, listen_port=51820, upsert_peers=peers
    )
    await driver.call("link", "add_address", cidr=address)
    await driver.call("link", "set_up")
    return driver


@pytest.mark.netns
async def test_kernel_tunnel_in_place_changes(kernel_module: None, testnet: TestNet) -> None:
    a, b = await testnet.add_host("a"), await testnet.add_host("b")
    (a_priv, a_pub), (b_priv, b_pub) = _keypair(), _keypair()
    _, c_pub = _keypair()
    to_b = PeerSpec(
        public_key=b_pub,
        allowed_ips=("10.99.0.2/32", "fd99::2/128"),
        endpoint=f"{b.lan_address}:51820",
        persistent_keepalive=25,
    )
    to_c = PeerSpec(public_key=c_pub, allowed_ips=("10.99.0.3/32",), endpoint="[2001:db8::3]:1")
    to_a = PeerSpec(
        public_key=a_pub, allowed_ips=("10.99.0.1/32",), endpoint=f"{a.lan_address}:51820"
    )
    agent_a = await _start(a, a_priv, "10.99.0.1/24", [to_b, to_c])
    agent_b = await _start(b, b_priv, "10.99.0.2/24", [to_a])

    state = await _read(agent_a)
    assert (state.public_key, state.listen_port) == (a_pub, 51820)
    assert [p.public_key for p in state.peers] == sorted([b_pub, c_pub])
    peer_c = next(p for p in state.peers if p.public_key == c_pub)
    assert peer_c.endpoint == "[2001:db8::3]:1"
    assert await ping(a, "10.99.0.2")
    peer_b = next(p for p in (await _read(agent_a)).peers if p.public_key == b_pub)
    assert peer_b.last_handshake > 0 and peer_b.rx_bytes > 0
    assert peer_b.allowed_ips == ("10.99.0.2/32", "fd99::2/128")
    assert peer_b.persistent_keepalive == 25

    # b changes in place: allowed IPs replaced, endpoint left alone, session kept.
    await agent_a.call(
        "wg",
        "configure",
        upsert_peers=[PeerSpec(public_key=b_pub, allowed_ips=("10.99.0.2/32", "10.97.0.0/24"))],
    )
    after = next(p for p in (await _read(agent_a)).peers if p.public_key == b_pub)
    assert after.allowed_ips == ("10.97.0.0/24", "10.99.0.2/32")
    assert after.endpoint == peer_b.endpoint
    assert after.last_handshake == peer_b.last_handshake
    assert after.rx_bytes >= peer_b.rx_bytes
    assert await ping(a, "10.99.0.2")

    await agent_a.call("wg", "configure", remove_peers=[c_pub, c_pub])
    assert [p.public_key for p in (await _read(agent_a)).peers] == [b_pub]

    # close() leaves the interface and its tunnel up.
    await agent_a.call("wg", "close")
    await agent_a.call("link", "close")
    await agent_a.close()
    assert await ping(a, "10.99.0.2")

    await agent_b.call("wg", "destroy")
    assert await agent_b.call("wg", "exists") is False
    await agent_b.call("wg", "destroy")  # idempotent
    await agent_b.close()


@pytest.mark.netns
async def test_kernel_many_peers_round_trip(kernel_module: None, testnet: TestNet) -> None:
    """More than one netlink message each way: the split set and the merged dump,
    with a peer whose allowed IPs span several messages both ways (the set goes on
    without the replace flag; the kernel's dump repeats the peer's key). A second
    set replaces that peer's allowed IPs with fewer, which must drop the rest."""
    host = await testnet.add_host("a")
    driver = await host.driver()
    await driver.new("wg", "agent.kernel:KernelBackend", "wg0")
    await driver.call("wg", "create")
    peers = [
        PeerSpec(
            public_key=_keypair()[1],
            allowed_ips=tuple(sorted(f"10.{n}.{i}.0/24" for i in range(40))),
            endpoint=f"192.0.2.{n % 250 + 1}:{1000 + n}",
            persistent_keepalive=n % 60,
        )
        for n in range(60)
    ]
    big = PeerSpec(
        public_key=_keypair()[1],
        allowed_ips=tuple(sorted(f"fd00::{i:x}/128" for i in range(1, 601))),
        endpoint="[2001:db8::1]:51820",
    )
    assert len(build_set_messages("wg0", upsert_peers=(big,))) > 1
    peers.append(big)

    def entries(peers: Iterable[PeerSpec | PeerState]) -> list[tuple[Any, ...]]:
        return sorted(
            (p.public_key, p.allowed_ips, p.endpoint, p.persistent_keepalive) for p in peers
        )

    await driver.call("wg", "configure", upsert_peers=peers)
    assert entries((await _read(driver)).peers) == entries(peers)
    smaller = msgspec.structs.replace(big, allowed_ips=big.allowed_ips[:3])
    await driver.call("wg", "configure", upsert_peers=[smaller])
    assert entries((await _read(driver)).peers) == entries([*peers[:-1], smaller])
    await driver.call("wg", "destroy")
    await driver.close()


@pytest.mark.netns
async def test_kernel_answers_to_what_goes_wrong(kernel_module: None, testnet: TestNet) -> None:
    """What the module answers where the tests above can only assume it: no such
    interface (retryable: the agent creates it), a link of that name that is not
    WireGuard (permanent), a listen port another interface holds (retryable, and
    refused only once the link is up)."""
    host = await testnet.add_host("a")
    driver = await host.driver()
    await driver.new("wg", "agent.kernel:KernelBackend", "wg0")
    await driver.new("other", "agent.kernel:KernelBackend", "wg1")
    assert await driver.call("wg", "exists") is False
    for method, kwargs in (("read", {}), ("configure", {"listen_port": 51820})):
        with pytest.raises(RemoteError, match="no such interface") as missing:
            await driver.call("wg", method, **kwargs)
        assert missing.value.type_name == "BackendError" and missing.value.retryable is True

    await host.run("ip", "link", "add", "wg0", "type", "dummy")
    assert await driver.call("wg", "exists") is False
    with pytest.raises(RemoteError, match="not usable as WireGuard") as foreign:
        await driver.call("wg", "create")
    assert foreign.value.retryable is False
    await driver.call("wg", "destroy")  # a link of that name is deleted, whatever it is
    assert (await host.run("ip", "link", "show", "wg0", check=False)).returncode != 0

    # The module binds its port when the link is up: on a link that is up, a port
    # another interface holds is refused at once (and the old one kept); on a link
    # that is down, it is taken as given, and bringing the link up fails.
    for name, interface in (("wg", "wg0"), ("other", "wg1")):
        await driver.new(f"{name}-link", "agent.link:Link", interface)
        await driver.call(name, "create")
    await driver.call("wg", "configure", listen_port=51820)
    await driver.call("wg-link", "set_up")
    await driver.call("other", "configure", listen_port=51820)  # down: accepted
    with pytest.raises(RemoteError, match="EADDRINUSE") as taken:
        await driver.call("other-link", "set_up")
    assert taken.value.type_name == "LinkError" and taken.value.retryable is True
    await driver.call("other", "configure", listen_port=51821)
    await driver.call("other-link", "set_up")
    with pytest.raises(RemoteError, match="EADDRINUSE") as taken:
        await driver.call("other", "configure", listen_port=51820)
    assert taken.value.type_name == "BackendError" and taken.value.retryable is True
    assert msgspec.convert(await driver.call("other", "read"), DeviceState).listen_port == 51821
    for name in ("wg", "other"):
        await driver.call(name, "destroy")
        await driver.call(name, "close")
        await driver.call(f"{name}-link", "close")
    await driver.close()
