"""What the host's DNS server answers, from the `dns` and `dns_zones` sections.

Pure: `answer(zone, query)` is the reply to a parsed query, or None when the
name is in none of the zones (the server forwards it to the host's own
resolvers). Inside a zone the server is the authority: a name it holds gets
its addresses (A, AAAA) or its alias (CNAME, followed when the target is in a
zone too); a name that holds nothing of the asked type, or that only has names
below it, gets an empty answer; any other name does not exist (NXDOMAIN). Each
of those carries the zone's SOA, so resolvers cache "no such name" only
briefly: names come and go with nodes.

`reply_to_garbage(data)` is what to send back for bytes that do not parse as
a query: FORMERR when a query id can be read, else nothing.
"""

from __future__ import annotations

import struct
from collections.abc import Mapping
from dataclasses import dataclass, field

from dnslib import AAAA, CNAME, EDNS0, QTYPE, RCODE, RR, SOA, A, DNSHeader, DNSRecord

from events.desired import DnsEntry, DnsZoneEntry

TTL = 5  # seconds: a removed node stops resolving within this, even through caches
_OPCODE_QUERY = 0
_MAX_CHASE = 8  # CNAMEs followed inside the zones before giving up (a loop)


@dataclass(frozen=True)
class Zone:
    """The names and domains one desired state gives the server."""

    names: Mapping[str, DnsEntry] = field(default_factory=dict)
    domains: tuple[str, ...] = ()  # longest first: the most specific zone wins
    # Names that exist only because names below them do (`sub` of `a.sub.d`).
    branches: frozenset[str] = frozenset()

    @classmethod
    def of(cls, names: Mapping[str, DnsEntry], zones: Mapping[str, DnsZoneEntry]) -> Zone:
        domains = tuple(sorted(zones, key=lambda d: (-len(d), d)))
        branches = set()
        for name in names:
            for domain in domains:
                if name.endswith("." + domain):
                    labels = name[: -len(domain) - 1].split(".")
                    for i in range(1, len(labels)):
                        branches.add(".".join(labels[i:]) + "." + domain)
                    break
        return cls(dict(names), domains, frozenset(branches))

    def authority(self, name: str) -> str | None:
        """The zone `name` (normal) is in; None when in none."""
        for domain in self.domains:
            if name == domain or name.endswith("." + domain):
                return domain
        return None


def _soa(domain: str) -> RR:
    return RR(
        domain,
        QTYPE.SOA,
        ttl=TTL,
        rdata=SOA(f"ns.{domain}", f"hostmaster.{domain}", (1, 3600, 600, 86400, TTL)),
    )


def _records(name: str, entry: DnsEntry, qtype: int) -> list[RR]:
    found: list[RR] = []
    if qtype in (QTYPE.A, QTYPE.ANY):
        found += [RR(name, QTYPE.A, ttl=TTL, rdata=A(ip)) for ip in entry.a]
    if qtype in (QTYPE.AAAA, QTYPE.ANY):
        found += [RR(name, QTYPE.AAAA, ttl=TTL, rdata=AAAA(ip)) for ip in entry.aaaa]
    return found


# The UDP payload this server says it takes, to a client that speaks EDNS
# (the size DNS flag day 2020 settled on: no fragmentation on common paths).
EDNS_PAYLOAD = 1232


def answer(zone: Zone, query: DNSRecord) -> DNSRecord | None:
    """The reply to `query`; None when its name is outside every zone. A
    query with EDNS gets EDNS back (a resolver such as systemd-resolved
    otherwise falls back to plain 512-byte UDP for this server)."""
    reply = _answer(zone, query)
    if reply is not None and any(rr.rtype == QTYPE.OPT for rr in query.ar):
        reply.add_ar(EDNS0(udp_len=EDNS_PAYLOAD))
    return reply


def _answer(zone: Zone, query: DNSRecord) -> DNSRecord | None:
    if query.header.opcode != _OPCODE_QUERY:
        reply = query.reply()
        reply.header.rcode = RCODE.NOTIMP
        return reply
    if len(query.questions) != 1:
        reply = query.reply()
        reply.header.rcode = RCODE.FORMERR
        return reply
    question = query.questions[0]
    name = str(question.qname).lower().removesuffix(".")
    domain = zone.authority(name)
    if domain is None:
        return None
    reply = query.reply()  # authoritative, recursion available (we forward the rest)
    qtype = question.qtype
    seen: set[str] = set()
    current = name
    while True:
        entry = zone.names.get(current)
        if entry is None:
            break
        if entry.cname:
            reply.add_answer(RR(current, QTYPE.CNAME, ttl=TTL, rdata=CNAME(entry.cname)))
            seen.add(current)
            target = entry.cname
            if qtype == QTYPE.CNAME or target in seen or len(seen) > _MAX_CHASE:
                return reply
            if zone.authority(target) is None:
                return reply  # outside: the client's resolver follows it
            current = target
            continue
        records = _records(current, entry, qtype)
        for record in records:
            reply.add_answer(record)
        if not records:
            reply.add_auth(_soa(domain))
        return reply
    if current != name:
        return reply  # an alias inside the zones pointing at nothing: the alias stands
    if name == domain:
        if qtype in (QTYPE.SOA, QTYPE.ANY):
            reply.add_answer(_soa(domain))
        else:
            reply.add_auth(_soa(domain))
        return reply
    if name in zone.branches:
        reply.add_auth(_soa(domain))
        return reply
    reply.header.rcode = RCODE.NXDOMAIN
    reply.add_auth(_soa(domain))
    return reply


def reply_to_garbage(data: bytes) -> bytes | None:
    """FORMERR for bytes that carry a query's header but do not parse; None
    (send nothing) for anything shorter, or that is itself a reply (answering
    replies would let two servers bounce garbage between them forever)."""
    if len(data) < 12:
        return None
    query_id, flags = struct.unpack("!HH", data[:4])
    if flags & 0x8000:
        return None
    header = DNSHeader(id=query_id, qr=1, ra=1, rcode=RCODE.FORMERR)
    return bytes(DNSRecord(header).pack())


def truncated(reply: DNSRecord, limit: int) -> bytes:
    """`reply` packed, or its header and question with TC set when it is
    longer than `limit` (a UDP client then asks again over TCP)."""
    packed = bytes(reply.pack())
    if len(packed) <= limit:
        return packed
    short = DNSRecord(reply.header, questions=list(reply.questions))
    short.header.tc = 1
    return bytes(short.pack())
