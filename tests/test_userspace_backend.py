"""UserspaceBackend: against a fake UAPI socket (no root), then with real
wireguard-go tunnels between two test hosts (marked netns)."""

from __future__ import annotations

import asyncio
import base64
import os
import stat
import tempfile
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import msgspec
import pytest
from nacl.public import PrivateKey

from agent import uapi
from agent.backend import BackendError, DeviceState, PeerSpec, PeerState
from agent.userspace import UserspaceBackend
from tests.netns import (
    Driver,
    Host,
    RemoteError,
    TestNet,
    ping,
    testnet_fixture,  # noqa: F401  (the `testnet` fixture)
    wait_until,
)

PUB2 = "zo060cy2M+x7cMF4FKXHbs0CloUFDTRHRboFhw5YfVk="

# --- fake device -------------------------------------------------------------


class FakeDevice:
    """A UAPI socket that records requests and answers from `reply`."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.requests: list[str] = []
        self.connections = 0
        self.reply: Callable[[str], bytes] = lambda request: b"errno=0\n\n"
        self._server: asyncio.Server | None = None

    async def start(self) -> None:
        self._server = await asyncio.start_unix_server(self._serve, self.path)

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            # Like wireguard-go: several requests per connection are allowed.
            while request := (await reader.readuntil(b"\n\n")).decode():
                self.requests.append(request)
                answer = self.reply(request)
                writer.write(answer)
                await writer.drain()
                if not answer.endswith(b"\n\n"):
                    break  # a device dying mid-answer
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()


@pytest.fixture
def socket_dir() -> Iterator[str]:
    # Short path: unix socket paths are limited to 108 bytes, tmp_path can be longer.
    with tempfile.TemporaryDirectory(prefix="nmu") as path:
        yield path


@pytest.fixture
async def device(socket_dir: str) -> AsyncIterator[FakeDevice]:
    fake = FakeDevice(os.path.join(socket_dir, "wgx.sock"))
    await fake.start()
    yield fake
    await fake.stop()


def _backend(socket_dir: str, wireguard_go: str = "/nonexistent/wireguard-go") -> UserspaceBackend:
    return UserspaceBackend("wgx", socket_dir=socket_dir, wireguard_go=wireguard_go, timeout=2)


async def test_absent_device_is_retryable(socket_dir: str) -> None:
    backend = _backend(socket_dir)
    assert await backend.exists() is False
    with pytest.raises(BackendError) as info:
        await backend.read()
    assert info.value.retryable is True
    with pytest.raises(BackendError) as info:
        await backend.configure(listen_port=1)
    assert info.value.retryable is True
    # A stale socket file (nobody listening) is absent too.
    Path(socket_dir, "wgx.sock").touch()
    assert await backend.exists() is False


async def test_create_attaches_to_a_running_device(device: FakeDevice, socket_dir: str) -> None:
    device.reply = lambda request: b"listen_port=5\nerrno=0\n\n"
    # The binary does not exist: attaching must not try to start it.
    backend = _backend(socket_dir)
    await backend.create()
    assert backend.pid is None
    assert await backend.read() == DeviceState(public_key=None, listen_port=5)
    await backend.close()


async def test_configure_sends_one_request_per_connection(
    device: FakeDevice, socket_dir: str
) -> None:
    backend = _backend(socket_dir)
    peer = PeerSpec(public_key=PUB2, allowed_ips=("10.0.0.2/32",))
    await backend.configure(listen_port=51820, upsert_peers=(peer,))
    await backend.configure(remove_peers=(PUB2,))
    await backend.configure()  # nothing to change: no request at all
    assert device.requests == [
        uapi.encode_set(listen_port=51820, upsert_peers=(peer,)),
        uapi.encode_set(remove_peers=(PUB2,)),
    ]
    assert device.connections == 2


async def test_device_errors(device: FakeDevice, socket_dir: str) -> None:
    backend = _backend(socket_dir)
    device.reply = lambda request: b"errno=-22\n\n"
    with pytest.raises(BackendError) as info:
        await backend.configure(listen_port=1)
    assert info.value.retryable is False
    device.reply = lambda request: b"listen_port=1\n"  # cut short, then EOF
    with pytest.raises(BackendError, match="truncated"):
        await backend.read()


def _script(directory: str, body: str) -> str:
    path = os.path.join(directory, "fake-wireguard-go")
    Path(path).write_text(f"#!/bin/sh\n{body}\n")
    os.chmod(path, stat.S_IRWXU)
    return path


async def test_create_reports_a_failed_start(socket_dir: str) -> None:
    with pytest.raises(BackendError) as info:
        await _backend(socket_dir).create()
    assert info.value.retryable is False  # no such binary

    backend = _backend(socket_dir, _script(socket_dir, "exit 3"))
    with pytest.raises(BackendError, match="status 3"):
        await backend.create()
    assert backend.pid is None

    backend = UserspaceBackend(
        "wgx",
        socket_dir=socket_dir,
        wireguard_go=_script(socket_dir, "exec sleep 60"),
        timeout=0.3,
    )
    with pytest.raises(BackendError, match="in time"):
        await backend.create()
    assert backend.pid is None  # killed and reaped


# --- real tunnels ------------------------------------------------------------


def _keypair() -> tuple[str, str]:
    key = PrivateKey.generate()
    return (
        base64.b64encode(bytes(key)).decode(),
        base64.b64encode(bytes(key.public_key)).decode(),
    )


async def _read(driver: Driver) -> DeviceState:
    return msgspec.convert(await driver.call("wg", "read"), DeviceState)


async def _wireguard_go_pids(host: Host) -> list[int]:
    pids = []
    for pid in await host.pids():
        try:
            comm = Path(f"/proc/{pid}/comm").read_text().strip()
        except FileNotFoundError:
            continue
        if comm == "wireguard-go":
            pids.append(pid)
    return pids


async def _start_agent(host: Host, private_key: str, address: str, peers: list[PeerSpec]) -> Driver:
    driver = await host.driver()
    await driver.new("wg", "agent.userspace:UserspaceBackend", "wg0")
    await driver.new("link", "agent.link:Link", "wg0")
    assert await driver.call("wg", "exists") is False
    await driver.call("wg", "create")
    await driver.call(
        "wg", "configure", private_key=private_key, listen_port=51820, upsert_peers=peers
    )
    for cidr in address.split(","):
        await driver.call("link", "add_address", cidr=cidr)
    await driver.call("link", "set_up")
    return driver


@pytest.mark.netns
async def test_tunnel_in_place_changes_and_reattach(testnet: TestNet) -> None:
    a, b = await testnet.add_host("a"), await testnet.add_host("b")
    (a_priv, a_pub), (b_priv, b_pub) = _keypair(), _keypair()
    _, c_pub = _keypair()  # a third peer that never answers

    def to_b(*extra: str) -> PeerSpec:
        return PeerSpec(
            public_key=b_pub,
            allowed_ips=("10.99.0.2/32", "fd99::2/128", *extra),
            endpoint=f"{b.lan_address}:51820",
        )

    to_c = PeerSpec(public_key=c_pub, allowed_ips=("10.99.0.3/32",), endpoint="192.0.2.99:51820")
    to_a = PeerSpec(
        public_key=a_pub,
        allowed_ips=("10.99.0.1/32", "fd99::1/128"),
        endpoint=f"{a.lan_address}:51820",
    )
    agent_a = await _start_agent(a, a_priv, "10.99.0.1/24,fd99::1/64", [to_b(), to_c])
    agent_b = await _start_agent(b, b_priv, "10.99.0.2/24,fd99::2/64", [to_a])
    wg_pid = await agent_a.attr("wg", "pid")

    def peer_b(state: DeviceState) -> tuple[float, int]:
        peer = _peer(state, b_pub)
        return peer.last_handshake, peer.rx_bytes

    assert wg_pid in await _wireguard_go_pids(a)

    state = await _read(agent_a)
    assert state.public_key == a_pub
    assert state.listen_port == 51820
    assert {p.public_key for p in state.peers} == {b_pub, c_pub}

    assert await ping(a, "10.99.0.2")
    assert await ping(a, "fd99::2")
    handshake, rx = peer_b(await _read(agent_a))
    assert handshake > 0

    # Another peer changes: b's session is untouched.
    await agent_a.call(
        "wg",
        "configure",
        upsert_peers=[msgspec.structs.replace(to_c, allowed_ips=("10.99.0.3/32", "10.98.0.0/24"))],
    )
    state = await _read(agent_a)
    assert _peer(state, c_pub).allowed_ips == ("10.98.0.0/24", "10.99.0.3/32")
    assert peer_b(state)[0] == handshake
    assert await ping(a, "10.99.0.2")
    assert peer_b(await _read(agent_a))[0] == handshake

    # b itself changes in place (more allowed IPs): still the same session.
    await agent_a.call("wg", "configure", upsert_peers=[to_b("10.97.0.0/24")])
    assert await ping(a, "10.99.0.2")
    state = await _read(agent_a)
    assert _peer(state, b_pub).allowed_ips == ("10.97.0.0/24", "10.99.0.2/32", "fd99::2/128")
    assert peer_b(state)[0] == handshake
    assert peer_b(state)[1] > rx  # counters kept and growing: not a new peer

    await agent_a.call("wg", "configure", remove_peers=[c_pub])
    assert [p.public_key for p in (await _read(agent_a)).peers] == [b_pub]
    assert await ping(a, "10.99.0.2")

    # An agent restart: the old one stops, a new one attaches to the same device.
    await agent_a.call("wg", "close")
    await agent_a.call("link", "close")
    await agent_a.close()
    assert await _wireguard_go_pids(a) == [wg_pid]
    assert await ping(a, "10.99.0.2")
    index = (await a.run("cat", "/sys/class/net/wg0/ifindex")).stdout.strip()

    agent_a = await a.driver(beside=wg_pid)
    await agent_a.new("wg", "agent.userspace:UserspaceBackend", "wg0")
    assert await agent_a.call("wg", "exists") is True
    await agent_a.call("wg", "create")
    assert await agent_a.attr("wg", "pid") is None  # attached, nothing started
    assert await _wireguard_go_pids(a) == [wg_pid]
    assert (await a.run("cat", "/sys/class/net/wg0/ifindex")).stdout.strip() == index
    state = await _read(agent_a)
    assert [p.public_key for p in state.peers] == [b_pub]
    assert peer_b(state)[0] == handshake
    shown = (await a.run("wg", "show", "wg0", "peers", beside=wg_pid)).stdout.split()
    assert shown == [b_pub]

    # Removing the last peer cuts the tunnel.
    await agent_a.call("wg", "configure", remove_peers=[b_pub])
    assert not await ping(a, "10.99.0.2", timeout=1)

    # destroy, from the attached agent: the link, the socket and wireguard-go go.
    await agent_a.call("wg", "destroy")
    assert await agent_a.call("wg", "exists") is False
    assert (await a.run("ip", "link", "show", "wg0", check=False)).returncode != 0
    await wait_until(lambda: not _alive(wg_pid), timeout=5, message="wireguard-go exited")
    await agent_a.call("wg", "destroy")  # idempotent

    # b, which started its device itself, destroys it and reaps its child.
    b_pid = await agent_b.attr("wg", "pid")
    await agent_b.call("wg", "destroy")
    assert await agent_b.attr("wg", "pid") is None
    assert not _alive(b_pid)
    await agent_b.close()


def _peer(state: DeviceState, public_key: str) -> PeerState:
    (peer,) = (p for p in state.peers if p.public_key == public_key)
    return peer


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]
    except FileNotFoundError:
        return False
    return state != "Z"


@pytest.mark.netns
async def test_same_interface_name_in_two_hosts(testnet: TestNet) -> None:
    """Each host's mount namespace has its own socket dir: no clash on wg0."""
    a, b = await testnet.add_host("a"), await testnet.add_host("b")
    drivers = []
    for host in (a, b):
        driver = await host.driver()
        await driver.new("wg", "agent.userspace:UserspaceBackend", "wg0")
        await driver.call("wg", "create")
        drivers.append(driver)
    pids = [await d.attr("wg", "pid") for d in drivers]
    assert None not in pids
    assert pids[0] != pids[1]
    with pytest.raises(RemoteError) as info:
        await drivers[0].call("wg", "configure", private_key="bad")
    assert info.value.retryable is False
    for driver in drivers:
        await driver.call("wg", "destroy")
