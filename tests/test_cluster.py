"""The control plane on a JetStream cluster, all real processes on loopback:
three `netmesh broker` members (nats-servers), two `netmesh server` processes
on them with --replicas 3, admins sending commands through the CLI's client.

What must hold while the events stream's leader broker and a control plane
are killed (-9) under load: every acknowledged command's events are in the
stream exactly once, nothing is doubled, refused commands wrote nothing, the
log verifies, and every read model agrees with the stream."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

import nats
import pytest
from nacl.public import PrivateKey

from agent.daemon import Agent, enroll
from agent.fake import FakeBackend, FakeDns, FakeFirewall, FakeLink, FakeMachine
from agent.session import broker_login
from agent.statedir import Identity, StateDir, private_key_b64, public_key_of
from cli.client import CliError, Login, command, query
from cli.lastwrite import LastWrite
from controlplane import queries as queries_module
from controlplane.broker import ClusterMember, member_config, route_password
from controlplane.embedded import EmbeddedNats
from controlplane.queries import QueryArgs
from controlplane.rules.base import Rejected
from controlplane.service import ControlPlane
from events.connect import BrokerNotReady, connect_once, server_urls
from events.envelope import RecordedEvent
from events.jetstream import JetStreamEventStore
from events.signing import (
    COMMAND_SIGNER_HEADER,
    SIGNATURE_HEADER,
    event_mac_key,
    load_or_create,
)
from events.subjects import DESIRED_STREAM, EVENTS_STREAM, REPORTS_STREAM
from events.tokens import parse_token
from projections.sqlite import ReadModel
from projections.topology import Topology, evolve
from tests.cluster import NETMESH, Cluster, ControlPlaneProcess
from tests.netns import wait_until
from tests.test_controlplane import signed_request

# As the issue asks: about 30 s here (NETMESH_CLUSTER_COMMANDS to change it).
COMMANDS = int(os.environ.get("NETMESH_CLUSTER_COMMANDS", "1000"))
CLIENTS = 4


def test_server_urls_split_a_cluster_and_keep_one_url() -> None:
    assert server_urls("nats://a:4222") == ["nats://a:4222"]
    assert server_urls(" tls://a:1, tls://b:2 ,,") == ["tls://a:1", "tls://b:2"]


def test_a_member_config_names_the_cluster_and_guards_its_routes(tmp_path: Path) -> None:
    root = load_or_create(tmp_path / "signing.key")
    member = ClusterMember("b1", "10.0.0.1:6222", ("10.0.0.1:6222", "nats-route://10.0.0.2:6222"))
    text = member_config(root, member, None)
    password = route_password(root)
    assert "auth_callout" in text  # the control plane's access rules, as for one broker
    assert 'listen: "10.0.0.1:6222"' in text and "name: netmesh" in text
    assert f'"nats-route://netmesh-route:{password}@10.0.0.2:6222"' in text
    assert f'password: "{password}"' in text
    other = load_or_create(tmp_path / "other.key")
    assert route_password(other) != password  # only holders of signing.key can join


def run_cli(*args: str, state: Path | None = None) -> subprocess.CompletedProcess[str]:
    """The CLI; with `state`, its XDG_STATE_HOME (where it remembers its last write)."""
    env = {**os.environ, "XDG_STATE_HOME": str(state)} if state else None
    return subprocess.run(
        [NETMESH, *args],
        capture_output=True,
        text=True,
        timeout=60,
        stdin=subprocess.DEVNULL,
        env=env,
    )


def test_broker_refuses_bad_input_in_one_line_and_writes_nothing(tmp_path: Path) -> None:
    data = tmp_path / "b1"
    common = ["broker", "--data-dir", str(data), "--print-config"]
    missing = run_cli(*common, "--cluster-listen", "127.0.0.1:6222", "--routes", "127.0.0.1:6222")
    assert missing.returncode == 1
    assert "signing.key does not exist: copy signing.key" in missing.stderr
    assert len(missing.stderr.strip().splitlines()) == 1
    assert not data.exists()
    data.mkdir()
    load_or_create(data / "signing.key")
    bad = run_cli(*common, "--cluster-listen", "127.0.0.1:6222", "--routes", "somewhere")
    assert bad.returncode == 1 and "invalid --routes 'somewhere'" in bad.stderr, bad.stderr
    assert sorted(p.name for p in data.iterdir()) == ["signing.key"]
    good = run_cli(
        *common, "--server-name", "b1", "--cluster-listen", "127.0.0.1:6222",
        "--routes", "127.0.0.1:6222,127.0.0.1:6223",
    )  # fmt: skip
    assert good.returncode == 0, good.stderr
    assert "cluster {" in good.stdout and "127.0.0.1:6223" in good.stdout
    assert (data / "nats-server.conf").read_text() == good.stdout.rstrip("\n") + "\n"


async def read_all(cluster: Cluster) -> list[RecordedEvent]:
    """Every event in the stream, MACs checked."""
    nc = await cluster.client()
    store = JetStreamEventStore(nc, mac_key=event_mac_key(cluster.root))
    try:
        last = await store.last_sequence()
        recorded: list[RecordedEvent] = []
        if last:
            async for batch in store.follow_batches(1):
                recorded.extend(batch)
                if batch[-1].seq >= last:
                    break
        return recorded
    finally:
        await store.close()
        await nc.close()


def folded(recorded: list[RecordedEvent]) -> Topology:
    topology = Topology()
    for event in recorded:
        evolve(topology, event)
    return topology


def summary(topology: Topology) -> dict[str, Any]:
    """What a read model says, in a form to compare."""
    return {
        "networks": {name: str(net.cidr) for name, net in topology.networks.items()},
        "keys": sorted((key.key_id, key.network) for key in topology.keys.values()),
        "last_seq": topology.last_seq,
    }


async def read_model_summary(path: Path) -> tuple[int, dict[str, Any]]:
    model = await ReadModel.open(path)
    try:
        return await model.checkpoint(), summary(await model.load_topology())
    finally:
        await model.close()


@pytest.fixture
async def cluster(tmp_path: Path) -> Any:
    made = Cluster.make(tmp_path / "cluster")
    await made.start()
    try:
        yield made
    finally:
        await made.stop()


async def test_acknowledged_commands_survive_killing_the_leader_broker_and_a_control_plane(
    cluster: Cluster, tmp_path: Path
) -> None:
    planes = [
        ControlPlaneProcess(tmp_path / name, cluster, home=i)
        for i, name in enumerate(("cpa", "cpb"))
    ]
    try:
        for plane in planes:
            await plane.start()
        nc = await cluster.client()
        js = nc.jetstream()
        for stream in (EVENTS_STREAM, DESIRED_STREAM, REPORTS_STREAM):
            info = await js.stream_info(stream)
            assert info.config.num_replicas == 3, stream
        await nc.close()
        login = Login(load_or_create(planes[0].data / "admin.key"))
        urls = cluster.urls
        await command(urls, "network.create", login=login, name="base", cidr="172.16.0.0/16")

        outcome: dict[str, str] = {}  # command id -> acked / refused / unknown
        verbs: dict[str, str] = {}  # command id -> its verb
        expected_refusals: set[str] = set()
        notes: list[str] = []

        async def client(first: int) -> None:
            for i in range(first, COMMANDS, CLIENTS):
                command_id = uuid.uuid4().hex
                fields: dict[str, Any]
                if i % 5 == 0:  # always refused: inside the base network
                    verb, fields = (
                        "network.create",
                        {"name": f"x{i}", "cidr": f"172.16.{i % 256}.0/24"},
                    )
                    expected_refusals.add(command_id)
                elif i % 5 == 1:
                    verb, fields = "key.create", {"network": "base", "uses": 1}
                else:
                    verb, fields = (
                        "network.create",
                        {"name": f"n{i}", "cidr": f"10.{i // 256}.{i % 256}.0/24"},
                    )
                verbs[command_id] = verb
                try:
                    await command(
                        urls,
                        verb,
                        login=login,
                        notify=notes.append,
                        command_id=command_id,
                        **fields,
                    )
                    outcome[command_id] = "acked"
                except CliError as exc:
                    unknown = "may or may not have been applied" in str(exc)
                    outcome[command_id] = "unknown" if unknown else "refused"
                    if not unknown and command_id not in expected_refusals:
                        notes.append(f"refused: {exc}")

        async def chaos() -> str:
            await wait_until(lambda: len(outcome) >= COMMANDS // 3, timeout=120, message="a third")
            leader = await cluster.leader()
            await cluster.kill(leader)
            await wait_until(lambda: len(outcome) >= 2 * COMMANDS // 3, timeout=120, message="2/3")
            await planes[0].kill()
            return leader.name

        clients = [asyncio.create_task(client(k)) for k in range(CLIENTS)]
        killed = await asyncio.wait_for(chaos(), 300)
        await asyncio.wait_for(asyncio.gather(*clients), 300)

        counts = Counter(outcome.values())
        assert counts["unknown"] == 0, notes
        refused = {cid for cid, what in outcome.items() if what == "refused"}
        assert expected_refusals <= refused
        # Besides those, a command may fail (the store did not come back in
        # time): then it wrote nothing (checked below), and says so.
        failed = [note for note in notes if note.startswith("refused")]
        assert len(failed) == len(refused - expected_refusals) <= COMMANDS // 50, failed
        assert all("did not answer" in why or "cannot connect" in why for why in failed), failed
        assert counts["acked"] == COMMANDS - len(refused)

        recorded = await read_all(cluster)
        assert all(r.signature == "valid" for r in recorded)
        by_command = Counter(r.envelope.command_id for r in recorded)
        # Exactly once: network.create and key.create each append one event.
        for command_id, what in outcome.items():
            assert by_command[command_id] == (1 if what == "acked" else 0), (command_id, what)
        assert len({r.envelope.event_id for r in recorded}) == len(recorded)
        assert [r.seq for r in recorded] == list(range(1, len(recorded) + 1))

        verified = run_cli("--server", urls, "--admin-key", str(planes[0].data / "admin.key"),
                           "events", "verify", "--json")  # fmt: skip
        assert verified.returncode == 0, verified.stderr
        assert json.loads(verified.stdout)["problems"] == []

        # The killed control plane comes back and catches up; the killed
        # broker comes back with an empty store and catches up too.
        await planes[0].start()
        member = cluster.member(killed)
        await cluster.restart(member, empty=True)
        head = recorded[-1].seq
        late: dict[str, Any] = {"name": "late", "cidr": "10.250.0.0/24"}
        after = await command(urls, "network.create", login=login, seq_as="seq", **late)
        assert after["seq"] == head + 1
        networks = await query(urls, "networks", login=login)
        assert "late" in {n["name"] for n in networks}
        # The CLI as a user runs it: its list right after its create has it.
        admin = ["--server", urls, "--admin-key", str(planes[0].data / "admin.key")]
        made = run_cli(
            *admin, "network", "create", "ryw", "--cidr", "10.251.0.0/24", state=tmp_path
        )
        assert made.returncode == 0, made.stderr
        remembered = json.loads((tmp_path / "netmesh" / "last-write.json").read_text())
        assert list(remembered.values()) == [head + 2]
        listed = run_cli(*admin, "network", "list", "--json", state=tmp_path)
        assert "ryw" in {n["name"] for n in json.loads(listed.stdout)}, listed.stderr

        nc = await cluster.client()
        js = nc.jetstream()

        async def current() -> bool:
            info = await js.stream_info(EVENTS_STREAM)
            peers = {p.name: p for p in (info.cluster.replicas or [])} if info.cluster else {}
            if info.cluster and info.cluster.leader == killed:
                return True
            peer = peers.get(killed)
            return peer is not None and bool(peer.current) and not peer.lag

        await wait_until(current, timeout=60, message=f"{killed} caught up")
        # Make the emptied member the leader: what the stream says now is its copy.
        await nc.request(
            f"$JS.API.STREAM.LEADER.STEPDOWN.{EVENTS_STREAM}",
            json.dumps({"placement": {"preferred": killed}}).encode(),
            timeout=10,
        )
        await nc.close()
        assert (await cluster.leader()).name == killed
        again = await read_all(cluster)
        # Its copy has every event, the two made since it came back included.
        assert [(r.seq, r.envelope.event_id) for r in again[: len(recorded)]] == [
            (r.seq, r.envelope.event_id) for r in recorded
        ]
        assert [r.seq for r in again] == list(range(1, head + 3))
    finally:
        for plane in planes:
            await plane.stop()

    # Both read models agree with the stream.
    truth = summary(folded(again))
    for plane in planes:
        checkpoint, said = await read_model_summary(plane.data / "readmodel.sqlite3")
        assert checkpoint == again[-1].seq
        assert said == truth, plane.data.name
    # base, late and ryw, and what the clients made.
    applied = [verb for cid, verb in verbs.items() if outcome[cid] == "acked"]
    assert len(truth["networks"]) == 3 + applied.count("network.create")
    assert len(truth["keys"]) == applied.count("key.create")


async def test_a_query_with_min_seq_waits_for_its_replica_to_have_the_write(
    nats_server: EmbeddedNats, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Replica B's read model is held behind (its commits wait, as on a slow
    disk) while its write model keeps up: without `min_seq` it answers
    without A's write; with it, once it has applied the write; held too long,
    it says so."""
    conns = [await nats.connect(nats_server.url) for _ in range(2)]
    (tmp_path / "b").mkdir()
    a = ControlPlane(conns[0], tmp_path / "a", nats_server.url)
    planes = [a]
    try:
        await a.start()
        shutil.copy(tmp_path / "a" / "signing.key", tmp_path / "b" / "signing.key")
        b = ControlPlane(conns[1], tmp_path / "b", nats_server.url)
        planes.append(b)
        await b.start()
        key = load_or_create(tmp_path / "a" / "admin.key")

        async def create(name: str, cidr: str) -> int:
            data, headers = signed_request(key, "network.create", name=name, cidr=cidr)
            reply = await a.commands.handle(
                "network.create",
                data,
                actor="test",
                signer=headers[COMMAND_SIGNER_HEADER],
                signature=headers[SIGNATURE_HEADER],
            )
            assert reply.ok and reply.seq is not None, reply.error
            return reply.seq

        # B's read model commits only when let (a slow disk): its write model
        # follows the stream as usual.
        assert b.model is not None
        let = asyncio.Event()
        commit = b.model.commit

        async def slow_commit(*args: Any) -> None:
            await let.wait()
            await commit(*args)

        monkeypatch.setattr(b.model, "commit", slow_commit)
        seq = await create("office", "10.10.0.0/24")
        await b.write.wait_for(seq)  # B has seen it: only its read model lags

        def names(networks: Any) -> set[str]:
            return {n["name"] for n in networks}

        assert "office" not in names(await b.queries.answer("networks", QueryArgs()))
        waiting = asyncio.ensure_future(b.queries.answer("networks", QueryArgs(min_seq=seq)))
        await b.write.wait_for(seq)
        assert not waiting.done()
        let.set()
        assert "office" in names(await asyncio.wait_for(waiting, 10))

        monkeypatch.setattr(queries_module, "MIN_SEQ_WAIT", 0.5)
        let.clear()
        later = await create("lab", "10.20.0.0/24")
        with pytest.raises(Rejected, match=f"has applied event #{seq}, not yet #{later}"):
            await b.queries.answer("networks", QueryArgs(min_seq=later))
        let.set()
        # A sequence beyond the stream (remembered from another stream behind
        # the same URL) does not hold the answer up.
        assert names(await b.queries.answer("networks", QueryArgs(min_seq=later + 1000))) == {
            "office",
            "lab",
        }
    finally:
        for plane in planes:
            assert await plane.stop() == []
        for c in conns:
            await c.close()


def test_the_cli_remembers_its_last_write_per_server(tmp_path: Path) -> None:
    remembered = LastWrite(tmp_path / "state" / "last-write.json")
    assert remembered.seq("nats://a:1,nats://b:2") is None
    remembered.saw("nats://a:1,nats://b:2", 7)
    remembered.saw("nats://b:2, nats://a:1", 5)  # the same cluster, an older write
    assert remembered.seq("nats://a:1,nats://b:2") == 7
    assert remembered.seq("nats://c:3") is None
    (tmp_path / "state" / "last-write.json").write_text("not json")
    assert remembered.seq("nats://a:1,nats://b:2") is None  # damaged: no guarantee, no error
    assert LastWrite(None).seq("nats://a:1") is None


async def fake_agent(cluster: Cluster, token: str, name: str, via: str, state: Path) -> Agent:
    """A real agent on the fake machine, enrolled through the broker at `via`
    only, then connected with every broker URL of its identity."""
    key = PrivateKey.generate()
    dirs = StateDir(state)
    dirs.ensure()
    _, joined = await enroll(
        token, via, name, public_key_of(key), ["192.0.2.1"], None, dirs.signing_key()
    )
    parts = parse_token(token)
    machine = FakeMachine()
    agent = Agent(
        identity=Identity(
            host_id=joined["host_id"], name=name, server=parts.server, server_key=parts.server_key
        ),
        state=dirs,
        backend=FakeBackend("nm0", machine),
        link=FakeLink("nm0", machine),
        firewall=FakeFirewall(),
        dns=FakeDns(),
        private_key=private_key_b64(key),
        public_key=public_key_of(key),
    )
    await agent.connect_forever()
    return agent


def peers_of(agent: Agent) -> set[str]:
    assert isinstance(agent.backend, FakeBackend)
    device = agent.backend.machine.devices.get("nm0")
    return set(device.peers) if device else set()


async def all_meshed(agents: list[Agent], what: str) -> None:
    """Until each agent has every other as its peer."""
    keys = {agent.public_key for agent in agents}
    for agent in agents:
        await wait_until(
            lambda: peers_of(agent) == keys - {agent.public_key},  # noqa: B023 (awaited here)
            timeout=20,
            message=f"{agent.identity.name} has {what}",
        )


# nats-py (2.16) drops the socket of a failed reconnect attempt without closing
# it (found here: a broker that holds a login no control plane answers); it is
# closed when collected, with a ResourceWarning (README, Known limits).
@pytest.mark.filterwarnings("ignore::ResourceWarning")
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
async def test_any_broker_asks_any_control_plane_and_agents_outlive_them_all(
    cluster: Cluster, tmp_path: Path
) -> None:
    """Each broker admits agents through whichever control plane answers its
    callout; with every control plane gone, connected agents keep their
    network and new logins wait; a control plane started afresh (an empty data
    dir but for signing.key) catches up from the stream and serves: a later
    join reaches every agent."""
    a, b = (
        ControlPlaneProcess(tmp_path / n, cluster, home=i) for i, n in enumerate(("cpa", "cpb"))
    )
    late = ControlPlaneProcess(tmp_path / "cpc", cluster, home=2)
    agents: list[Agent] = []
    loops: list[asyncio.Task[None]] = []
    try:
        await a.start()
        await b.start()
        login = Login(load_or_create(a.data / "admin.key"))
        urls = cluster.urls
        await command(urls, "network.create", login=login, name="office", cidr="10.10.0.0/24")
        made = await command(urls, "key.create", login=login, network="office", uses=10)
        token = str(made["token"])
        # Every broker (in the order of the answering plane's --nats-url).
        assert sorted(server_urls(parse_token(token).server)) == sorted(server_urls(urls))

        for i, member in enumerate(cluster.members):
            agent = await fake_agent(cluster, token, f"h{i}", member.url, tmp_path / f"h{i}")
            agents.append(agent)
            loops.append(asyncio.create_task(agent.reconcile_forever()))
        await all_meshed(agents, "its peers")
        keys = {agent.public_key for agent in agents}

        # One control plane left: every broker still admits (its callout
        # reaches the other), by the agent's own key.
        await a.kill()
        for member in cluster.members:
            nc = await connect_once(
                member.url, timeout=10, **broker_login(agents[0].state, agents[0].identity, urls)
            )
            await nc.close()

        # None left: agents stay connected and keep their peers; a new login waits.
        await b.kill()
        with pytest.raises(BrokerNotReady):
            await connect_once(
                cluster.members[0].url,
                timeout=3,
                **broker_login(agents[0].state, agents[0].identity, urls),
            )
        for agent in agents:
            assert agent.nc is not None and agent.nc.is_connected
            assert peers_of(agent) == keys - {agent.public_key}

        # A control plane that never ran before catches up and serves.
        await late.start()
        fourth = await fake_agent(cluster, token, "h3", urls, tmp_path / "h3")
        agents.append(fourth)
        loops.append(asyncio.create_task(fourth.reconcile_forever()))
        keys.add(fourth.public_key)
        await all_meshed(agents, "the late peer")

    finally:
        for loop in loops:
            # Cancelled again until it ends: a cancellation that lands as an
            # inner asyncio.wait_for completes is swallowed (Python 3.11), and
            # the loop goes on (seen here, once in a few runs).
            while not loop.done():
                loop.cancel()
                await asyncio.wait({loop}, timeout=1)
        for agent in agents:
            await agent.close()
        for plane in (a, b, late):
            await plane.stop()
