"""Golden-text tests of the UAPI encoder and parser (agent/uapi.py)."""

from __future__ import annotations

import pytest

from agent import uapi
from agent.backend import BackendError, DeviceState, PeerSpec, PeerState

# Keys: bytes([n]) * 32 as private keys, and their public keys.
PRIV1 = "AQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQE="
HEX1 = "01" * 32
# What wireguard-go hands back for PRIV1: the curve25519-clamped form.
HEX1_CLAMPED = "00" + "01" * 30 + "41"
PUB1 = "pOCSkrZRwni5dyxWn1+puxPZBrRqtoyd+dwrRAn4ogk="
PUB2 = "zo060cy2M+x7cMF4FKXHbs0CloUFDTRHRboFhw5YfVk="
PUB2_HEX = "ce8d3ad1ccb633ec7b70c17814a5c76ecd029685050d344745ba05870e587d59"
PUB3 = "Xf7dO2vUf2+ijuFdlp1bsOpTd01Ii9r53xxuASSz7yI="
PUB3_HEX = "5dfedd3b6bd47f6fa28ee15d969d5bb0ea53774d488bdaf9df1c6e0124b3ef22"


ENCODE_CASES = [
    pytest.param({}, "", id="nothing"),
    pytest.param(
        {"private_key": PRIV1, "listen_port": 51820},
        f"set=1\nprivate_key={HEX1}\nlisten_port=51820\n\n",
        id="device",
    ),
    pytest.param(
        {
            "upsert_peers": (
                PeerSpec(
                    public_key=PUB2,
                    allowed_ips=("10.0.0.2/32", "fd00::2/128"),
                    endpoint="192.0.2.2:51820",
                    persistent_keepalive=25,
                ),
            )
        },
        "set=1\n"
        f"public_key={PUB2_HEX}\n"
        "endpoint=192.0.2.2:51820\n"
        "persistent_keepalive_interval=25\n"
        "replace_allowed_ips=true\n"
        "allowed_ip=10.0.0.2/32\n"
        "allowed_ip=fd00::2/128\n\n",
        id="peer-full",
    ),
    pytest.param(
        {"upsert_peers": (PeerSpec(public_key=PUB2, allowed_ips=("10.0.0.0/24",)),)},
        "set=1\n"
        f"public_key={PUB2_HEX}\n"
        "persistent_keepalive_interval=0\n"
        "replace_allowed_ips=true\n"
        "allowed_ip=10.0.0.0/24\n\n",
        id="peer-endpoint-untouched",
    ),
    pytest.param(
        {"upsert_peers": (PeerSpec(public_key=PUB2, allowed_ips=(), endpoint="[fd00::9]:1"),)},
        "set=1\n"
        f"public_key={PUB2_HEX}\n"
        "endpoint=[fd00::9]:1\n"
        "persistent_keepalive_interval=0\n"
        "replace_allowed_ips=true\n\n",
        id="peer-no-allowed-ips-v6-endpoint",
    ),
    pytest.param(
        {"remove_peers": (PUB2, PUB3)},
        f"set=1\npublic_key={PUB2_HEX}\nremove=true\npublic_key={PUB3_HEX}\nremove=true\n\n",
        id="remove",
    ),
    pytest.param(
        {
            "listen_port": 0,
            "remove_peers": (PUB3,),
            "upsert_peers": (PeerSpec(public_key=PUB2, allowed_ips=("10.0.0.2/32",)),),
        },
        "set=1\n"
        "listen_port=0\n"
        f"public_key={PUB3_HEX}\n"
        "remove=true\n"
        f"public_key={PUB2_HEX}\n"
        "persistent_keepalive_interval=0\n"
        "replace_allowed_ips=true\n"
        "allowed_ip=10.0.0.2/32\n\n",
        id="mixed",
    ),
]


@pytest.mark.parametrize(("kwargs", "expected"), ENCODE_CASES)
def test_encode_set(kwargs: dict[str, object], expected: str) -> None:
    assert uapi.encode_set(**kwargs) == expected  # type: ignore[arg-type]


BAD_ENCODE_CASES = [
    pytest.param({"private_key": "not base64!"}, id="key-not-base64"),
    pytest.param({"private_key": "AQEB"}, id="key-short"),
    pytest.param({"listen_port": 70000}, id="port-range"),
    pytest.param({"remove_peers": ("zz",)}, id="remove-bad-key"),
    pytest.param(
        {"upsert_peers": (PeerSpec(public_key=PUB2, allowed_ips=("10.0.0.300/32",)),)},
        id="bad-allowed-ip",
    ),
    pytest.param(
        {"upsert_peers": (PeerSpec(public_key=PUB2, allowed_ips=(), endpoint="host:51820"),)},
        id="endpoint-name",
    ),
    pytest.param(
        {"upsert_peers": (PeerSpec(public_key=PUB2, allowed_ips=(), endpoint="fd00::1:51820"),)},
        id="endpoint-v6-without-brackets",
    ),
    pytest.param(
        {
            "upsert_peers": (
                PeerSpec(public_key=PUB2, allowed_ips=(), endpoint="1.2.3.4:1\nremove=true"),
            )
        },
        id="endpoint-injection",
    ),
    pytest.param(
        {"upsert_peers": (PeerSpec(public_key=PUB2, allowed_ips=(), persistent_keepalive=-1),)},
        id="keepalive-range",
    ),
    pytest.param(
        {
            "upsert_peers": (PeerSpec(public_key=PUB2, allowed_ips=()),),
            "remove_peers": (PUB2,),
        },
        id="upsert-and-remove",
    ),
]


@pytest.mark.parametrize("kwargs", BAD_ENCODE_CASES)
def test_encode_set_rejects(kwargs: dict[str, object]) -> None:
    with pytest.raises(BackendError) as info:
        uapi.encode_set(**kwargs)  # type: ignore[arg-type]
    assert info.value.retryable is False


# Shaped like a real wireguard-go 0.0.20220316 answer (captured, then keys replaced).
GET_TWO_PEERS = (
    f"private_key={HEX1_CLAMPED}\n"
    "listen_port=51820\n"
    "fwmark=51\n"
    f"public_key={PUB2_HEX}\n"
    "preshared_key=" + "0" * 64 + "\n"
    "protocol_version=1\n"
    "endpoint=192.0.2.9:51820\n"
    "last_handshake_time_sec=1700000000\n"
    "last_handshake_time_nsec=500000000\n"
    "tx_bytes=1184\n"
    "rx_bytes=92\n"
    "persistent_keepalive_interval=25\n"
    "allowed_ip=fd00::2/128\n"
    "allowed_ip=10.0.0.2/32\n"
    f"public_key={PUB3_HEX}\n"
    "preshared_key=" + "0" * 64 + "\n"
    "protocol_version=1\n"
    "last_handshake_time_sec=0\n"
    "last_handshake_time_nsec=0\n"
    "tx_bytes=0\n"
    "rx_bytes=0\n"
    "persistent_keepalive_interval=0\n"
    "allowed_ip=10.0.0.3/32\n"
    "errno=0\n\n"
)

PARSE_CASES = [
    pytest.param(
        "listen_port=0\nerrno=0\n\n",
        DeviceState(public_key=None, listen_port=0),
        id="empty-device",
    ),
    pytest.param(
        f"private_key={HEX1}\nlisten_port=1\nerrno=0\n\n",
        DeviceState(public_key=PUB1, listen_port=1),
        id="unclamped-key",
    ),
    pytest.param(
        GET_TWO_PEERS,
        DeviceState(
            public_key=PUB1,
            listen_port=51820,
            fwmark=51,
            peers=(
                PeerState(public_key=PUB3, allowed_ips=("10.0.0.3/32",)),
                PeerState(
                    public_key=PUB2,
                    allowed_ips=("10.0.0.2/32", "fd00::2/128"),
                    endpoint="192.0.2.9:51820",
                    persistent_keepalive=25,
                    last_handshake=1700000000.5,
                    rx_bytes=92,
                    tx_bytes=1184,
                ),
            ),
        ),
        id="two-peers-sorted-clamped-key",
    ),
    pytest.param(
        f"listen_port=7\npublic_key={PUB2_HEX}\nendpoint=[fd00::9]:51820\n"
        "some_future_key=1\nerrno=0\n\n",
        DeviceState(
            public_key=None,
            listen_port=7,
            peers=(PeerState(public_key=PUB2, endpoint="[fd00::9]:51820"),),
        ),
        id="v6-endpoint-unknown-key",
    ),
]


def test_parse_get_sorts_peers() -> None:
    # wireguard-go lists peers in Go map order: reads must compare equal anyway.
    first, second = GET_TWO_PEERS.split(f"public_key={PUB3_HEX}\n")
    head, peer2 = first.split(f"public_key={PUB2_HEX}\n")
    peer3, tail = second.split("errno=0\n\n")
    swapped = f"{head}public_key={PUB3_HEX}\n{peer3}public_key={PUB2_HEX}\n{peer2}errno=0\n\n"
    assert uapi.parse_get(swapped) == uapi.parse_get(GET_TWO_PEERS)
    assert tail == ""


@pytest.mark.parametrize(("answer", "expected"), PARSE_CASES)
def test_parse_get(answer: str, expected: DeviceState) -> None:
    assert uapi.parse_get(answer) == expected


BAD_PARSE_CASES = [
    pytest.param("errno=-22\n\n", False, id="einval"),
    pytest.param("errno=-98\n\n", True, id="eaddrinuse-retryable"),
    pytest.param("listen_port=1\n", True, id="truncated"),
    pytest.param("", True, id="empty"),
    pytest.param("listen_port=1\n\n", True, id="no-errno"),
    pytest.param("listen_port\nerrno=0\n\n", True, id="no-equals"),
    pytest.param("listen_port=x\nerrno=0\n\n", True, id="not-a-number"),
    pytest.param("public_key=abcd\nerrno=0\n\n", True, id="short-key"),
]


@pytest.mark.parametrize(("answer", "retryable"), BAD_PARSE_CASES)
def test_parse_get_errors(answer: str, retryable: bool) -> None:
    with pytest.raises(BackendError) as info:
        uapi.parse_get(answer)
    assert info.value.retryable is retryable


@pytest.mark.parametrize(
    ("answer", "error"),
    [
        ("errno=0\n\n", None),
        ("errno=-22\n\n", False),
        ("errno=-98\n\n", True),
        ("errno=0\n", True),
        ("listen_port=1\n\n", True),
    ],
)
def test_check_set_answer(answer: str, error: bool | None) -> None:
    if error is None:
        uapi.check_set_answer(answer)
        return
    with pytest.raises(BackendError) as info:
        uapi.check_set_answer(answer)
    assert info.value.retryable is error


def test_key_round_trip() -> None:
    assert uapi.key_to_hex(PUB2) == PUB2_HEX
    assert uapi.hex_to_key(PUB2_HEX) == PUB2
    assert uapi.public_key_of(PRIV1) == PUB1
