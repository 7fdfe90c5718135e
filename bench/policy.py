"""`make bench`, policy part: what a policy change, a tag change and a join
under a policy cost the control plane, against a naive baseline that
recomputes every host's view (what Headscale does on every policy change).

A network of N hosts with 50 tags (each host one tag; every tenth a second
one), a policy of 51 rules (tag k may open 443/tcp on tag k+1; ops reach
everything). Measured, in this process, on the pure core the control plane
runs for each change: fold the event, then build the messages for every host
whose state moved (`messages`); bytes are the encoded messages. The baseline
derives every host's whole state before and after and compares them.

    .venv/bin/python bench/policy.py [--hosts 1000,5000] [--repeat 5]

Figures depend on the machine (see "machine" in the JSON): read the ratios.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from controlplane.decide import Context, decide
from events.commands import AnyCommand, CreateEnrollmentKey, CreateNetwork, Join
from events.desired import DesiredMessage, Sections, desired_encoder
from events.envelope import RecordedEvent, make_envelope
from events.model import AnyEvent, NodeTagged, PolicySet
from events.subjects import aggregate_subject
from events.tokens import make_token
from projections.desired import Builders, DesiredChanges, fold, messages
from projections.topology import Topology


def public_key(label: str) -> str:
    return base64.b64encode(hashlib.sha256(label.encode()).digest()).decode()


RESULTS = Path(__file__).resolve().parent / "results"
NETWORK = "bench"
TAGS = 50


def policy_document(extra: str = "") -> str:
    """Tag k may open 443/tcp on tag k+1; ops reach everything (plain JSON)."""
    rules = [
        f'{{"from": ["tag:t{k}"], "to": ["tag:t{(k + 1) % TAGS}"], "ports": ["443/tcp"]}}'
        for k in range(TAGS)
    ]
    rules.append('{"from": ["tag:ops"], "to": ["*"]}')
    if extra:
        rules.append(extra)
    return '{"rules": [' + ",\n".join(rules) + "]}"


# The rule a policy change adds, and the next one takes away.
EXTRA_RULE = '{"from": ["tag:t3"], "to": ["tag:t7"], "ports": ["22/tcp"]}'


def policy_tags(n: int) -> tuple[str, ...]:
    """Host n's tags: one of the 50, and `ops` on one host in 500."""
    return (f"t{n % TAGS}",) + (("ops",) if n % 500 == 0 else ())


class World:
    """A topology folded from decided commands and raw events, with the
    revision each host's agent holds (everything published so far)."""

    def __init__(self) -> None:
        self.topology = Topology()
        self.seq = 0
        self.published: dict[str, int] = {}

    def record(self, subject: str, event: AnyEvent) -> Any:
        self.seq += 1
        envelope = make_envelope(
            event, event_id=str(self.seq), time=0.0, actor="bench", command_id=str(self.seq)
        )
        return fold(self.topology, RecordedEvent(seq=self.seq, subject=subject, envelope=envelope))

    def run(self, command: AnyCommand, key_id: str = "", secret: str = "") -> tuple[Any, list[Any]]:
        ctx = Context(now=0.0, actor="bench", new_key_id=key_id, new_secret=secret)
        decision = decide(self.topology, command, ctx)
        return decision.result, [self.record(s, e) for s, e in decision.events]

    def settle(self) -> None:
        for host_id in self.topology.hosts:
            self.published[host_id] = self.topology.revision_of(host_id)


def seeded(hosts: int) -> tuple[World, list[str], str]:
    world = World()
    world.run(CreateNetwork(name=NETWORK, cidr="10.128.0.0/9"))
    key, _ = world.run(CreateEnrollmentKey(network=NETWORK, uses=None), "kbench", "sbench")
    token = make_token("nats://bench", key["key_id"], "sbench")
    subject = aggregate_subject("network", NETWORK)
    world.record(subject, PolicySet(network=NETWORK, document=policy_document()))
    ids = []
    for n in range(hosts):
        result, _ = world.run(Join(token=token, public_key=public_key(f"key{n}"), name=f"h{n}"))
        ids.append(result["host_id"])
        node = next(iter(world.topology.nodes_by_host[result["host_id"]]))
        tags = policy_tags(n)
        world.record(
            subject,
            NodeTagged(network=NETWORK, node_id=node, host_id=result["host_id"], tags=tags),
        )
    world.settle()
    return world, ids, token


def incremental(world: World, change: Callable[[], list[Any]]) -> dict[str, Any]:
    """The control plane's way: fold, then messages for the hosts that moved."""
    started = time.perf_counter()
    touched = change()
    changes = DesiredChanges()
    for one in touched:
        changes.add(one)
    sent = messages(world.topology, changes, world.published)
    elapsed = time.perf_counter() - started
    world.settle()
    return {"seconds": elapsed, **_size(sent)}


def naive(world: World, change: Callable[[], list[Any]]) -> dict[str, Any]:
    """The baseline: every host's whole view before and after, compared."""
    started = time.perf_counter()
    before = Builders(world.topology)
    views: dict[str, Sections] = {}
    for host_id in world.topology.hosts:
        state = before.state(host_id)
        if state is not None:
            views[host_id] = state.sections
    change()
    after = Builders(world.topology)
    moved: list[DesiredMessage] = []
    for host_id in world.topology.hosts:
        state = after.state(host_id)
        if state is not None and state.sections != views.get(host_id):
            moved.append(state)
    elapsed = time.perf_counter() - started
    world.settle()
    return {"seconds": elapsed, **_size(moved)}


def _size(sent: list[DesiredMessage]) -> dict[str, Any]:
    return {"hosts": len(sent), "bytes": sum(len(desired_encoder.encode(m)) for m in sent)}


def scenarios(world: World, ids: list[str], token: str) -> dict[str, Callable[[], list[Any]]]:
    subject = aggregate_subject("network", NETWORK)
    counter = iter(range(10**6))

    def policy_change() -> list[Any]:
        # One more rule between two tags, then (next time) without it again:
        # the first change adds it (the seed has the policy without it).
        extra = EXTRA_RULE if next(counter) % 2 == 0 else ""
        return [world.record(subject, PolicySet(network=NETWORK, document=policy_document(extra)))]

    def tag_change() -> list[Any]:
        host_id = ids[next(counter) % len(ids)]
        node = next(iter(world.topology.nodes_by_host[host_id]))
        tag = f"t{next(counter) % TAGS}"
        return [
            world.record(
                subject, NodeTagged(network=NETWORK, node_id=node, host_id=host_id, tags=(tag,))
            )
        ]

    def join() -> list[Any]:
        n = next(counter)
        _, touched = world.run(Join(token=token, public_key=public_key(f"new{n}"), name=f"new{n}"))
        return touched

    return {"policy change": policy_change, "tag change": tag_change, "join": join}


def bench(hosts: int, repeat: int) -> dict[str, Any]:
    started = time.perf_counter()
    world, ids, token = seeded(hosts)
    out: dict[str, Any] = {"hosts": hosts, "seed_seconds": round(time.perf_counter() - started, 1)}
    for name, change in scenarios(world, ids, token).items():
        ours = [incremental(world, change) for _ in range(repeat)]
        # The baseline costs seconds per change at 5,000 hosts: fewer runs.
        theirs = [naive(world, change) for _ in range(max(1, repeat // 2))]
        p50_ours = statistics.median(r["seconds"] for r in ours)
        p50_theirs = statistics.median(r["seconds"] for r in theirs)
        out[name] = {
            "p50_ms": round(p50_ours * 1000, 2),
            "max_ms": round(max(r["seconds"] for r in ours) * 1000, 2),
            "hosts_messaged": statistics.median(r["hosts"] for r in ours),
            "bytes": statistics.median(r["bytes"] for r in ours),
            "naive_p50_ms": round(p50_theirs * 1000, 1),
            "naive_hosts_changed": statistics.median(r["hosts"] for r in theirs),
            "speedup": round(p50_theirs / p50_ours, 1) if p50_ours else None,
        }
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hosts", default="1000,5000")
    parser.add_argument("--repeat", type=int, default=6)
    args = parser.parse_args()
    results: dict[str, Any] = {
        "machine": {
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "python": platform.python_version(),
            "load_avg": os.getloadavg(),
        },
        "runs": [bench(int(h), args.repeat) for h in args.hosts.split(",")],
    }
    for run in results["runs"]:
        print(f"policy, {run['hosts']} hosts ({TAGS} tags), seeded in {run['seed_seconds']} s")
        for name in ("policy change", "tag change", "join"):
            r = run[name]
            print(
                f"  {name:14} p50 {r['p50_ms']:8.2f} ms  {r['hosts_messaged']:6} hosts "
                f"{r['bytes']:9} B | naive p50 {r['naive_p50_ms']:9.1f} ms "
                f"({r['naive_hosts_changed']} hosts changed) | x{r['speedup']}"
            )
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "policy.json").write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
