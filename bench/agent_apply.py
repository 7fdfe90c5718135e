"""The agent's own cost: plan and apply a change to an interface with many peers.

Real wireguard-go, in a network namespace this script creates (with a private
/var/run/wireguard) and removes; nothing is sent anywhere (no peer has traffic
or keepalives). Measures, with the agent's own read/plan/apply:
- the first apply of a snapshot of N peers;
- a one-peer change (a delta) on top of it: read the device, plan, apply,
  median of 20.

    .venv/bin/python bench/agent_apply.py --peers 1000

Prints one JSON line. Needs root, `ip`, `unshare` and `wireguard-go`.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import time

from nacl.public import PrivateKey

from agent.apply import apply, read_actual
from agent.link import Link
from agent.plan import Actual, plan
from agent.userspace import UserspaceBackend
from events.desired import (
    WIREGUARD,
    AddressEntry,
    DesiredDelta,
    DesiredState,
    InterfaceEntry,
    PeerEntry,
    Sections,
    apply_delta,
)

PRIVATE_MOUNT = (
    'mkdir -p /var/run/wireguard && mount -t tmpfs tmpfs /var/run/wireguard && exec "$@"'
)


def peer(n: int) -> tuple[str, PeerEntry]:
    key = base64.b64encode(bytes(PrivateKey.generate().public_key)).decode()
    return key, PeerEntry(
        allowed_ips=(f"10.{100 + n // 65536}.{n // 256 % 256}.{n % 256}/32",),
        endpoint=f"192.0.2.{n % 250 + 1}:51820",
        name=f"p{n}",
    )


async def inner(peers: int) -> dict[str, object]:
    key = PrivateKey.generate()
    private = base64.b64encode(bytes(key)).decode()
    public = base64.b64encode(bytes(key.public_key)).decode()
    backend = UserspaceBackend("nm0")
    link = Link("nm0")
    state = DesiredState(
        host_id="bench",
        revision=1,
        sections=Sections(
            interface={WIREGUARD: InterfaceEntry(listen_port=51820, mtu=1420)},
            addresses={"10.99.0.1/16": AddressEntry()},
            peers=dict(sorted(peer(n) for n in range(peers))),
        ),
    )

    async def actual() -> Actual:
        return await read_actual(backend, link)

    try:
        t0 = time.perf_counter()
        ops = plan(state, await actual(), public_key=public)
        result = await apply(ops, backend, link, private)
        assert result.ok, result.error
        first = time.perf_counter() - t0
        assert len((await backend.read()).peers) == peers
        reads, plans, applies = [], [], []
        for n in range(20):
            delta = DesiredDelta(
                host_id="bench",
                revision=state.revision + 1,
                base=state.revision,
                upsert=Sections(peers=dict([peer(peers + n)])),
            )
            previous, state = state, apply_delta(state, delta)
            t0 = time.perf_counter()
            now = await actual()
            t1 = time.perf_counter()
            ops = plan(state, now, public_key=public, previous=previous)
            t2 = time.perf_counter()
            result = await apply(ops, backend, link, private)
            t3 = time.perf_counter()
            assert result.ok and len(ops) == 1, ops
            reads.append(t1 - t0)
            plans.append(t2 - t1)
            applies.append(t3 - t2)
        total = [r + p + a for r, p, a in zip(reads, plans, applies, strict=True)]
        return {
            "peers": peers,
            "backend": "wireguard-go",
            "first_apply_ms": first * 1000,
            "change_ms": statistics.median(total) * 1000,
            "read_ms": statistics.median(reads) * 1000,
            "plan_ms": statistics.median(plans) * 1000,
            "apply_ms": statistics.median(applies) * 1000,
        }
    finally:
        await backend.destroy()
        await backend.close()
        await link.close()


def outer(peers: int) -> int:
    missing = [t for t in ("ip", "unshare", "wireguard-go") if shutil.which(t) is None]
    if os.geteuid() != 0 or missing:
        print(f"needs root and {', '.join(missing) or 'nothing else'}", file=sys.stderr)
        return 2
    netns = f"nmbench-{os.getpid()}"
    subprocess.run(["ip", "netns", "add", netns], check=True)
    try:
        subprocess.run(["ip", "-n", netns, "link", "set", "lo", "up"], check=True)
        run = subprocess.run(
            ["ip", "netns", "exec", netns, "unshare", "-m", "--propagation", "private",
             "sh", "-c", PRIVATE_MOUNT, "sh",
             sys.executable, os.path.abspath(__file__), "--inner", "--peers", str(peers)],
            capture_output=True, text=True, timeout=600,
        )  # fmt: skip
        sys.stderr.write(run.stderr)
        if run.returncode != 0:
            return run.returncode
        print(run.stdout.strip().splitlines()[-1])
        return 0
    finally:
        # Anything still running in our namespace is ours (wireguard-go if the
        # inner run died early): stop it by pid, then remove the namespace.
        pids = subprocess.run(["ip", "netns", "pids", netns], capture_output=True, text=True)
        for pid in pids.stdout.split():
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(pid), signal.SIGTERM)
        subprocess.run(["ip", "netns", "del", netns], check=False)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--peers", type=int, default=1000)
    parser.add_argument("--inner", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.inner:
        print(json.dumps(asyncio.run(inner(args.peers))))
        return 0
    return outer(args.peers)


if __name__ == "__main__":
    sys.exit(main())
