"""`netmesh events log` filters: the pure filter over a table of events, then
the CLI on a recorded log (a real control plane on a real nats-server), and
bad input (a malformed time, a sequence beyond the log, an unknown type): one
line, exit 1."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from controlplane.embedded import EmbeddedNats
from events.envelope import RecordedEvent, make_envelope
from events.logfilter import BadFilter, LogFilter, Point, check_type_pattern, parse_point
from events.model import (
    AnyEvent,
    HostEndpointObserved,
    HostRegistered,
    NetworkCreated,
    NodeJoined,
    NodeRemoved,
)
from tests.eventlog_scenario import Recorded, control_plane, record
from tests.test_cli import netmesh, one_line_error
from tests.test_controlplane import Admin


def recorded(seq: int, event: AnyEvent, at: float) -> RecordedEvent:
    envelope = make_envelope(event, event_id=f"e{seq}", time=at, actor="t", command_id=f"c{seq}")
    return RecordedEvent(seq=seq, subject="netmesh.ev.x", envelope=envelope)


LOG = [
    recorded(1, NetworkCreated(network="office", cidr="10.10.0.0/24"), 100.0),
    recorded(2, NetworkCreated(network="lab", cidr="10.20.0.0/24"), 110.0),
    recorded(
        3,
        NodeJoined(network="office", node_id="n1", host_id="h1", name="a", address="10.10.0.2"),
        120,
    ),
    recorded(4, HostRegistered(host_id="h1", name="a", public_key="k1"), 120.0),
    recorded(
        5, NodeJoined(network="lab", node_id="n2", host_id="h2", name="b", address="10.20.0.2"), 130
    ),
    recorded(6, HostRegistered(host_id="h2", name="b", public_key="k2"), 130.0),
    recorded(7, HostEndpointObserved(host_id="h1", endpoints=("1.2.3.4",)), 140.0),
    recorded(8, HostEndpointObserved(host_id="h2", endpoints=("5.6.7.8",)), 150.0),
    recorded(9, NodeRemoved(network="office", node_id="n1", host_id="h1"), 160.0),
    recorded(10, HostEndpointObserved(host_id="h1", endpoints=("9.9.9.9",)), 170.0),
]


def shown(wanted: LogFilter) -> list[int]:
    return [r.seq for r in LOG if wanted.wanted(r)]


@pytest.mark.parametrize(
    ("wanted", "seqs"),
    [
        (LogFilter(), list(range(1, 11))),
        (LogFilter(since=Point(seq=8)), [8, 9, 10]),
        (LogFilter(until=Point(seq=2)), [1, 2]),
        (LogFilter(since=Point(time=125.0), until=Point(time=150.0)), [5, 6, 7, 8]),
        (LogFilter(type_pattern="host.*"), [4, 6, 7, 8, 10]),
        (LogFilter(type_pattern="node.joined"), [3, 5]),
        # office's events, and its member's while it was one (not after it left).
        (LogFilter(network="office"), [1, 3, 4, 7, 9]),
        (LogFilter(network="lab", type_pattern="host.*"), [6, 8]),
        # Membership is followed from the start even when showing from later on.
        (LogFilter(network="office", since=Point(seq=5)), [7, 9]),
    ],
)
def test_the_filter(wanted: LogFilter, seqs: list[int]) -> None:
    assert shown(wanted) == seqs


def test_points_and_patterns() -> None:
    assert parse_point("42") == Point(seq=42)
    assert parse_point("1970-01-01T00:02:00Z") == Point(time=120.0)
    assert parse_point("1970-01-01 00:02:00Z") == Point(time=120.0)  # as `events log` prints
    assert parse_point("1970-01-01T01:02:00+01:00") == Point(time=120.0)
    assert parse_point("1970-01-01T00:02:00") == Point(time=120.0)  # no zone: UTC
    assert str(Point(time=120.0)) == "1970-01-01T00:02:00Z" and str(Point(seq=3)) == "#3"
    for bad in ("yesterday", "-3", "12:00", "2026-13-01"):
        with pytest.raises(BadFilter, match="neither an event sequence nor a time"):
            parse_point(bad)
    assert check_type_pattern("node.*") == "node.*"
    for bad in ("node.teleported", "nodes.*"):
        with pytest.raises(BadFilter, match="unknown event type"):
            check_type_pattern(bad)


@pytest.fixture
async def recorded_log(
    nats_server: EmbeddedNats, tmp_path: Path
) -> AsyncIterator[tuple[str, Admin, list[Recorded]]]:
    """A control plane with the scenario's log, and the read model's answers
    after each of its commands; the CLI logs in as its admin."""
    async with control_plane(nats_server.url, tmp_path / "cp") as (plane, admin):
        yield nats_server.url, admin, await record(plane, admin)


async def log_json(url: str, *args: str) -> list[dict[str, object]]:
    rc, out, err = await netmesh(url, "events", "log", "--json", *args)
    assert rc == 0, err
    return [json.loads(line) for line in out.splitlines()]


async def test_the_cli_filters_a_recorded_log(
    recorded_log: tuple[str, Admin, list[Recorded]],
) -> None:
    url, admin, _ = recorded_log
    everything = await log_json(url)
    head = await admin.last_seq()
    assert [e["seq"] for e in everything] == list(range(1, head + 1))
    assert [e["seq"] for e in await log_json(url, "--since", "5", "--until", "7")] == [5, 6, 7]
    tags = await log_json(url, "--type", "node.*tagged")
    assert [e["type"] for e in tags] == ["node.tagged", "node.untagged"]
    lab = await log_json(url, "--network", "lab")
    lab_types = [e["type"] for e in lab]
    assert lab_types[0] == "network.created" and lab_types[-1] == "network.deleted"
    assert "host.registered" in lab_types  # its member's
    assert all(
        e["data"].get("network", "lab") == "lab"  # type: ignore[attr-defined]
        for e in lab
    )
    # By time: the events of the second in which the last one was written.
    last_time = float(everything[-1]["time"])  # type: ignore[arg-type]
    since = Point(time=float(int(last_time)))
    by_time = await log_json(url, "--since", str(since))
    assert by_time and by_time[-1]["seq"] == head
    assert all(float(e["time"]) >= int(last_time) for e in by_time)  # type: ignore[arg-type]
    # The whole recorded log (hosts' commands and hooks too) verifies.
    rc, out, err = await netmesh(url, "events", "verify", "--json")
    report = json.loads(out)
    assert (rc, report["problems"], report["events"]) == (0, [], head), err
    rc, out, _ = await netmesh(url, "events", "log", "--until", "2")
    assert rc == 0 and [line.split()[0] for line in out.splitlines()] == ["1", "2"]

    for args, needle in [
        (("--since", "yesterday"), "neither an event sequence nor a time"),
        (("--until", "2026-02-30"), "neither an event sequence nor a time"),
        (("--since", str(head + 1)), f"event #{head + 1} is beyond the log"),
        (("--until", "100000"), f"its last event is #{head}"),
        (("--type", "node.teleported"), "unknown event type 'node.teleported'"),
    ]:
        rc, out, err = await netmesh(url, "events", "log", *args)
        one_line_error(rc, err, needle)
        assert (rc, out) == (1, "")


def readme_consumer() -> str:
    """The plain nats-py consumer the README shows."""
    readme = (Path(__file__).parent.parent / "README.md").read_text()
    after = readme.split("Tapping the stream from any NATS client", 1)[1]
    return after.split("```python\n", 1)[1].split("```", 1)[0]


async def test_the_readme_consumer_reads_the_log(
    recorded_log: tuple[str, Admin, list[Recorded]],
) -> None:
    import asyncio
    import sys

    url, admin, _ = recorded_log
    head = await admin.last_seq()
    code = readme_consumer().replace("nats://127.0.0.1:4222", url)
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", code, stdout=asyncio.subprocess.PIPE
    )
    try:
        assert proc.stdout is not None
        lines = [(await asyncio.wait_for(proc.stdout.readline(), 30)).decode() for _ in range(head)]
    finally:
        proc.kill()
        await proc.wait()
    assert [int(line.split()[0]) for line in lines] == list(range(1, head + 1))
    assert lines[0].split()[1] == "admin.added" and "network.created" in lines[1]
