"""A recorded log with most kinds of events in it, made by real commands
against a real control plane (admin commands signed by the admin, hosts'
commands by their own keys), and what the read model answered after each."""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import msgspec
import nats
from nacl.signing import SigningKey

from controlplane.metrics import NO_METRICS, ControlPlaneMetrics
from controlplane.service import ControlPlane
from events.commands import Reply
from events.envelope import RecordedEvent
from events.signing import load_or_create, public_text, signed_payload
from tests.factories import public_key
from tests.test_cli import ADMIN_KEY
from tests.test_controlplane import Admin
from tests.test_policy_commands import POLICY

# What is asked of the read model at each point: (query, args).
QUESTIONS: list[tuple[str, dict[str, Any]]] = [
    ("networks", {}),
    ("network", {"name": "office"}),
    ("network", {"name": "lab"}),
    ("nodes", {}),
    ("nodes", {"network": "office"}),
    ("node", {"node": "office/db1"}),
    ("node", {"node": "office/web1"}),
    ("keys", {}),
    ("policy", {"network": "office"}),
    ("admins", {}),
    ("gateways", {}),
    ("dns", {"network": "office"}),
    ("clients", {}),
    ("relays", {}),
]


class Recorded(msgspec.Struct):
    seq: int
    answers: list[dict[str, Any]]  # one per QUESTIONS: the reply, as the read model gave it
    verb: str = ""  # of the command that led here


def comparable(what: str, reply: Reply) -> dict[str, Any]:
    """A reply as compared across time: `node`'s live status (agents' reports)
    is no part of the topology."""
    result = reply.result
    if what == "node" and isinstance(result, dict):
        result = {k: v for k, v in result.items() if k != "status"}
    return {"ok": reply.ok, "result": result, "error": reply.error}


async def ask_all(admin: Admin, **extra: Any) -> list[dict[str, Any]]:
    answers = []
    for what, args in QUESTIONS:
        reply = await admin.send(f"netmesh.query.{what}", {**args, **extra})
        answers.append(comparable(what, reply))
    return answers


async def record(plane: ControlPlane, admin: Admin) -> list[Recorded]:
    """Run the scenario; the read model's answers after each command."""
    points = [Recorded(await admin.last_seq(), await ask_all(admin))]
    hosts: dict[str, tuple[SigningKey, str]] = {}

    async def host_command(name: str, verb: str, fields: dict[str, Any]) -> Any:
        key = hosts[name][0]
        fields = {"command_id": uuid.uuid4().hex, **fields}
        data, headers = signed_payload(key, verb, fields)
        msg = await admin.nc.request(f"netmesh.cmd.{verb}", data, headers=headers, timeout=10)
        reply = msgspec.json.decode(msg.data, type=Reply)
        assert reply.ok, reply.error
        return reply.result

    async def step(verb: str, **fields: Any) -> Any:
        result = await admin.ok(verb, **fields)
        points.append(Recorded(await admin.last_seq(), await ask_all(admin), verb))
        return result

    async def join(name: str, n: int, token: str) -> None:
        key = SigningKey.generate()
        hosts[name] = (key, "")
        fields = {
            "token": token,
            "public_key": public_key(n),
            "name": name,
            "endpoints": [f"192.0.2.{n}"],
            "signing_key": public_text(key),
        }
        result = await host_command(name, "join", fields)
        hosts[name] = (key, result["host_id"])
        points.append(Recorded(await admin.last_seq(), await ask_all(admin), "join"))

    async def host_step(name: str, verb: str, **fields: Any) -> None:
        await host_command(name, verb, {"host_id": hosts[name][1], **fields})
        points.append(Recorded(await admin.last_seq(), await ask_all(admin), verb))

    await step("network.create", name="office", cidr="10.10.0.0/24")
    token = (await step("key.create", network="office", uses=3, tags=["web"]))["token"]
    await join("db1", 1, token)
    await join("web1", 2, token)
    await host_step("db1", "endpoint.report", endpoints=["198.51.100.7"], listen_port=51821)
    # web1 saw db1 behind a NAT (its public mapping).
    await host_step("web1", "endpoint.seen", peer_key=public_key(1), endpoint="203.0.113.5:40000")
    await step("node.tag", node="office/db1", tags=["db", "ops"])
    await step("node.untag", node="office/db1", tags=["web"])
    await step("policy.set", network="office", document=POLICY)
    await step("network.update", name="office", mtu=1380, keepalive=15)
    await step("node.rotate_key", node="office/web1")
    await host_step("web1", "host.rotate_key", public_key=public_key(12))
    await step("policy.clear", network="office")
    await step("egress.add", node="office/db1", ranges=["192.168.5.0/24", "0.0.0.0/0"])
    await step("node.exit", node="office/web1", via="db1")
    await step("node.exit_off", node="office/web1")
    await step("egress.remove", node="office/db1", ranges=["192.168.5.0/24"])
    await step("ingress.add", node="office/db1")
    phone = {"network": "office", "via": "db1", "public_key": public_key(40)}
    await step("client.create", name="phone", **phone)
    await step("client.remove", network="office", name="phone")
    await step("client.create", name="laptop", **{**phone, "public_key": public_key(41)})
    await step("ingress.remove", node="office/db1")
    await join("gw1", 4, token)
    await step("relay.add", node="office/gw1", ports="53000-53099")
    await host_step("db1", "relay.request", peer_key=public_key(12))  # web1, since its rotation
    await step("relay.remove", node="office/gw1")
    await step("dns.add", network="office", name="files", a=["10.10.0.99"])
    await step("dns.remove", network="office", name="files")
    await step("network.create", name="lab", cidr="10.20.0.0/24", listen_port=51830)
    lab_token = (await step("key.create", network="lab", uses=None))["token"]
    await join("lab1", 3, lab_token)
    key_id = next(k["key_id"] for k in await admin.query("keys") if k["network"] == "lab")
    await step("key.revoke", key_id=key_id)
    await step("admin.add", name="aud", public_key=public_text(SigningKey.generate()))
    await step("admin.remove", name="aud")
    await step("token.create", name="dash", role="auditor")
    await step("token.revoke", name="dash")
    # Nothing listens there (loopback): added and removed again.
    hook = await step("hook.add", url="http://127.0.0.1:9/hook", events="node.*")
    await step("hook.remove", hook_id=hook["hook_id"])
    await step("node.remove", node="office/web1")
    await host_step("db1", "host.leave", network="office")
    await step("network.delete", name="lab", force=True)
    return points


@contextlib.asynccontextmanager
async def control_plane(
    url: str, data_dir: Path, metrics: ControlPlaneMetrics = NO_METRICS
) -> AsyncIterator[tuple[ControlPlane, Admin]]:
    """A control plane on the nats-server at `url`, and its first admin (whom
    the CLI logs in as too)."""
    cp_nc = await nats.connect(url)
    admin_nc = await nats.connect(url)
    plane = ControlPlane(cp_nc, data_dir, url, metrics=metrics)
    await plane.start()
    ADMIN_KEY[url] = str(data_dir / "admin.key")
    try:
        yield plane, Admin(admin_nc, load_or_create(data_dir / "admin.key"))
    finally:
        assert await plane.stop() == []
        await cp_nc.close()
        await admin_nc.close()


async def read_log(plane: ControlPlane, head: int) -> list[RecordedEvent]:
    recorded: list[RecordedEvent] = []
    async for batch in plane.store.follow_batches(1):
        recorded.extend(batch)
        if batch[-1].seq >= head:
            break
    return recorded
