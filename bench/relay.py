"""`make bench`: what a relay costs. Throughput through the relay forwarder
(agent/relay.py) vs direct, side by side in one run, and the relay process's
CPU per Mbit/s.

Three namespaces on one bridge (tests/netns.py): hosts a and b each run two
wireguard-go devices, wg0 straight to the other and wg1 through the relay
host, which runs only the forwarder (in a driver process of its own, whose
/proc/PID/stat is read before and after each run). iperf3 (TCP, a to b) runs
over wg0, then over wg1 through each variant of the forwarder (`VARIANTS`:
how it reads its sockets, their receive buffer), interleaved for `--rounds`;
medians are reported.

    .venv/bin/python bench/relay.py [--seconds 10] [--rounds 2] [--variants drain,...]

A benchmark, not a test: figures depend on the machine (see "machine") and
on what else it is doing (wireguard-go at both ends shares its cores).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # tests.netns

from nacl.public import PrivateKey

from agent.statedir import private_key_b64, public_key_of
from tests.netns import Driver, Host, TestNet, wait_until

PORTS = (46001, 46002)
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process (utime and stime of /proc/PID/stat)."""
    with open(f"/proc/{pid}/stat", encoding="ascii") as stat:
        fields = stat.read().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def machine() -> dict[str, Any]:
    model = ""
    with open("/proc/cpuinfo", encoding="utf-8") as info:
        for line in info:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return {
        "cpu": model,
        "cores": os.cpu_count(),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "load_before": os.getloadavg(),
    }


async def device(host: Host, name: str, port: int, beside: int | None) -> int:
    """A wireguard-go device `name` in `host`; the pid to run `wg` beside."""
    process = await host.spawn(
        "wireguard-go",
        "-f",
        name,
        beside=beside,
        env={"WG_I_PREFER_BUGGY_USERSPACE_TO_POLISHED_KMOD": "1"},
    )
    pid = beside or process.pid

    async def up() -> bool:
        return (await host.run("wg", "show", name, beside=pid, check=False)).returncode == 0

    await wait_until(up, timeout=10, message=f"{name} in {host.name}")
    return pid


async def configure(
    host: Host,
    pid: int,
    name: str,
    port: int,
    key_file: Path,
    address: str,
    peer: PrivateKey,
    peer_ip: str,
    endpoint: str,
) -> None:
    await host.run(
        "wg", "set", name, "private-key", str(key_file), "listen-port", str(port),
        "peer", public_key_of(peer), "allowed-ips", f"{peer_ip}/32", "endpoint", endpoint,
        beside=pid,
    )  # fmt: skip
    await host.run("ip", "addr", "add", f"{address}/24", "dev", name, beside=pid)
    await host.run("ip", "link", "set", name, "up", beside=pid)


async def iperf(client: Host, server: Host, address: str, seconds: int) -> float:
    """Mbit/s received by `server` from `client` over TCP to `address`."""
    listening = await server.spawn(
        "iperf3", "-s", "-1", "-B", address, "-p", "5301", stdout=asyncio.subprocess.DEVNULL
    )
    try:
        # The server is up once it accepts; iperf3 -c retries nothing, so wait.
        async def ready() -> bool:
            result = await server.run("ss", "-ltn", check=False)
            return f"{address}:5301" in result.stdout

        await wait_until(ready, timeout=10, message="iperf3 server")
        result = await client.run(
            "iperf3", "-c", address, "-p", "5301", "-t", str(seconds), "-J",
            timeout=seconds + 30,
        )  # fmt: skip
        report = json.loads(result.stdout)
        return float(report["end"]["sum_received"]["bits_per_second"]) / 1e6
    finally:
        await asyncio.wait_for(listening.wait(), 10)


# What is measured through the relay: name -> the Forwarder's arguments.
VARIANTS: dict[str, dict[str, Any]] = {
    "drain": {"loop": "drain"},  # the agent's (agent/relay.py's defaults)
    "drain_default_buffer": {"loop": "drain", "receive_buffer": 0},
    "protocol": {"loop": "protocol"},  # asyncio's datagram protocol, the 4 MiB buffer
    "protocol_default_buffer": {"loop": "protocol", "receive_buffer": 0},  # the first one built
}


async def relayed_run(
    forwarder: Driver, variant: str, a: Host, b: Host, seconds: int
) -> tuple[float, float, list[int]]:
    """(Mbit/s, relay CPU cores busy, datagrams forwarded per side) through
    the forwarder of `variant` (see VARIANTS), opened afresh (it learns
    both sides again)."""
    name = f"fw-{variant}"
    await forwarder.call(name, "open", key="a,b", entry={"hosts": ["a", "b"], "ports": PORTS})
    try:
        # b speaks first (the relay learns b), then a's packets have somewhere to go.
        await b.run("ping", "-c", "1", "-W", "1", "10.82.0.1", check=False)

        async def through() -> bool:
            result = await a.run("ping", "-c", "1", "-W", "1", "10.82.0.2", check=False)
            return result.returncode == 0

        await wait_until(through, timeout=20, message=f"a -> b through the relay ({variant})")
        clock = asyncio.get_running_loop().time
        before = cpu_seconds(forwarder.pid), clock()
        mbps = await iperf(a, b, "10.82.0.2", seconds)
        after = cpu_seconds(forwarder.pid), clock()
        status = await forwarder.call(name, "status")
    finally:
        await forwarder.call(name, "close_pair", key="a,b")
    cores = (after[0] - before[0]) / (after[1] - before[1])
    return mbps, cores, [side["forwarded"] for side in status[0]["sides"]]


async def bench(seconds: int, rounds: int, variants: tuple[str, ...]) -> dict[str, Any]:
    out: dict[str, Any] = {"machine": machine(), "seconds": seconds, "rounds": rounds}
    tmp = Path(tempfile.mkdtemp(prefix="nmbench-relay-"))
    direct: list[float] = []
    relayed: dict[str, list[tuple[float, float, list[int]]]] = {variant: [] for variant in variants}
    try:
        async with TestNet() as net:
            relay = await net.add_host("relay")
            a = await net.add_host("a")
            b = await net.add_host("b")
            forwarder = await relay.driver()
            for variant in variants:
                await forwarder.new(f"fw-{variant}", "agent.relay:Forwarder", **VARIANTS[variant])

            keys = {host.name: PrivateKey.generate() for host in (a, b)}
            for host in (a, b):
                (tmp / f"{host.name}.key").write_text(private_key_b64(keys[host.name]) + "\n")
            for host, other, n in ((a, b, 1), (b, a, 2)):
                pid = await device(host, "wg0", 51820, None)
                await device(host, "wg1", 51821, pid)
                key_file = tmp / f"{host.name}.key"
                await configure(
                    host, pid, "wg0", 51820, key_file, f"10.81.0.{n}", keys[other.name],
                    f"10.81.0.{3 - n}", f"{other.lan_address}:51820",
                )  # fmt: skip
                await configure(
                    host, pid, "wg1", 51821, key_file, f"10.82.0.{n}", keys[other.name],
                    f"10.82.0.{3 - n}", f"{relay.lan_address}:{PORTS[n - 1]}",
                )  # fmt: skip
            await a.run("ping", "-c", "1", "-W", "2", "10.81.0.2")  # direct works
            for _ in range(rounds):  # interleaved: a noisy moment hits every kind
                direct.append(await iperf(a, b, "10.81.0.2", seconds))
                for variant in variants:
                    relayed[variant].append(await relayed_run(forwarder, variant, a, b, seconds))
            await forwarder.close()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    out["direct_mbit_s"] = [round(x) for x in direct]
    for variant, runs in relayed.items():
        mbps = statistics.median(run[0] for run in runs)
        cores = statistics.median(run[1] for run in runs)
        out[f"relayed_{variant}"] = {
            "mbit_s": [round(run[0]) for run in runs],
            "vs_direct": round(mbps / statistics.median(direct), 2),
            # Cores the relay process kept busy while relaying (1.0: one core).
            "relay_cpu_cores": round(cores, 3),
            # What each Mbit/s relayed costs: CPU seconds per second, per Mbit/s.
            "relay_cpu_s_per_mbit_s": round(cores / mbps, 5) if mbps else None,
            "forwarded_datagrams": runs[-1][2],
        }
    out["load_after"] = os.getloadavg()
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated")
    args = parser.parse_args()
    missing = [t for t in ("ip", "unshare", "wireguard-go", "iperf3", "wg") if not shutil.which(t)]
    if os.geteuid() != 0 or missing:
        print(f"bench/relay.py needs root and {', '.join(missing) or '-'}", file=sys.stderr)
        return 2
    variants = tuple(args.variants.split(","))
    if not set(variants) <= set(VARIANTS):
        print(f"--variants: some of {', '.join(VARIANTS)}", file=sys.stderr)
        return 2
    print(json.dumps(asyncio.run(bench(args.seconds, args.rounds, variants))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
