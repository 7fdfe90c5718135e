"""One contract for WireGuard backends, run against the fake (in process), against
wireguard-go (UserspaceBackend) and against the kernel module (KernelBackend), each
real one in a network-namespace test host. Without the wireguard module the kernel
case is skipped here; tests/test_kernel_vm.py runs it in a VM with a real kernel."""

from __future__ import annotations

import base64
from collections.abc import AsyncIterator
from typing import Any, Protocol

import msgspec
import pytest
from nacl.public import PrivateKey

from agent.backend import DeviceState, PeerSpec
from agent.fake import FakeBackend
from agent.kernel import kernel_wireguard_available
from tests.netns import Driver, TestNet

KEY = PrivateKey(bytes(range(1, 33)))
PEER = {n: base64.b64encode(bytes(PrivateKey(bytes([n]) * 32).public_key)).decode() for n in (1, 2)}


class Subject(Protocol):
    async def call(self, method: str, **kwargs: Any) -> Any: ...


class InProcess:
    def __init__(self) -> None:
        self.backend = FakeBackend("wg0")

    async def call(self, method: str, **kwargs: Any) -> Any:
        result = await getattr(self.backend, method)(**kwargs)
        return msgspec.to_builtins(result)


class InHost:
    def __init__(self, driver: Driver) -> None:
        self.driver = driver

    async def call(self, method: str, **kwargs: Any) -> Any:
        return await self.driver.call("wg", method, **msgspec.to_builtins(kwargs))


REAL = {"wireguard-go": "agent.userspace:UserspaceBackend", "kernel": "agent.kernel:KernelBackend"}


@pytest.fixture(
    params=["fake", *(pytest.param(name, marks=pytest.mark.netns) for name in sorted(REAL))]
)
async def backend(request: pytest.FixtureRequest) -> AsyncIterator[Subject]:
    if request.param == "fake":
        yield InProcess()
        return
    from tests.netns import require_netns

    require_netns()
    if request.param == "kernel" and not await kernel_wireguard_available():
        pytest.skip("no wireguard kernel module here (tests/test_kernel_vm.py runs it in a VM)")
    async with TestNet() as net:
        host = await net.add_host("a")
        driver = await host.driver()
        await driver.new("wg", REAL[request.param], "wg0")
        yield InHost(driver)


async def read(subject: Subject) -> DeviceState:
    return msgspec.convert(await subject.call("read"), DeviceState)


def spec(n: int, allowed: str, endpoint: str | None = None) -> PeerSpec:
    return PeerSpec(
        public_key=PEER[n], allowed_ips=(allowed,), endpoint=endpoint, persistent_keepalive=0
    )


async def test_backend_contract(backend: Subject) -> None:
    assert await backend.call("exists") is False
    await backend.call("create")
    await backend.call("create")  # idempotent
    assert await backend.call("exists") is True
    fresh = await read(backend)
    assert fresh.public_key is None and fresh.peers == ()

    await backend.call(
        "configure",
        private_key=base64.b64encode(bytes(KEY)).decode(),
        listen_port=51999,
        upsert_peers=[
            spec(2, "10.0.0.3/32", "192.0.2.2:51820"),
            spec(1, "10.0.0.2/32", "192.0.2.1:51820"),
        ],
    )
    device = await read(backend)
    assert device.public_key == base64.b64encode(bytes(KEY.public_key)).decode()
    assert device.listen_port == 51999
    assert [p.public_key for p in device.peers] == sorted(PEER.values())
    by_key = {p.public_key: p for p in device.peers}
    assert by_key[PEER[1]].allowed_ips == ("10.0.0.2/32",)
    assert by_key[PEER[1]].endpoint == "192.0.2.1:51820"

    # In place: allowed IPs replaced, endpoint kept when not given, peer 2 untouched.
    await backend.call("configure", upsert_peers=[spec(1, "10.0.5.0/24")])
    by_key = {p.public_key: p for p in (await read(backend)).peers}
    assert by_key[PEER[1]].allowed_ips == ("10.0.5.0/24",)
    assert by_key[PEER[1]].endpoint == "192.0.2.1:51820"
    assert by_key[PEER[2]].allowed_ips == ("10.0.0.3/32",)

    # The fwmark (an exit node's tunnel packets): set, kept by other changes, cleared.
    assert (await read(backend)).fwmark == 0
    await backend.call("configure", fwmark=0xCA6C)
    await backend.call("configure", upsert_peers=[spec(1, "10.0.5.0/24")])
    assert (await read(backend)).fwmark == 0xCA6C
    await backend.call("configure", fwmark=0)
    assert (await read(backend)).fwmark == 0

    await backend.call("configure", remove_peers=[PEER[2]])
    await backend.call("configure", remove_peers=[PEER[2]])  # absent: fine
    assert [p.public_key for p in (await read(backend)).peers] == [PEER[1]]

    await backend.call("destroy")
    await backend.call("destroy")  # idempotent
    assert await backend.call("exists") is False
