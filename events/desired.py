"""Desired WireGuard state: what the control plane tells one host to be.

This is protocol (see PROTOCOL.md in this folder for its versions): agents of
one version must read what control planes of the next version write. Fields
are only ever added, with defaults.

A host's subject `netmesh.desired.<host>` carries a snapshot (the whole state,
published with a rollup so that it replaces everything before it), then
deltas. Each delta names the revision it applies to (`base`): an agent applies
it only on top of exactly that revision, and on a gap goes back to the snapshot.
"""

from __future__ import annotations

import msgspec

PROTOCOL = 2


class PeerConfig(msgspec.Struct, frozen=True, kw_only=True):
    """One WireGuard peer as the control plane wants it."""

    public_key: str  # base64, as `wg` prints it
    allowed_ips: tuple[str, ...]  # CIDRs, e.g. ("10.10.0.2/32",)
    endpoint: str | None = None  # "ip:port" or "[ipv6]:port"; None when the peer is unreachable
    persistent_keepalive: int = 0  # seconds, 0 = off
    name: str = ""  # for logs and humans; not part of WireGuard config


class InterfaceConfig(msgspec.Struct, frozen=True, kw_only=True):
    """The interface settings of a desired state, sent whole when any changes."""

    addresses: tuple[str, ...]
    listen_port: int
    mtu: int
    # Raised by `netmesh node rotate-key`: an agent holding a lower epoch makes
    # a new WireGuard key and announces it.
    key_epoch: int = 0


class DesiredState(msgspec.Struct, frozen=True, kw_only=True, tag_field="kind", tag="snapshot"):
    """Everything a host's agent needs to configure its interface (a snapshot).

    `revision` is the event-stream sequence this state reflects: agents apply a
    state only when its revision is newer than the one they hold.
    """

    host_id: str
    revision: int
    addresses: tuple[str, ...]  # interface addresses with prefix, e.g. ("10.10.0.1/24",)
    listen_port: int
    mtu: int
    peers: tuple[PeerConfig, ...] = ()
    protocol: int = PROTOCOL
    key_epoch: int = 0

    @classmethod
    def of(
        cls,
        host_id: str,
        revision: int,
        interface: InterfaceConfig,
        peers: tuple[PeerConfig, ...] = (),
    ) -> DesiredState:
        return cls(
            host_id=host_id,
            revision=revision,
            addresses=interface.addresses,
            listen_port=interface.listen_port,
            mtu=interface.mtu,
            peers=peers,
            key_epoch=interface.key_epoch,
        )

    @property
    def interface(self) -> InterfaceConfig:
        return InterfaceConfig(
            addresses=self.addresses,
            listen_port=self.listen_port,
            mtu=self.mtu,
            key_epoch=self.key_epoch,
        )


class DesiredDelta(msgspec.Struct, frozen=True, kw_only=True, tag_field="kind", tag="delta"):
    """What changed in a host's desired state between revision `base` and `revision`.

    Peers are upserted whole (keyed by public key) or removed by public key;
    `interface` is None when the interface settings did not change. An empty
    delta (nothing changed for this host, but its revision moved) keeps the
    chain of revisions unbroken.
    """

    host_id: str
    revision: int
    base: int
    interface: InterfaceConfig | None = None
    upsert: tuple[PeerConfig, ...] = ()
    remove: tuple[str, ...] = ()
    protocol: int = PROTOCOL


DesiredMessage = DesiredState | DesiredDelta


class DeltaMismatch(Exception):
    """A delta that does not apply to the state at hand (a gap in the chain)."""


def apply_delta(state: DesiredState, delta: DesiredDelta) -> DesiredState:
    """The state `delta` leads to from `state`. Raises DeltaMismatch when
    `delta.base` is not `state.revision` or the hosts differ."""
    if delta.host_id != state.host_id or delta.base != state.revision:
        raise DeltaMismatch(
            f"delta {delta.base}->{delta.revision} for {delta.host_id} does not apply to "
            f"revision {state.revision} of {state.host_id}"
        )
    peers = state.peers
    if delta.upsert or delta.remove:
        by_key = {p.public_key: p for p in peers}
        for key in delta.remove:
            by_key.pop(key, None)
        for peer in delta.upsert:
            by_key[peer.public_key] = peer
        peers = tuple(sorted(by_key.values(), key=lambda p: p.public_key))
    return DesiredState.of(state.host_id, delta.revision, delta.interface or state.interface, peers)


desired_encoder = msgspec.json.Encoder()
desired_decoder = msgspec.json.Decoder(DesiredState)
_message_decoder: msgspec.json.Decoder[DesiredState | DesiredDelta] = msgspec.json.Decoder(
    DesiredMessage
)


def decode_message(data: bytes) -> DesiredMessage:
    """A snapshot or a delta; a version-1 state (no `kind`) reads as a snapshot.
    Raises msgspec.DecodeError (ValidationError included) on anything else."""
    try:
        return _message_decoder.decode(data)
    except msgspec.ValidationError as exc:
        if "`kind`" not in str(exc):
            raise
        return desired_decoder.decode(data)


# Header on every desired-state message, so that the control plane can learn
# each host's published revision from a headers-only scan of the stream.
REVISION_HEADER = "Netmesh-Revision"
