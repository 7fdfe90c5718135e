"""WireGuardBackend for wireguard-go, driven through its UAPI unix socket.

wireguard-go runs as `wireguard-go -f <iface>` in a session of its own, so the
interface outlives the agent: `close()` detaches, and an agent that starts again
attaches to the running device instead of creating it anew.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time

import structlog

from agent import uapi
from agent.backend import BackendError, DeviceState, ExistsByReading, PeerSpec
from agent.link import Link

log = structlog.get_logger("netmesh.agent")

# wireguard-go refuses to run when it believes the kernel module is available.
_ENV_OVERRIDE = {"WG_I_PREFER_BUGGY_USERSPACE_TO_POLISHED_KMOD": "1"}

# A get answer for thousands of peers is a few MB; more means something is wrong.
_MAX_ANSWER = 64 * 1024 * 1024


class UserspaceBackend(ExistsByReading):
    """One wireguard-go interface.

    `socket_dir` is where this class looks for `<interface>.sock`; wireguard-go's own
    directory is compiled in (/var/run/wireguard), so change it only to talk to a
    device that is served elsewhere (tests, another implementation). Give tests their
    own mount namespace with a tmpfs there rather than a different `socket_dir`.

    `pid` is the wireguard-go process this object started, None when it attached to
    a running device (or after `close()`).
    """

    def __init__(
        self,
        interface: str,
        *,
        socket_dir: str = "/var/run/wireguard",
        wireguard_go: str = "wireguard-go",
        log_path: str | None = None,
        timeout: float = 10.0,
    ) -> None:
        self.interface = interface
        self.socket_path = os.path.join(socket_dir, f"{interface}.sock")
        self.pid: int | None = None
        self._wireguard_go = wireguard_go
        self._log_path = log_path
        self._timeout = timeout
        # create/destroy poll for a while; overlapping calls must not start two
        # wireguard-go processes or race a deletion.
        self._lifecycle = asyncio.Lock()

    async def create(self) -> None:
        async with self._lifecycle:
            await self._create()

    async def destroy(self) -> None:
        async with self._lifecycle:
            await self._destroy()

    async def _create(self) -> None:
        self._reap()
        if await self.exists():
            return
        if self.pid is not None:
            # Our previous wireguard-go is still shutting down (its link was
            # deleted): let it finish first. On exit it removes its socket file
            # by path, which would be the new process's socket by then, leaving
            # a device nobody can configure.
            await self._wait_own_exit(time.monotonic() + self._timeout)
        await self._replace_orphaned_link()
        pid = self._spawn()
        self.pid = pid
        deadline = time.monotonic() + self._timeout
        delay = 0.01
        while not await self.exists():
            status = self._reap()
            if status is not None:
                raise BackendError(
                    f"wireguard-go for {self.interface} exited with status {status}"
                    + self._log_hint()
                )
            if time.monotonic() > deadline:
                self._kill_own()
                await self._wait_own_exit(time.monotonic() + self._timeout)
                raise BackendError(f"wireguard-go for {self.interface} did not answer in time")
            await asyncio.sleep(delay)
            delay = min(delay * 2, 0.2)

    async def _replace_orphaned_link(self) -> None:
        """An interface of our name whose control socket is missing or refuses
        connections here (its wireguard-go was started from another mount
        namespace) can be neither configured nor created again: delete it, so
        that a new wireguard-go can make it. Only a `tun` link, and never
        because a socket that is there was slow or answered badly: that
        interface may be carrying traffic."""
        link = Link(self.interface)
        try:
            if not await link.exists():
                return
            if not await self._socket_absent():
                raise BackendError(
                    f"{self.interface}: its wireguard-go socket is there but does not "
                    "answer properly; not replacing a live interface"
                )
            kind = await link.kind()
            if kind != "tun":
                raise BackendError(
                    f"{self.interface} exists and is a {kind or 'plain'} link, not "
                    "wireguard-go's: not touching it (choose another --interface)",
                    retryable=False,
                )
            log.warning(
                "interface exists but its wireguard-go control socket is missing here; "
                "replacing it",
                interface=self.interface,
                socket=self.socket_path,
            )
            await link.delete()
            deadline = time.monotonic() + self._timeout
            while await link.exists():
                if time.monotonic() > deadline:
                    raise BackendError(f"{self.interface}: the orphaned link does not go away")
                await asyncio.sleep(0.05)
        finally:
            await link.close()

    async def _socket_absent(self) -> bool:
        """True only when nothing listens on our socket path: missing, or
        refusing connections. A connection that opens means a device is there."""
        try:
            async with asyncio.timeout(self._timeout):
                _, writer = await asyncio.open_unix_connection(self.socket_path)
        except (FileNotFoundError, ConnectionRefusedError):
            return True
        except (OSError, TimeoutError):
            return False
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()
        return False

    async def _destroy(self) -> None:
        link = Link(self.interface)
        try:
            # Deleting the link makes wireguard-go shut down and remove its socket,
            # whoever started it.
            await link.delete()
        finally:
            await link.close()
        deadline = time.monotonic() + self._timeout
        delay = 0.01
        while await self.exists():
            if time.monotonic() > deadline:
                if self._kill_own():
                    break
                raise BackendError(f"{self.interface} still answers after its link was deleted")
            await asyncio.sleep(delay)
            delay = min(delay * 2, 0.2)
        await self._wait_own_exit(deadline)

    async def read(self) -> DeviceState:
        return uapi.parse_get(await self._request(uapi.GET_REQUEST))

    async def configure(
        self,
        *,
        private_key: str | None = None,
        listen_port: int | None = None,
        fwmark: int | None = None,
        upsert_peers: tuple[PeerSpec, ...] = (),
        remove_peers: tuple[str, ...] = (),
    ) -> None:
        request = uapi.encode_set(
            private_key=private_key,
            listen_port=listen_port,
            fwmark=fwmark,
            upsert_peers=upsert_peers,
            remove_peers=remove_peers,
        )
        if request:
            uapi.check_set_answer(await self._request(request))

    async def close(self) -> None:
        # Leave wireguard-go running: the network must survive an agent stop.
        self._reap()
        self.pid = None

    async def _request(self, request: str) -> str:
        try:
            async with asyncio.timeout(self._timeout):
                reader, writer = await asyncio.open_unix_connection(self.socket_path)
                try:
                    writer.write(request.encode("ascii"))
                    await writer.drain()
                    answer = bytearray()
                    # The device keeps the connection open for further requests, so
                    # the empty line, not EOF, ends the answer.
                    while not answer.endswith(b"\n\n"):
                        chunk = await reader.read(65536)
                        if not chunk:
                            break
                        answer += chunk
                        if len(answer) > _MAX_ANSWER:
                            raise BackendError("UAPI answer too large")
                finally:
                    writer.close()
                    with contextlib.suppress(OSError):
                        await writer.wait_closed()
        except (FileNotFoundError, ConnectionRefusedError) as exc:
            raise BackendError(f"{self.interface}: no WireGuard device ({exc})") from exc
        except TimeoutError as exc:
            raise BackendError(f"{self.interface}: UAPI request timed out") from exc
        except OSError as exc:
            raise BackendError(f"{self.interface}: UAPI socket error: {exc}") from exc
        try:
            return answer.decode("ascii")
        except UnicodeDecodeError as exc:
            raise BackendError(f"{self.interface}: UAPI answer is not ASCII") from exc

    def _spawn(self) -> int:
        # Not asyncio/subprocess.Popen: their process objects kill the child (asyncio
        # transport close/GC) or warn (Popen.__del__) when dropped, while this child
        # must outlive the agent. setsid keeps the agent's signals (Ctrl-C to its
        # process group, terminal hangup) away from it.
        log = self._log_path or os.devnull
        file_actions = [
            (os.POSIX_SPAWN_OPEN, 0, os.devnull, os.O_RDONLY, 0),
            # Never a pipe: a write to a pipe nobody reads would block or kill it.
            (os.POSIX_SPAWN_OPEN, 1, log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600),
            (os.POSIX_SPAWN_DUP2, 1, 2),
        ]
        try:
            return os.posix_spawnp(
                self._wireguard_go,
                [self._wireguard_go, "-f", self.interface],
                {**os.environ, **_ENV_OVERRIDE},
                file_actions=file_actions,
                setsid=True,
            )
        except OSError as exc:
            raise BackendError(
                f"cannot start {self._wireguard_go}: {exc}", retryable=False
            ) from exc

    def _reap(self) -> int | None:
        """Collect our child if it exited; its exit status, or None while it runs."""
        if self.pid is None:
            return None
        try:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
        except ChildProcessError:
            self.pid = None
            return -1
        if pid == 0:
            return None
        self.pid = None
        return os.waitstatus_to_exitcode(status)

    def _kill_own(self) -> bool:
        if self.pid is None:
            return False
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.pid, signal.SIGKILL)
        return True

    async def _wait_own_exit(self, deadline: float) -> None:
        while self.pid is not None and self._reap() is None:
            if time.monotonic() > deadline:
                self._kill_own()
                deadline = time.monotonic() + self._timeout
            await asyncio.sleep(0.02)

    def _log_hint(self) -> str:
        if self._log_path is None:
            return ""
        try:
            with open(self._log_path, encoding="utf-8", errors="replace") as log:
                tail = log.read()[-500:]
        except OSError:
            return ""
        return f"; log: {tail.strip()}"
