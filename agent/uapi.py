"""The WireGuard cross-platform UAPI text protocol, as pure functions (no I/O).

Requests and answers are `key=value` lines ended by an empty line. Keys travel as
lowercase hex here, while the rest of netmesh uses base64 (as `wg` does); the
conversion happens only in this module. See https://www.wireguard.com/xplatform/.
"""

from __future__ import annotations

import base64
import binascii
import errno as errno_codes
import ipaddress

from nacl.public import PrivateKey

from agent.backend import BackendError, DeviceState, PeerSpec, PeerState

GET_REQUEST = "get=1\n\n"

# Errors that mean "the request itself is wrong": sending it again cannot help.
_PERMANENT_ERRNOS = frozenset({errno_codes.EINVAL, errno_codes.EPROTO})

_KEY_BYTES = 32


def key_to_hex(key: str) -> str:
    """A base64 WireGuard key as the lowercase hex UAPI wants."""
    try:
        raw = base64.b64decode(key, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise BackendError(f"invalid key {key!r}: not base64", retryable=False) from exc
    if len(raw) != _KEY_BYTES:
        raise BackendError(f"invalid key {key!r}: not 32 bytes", retryable=False)
    return raw.hex()


def hex_to_key(value: str) -> str:
    """A hex UAPI key as base64."""
    try:
        raw = bytes.fromhex(value)
    except ValueError as exc:
        raise BackendError(f"invalid hex key in UAPI answer: {value!r}") from exc
    if len(raw) != _KEY_BYTES:
        raise BackendError(f"invalid key length in UAPI answer: {value!r}")
    return base64.b64encode(raw).decode("ascii")


def public_key_of(private_key: str) -> str:
    """The base64 public key of a base64 private key (curve25519, as `wg pubkey`)."""
    raw = base64.b64decode(private_key)
    return base64.b64encode(bytes(PrivateKey(raw).public_key)).decode("ascii")


def _check_port(name: str, value: int) -> None:
    if not 0 <= value <= 65535:
        raise BackendError(f"{name} out of range: {value}", retryable=False)


def _check_allowed_ip(cidr: str) -> str:
    try:
        # Not strict: wireguard-go masks host bits itself, as `wg set` does.
        ipaddress.ip_network(cidr, strict=False)
    except ValueError as exc:
        raise BackendError(f"invalid allowed IP {cidr!r}", retryable=False) from exc
    return cidr


def _check_endpoint(endpoint: str) -> str:
    # wireguard-go accepts only an IP literal with a port (no DNS names); checking
    # here also keeps a stray newline from injecting lines into the request.
    host, sep, port = endpoint.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host, version = host[1:-1], 6
    else:
        version = 4
    try:
        address = ipaddress.ip_address(host)
        port_number = int(port)
    except ValueError as exc:
        raise BackendError(f"invalid endpoint {endpoint!r}", retryable=False) from exc
    if not sep or address.version != version or not 1 <= port_number <= 65535:
        raise BackendError(f"invalid endpoint {endpoint!r}", retryable=False)
    return endpoint


def check_fwmark(mark: int) -> int:
    """A device fwmark (0 clears it). Raises BackendError(retryable=False)."""
    if not 0 <= mark <= 0xFFFFFFFF:
        raise BackendError(f"invalid fwmark {mark}", retryable=False)
    return mark


def encode_set(
    *,
    private_key: str | None = None,
    listen_port: int | None = None,
    fwmark: int | None = None,
    upsert_peers: tuple[PeerSpec, ...] = (),
    remove_peers: tuple[str, ...] = (),
) -> str:
    """One `set=1` request; the empty string when there is nothing to change.

    Peers not named are left alone (no `replace_peers`), and an upserted peer keeps
    its session: only its allowed IPs (replaced), endpoint and keepalive change.
    Raises BackendError(retryable=False) for malformed input.
    """
    upserted = {peer.public_key for peer in upsert_peers}
    both = upserted.intersection(remove_peers)
    if both:
        raise BackendError(f"peers both upserted and removed: {sorted(both)}", retryable=False)
    lines: list[str] = []
    if private_key is not None:
        lines.append(f"private_key={key_to_hex(private_key)}")
    if listen_port is not None:
        _check_port("listen_port", listen_port)
        lines.append(f"listen_port={listen_port}")
    if fwmark is not None:
        lines.append(f"fwmark={check_fwmark(fwmark)}")
    for public_key in remove_peers:
        lines.append(f"public_key={key_to_hex(public_key)}")
        lines.append("remove=true")
    for peer in upsert_peers:
        lines.append(f"public_key={key_to_hex(peer.public_key)}")
        if peer.endpoint is not None:
            lines.append(f"endpoint={_check_endpoint(peer.endpoint)}")
        _check_port("persistent_keepalive", peer.persistent_keepalive)
        lines.append(f"persistent_keepalive_interval={peer.persistent_keepalive}")
        lines.append("replace_allowed_ips=true")
        lines.extend(f"allowed_ip={_check_allowed_ip(cidr)}" for cidr in peer.allowed_ips)
    if not lines:
        return ""
    return "set=1\n" + "\n".join(lines) + "\n\n"


def _pairs(answer: str) -> list[tuple[str, str]]:
    if not answer.endswith("\n\n"):
        # The device closed the connection mid-answer (e.g. it is shutting down).
        raise BackendError("truncated UAPI answer")
    pairs: list[tuple[str, str]] = []
    for line in answer[:-2].split("\n"):
        key, sep, value = line.partition("=")
        if not sep:
            raise BackendError(f"malformed UAPI line: {line!r}")
        pairs.append((key, value))
    return pairs


def _raise_for_errno(value: str) -> None:
    try:
        code = int(value)
    except ValueError as exc:
        raise BackendError(f"malformed UAPI errno: {value!r}") from exc
    if code != 0:
        # The device sends negated errno values; accept either sign.
        number = abs(code)
        name = errno_codes.errorcode.get(number, "unknown")
        raise BackendError(
            f"WireGuard device error {code} ({name})",
            retryable=number not in _PERMANENT_ERRNOS,
        )


def check_set_answer(answer: str) -> None:
    """Raise BackendError unless the answer to a `set=1` request is `errno=0`."""
    pairs = _pairs(answer)
    if not pairs or pairs[-1][0] != "errno":
        raise BackendError(f"unexpected UAPI answer: {answer!r}")
    _raise_for_errno(pairs[-1][1])


class _PeerBuilder:
    def __init__(self, public_key: str) -> None:
        self.public_key = public_key
        self.allowed_ips: list[str] = []
        self.endpoint: str | None = None
        self.keepalive = 0
        self.handshake_sec = 0
        self.handshake_nsec = 0
        self.rx_bytes = 0
        self.tx_bytes = 0

    def build(self) -> PeerState:
        return PeerState(
            public_key=self.public_key,
            allowed_ips=tuple(sorted(self.allowed_ips)),
            endpoint=self.endpoint,
            persistent_keepalive=self.keepalive,
            last_handshake=self.handshake_sec + self.handshake_nsec / 1e9,
            rx_bytes=self.rx_bytes,
            tx_bytes=self.tx_bytes,
        )


def parse_get(answer: str) -> DeviceState:
    """The `DeviceState` in the answer to `get=1`.

    Peers are sorted by public key (wireguard-go lists them in Go map order, which
    changes between reads); each peer's allowed IPs are sorted as strings.
    Keys the model does not carry (preshared_key, protocol_version) and keys
    unknown to this version are ignored. A nonzero errno raises BackendError.
    """
    public_key: str | None = None
    listen_port = 0
    fwmark = 0
    peers: list[PeerState] = []
    current: _PeerBuilder | None = None
    saw_errno = False
    try:
        for key, value in _pairs(answer):
            if key == "errno":
                _raise_for_errno(value)
                saw_errno = True
            elif key == "public_key":
                if current is not None:
                    peers.append(current.build())
                current = _PeerBuilder(hex_to_key(value))
            elif current is None:
                if key == "private_key":
                    # The device returns the private key only; derive what we expose.
                    public_key = public_key_of(hex_to_key(value))
                elif key == "listen_port":
                    listen_port = int(value)
                elif key == "fwmark":
                    fwmark = int(value)
            elif key == "allowed_ip":
                current.allowed_ips.append(value)
            elif key == "endpoint":
                current.endpoint = value
            elif key == "persistent_keepalive_interval":
                current.keepalive = int(value)
            elif key == "last_handshake_time_sec":
                current.handshake_sec = int(value)
            elif key == "last_handshake_time_nsec":
                current.handshake_nsec = int(value)
            elif key == "rx_bytes":
                current.rx_bytes = int(value)
            elif key == "tx_bytes":
                current.tx_bytes = int(value)
    except ValueError as exc:
        raise BackendError(f"malformed UAPI answer: {exc}") from exc
    if not saw_errno:
        raise BackendError("UAPI answer without errno")
    if current is not None:
        peers.append(current.build())
    peers.sort(key=lambda peer: peer.public_key)
    return DeviceState(
        public_key=public_key, listen_port=listen_port, fwmark=fwmark, peers=tuple(peers)
    )
