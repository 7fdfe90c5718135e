"""What `--plan` costs the control plane: copy the topology, fold the
decision's events into the copy, derive the touched hosts before and after.

A network of N hosts (one /16), on the pure core the control plane runs for a
plan: `decide`, then `plan_events`; the deep copy of the topology is timed on
its own as well (it is the part that grows with the whole topology, not with
the change).

    .venv/bin/python bench/plan.py [--hosts 1000,5000] [--repeat 3]
"""

from __future__ import annotations

import argparse
import base64
import copy
import hashlib
import json
import statistics
import time
from collections.abc import Callable

from controlplane.decide import Context, decide
from events.commands import (
    AnyCommand,
    CreateEnrollmentKey,
    CreateNetwork,
    Join,
    RemoveNode,
    TagNode,
    UpdateNetwork,
)
from events.envelope import RecordedEvent, make_envelope
from events.tokens import make_token
from projections.desired import fold
from projections.plan import plan_events
from projections.topology import Topology

NOW = 1_000_000.0


def apply(topology: Topology, command: AnyCommand, ctx: Context) -> dict[str, object]:
    decision = decide(topology, command, ctx)
    for subject, event in decision.events:
        envelope = make_envelope(event, event_id="e", time=NOW, actor="bench", command_id="")
        fold(topology, RecordedEvent(seq=topology.last_seq + 1, subject=subject, envelope=envelope))
    return decision.result


def network_of(hosts: int) -> Topology:
    topology = Topology()
    ctx = Context(now=NOW, actor="bench", new_key_id="k1", new_secret="s1")
    apply(topology, CreateNetwork(name="office", cidr="10.0.0.0/16"), ctx)
    key_id = apply(topology, CreateEnrollmentKey(network="office", uses=None), ctx)["key_id"]
    token = make_token("x", str(key_id), "s1")
    for n in range(hosts):
        key = base64.b64encode(hashlib.sha256(f"h{n}".encode()).digest()).decode()
        apply(topology, Join(token=token, public_key=key, name=f"h{n}"), ctx)
    return topology


def timed(work: Callable[[], object], repeat: int) -> float:
    runs = []
    for _ in range(repeat):
        start = time.perf_counter()
        work()
        runs.append(time.perf_counter() - start)
    return round(statistics.median(runs) * 1000, 1)


def measure(hosts: int, repeat: int) -> dict[str, object]:
    topology = network_of(hosts)
    ctx = Context(now=NOW, actor="bench", new_key_id="k2", new_secret="s2")
    row: dict[str, object] = {"hosts": hosts}
    row["deepcopy_ms"] = timed(lambda: copy.deepcopy(topology), repeat)
    for label, command in (
        ("mtu_every_host", UpdateNetwork(name="office", mtu=1300)),
        ("remove_one_node", RemoveNode(node="office/h7")),
        ("tag_one_node", TagNode(node="office/h7", tags=("web",))),
    ):

        def plan(command: AnyCommand = command) -> None:
            decision = decide(topology, command, ctx)
            plan_events(topology, decision.events, now=NOW)

        row[f"{label}_ms"] = timed(plan, repeat)
    return row


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--hosts", default="1000,5000")
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    for hosts in map(int, args.hosts.split(",")):
        print(json.dumps(measure(hosts, args.repeat)), flush=True)


if __name__ == "__main__":
    main()
