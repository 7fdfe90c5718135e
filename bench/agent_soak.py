"""Agent memory over many updates: a real Agent (plan, apply, state-dir writes)
on the fake machine, fed a stream of desired states that add, change and remove
peers. Prints RSS as it goes; memory should level off, not grow with updates.

    .venv/bin/python bench/agent_soak.py [updates] [peers]
"""

from __future__ import annotations

import asyncio
import base64
import gc
import hashlib
import sys
import tempfile
import time
from pathlib import Path

from nacl.public import PrivateKey

from agent.daemon import Agent
from agent.fake import FakeBackend, FakeDns, FakeFirewall, FakeLink, FakeMachine
from agent.statedir import Identity, StateDir, private_key_b64, public_key_of
from events.desired import (
    WIREGUARD,
    AddressEntry,
    DesiredState,
    InterfaceEntry,
    PeerEntry,
    Sections,
)


def rss_kib() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def peer(n: int, generation: int) -> tuple[str, PeerEntry]:
    key = base64.b64encode(hashlib.sha256(f"{n}".encode()).digest()).decode()
    return key, PeerEntry(
        allowed_ips=(f"10.{n // 250}.{n % 250}.{generation % 200 + 1}/32",),
        endpoint=f"192.0.2.{n % 250}:{51820 + generation % 7}",
        persistent_keepalive=25,
        name=f"p{n}",
    )


async def main(updates: int, peers: int) -> None:
    key = PrivateKey.generate()
    machine = FakeMachine()
    with tempfile.TemporaryDirectory() as tmp:
        agent = Agent(
            identity=Identity(host_id="h", name="soak", server="nats://127.0.0.1:1"),
            state=StateDir(Path(tmp)),
            backend=FakeBackend("nm0", machine),
            link=FakeLink("nm0", machine),
            firewall=FakeFirewall(),
            dns=FakeDns(),
            private_key=private_key_b64(key),
            public_key=public_key_of(key),
        )
        start = time.perf_counter()
        print(f"{'updates':>8} {'rss KiB':>9} {'s':>6}")
        for i in range(1, updates + 1):
            # Each update changes one peer, adds one and drops one: churn.
            members = [peer(n, i if n == i % peers else 0) for n in range(peers) if n != i % peers]
            state = DesiredState(
                host_id="h",
                revision=i,
                sections=Sections(
                    interface={WIREGUARD: InterfaceEntry(listen_port=51820, mtu=1420)},
                    addresses={"10.0.0.1/16": AddressEntry()},
                    peers=dict(members),
                ),
            )
            agent.offer(state)
            await agent.reconcile_once()
            machine.ops.clear()
            if i % (updates // 10) == 0:
                gc.collect()
                print(f"{i:>8} {rss_kib():>9} {time.perf_counter() - start:>6.1f}")


if __name__ == "__main__":
    from cli.logs import configure_logging

    configure_logging("console", "warning")
    args = [int(a) for a in sys.argv[1:]]
    asyncio.run(main(args[0] if args else 20000, args[1] if len(args) > 1 else 200))
