"""Test hosts in network namespaces, joined by a private LAN (needs root).

A `TestNet` owns everything it creates: a "LAN" namespace holding a bridge, one
namespace per host with `eth0` on that bridge (192.0.2.0/24, TEST-NET-1, which
exists only inside these namespaces), and every process it starts. Cleanup kills
by process group / by namespace membership and deletes the namespaces by name; it
runs on exit from `async with`, failures included.

Processes started in a host also get a private mount namespace with a fresh tmpfs
on /var/run/wireguard, because wireguard-go's socket directory is not per network
namespace. Start a second process `beside=` a running one to share its view.

Use from a test module (tests/ is a package):

    from tests.netns import Host, TestNet, ping, wait_until
    from tests.netns import testnet_fixture  # noqa: F401  (provides the `testnet` fixture)

    @pytest.mark.netns
    async def test_x(testnet: TestNet) -> None:
        a = await testnet.add_host("a")
        b = await testnet.add_host("b")
        assert await ping(a, b.lan_address)
        agent = await a.driver()  # Python driver: runs agent code inside host a
        await agent.new("wg", "agent.userspace:UserspaceBackend", "wg0")
        await agent.call("wg", "create")
        print((await a.run("wg", "show", beside=agent.pid)).stdout)

`python tests/netns.py driver` is that driver: JSON lines on stdin/stdout (see
`Driver`), so a test can call agent objects living in another namespace.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import importlib
import inspect
import itertools
import os
import shutil
import signal
import sys
import tempfile
import time
import typing
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import msgspec
import pytest

T = TypeVar("T")

LAN_PREFIX = "192.0.2"
# A slow machine (a VM under emulation, tests/test_kernel_vm.py) stretches every
# wait and command timeout of these helpers by this factor.
TIME_SCALE = float(os.environ.get("NETMESH_TEST_TIME_SCALE", "1"))
_TOOLS = ("ip", "nsenter", "unshare", "ping", "wireguard-go", "mount")
_counter = itertools.count()

# Runs inside `ip netns exec`: a private mount namespace with its own socket
# dir, and the host's own resolv.conf ($0, a file of the test's) bound over
# /etc/resolv.conf: an agent pointing "the host's resolver" at its DNS server
# changes that file, never the machine's.
_PRIVATE_MOUNT = (
    "mkdir -p /var/run/wireguard && mount -t tmpfs tmpfs /var/run/wireguard"
    ' && mount --bind "$0" /etc/resolv.conf && exec "$@"'
)


def netns_unavailable() -> str | None:
    """Why namespace tests cannot run here, or None."""
    if os.geteuid() != 0:
        return "needs root"
    missing = [tool for tool in _TOOLS if shutil.which(tool) is None]
    if missing:
        return f"missing tools: {', '.join(missing)}"
    if not os.path.exists("/dev/net/tun"):
        return "no /dev/net/tun"
    return None


def require_netns() -> None:
    reason = netns_unavailable()
    if reason is not None:
        pytest.skip(reason)


# The NAT kinds of `TestNet.add_router`: its nftables masquerade statement.
NAT_KINDS = {"endpoint-independent": "masquerade", "symmetric": "masquerade random"}


@dataclass(frozen=True)
class Result:
    returncode: int
    stdout: str
    stderr: str


class CommandError(Exception):
    pass


async def run(*argv: str, check: bool = True, timeout: float = 30.0) -> Result:
    """Run a command to completion (in the caller's namespaces)."""
    timeout *= TIME_SCALE
    proc = await asyncio.create_subprocess_exec(
        *argv,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        start_new_session=True,
    )
    try:
        async with asyncio.timeout(timeout):
            out, err = await proc.communicate()
    except TimeoutError:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        await proc.communicate()
        raise
    assert proc.returncode is not None
    result = Result(proc.returncode, out.decode(errors="replace"), err.decode(errors="replace"))
    if check and result.returncode != 0:
        raise CommandError(f"{argv} failed ({result.returncode}): {result.stderr.strip()}")
    return result


async def run_stdin(argv: list[str], text: str, timeout: float = 30.0) -> None:
    """Run a command with `text` on its stdin; raises CommandError when it fails."""
    proc = await asyncio.create_subprocess_exec(
        *argv,
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    async with asyncio.timeout(timeout * TIME_SCALE):
        _, err = await proc.communicate(text.encode())
    if proc.returncode != 0:
        raise CommandError(f"{argv} failed ({proc.returncode}): {err.decode().strip()}")


@typing.overload
async def wait_until(
    predicate: Callable[[], Awaitable[T]],
    timeout: float = ...,
    interval: float = ...,
    message: str = ...,
) -> T: ...


@typing.overload
async def wait_until(
    predicate: Callable[[], T],
    timeout: float = ...,
    interval: float = ...,
    message: str = ...,
) -> T: ...


async def wait_until(
    predicate: Callable[[], Any],
    timeout: float = 10.0,
    interval: float = 0.05,
    message: str = "condition",
) -> Any:
    """Poll `predicate` (sync or async) until it returns a truthy value; return it.

    Raises TimeoutError after `timeout` seconds (times TIME_SCALE).
    """
    timeout *= TIME_SCALE
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if inspect.isawaitable(value):
            value = await value
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"{message} not met within {timeout}s")
        await asyncio.sleep(interval)


async def ping(host: Host, address: str, count: int = 1, timeout: float = 2.0) -> bool:
    """Whether `address` answers `count` echo requests from `host` within `timeout`
    each (times TIME_SCALE: a first packet waits for a handshake, slow when emulated)."""
    timeout *= TIME_SCALE
    result = await host.run(
        "ping",
        "-n",
        "-q",
        "-c",
        str(count),
        "-W",
        str(timeout),
        "-w",
        str(max(1, round(count * timeout))),
        address,
        check=False,
        timeout=count * timeout + 10,
    )
    return result.returncode == 0


class RemoteError(Exception):
    """An exception raised by agent code inside a driver."""

    def __init__(self, type_name: str, message: str, retryable: bool | None) -> None:
        super().__init__(f"{type_name}: {message}")
        self.type_name = type_name
        self.retryable = retryable


class Driver:
    """Client of a driver process: calls methods of objects living in a host.

    Arguments and results cross as JSON (msgspec builtins): Structs become dicts;
    convert back with `msgspec.convert(result, DeviceState)`. Keyword arguments are
    converted to the method's annotated types inside the driver.
    """

    def __init__(self, process: asyncio.subprocess.Process) -> None:
        self._process = process
        self.pid = process.pid
        self._lock = asyncio.Lock()

    async def new(self, name: str, target: str, *args: Any, **kwargs: Any) -> None:
        """`name = module:Class(*args, **kwargs)` inside the host."""
        await self._request(
            {"op": "new", "name": name, "target": target, "args": args, "kwargs": kwargs}
        )

    async def call(self, name: str, method: str, **kwargs: Any) -> Any:
        """`await name.method(**kwargs)` (or a plain call) inside the host."""
        return await self._request({"op": "call", "name": name, "method": method, "kwargs": kwargs})

    async def attr(self, name: str, attr: str) -> Any:
        return await self._request({"op": "attr", "name": name, "attr": attr})

    async def close(self, timeout: float = 10.0) -> None:
        """End the driver (EOF on its stdin) and wait for it; objects are not closed."""
        stdin = self._process.stdin
        if stdin is not None and not stdin.is_closing():
            stdin.close()
        async with asyncio.timeout(timeout * TIME_SCALE):
            await self._process.wait()

    async def _request(self, request: dict[str, Any]) -> Any:
        stdin, stdout = self._process.stdin, self._process.stdout
        assert stdin is not None and stdout is not None
        async with self._lock:
            stdin.write(msgspec.json.encode(msgspec.to_builtins(request)) + b"\n")
            await stdin.drain()
            line = await stdout.readline()
        if not line:
            raise RemoteError("EOF", f"driver {self.pid} exited", None)
        answer = msgspec.json.decode(line)
        if "error" in answer:
            error = answer["error"]
            raise RemoteError(error["type"], error["message"], error["retryable"])
        return answer["ok"]


class Host:
    """One test host: a network namespace with `eth0` on the test LAN."""

    def __init__(
        self, net: TestNet, name: str, netns: str, lan_address: str, resolv_conf: Path
    ) -> None:
        self.net = net
        self.name = name
        self.netns = netns
        self.lan_address = lan_address
        # What its processes see as /etc/resolv.conf (see _PRIVATE_MOUNT).
        self.resolv_conf = resolv_conf

    def _wrap(self, argv: tuple[str, ...], beside: int | None, private_mount: bool) -> list[str]:
        if beside is not None:
            return ["nsenter", "-t", str(beside), "-m", "-n", *argv]
        if private_mount:
            return [
                "ip",
                "netns",
                "exec",
                self.netns,
                "unshare",
                "-m",
                "--propagation",
                "private",
                "sh",
                "-c",
                _PRIVATE_MOUNT,
                str(self.resolv_conf),
                *argv,
            ]
        return ["ip", "netns", "exec", self.netns, *argv]

    async def spawn(
        self,
        *argv: str,
        beside: int | None = None,
        env: dict[str, str] | None = None,
        stdin: int | None = asyncio.subprocess.DEVNULL,
        stdout: int | None = None,
    ) -> asyncio.subprocess.Process:
        """Start a tracked process in this host (own mount namespace unless `beside`).

        `beside=PID` joins the mount and network namespaces of a running process.
        The process leads its own process group; cleanup kills that group.
        """
        return await self.net._spawn(
            self._wrap(argv, beside, private_mount=True),
            env=env,
            stdin=stdin,
            stdout=stdout,
        )

    async def run(
        self,
        *argv: str,
        beside: int | None = None,
        check: bool = True,
        timeout: float = 30.0,
    ) -> Result:
        """Run a command to completion in this host's network namespace.

        Without `beside` it sees the host's /var/run/wireguard, not any process's
        private one; pass `beside=PID` for `wg show` next to a running agent.
        """
        return await run(
            *self._wrap(argv, beside, private_mount=False), check=check, timeout=timeout
        )

    async def driver(self, *, beside: int | None = None) -> Driver:
        """Start a Python driver in this host (see `Driver`)."""
        process = await self.spawn(
            sys.executable,
            os.path.abspath(__file__),
            "driver",
            beside=beside,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
        )
        driver = Driver(process)
        await driver.call("", "ping")  # ready once imports are done
        return driver

    async def pids(self) -> list[int]:
        """Processes whose network namespace is this host's."""
        result = await run("ip", "netns", "pids", self.netns, check=False)
        return [int(pid) for pid in result.stdout.split()]


class TestNet:
    """A LAN and its hosts; an async context manager that cleans up on exit."""

    __test__ = False  # not a test class, even when imported into a test module

    def __init__(self, prefix: str | None = None) -> None:
        # pid + counter: unique across concurrent pytest processes and tests.
        self.prefix = prefix or f"nmt{os.getpid()}-{next(_counter)}"
        self.lan_netns = f"{self.prefix}-lan"
        self.hosts: dict[str, Host] = {}
        self._namespaces: list[str] = []
        self._processes: list[asyncio.subprocess.Process] = []
        self._files = Path(tempfile.mkdtemp(prefix=f"{self.prefix}-"))  # hosts' resolv.conf
        self._lans: dict[str, tuple[str, int]] = {}  # router -> (its LAN's /24 prefix, hosts)

    async def __aenter__(self) -> TestNet:
        try:
            await self._add_netns(self.lan_netns)
            await run("ip", "-n", self.lan_netns, "link", "add", "br0", "type", "bridge")
            await run("ip", "-n", self.lan_netns, "link", "set", "br0", "up")
        except BaseException:
            await self.cleanup()
            raise
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.cleanup()

    async def add_host(self, name: str) -> Host:
        number = len(self.hosts) + 1
        netns = f"{self.prefix}-{name}"
        port = f"p{number}"
        address = f"{LAN_PREFIX}.{10 + number}"
        await self._add_netns(netns)
        # Both ends are created in the LAN namespace, one moved at once: no name
        # ever appears in the root namespace, so parallel runs cannot collide.
        await run(
            "ip",
            "-n",
            self.lan_netns,
            "link",
            "add",
            port,
            "type",
            "veth",
            "peer",
            "name",
            "eth0",
            "netns",
            netns,
        )
        await run("ip", "-n", self.lan_netns, "link", "set", port, "master", "br0", "up")
        await run("ip", "-n", netns, "addr", "add", f"{address}/24", "dev", "eth0")
        await run("ip", "-n", netns, "link", "set", "eth0", "up")
        host = Host(self, name, netns, address, self._resolv_conf(name, f"{LAN_PREFIX}.1"))
        self.hosts[name] = host
        return host

    async def add_behind(self, host: Host, name: str, subnet: str) -> Host:
        """A host on its own LAN `subnet` (a /24 prefix such as "192.168.77"),
        reachable only through `host`: `host` gets eth1 at .1, the new one
        eth0 at .2 with its default route through .1."""
        netns = f"{self.prefix}-{name}"
        await self._add_netns(netns)
        behind = Host(self, name, netns, f"{subnet}.2", self._resolv_conf(name, f"{subnet}.1"))
        await self.wire(host, "eth1", f"{subnet}.1/24", behind, "eth0", f"{subnet}.2/24")
        await run("ip", "-n", netns, "route", "add", "default", "via", f"{subnet}.1")
        self.hosts[name] = behind
        return behind

    async def add_router(
        self, name: str, subnet: str, *, nat: str = "endpoint-independent"
    ) -> Host:
        """A home router: a host on the test LAN (here "the internet") with a
        LAN of its own, `subnet` (a /24 prefix such as "192.168.1"; a bridge
        at .1), forwarding between them and masquerading what leaves by eth0
        with nftables, in its own namespace only. `nat` is the mapping kind:
        "endpoint-independent" (`masquerade`: a source port is kept where it
        can be, one mapping for every destination, as most home routers do) or
        "symmetric" (`masquerade random`: a new mapping per destination).
        Unsolicited packets from outside are dropped either way (as a home
        router's firewall does): only replies to what left get in. Hosts go
        behind it with `add_behind_nat`."""
        if nat not in NAT_KINDS:
            raise ValueError(f"nat must be one of {sorted(NAT_KINDS)}")
        router = await self.add_host(name)
        ns = router.netns
        await run("ip", "-n", ns, "link", "add", "br1", "type", "bridge")
        await run("ip", "-n", ns, "addr", "add", f"{subnet}.1/24", "dev", "br1")
        await run("ip", "-n", ns, "link", "set", "br1", "up")
        await run("ip", "netns", "exec", ns, "sysctl", "-qw", "net.ipv4.ip_forward=1")
        ruleset = (
            "table ip lab_nat {\n"
            " chain postrouting {\n"
            "  type nat hook postrouting priority srcnat; policy accept;\n"
            f'  oifname "eth0" ip saddr {subnet}.0/24 {NAT_KINDS[nat]}\n'
            " }\n"
            " chain forward {\n"
            "  type filter hook forward priority filter; policy drop;\n"
            '  iifname "br1" accept\n'
            "  ct state established,related accept\n"
            " }\n"
            # Unsolicited packets to the router itself are dropped, not answered:
            # dropped before conntrack confirms them, they leave no entry that
            # would make the NAT give a later outgoing flow another port.
            " chain input {\n"
            "  type filter hook input priority filter; policy drop;\n"
            '  iifname { "lo", "br1" } accept\n'
            "  ct state established,related accept\n"
            " }\n"
            "}\n"
        )
        await run_stdin(["ip", "netns", "exec", ns, "nft", "-f", "-"], ruleset)
        self._lans[name] = (subnet, 0)
        return router

    async def add_behind_nat(self, router: Host, name: str) -> Host:
        """A host on `router`'s LAN (see `add_router`): .10, .11, ... with its
        default route through the router."""
        subnet, count = self._lans[router.name]
        self._lans[router.name] = (subnet, count + 1)
        netns = f"{self.prefix}-{name}"
        address = f"{subnet}.{10 + count}"
        await self._add_netns(netns)
        port = f"l{len(self.hosts) + 1}"
        await run(
            "ip", "-n", router.netns, "link", "add", port, "type", "veth",
            "peer", "name", "eth0", "netns", netns,
        )  # fmt: skip
        await run("ip", "-n", router.netns, "link", "set", port, "master", "br1", "up")
        await run("ip", "-n", netns, "addr", "add", f"{address}/24", "dev", "eth0")
        await run("ip", "-n", netns, "link", "set", "eth0", "up")
        await run("ip", "-n", netns, "route", "add", "default", "via", f"{subnet}.1")
        host = Host(self, name, netns, address, self._resolv_conf(name, f"{subnet}.1"))
        self.hosts[name] = host
        return host

    def _resolv_conf(self, name: str, nameserver: str) -> Path:
        """The file bound over /etc/resolv.conf in host `name` (see Host)."""
        path = self._files / f"{name}.resolv.conf"
        path.write_text(f"# resolv.conf of test host {name}\nnameserver {nameserver}\n")
        return path

    async def wire(
        self, a: Host, a_name: str, a_cidr: str, b: Host, b_name: str, b_cidr: str
    ) -> None:
        """A veth pair between hosts `a` and `b` (it goes with their namespaces)."""
        await run(
            "ip", "-n", a.netns, "link", "add", a_name, "type", "veth",
            "peer", "name", b_name, "netns", b.netns,
        )  # fmt: skip
        for host, name, cidr in ((a, a_name, a_cidr), (b, b_name, b_cidr)):
            await run("ip", "-n", host.netns, "addr", "add", cidr, "dev", name)
            await run("ip", "-n", host.netns, "link", "set", name, "up")

    async def cleanup(self) -> None:
        errors: list[str] = []
        for process in self._processes:
            if process.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(process.pid, signal.SIGKILL)
            try:
                async with asyncio.timeout(10 * TIME_SCALE):
                    await process.communicate()
            except TimeoutError:
                errors.append(f"process {process.pid} did not exit")
        self._processes.clear()
        for netns in reversed(self._namespaces):
            # Processes that left our process groups (e.g. wireguard-go, which
            # starts its own session) are found by namespace membership.
            pids = (await run("ip", "netns", "pids", netns, check=False)).stdout.split()
            for pid in pids:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(int(pid), signal.SIGKILL)
            try:
                await wait_until(
                    functools.partial(_no_pids, netns),
                    timeout=10,
                    message=f"processes of {netns} gone",
                )
            except TimeoutError as exc:
                errors.append(str(exc))
            result = await run("ip", "netns", "del", netns, check=False)
            if result.returncode != 0:
                errors.append(f"ip netns del {netns}: {result.stderr.strip()}")
        self._namespaces.clear()
        self.hosts.clear()
        shutil.rmtree(self._files, ignore_errors=True)
        if errors:
            raise RuntimeError("test net cleanup: " + "; ".join(errors))

    async def _add_netns(self, netns: str) -> None:
        await run("ip", "netns", "add", netns)
        self._namespaces.append(netns)
        await run("ip", "-n", netns, "link", "set", "lo", "up")

    async def _spawn(
        self,
        argv: list[str],
        *,
        env: dict[str, str] | None,
        stdin: int | None,
        stdout: int | None,
    ) -> asyncio.subprocess.Process:
        process = await asyncio.create_subprocess_exec(
            *argv,
            stdin=stdin,
            stdout=stdout,
            env=None if env is None else {**os.environ, **env},
            start_new_session=True,
            # A driver answers with one JSON line, which can be megabytes (a
            # device with thousands of allowed IPs); asyncio's default is 64 KiB.
            limit=16 * 1024 * 1024,
        )
        self._processes.append(process)
        return process


async def _no_pids(netns: str) -> bool:
    result = await run("ip", "netns", "pids", netns, check=False)
    # Zombies still count for `ip netns pids`; they die with their reaper.
    return all(_is_zombie(int(pid)) for pid in result.stdout.split())


def _is_zombie(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as stat:
            return stat.read().rpartition(")")[2].split()[0] == "Z"
    except (FileNotFoundError, ProcessLookupError):
        return True


@pytest.fixture(name="testnet")
async def testnet_fixture() -> AsyncIterator[TestNet]:
    """A TestNet, skipped when namespaces are not available, always cleaned up."""
    require_netns()
    async with TestNet() as net:
        yield net


# ---------------------------------------------------------------------------
# The driver: runs inside a host, executes requests from a Driver client.


def _load(target: str) -> Any:
    module, _, name = target.partition(":")
    return getattr(importlib.import_module(module), name)


def _convert_kwargs(function: Any, kwargs: dict[str, Any]) -> dict[str, Any]:
    try:
        hints = typing.get_type_hints(function)
    except (NameError, TypeError):
        return kwargs
    return {
        key: msgspec.convert(value, hints[key]) if key in hints else value
        for key, value in kwargs.items()
    }


async def _handle(objects: dict[str, Any], request: dict[str, Any]) -> Any:
    op = request["op"]
    if op == "new":
        cls = _load(request["target"])
        objects[request["name"]] = cls(*request["args"], **request["kwargs"])
        return None
    if op == "attr":
        return getattr(objects[request["name"]], request["attr"])
    if request["name"] == "" and request["method"] == "ping":
        return "pong"
    function = getattr(objects[request["name"]], request["method"])
    result = function(**_convert_kwargs(function, request["kwargs"]))
    if inspect.isawaitable(result):
        result = await result
    return result


async def _driver_main() -> None:
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader(limit=16 * 1024 * 1024)
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    objects: dict[str, Any] = {}
    while line := await reader.readline():
        request = msgspec.json.decode(line)
        try:
            answer: dict[str, Any] = {"ok": await _handle(objects, request)}
        except Exception as exc:  # reported to the test, which decides
            answer = {
                "error": {
                    "type": type(exc).__name__,
                    "message": str(exc),
                    "retryable": getattr(exc, "retryable", None),
                }
            }
        sys.stdout.buffer.write(msgspec.json.encode(msgspec.to_builtins(answer)) + b"\n")
        sys.stdout.buffer.flush()


if __name__ == "__main__" and sys.argv[1:] == ["driver"]:
    asyncio.run(_driver_main())
