"""Time travel on a recorded log (real commands, a real control plane on a
real nats-server): at every point the read model passed through, `--at` that
point (by sequence and by time) answers exactly what the read model answered
then; replaying to the head answers what it answers now; forged events are no
more believed in the past than in the present; `events diff` says what
changed, typed; bad points are one line, exit 1."""

from __future__ import annotations

import itertools
import json
import time
from typing import Any

import msgspec
import pytest

from controlplane.service import ControlPlane
from events.envelope import encode_envelope, make_envelope
from events.logfilter import Point
from events.model import NetworkCreated
from projections.timetravel import Change, diff, replayed, view_of
from tests.eventlog_scenario import QUESTIONS, Recorded, ask_all, read_log, record
from tests.netns import wait_until
from tests.test_cli import netmesh, one_line_error
from tests.test_controlplane import Admin
from tests.test_controlplane import cp as cp  # the fixture
from tests.test_event_log import recorded_log as recorded_log  # the fixture


def at(point: Point) -> dict[str, Any]:
    return {"at": msgspec.to_builtins(point)}


async def test_every_point_answers_as_the_read_model_did_then(
    cp: tuple[ControlPlane, Admin],
) -> None:
    plane, admin = cp
    points = await record(plane, admin)
    head = await admin.last_seq()
    log = await read_log(plane, head)
    times = {r.seq: r.envelope.time for r in log}
    assert len(points) > 20 and points[-1].seq == head
    for point in points:
        by_seq = await ask_all(admin, **at(Point(seq=point.seq)))
        assert by_seq == point.answers, f"as of #{point.seq}"
        if point.seq:
            by_time = await ask_all(admin, **at(Point(time=times[point.seq])))
            assert by_time == point.answers, f"as of the time of #{point.seq}"
    # The answers did move along the way (else the comparison proves little):
    # all but where no query asked shows the change (a host's key epoch, hooks,
    # where a peer saw a host).
    same = {b.verb for a, b in itertools.pairwise(points) if a.answers == b.answers}
    assert same == {
        "node.rotate_key",
        "hook.add",
        "hook.remove",
        "token.create",
        "token.revoke",
        "endpoint.seen",
    }
    # The head, replayed, is today's read model.
    assert await ask_all(admin, **at(Point(seq=head))) == await ask_all(admin)
    # Before the first event: nothing at all.
    networks = await admin.send("netmesh.query.networks", at(Point(time=0.0)))
    assert (networks.ok, networks.result) == (True, [])
    # Every point of the log, those inside a command's batch too, replays.
    for seq in range(head + 1):
        reply = await admin.send("netmesh.query.nodes", at(Point(seq=seq)))
        assert reply.ok, (seq, reply.error)


async def test_forged_events_are_not_believed_in_the_past_either(
    cp: tuple[ControlPlane, Admin],
) -> None:
    plane, admin = cp
    await admin.ok("network.create", name="office", cidr="10.10.0.0/24")
    forged = make_envelope(
        NetworkCreated(network="evil", cidr="10.66.0.0/24"),
        event_id="f",
        time=time.time(),
        actor="eve",
        command_id="f",
    )
    ack = await admin.nc.jetstream().publish("netmesh.ev.network.evil", encode_envelope(forged))
    await wait_until(lambda: plane.write_model.last_seq >= ack.seq, message="seen")
    await admin.ok("network.create", name="lab", cidr="10.20.0.0/24")
    names = [n["name"] for n in await admin.query("networks", **at(Point(seq=ack.seq + 1)))]
    assert names == ["lab", "office"]
    assert await admin.query("networks", **at(Point(seq=ack.seq + 1))) == await admin.query(
        "networks"
    )


async def test_bad_points_are_refused(cp: tuple[ControlPlane, Admin]) -> None:
    _, admin = cp
    head = await admin.last_seq()
    reply = await admin.send("netmesh.query.nodes", at(Point(seq=head + 5)))
    assert (reply.ok, reply.code) == (False, "invalid")
    assert reply.error == f"event #{head + 5} is beyond the log (its last event is #{head})"
    reply = await admin.send("netmesh.query.status", at(Point(seq=head)))
    assert (reply.ok, reply.error) == (False, "status cannot be asked as of a past point")
    reply = await admin.send("netmesh.query.diff", at(Point(seq=head)))
    assert (reply.ok, reply.error) == (False, "diff needs two points: at and to")


def test_a_diff_is_typed_and_prints_itself() -> None:
    from tests.test_event_log import LOG

    before, after = (view_of(replayed(LOG, Point(seq=s)).topology) for s in (2, 10))
    changes = diff(before, after)
    assert [str(c) for c in changes] == [
        "+ host a: public_key=k1 endpoints=9.9.9.9 listen_port=51820 key_epoch=0",
        "+ host b: public_key=k2 endpoints=5.6.7.8 listen_port=51820 key_epoch=0",
        "+ node lab/b: address=10.20.0.2 tags=none host_id=h2",
    ]
    assert diff(after, before)[-1] == Change(
        kind="node", name="lab/b", change="removed", fields=changes[-1].fields
    )
    assert diff(after, after) == []
    moved = diff(*(view_of(replayed(LOG, Point(seq=s)).topology) for s in (7, 8)))
    assert [str(c) for c in moved] == ["~ host b: endpoints none -> 5.6.7.8"]


@pytest.mark.parametrize("as_json", [False, True])
async def test_the_cli_travels_and_diffs(
    recorded_log: tuple[str, Admin, list[Recorded]], as_json: bool
) -> None:
    url, _, points = recorded_log
    asked = list(QUESTIONS)
    networks = asked.index(("networks", {}))
    commands = {
        "networks": ["network", "list"],
        "keys": ["key", "list"],
    }
    updated = next(
        p
        for p in points
        if p.answers[networks]["result"][0:1] and p.answers[networks]["result"][0]["mtu"] == 1380
    )
    before = points[points.index(updated) - 1]
    for point in (before, updated):
        for what, argv in commands.items():
            rc, out, err = await netmesh(url, *argv, "--at", str(point.seq), "--json")
            assert rc == 0, err
            assert json.loads(out) == point.answers[asked.index((what, {}))]["result"]
    if as_json:
        rc, out, err = await netmesh(
            url, "events", "diff", str(before.seq), str(updated.seq), "--json"
        )
        assert rc == 0, err
        answer = json.loads(out)
        assert (answer["from"], answer["to"]) == (before.seq, updated.seq)
        assert answer["changes"] == [
            {
                "kind": "network",
                "name": "office",
                "change": "changed",
                "fields": {"mtu": [1420, 1380], "keepalive": [25, 15]},
            }
        ]
    else:
        rc, out, err = await netmesh(url, "events", "diff", str(before.seq), str(updated.seq))
        assert (rc, out.splitlines()) == (
            0,
            [
                f"from #{before.seq} to #{updated.seq}: 1 change(s)",
                "~ network office: mtu 1420 -> 1380, keepalive 25 -> 15",
            ],
        ), err
        rc, out, _ = await netmesh(url, "events", "diff", "0", str(points[-1].seq))
        assert (
            rc == 0 and "+ admin " in out and "network office" in out and "network lab" not in out
        )
        rc, out, _ = await netmesh(url, "node", "show", "office/db1", "--at", str(updated.seq))
        assert rc == 0 and "tags       db, ops" in out and "state" not in out
        rc, out, _ = await netmesh(url, "policy", "show", "office", "--at", str(updated.seq))
        assert rc == 0 and out.startswith("// policy of network office, revision ")
    head = points[-1].seq
    for args, needle in [
        (["network", "list", "--at", "last tuesday"], "neither an event sequence nor a time"),
        (["node", "list", "--at", str(head + 1)], f"event #{head + 1} is beyond the log"),
        (["events", "diff", "1", str(head + 3)], f"its last event is #{head}"),
        (["events", "diff", "soon", "1"], "neither an event sequence nor a time"),
    ]:
        rc, out, err = await netmesh(url, *args)
        one_line_error(rc, err, needle)
        assert (rc, out) == (1, "")
