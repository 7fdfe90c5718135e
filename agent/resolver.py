"""Split DNS: pointing the host's resolver at the agent's DNS server for the
networks' domains only, and taking it back exactly.

Two ways, chosen by what the host runs (`host_resolver`):

- systemd-resolved (`/run/systemd/resolve` exists and `resolvectl` is there):
  the overlay interface gets the server as its per-link DNS server and each
  domain as a routing domain (`~office.internal`), and is not a default route
  for DNS: resolved sends only those names to it, everything else where it
  did before. `resolvectl revert` takes it all back (so does the interface
  going away).
- otherwise `/etc/resolv.conf`: a marked block before the host's own lines,
  `nameserver <overlay address>`. The C library asks the first nameserver
  first, so every name goes to the agent's server, which answers its domains
  and forwards every other name to the nameservers that follow the block (the
  host's own, untouched): other names are still answered by the host's
  resolvers. Removing the block (`agent down`) gives back the file byte for
  byte. While the agent is stopped its address refuses queries, and the C
  library moves on to the host's nameservers at once.

Both are behind `ResolverControl`; resolvectl is driven through a `Command`
runner: the sequence of commands is tested on a fake, and the real runner (a
subprocess) against a real systemd-resolved in test hosts
(tests/test_e2e_resolved.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from agent.backend import BackendError

RESOLV_CONF = Path("/etc/resolv.conf")
RESOLVED_RUN_DIR = Path("/run/systemd/resolve")
BEGIN = "# netmesh: begin (the netmesh agent's DNS server; removed by `netmesh agent down`)"
END = "# netmesh: end"
_DOMAINS = "# netmesh domains:"


class ResolverError(BackendError):
    """The resolver configuration could not be read or written."""


@dataclass(frozen=True)
class Routing:
    """Where the host sends the names of some domains: `server` (an overlay
    address of this host) for `domains` (sorted)."""

    server: str
    domains: tuple[str, ...]


class ResolverControl(Protocol):
    async def read(self) -> Routing | None:
        """What of ours is in force (None: nothing)."""
        ...

    async def point(self, routing: Routing) -> None:
        """Send `routing.domains` to `routing.server` (replacing what we set before)."""
        ...

    async def restore(self) -> None:
        """Take back everything we set; the host's configuration as it was."""
        ...

    def upstreams(self) -> list[str]:
        """The host's own resolvers, for the names outside our domains."""
        ...


def nameservers(text: str) -> list[str]:
    """The `nameserver` addresses of resolv.conf text, in order."""
    found = []
    for line in text.splitlines():
        parts = line.split()
        if len(parts) >= 2 and parts[0] == "nameserver":
            found.append(parts[1])
    return found


def without_block(text: str) -> str:
    """resolv.conf text with our block (if any) taken out, byte for byte."""
    start = text.find(BEGIN)
    if start < 0:
        return text
    end = text.find(END, start)
    if end < 0:
        return text  # half a block is not ours to guess at
    end += len(END)
    if text[end : end + 1] == "\n":
        end += 1
    return text[:start] + text[end:]


def block_of(text: str) -> Routing | None:
    start = text.find(BEGIN)
    end = text.find(END, start + 1)
    if start < 0 or end < 0:
        return None
    inside = text[start:end]
    servers = nameservers(inside)
    domains: tuple[str, ...] = ()
    for line in inside.splitlines():
        if line.startswith(_DOMAINS):
            domains = tuple(line[len(_DOMAINS) :].split())
    return Routing(servers[0], domains) if servers else None


def with_block(text: str, routing: Routing) -> str:
    """resolv.conf text with our block first (the C library asks nameservers in order)."""
    block = f"{BEGIN}\n{_DOMAINS} {' '.join(routing.domains)}\nnameserver {routing.server}\n{END}\n"
    return block + without_block(text)


class ResolvConf:
    """A marked block in resolv.conf (the file everything else in it stays as is)."""

    def __init__(self, path: Path = RESOLV_CONF) -> None:
        self.path = path

    def _text(self) -> str:
        # Bytes as they are (no newline translation): restored byte for byte.
        try:
            return self.path.read_bytes().decode("utf-8", "surrogateescape")
        except FileNotFoundError:
            return ""
        except OSError as exc:
            raise ResolverError(f"cannot read {self.path}: {exc.strerror}") from None

    async def read(self) -> Routing | None:
        return block_of(self._text())

    async def point(self, routing: Routing) -> None:
        text = self._text()
        wanted = with_block(text, routing)
        if wanted != text:
            self._write(wanted)

    async def restore(self) -> None:
        text = self._text()
        original = without_block(text)
        if original != text:
            self._write(original)

    def upstreams(self) -> list[str]:
        return nameservers(without_block(self._text()))

    def _write(self, text: str) -> None:
        """Atomically where the file may be replaced (a new file renamed over
        it, its mode kept); in place where it may not (a bind mount, as in
        containers, cannot be renamed over)."""
        data = text.encode("utf-8", "surrogateescape")
        try:
            mode = self.path.stat().st_mode & 0o7777
        except OSError:
            mode = 0o644
        temporary = ""
        # A link stays a link (its target is written), a file mounted over
        # the path stays mounted (written in place).
        if not self.path.is_symlink() and not os.path.ismount(self.path):
            try:
                fd, temporary = tempfile.mkstemp(dir=self.path.parent, prefix=".netmesh-resolv.")
            except OSError:
                temporary = ""
        if temporary:
            try:
                with os.fdopen(fd, "wb") as out:
                    out.write(data)
                os.chmod(temporary, mode)
                os.replace(temporary, self.path)
                return
            except OSError:
                Path(temporary).unlink(missing_ok=True)
        try:
            with open(self.path, "r+b") as out:
                out.write(data)
                out.truncate()
        except OSError as exc:
            raise ResolverError(f"cannot write {self.path}: {exc.strerror}") from None


class Command(Protocol):
    async def __call__(self, *args: str) -> str:
        """Run resolvectl with `args`; its standard output. Raises ResolverError."""
        ...


async def resolvectl(*args: str) -> str:
    """The real `resolvectl`."""
    try:
        process = await asyncio.create_subprocess_exec(
            "resolvectl",
            *args,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
    except OSError as exc:
        raise ResolverError(f"cannot run resolvectl: {exc.strerror}") from None
    out, err = await process.communicate()
    if process.returncode != 0:
        why = err.decode(errors="replace").strip() or f"exit {process.returncode}"
        raise ResolverError(f"resolvectl {' '.join(args)}: {why}")
    return out.decode(errors="replace")


def _after_colon(output: str) -> list[str]:
    """`Link 5 (netmesh0): a b` -> [a, b] (resolvectl's per-link lines)."""
    _, _, values = output.strip().partition(":")
    return values.split()


class Resolved:
    """systemd-resolved's per-link DNS server and routing domains on the
    overlay interface (nothing global is touched)."""

    def __init__(
        self,
        interface: str,
        command: Command = resolvectl,
        upstream_file: Path = RESOLVED_RUN_DIR / "resolv.conf",
    ) -> None:
        self.interface = interface
        self.command = command
        self.upstream_file = upstream_file

    async def read(self) -> Routing | None:
        try:
            servers = _after_colon(await self.command("dns", self.interface))
            domains = _after_colon(await self.command("domain", self.interface))
        except ResolverError:
            return None  # no such link (yet): nothing of ours is in force
        routing = tuple(sorted(d.removeprefix("~") for d in domains if d.startswith("~")))
        return Routing(servers[0], routing) if servers else None

    async def point(self, routing: Routing) -> None:
        await self.command("dns", self.interface, routing.server)
        await self.command("domain", self.interface, *(f"~{d}" for d in routing.domains))
        # Only the routing domains go to our server, never names in general.
        await self.command("default-route", self.interface, "false")

    async def restore(self) -> None:
        # A link that is gone took its settings with it.
        with contextlib.suppress(ResolverError):
            await self.command("revert", self.interface)

    def upstreams(self) -> list[str]:
        # resolved's own view of the upstream servers (not its stub, 127.0.0.53,
        # which would route our domains back to us).
        try:
            return nameservers(self.upstream_file.read_text())
        except OSError:
            return []


def resolved_runs(run_dir: Path = RESOLVED_RUN_DIR) -> bool:
    return run_dir.is_dir() and shutil.which("resolvectl") is not None


def host_resolver(interface: str) -> ResolverControl:
    """systemd-resolved where it runs, else /etc/resolv.conf."""
    return Resolved(interface) if resolved_runs() else ResolvConf()


def servers_of(addresses: Sequence[str]) -> str | None:
    """The address to point the resolver at: the first IPv4 overlay address
    (every C library takes one), else the first."""
    ips = [a.split("/")[0] for a in addresses]
    v4 = [ip for ip in ips if ":" not in ip]
    chosen = v4 or ips
    return chosen[0] if chosen else None
