"""A WireGuard device and link in memory, recording every change.

For unit tests of the agent's logic and for simulating thousands of agents in
one process (the scale benchmark). It honours the same contract as the real
backends (tests/test_backend_contract.py runs against both).
"""

from __future__ import annotations

import base64
import ipaddress

from nacl.public import PrivateKey

from agent.backend import BackendError, DeviceState, PeerSpec, PeerState
from agent.link import LinkState


class FakeMachine:
    """One host's kernel, as far as the agent can see: interfaces and a log."""

    def __init__(self) -> None:
        self.devices: dict[str, FakeDevice] = {}
        self.ops: list[str] = []


class FakeDevice:
    def __init__(self, index: int) -> None:
        self.index = index
        self.public_key: str | None = None
        self.listen_port = 0
        self.peers: dict[str, PeerState] = {}
        self.mtu = 1420
        self.up = False
        self.addresses: set[str] = set()
        self.routes: set[str] = set()


class FakeBackend:
    def __init__(self, interface: str, machine: FakeMachine | None = None) -> None:
        self.interface = interface
        self.machine = machine or FakeMachine()

    def _device(self) -> FakeDevice:
        device = self.machine.devices.get(self.interface)
        if device is None:
            raise BackendError(f"{self.interface}: no such device")
        return device

    async def exists(self) -> bool:
        return self.interface in self.machine.devices

    async def create(self) -> None:
        if self.interface not in self.machine.devices:
            self.machine.devices[self.interface] = FakeDevice(len(self.machine.devices) + 1)
            self.machine.ops.append(f"create {self.interface}")

    async def destroy(self) -> None:
        if self.machine.devices.pop(self.interface, None) is not None:
            self.machine.ops.append(f"destroy {self.interface}")

    async def read(self) -> DeviceState:
        device = self._device()
        return DeviceState(
            public_key=device.public_key,
            listen_port=device.listen_port,
            peers=tuple(device.peers[k] for k in sorted(device.peers)),
        )

    async def configure(
        self,
        *,
        private_key: str | None = None,
        listen_port: int | None = None,
        upsert_peers: tuple[PeerSpec, ...] = (),
        remove_peers: tuple[str, ...] = (),
    ) -> None:
        device = self._device()
        if private_key is not None:
            raw = base64.b64decode(private_key)
            device.public_key = base64.b64encode(bytes(PrivateKey(raw).public_key)).decode()
            self.machine.ops.append("set private_key")
        if listen_port is not None:
            device.listen_port = listen_port
            self.machine.ops.append(f"set listen_port {listen_port}")
        for key in remove_peers:
            if device.peers.pop(key, None) is not None:
                self.machine.ops.append(f"remove peer {key[:8]}")
        for spec in upsert_peers:
            old = device.peers.get(spec.public_key)
            endpoint = (
                spec.endpoint if spec.endpoint is not None else (old.endpoint if old else None)
            )
            device.peers[spec.public_key] = PeerState(
                public_key=spec.public_key,
                allowed_ips=tuple(sorted(str(ipaddress.ip_network(a)) for a in spec.allowed_ips)),
                endpoint=endpoint,
                persistent_keepalive=spec.persistent_keepalive,
                last_handshake=old.last_handshake if old else 0.0,
                rx_bytes=old.rx_bytes if old else 0,
                tx_bytes=old.tx_bytes if old else 0,
            )
            self.machine.ops.append(
                f"{'update' if old else 'add'} peer {spec.public_key[:8]} "
                f"allowed {','.join(spec.allowed_ips)}"
                + (f" endpoint {spec.endpoint}" if spec.endpoint else "")
            )

    async def close(self) -> None:
        return None


class FakeLink:
    """`agent.link.Link` over a FakeMachine."""

    def __init__(self, interface: str, machine: FakeMachine) -> None:
        self.interface = interface
        self.machine = machine

    def _device(self) -> FakeDevice:
        device = self.machine.devices.get(self.interface)
        if device is None:
            raise BackendError(f"{self.interface}: no such link")
        return device

    async def exists(self) -> bool:
        return self.interface in self.machine.devices

    async def state(self) -> LinkState:
        d = self._device()
        return LinkState(
            index=d.index,
            mtu=d.mtu,
            up=d.up,
            addresses=tuple(sorted(d.addresses)),
            routes=tuple(sorted(d.routes)),
        )

    async def set_mtu(self, mtu: int) -> None:
        self._device().mtu = mtu
        self.machine.ops.append(f"link mtu {mtu}")

    async def set_up(self) -> None:
        self._device().up = True
        self.machine.ops.append("link up")

    async def add_address(self, cidr: str) -> None:
        self._device().addresses.add(cidr)
        self.machine.ops.append(f"addr add {cidr}")

    async def remove_address(self, cidr: str) -> None:
        self._device().addresses.discard(cidr)
        self.machine.ops.append(f"addr del {cidr}")

    async def add_route(self, cidr: str) -> None:
        self._device().routes.add(cidr)
        self.machine.ops.append(f"route add {cidr}")

    async def remove_route(self, cidr: str) -> None:
        self._device().routes.discard(cidr)
        self.machine.ops.append(f"route del {cidr}")

    async def delete(self) -> None:
        if self.machine.devices.pop(self.interface, None) is not None:
            self.machine.ops.append(f"link del {self.interface}")

    async def close(self) -> None:
        return None
