"""Names in the overlay: a network's DNS domain and the names inside it.

Every node is NODE.DOMAIN, the domain being NETWORK.internal unless the admin
chose another (`.internal` is reserved for private use, so it never clashes
with a public name). Custom records are names inside the domain too. Names are
compared lowercase, without a trailing dot (DNS is case-insensitive).

Pure: the rules validate with these, the topology and the agent use them to
name things, and all agree.
"""

from __future__ import annotations

import ipaddress
import re

DEFAULT_SUFFIX = "internal"
MAX_NAME = 253  # the longest name DNS carries, without the trailing dot
# A label: letters, digits, '-' and '_' (underscores appear in service names,
# and node names may hold them), not starting or ending with '-'.
_LABEL = re.compile(r"^(?!-)[a-z0-9_-]{1,63}(?<!-)$")


class DnsNameError(ValueError):
    """A name or domain DNS cannot carry; the message says why, in one line."""


def default_domain(network: str) -> str:
    return f"{network}.{DEFAULT_SUFFIX}"


def normal(name: str) -> str:
    """`name` as names are compared: lowercase, no trailing dot."""
    return name.strip().lower().removesuffix(".")


def parse_name(text: str, what: str = "name") -> str:
    """A DNS name, normalised. Raises DnsNameError."""
    name = normal(text)
    if not name:
        raise DnsNameError(f"empty {what}")
    if len(name) > MAX_NAME:
        raise DnsNameError(f"{what} {text!r} is longer than {MAX_NAME} characters")
    for label in name.split("."):
        if not _LABEL.match(label):
            raise DnsNameError(
                f"invalid {what} {text!r}: each label is 1-63 of a-z, 0-9, '-' and '_', "
                "not starting or ending with '-'"
            )
    return name


def parse_domain(text: str) -> str:
    """A network's DNS domain, normalised: at least two labels, not an IP
    address. Raises DnsNameError."""
    domain = parse_name(text, "DNS domain")
    if "." not in domain:
        raise DnsNameError(
            f"DNS domain {text!r} has one label: use two or more, e.g. office.internal"
        )
    try:
        ipaddress.ip_address(domain)
    except ValueError:
        return domain
    raise DnsNameError(f"DNS domain {text!r} is an IP address")


def within(name: str, domain: str) -> bool:
    """Whether `name` is `domain` or a name inside it (both normal)."""
    return name == domain or name.endswith("." + domain)


def relative_name(text: str, domain: str) -> str:
    """A record's name relative to `domain`: `db` or `db.office.internal`
    (whole) give `db`; `a.b` is read as whole, so it must end in the domain.
    Raises DnsNameError (outside the domain, or the domain itself)."""
    name = parse_name(text)
    if name == domain:
        raise DnsNameError(
            f"{text!r} is the domain itself: give a name inside it, e.g. db.{domain}"
        )
    if name.endswith("." + domain):
        return name[: -len(domain) - 1]
    if "." not in name:
        if len(name) + 1 + len(domain) > MAX_NAME:
            raise DnsNameError(f"name {name}.{domain} is longer than {MAX_NAME} characters")
        return name
    raise DnsNameError(f"name {text!r} is outside the domain {domain}")


def node_label(name: str) -> str | None:
    """A node's name as a DNS label (relative name), or None when it cannot be
    one (its names are looser than DNS's: such a node has no name in DNS)."""
    try:
        return parse_name(name)
    except DnsNameError:
        return None


def fqdn(relative: str, domain: str) -> str:
    return f"{relative}.{domain}"
