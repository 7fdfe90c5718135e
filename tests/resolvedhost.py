"""A real systemd-resolved (Debian's package, extracted, never installed) in a
test host, for the agent's systemd-resolved path of split DNS.

It runs inside the host's own network and mount namespaces (tests/netns.py),
with what it needs made private there: a tmpfs on /run/systemd (its state, its
resolved.conf.d) and on /run/dbus (the socket of a system bus of its own,
`dbus-daemon` with a permissive policy), and /etc/passwd and /etc/group bound
with a `systemd-resolve` user added (resolved, started as root, drops to it).
The host's /etc/resolv.conf is already the host's own file there: resolved reads
it as a "foreign" resolv.conf, its nameservers becoming resolved's upstreams;
or it says `nameserver 127.0.0.53` (`STUB_RESOLV_CONF`, the C library asks
resolved's stub) and the upstream is resolved.conf's `DNS=` (`dns=`).
Nothing of the machine's own configuration is seen or changed.

Processes that join it (`beside=resolved.pid`: an agent, `resolvectl`) see that
bus and that /run/systemd; `PATH` (from `env()`) finds the package's resolvectl.
"""

from __future__ import annotations

import asyncio
import os
import sys
from pathlib import Path

from tests.netns import Host, Result, wait_until

# `make setup` extracts the package here (scripts/extract-resolved.sh).
ROOT = Path(os.environ.get("NETMESH_RESOLVED_ROOT", Path(sys.prefix) / "systemd-resolved"))
DAEMON = ROOT / "lib/systemd/systemd-resolved"
RESOLVECTL = ROOT / "usr/bin/resolvectl"

_BUS_CONFIG = """<!DOCTYPE busconfig PUBLIC "-//freedesktop//DTD D-BUS Bus Configuration 1.0//EN"
 "http://www.freedesktop.org/standards/dbus/1.0/busconfig.dtd">
<busconfig>
  <type>system</type>
  <listen>unix:path=/run/dbus/system_bus_socket</listen>
  <auth>EXTERNAL</auth>
  <policy context="default">
    <allow user="*"/>
    <allow own="*"/>
    <allow send_destination="*"/>
    <allow receive_sender="*"/>
  </policy>
</busconfig>
"""

# Quiet on the test LAN (no multicast name protocols); unicast DNS as shipped.
_RESOLVED_CONF = "[Resolve]\nLLMNR=no\nMulticastDNS=no\nDNSSEC=no\n"

# /etc/resolv.conf of a host whose C library asks resolved's stub (what
# Debian's /run/systemd/resolve/stub-resolv.conf says, the usual symlink's target).
STUB_RESOLV_CONF = "nameserver 127.0.0.53\noptions edns0 trust-ad\nsearch .\n"

# $0: the directory of the files above; then the daemon's command line.
_START = """set -e
mount -t tmpfs tmpfs /run/systemd
mount -t tmpfs tmpfs /run/dbus
mount --bind "$0/passwd" /etc/passwd
mount --bind "$0/group" /etc/group
mkdir /run/systemd/resolved.conf.d
cp "$0/resolved.conf" /run/systemd/resolved.conf.d/netmesh-test.conf
dbus-daemon --config-file="$0/bus.conf" --fork --nopidfile
exec "$@"
"""


def resolved_unavailable() -> str | None:
    """Why a real systemd-resolved cannot run in a test host here, or None."""
    if not DAEMON.exists() or not RESOLVECTL.exists():
        return f"systemd-resolved not extracted in {ROOT} (make setup: scripts/extract-resolved.sh)"
    if not Path("/run/systemd").is_dir() or not Path("/run/dbus").is_dir():
        return "no /run/systemd or /run/dbus to mount a private tmpfs on"
    if not any(Path(d, "dbus-daemon").exists() for d in ("/usr/bin", "/bin")):
        return "no dbus-daemon"
    return None


def with_resolve_user(passwd: str, group: str) -> tuple[str, str]:
    """passwd and group text with a `systemd-resolve` user and group added (at
    an id neither uses); as they are where the user exists already."""
    users = [line.split(":") for line in passwd.splitlines() if line.count(":") >= 3]
    groups = [line.split(":") for line in group.splitlines() if line.count(":") >= 2]
    if any(u[0] == "systemd-resolve" for u in users):
        return passwd, group
    used = {int(e[2]) for e in users + groups if e[2].isdigit()}
    free = next(i for i in range(999, 100, -1) if i not in used)
    user = f"systemd-resolve:x:{free}:{free}:systemd Resolver:/:/usr/sbin/nologin"
    passwd = passwd.rstrip("\n") + f"\n{user}\n"
    if not any(g[0] == "systemd-resolve" for g in groups):
        group = group.rstrip("\n") + f"\nsystemd-resolve:x:{free}:\n"
    return passwd, group


class Resolved:
    """systemd-resolved with its bus, running in `host` until the test net ends."""

    def __init__(self, host: Host, process: asyncio.subprocess.Process) -> None:
        self.host = host
        self.process = process
        self.pid = process.pid

    @classmethod
    async def start(cls, host: Host, files: Path, log: Path, dns: str | None = None) -> Resolved:
        """Start it in `host` (files of its own under `files`, its log in `log`;
        `dns`: its global DNS server, resolved.conf's `DNS=`) and wait until it
        answers on its bus."""
        files.mkdir(parents=True, exist_ok=True)
        passwd, group = with_resolve_user(
            Path("/etc/passwd").read_text(), Path("/etc/group").read_text()
        )
        (files / "passwd").write_text(passwd)
        (files / "group").write_text(group)
        (files / "bus.conf").write_text(_BUS_CONFIG)
        (files / "resolved.conf").write_text(_RESOLVED_CONF + (f"DNS={dns}\n" if dns else ""))
        process = await host.spawn(
            "sh",
            "-c",
            f"exec >>{log} 2>&1; {_START}",
            str(files),
            str(DAEMON),
        )
        resolved = cls(host, process)
        await wait_until(resolved._answers, timeout=20, message="systemd-resolved on its bus")
        return resolved

    async def _answers(self) -> bool:
        assert self.process.returncode is None, "systemd-resolved exited"
        result = await self.resolvectl("status", check=False)
        upstream = await self.host.run(
            "cat", "/run/systemd/resolve/resolv.conf", beside=self.pid, check=False
        )
        return result.returncode == 0 and upstream.returncode == 0

    async def resolvectl(self, *args: str, check: bool = True) -> Result:
        """`resolvectl ARGS` in the host, beside resolved (its bus)."""
        return await self.host.run(str(RESOLVECTL), *args, beside=self.pid, check=check)

    def env(self) -> dict[str, str]:
        """The environment of a process that should find this resolvectl."""
        return {"PATH": f"{RESOLVECTL.parent}:{os.environ.get('PATH', '/usr/bin:/bin')}"}
