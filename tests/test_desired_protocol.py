"""The desired-state wire format (protocol 5, events/PROTOCOL.md): sections,
deltas per section, and what older and newer peers of the protocol get."""

from __future__ import annotations

import pytest

from events.desired import (
    PROTOCOL,
    WIREGUARD,
    DesiredDelta,
    DesiredState,
    DnsEntry,
    DnsZoneEntry,
    FirewallEntry,
    InterfaceEntry,
    PeerEntry,
    Sections,
    UnknownSection,
    apply_delta,
    decode_message,
    desired_encoder,
)
from tests.desired_states import desired_state

V2_SNAPSHOT = (
    b'{"kind":"snapshot","host_id":"h1","revision":7,"addresses":["10.0.0.1/24"],'
    b'"listen_port":51821,"mtu":1380,"key_epoch":2,"protocol":2,"peers":['
    b'{"public_key":"K1","allowed_ips":["10.0.0.2/32"],"endpoint":"192.0.2.2:51820",'
    b'"persistent_keepalive":25,"name":"two"}]}'
)
V2_DELTA = (
    b'{"kind":"delta","host_id":"h1","revision":9,"base":7,"protocol":2,'
    b'"interface":{"addresses":["10.0.0.1/24"],"listen_port":51999,"mtu":1380,"key_epoch":2},'
    b'"upsert":[{"public_key":"K3","allowed_ips":["10.0.0.3/32"]}],"remove":["K1"]}'
)


def test_a_version_2_snapshot_and_delta_read_as_today() -> None:
    snapshot = decode_message(V2_SNAPSHOT)
    assert snapshot == desired_state(
        host_id="h1",
        revision=7,
        addresses=("10.0.0.1/24",),
        listen_port=51821,
        mtu=1380,
        key_epoch=2,
        peers=[
            (
                "K1",
                PeerEntry(
                    allowed_ips=("10.0.0.2/32",),
                    endpoint="192.0.2.2:51820",
                    persistent_keepalive=25,
                    name="two",
                ),
            )
        ],
        # Before version 4 everything arriving on the overlay was let in.
        firewall=[("0.0.0.0/0", ("any",)), ("::/0", ("any",))],
    )
    delta = decode_message(V2_DELTA)
    assert isinstance(snapshot, DesiredState) and isinstance(delta, DesiredDelta)
    after = apply_delta(snapshot, delta)
    assert after.revision == 9
    assert after.interface == InterfaceEntry(listen_port=51999, mtu=1380, key_epoch=2)
    assert after.addresses == ("10.0.0.1/24",)
    assert after.peers == {"K3": PeerEntry(allowed_ips=("10.0.0.3/32",))}


def test_a_version_3_snapshot_lets_everything_in_and_its_deltas_leave_the_firewall() -> None:
    v3 = (
        b'{"kind":"snapshot","host_id":"h1","revision":7,"protocol":3,"sections":{'
        b'"addresses":{"10.0.0.1/24":{"network":"n"}}}}'
    )
    snapshot = decode_message(v3)
    assert isinstance(snapshot, DesiredState)
    assert snapshot.sections.firewall == {
        "0.0.0.0/0": FirewallEntry(allow=("any",)),
        "::/0": FirewallEntry(allow=("any",)),
    }
    delta = decode_message(
        b'{"kind":"delta","host_id":"h1","revision":8,"base":7,"protocol":3,'
        b'"upsert":{"peers":{"K":{"allowed_ips":["10.0.0.2/32"]}}}}'
    )
    assert isinstance(delta, DesiredDelta)
    assert apply_delta(snapshot, delta).sections.firewall == snapshot.sections.firewall


def test_a_version_4_message_has_no_names_and_no_zones() -> None:
    v4 = (
        b'{"kind":"snapshot","host_id":"h1","revision":7,"protocol":4,"sections":{'
        b'"firewall":{"10.0.0.0/24":{"allow":["any"]}}}}'
    )
    snapshot = decode_message(v4)
    assert isinstance(snapshot, DesiredState) and snapshot.protocol == PROTOCOL
    assert snapshot.sections.dns == {} and snapshot.sections.dns_zones == {}
    assert snapshot.sections.firewall == {"10.0.0.0/24": FirewallEntry(allow=("any",))}
    delta = decode_message(
        b'{"kind":"delta","host_id":"h1","revision":8,"base":7,"protocol":4,'
        b'"upsert":{"peers":{"K":{"allowed_ips":["10.0.0.2/32"]}}}}'
    )
    assert isinstance(delta, DesiredDelta) and delta.upsert.dns == {}


def test_dns_entries_round_trip_with_only_what_they_hold() -> None:
    state = DesiredState(
        host_id="h",
        revision=3,
        sections=Sections(
            dns={"web.office.internal": DnsEntry(a=("10.0.0.2",))},
            dns_zones={"office.internal": DnsZoneEntry(network="office")},
        ),
    )
    wire = desired_encoder.encode(state)
    assert b'"aaaa"' not in wire and b'"cname"' not in wire
    assert decode_message(wire) == state


def test_a_snapshot_round_trips_and_a_delta_touches_only_its_sections() -> None:
    state = desired_state(addresses=("10.0.0.1/24",), peers=[("K1", PeerEntry(allowed_ips=()))])
    assert decode_message(desired_encoder.encode(state)) == state
    delta = DesiredDelta(
        host_id="h",
        revision=6,
        base=5,
        upsert=Sections(interface={WIREGUARD: InterfaceEntry(listen_port=1, mtu=1420)}),
        remove={"peers": ("K1",)},
    )
    wire = desired_encoder.encode(delta)
    # Only what changed is on the wire: no empty sections.
    assert b"addresses" not in wire and b"routes" not in wire
    after = apply_delta(state, decode_message(wire))  # type: ignore[arg-type]
    assert after.peers == {} and after.interface.listen_port == 1
    assert after.sections.addresses is state.sections.addresses  # untouched: shared


def test_a_section_this_agent_does_not_know_is_refused_with_upgrade_advice() -> None:
    newer = (
        b'{"kind":"snapshot","host_id":"h","revision":3,"protocol":%d,'
        b'"sections":{"mail":{"r1":{}}}}' % PROTOCOL
    )
    with pytest.raises(UnknownSection, match="upgrade the agent"):
        decode_message(newer)
    removal = b'{"kind":"delta","host_id":"h","revision":4,"base":3,"remove":{"mail":["r1"]}}'
    with pytest.raises(UnknownSection, match="unknown section"):
        decode_message(removal.replace(b'"kind"', b'"protocol":%d,"kind"' % PROTOCOL))
    with pytest.raises(UnknownSection, match="upgrade the agent"):
        decode_message(
            b'{"kind":"snapshot","host_id":"h","revision":3,"protocol":%d}' % (PROTOCOL + 1)
        )
