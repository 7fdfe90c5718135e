"""The command specs hold together: every command has exactly one spec whose
handler `decide` reaches, and what the rules let each role sign is what
`events verify` accepts in the log (the two must not drift apart)."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import pytest
from nacl.signing import SigningKey

import controlplane.rules as rules
from controlplane.audit import verify_log
from controlplane.authorization import authorize
from controlplane.decide import Context, Decision, Rejected, decide
from controlplane.rules import SPECS, spec_for, spec_for_verb, verbs_sent_by
from controlplane.rules.spec import Sender
from events.commands import (
    COMMAND_TYPES,
    AddAdmin,
    AddDnsRecord,
    AddEgress,
    AddHook,
    AddIngress,
    AddRelay,
    AnyCommand,
    ClearExit,
    ClearPolicy,
    Command,
    CreateAdminToken,
    CreateClient,
    CreateEnrollmentKey,
    CreateNetwork,
    DeleteNetwork,
    Join,
    LeaveNetworks,
    RemoveAdmin,
    RemoveClient,
    RemoveDnsRecord,
    RemoveEgress,
    RemoveHook,
    RemoveIngress,
    RemoveNode,
    RemoveRelay,
    ReportEndpoint,
    ReportSeenEndpoint,
    RequestKeyRotation,
    RequestRelay,
    RevokeAdminToken,
    RevokeEnrollmentKey,
    RotateHostKey,
    SetExit,
    SetPolicy,
    TagNode,
    UntagNode,
    UpdateNetwork,
    command_verb,
)
from events.signing import public_text
from events.tokens import make_token
from projections.topology import Topology
from tests.factories import World, public_key

ROOT = SigningKey.generate()
OLGA = SigningKey.generate()  # network admin of office (and annex, deleted since)
LARRY = SigningKey.generate()  # network admin of lab
ALDO = SigningKey.generate()  # auditor
SPARE = SigningKey.generate()  # another admin, to remove
HOST1, HOST2, HOST3 = SigningKey.generate(), SigningKey.generate(), SigningKey.generate()
HOST4 = SigningKey.generate()  # office's relay

SIGNERS = {"admin": ROOT, "olga": OLGA, "larry": LARRY, "auditor": ALDO}
NETWORKS_OF = {"olga": ("office", "annex"), "larry": ("lab",)}


def key_of(world: World, network: str) -> str:
    return next(k.key_id for k in world.topology.keys.values() if k.network == network)


def join(world: World, network: str, n: int, key: SigningKey) -> Join:
    key_id = key_of(world, network)
    return Join(
        token=make_token("nats://cp:4222", key_id, f"s{key_id.removeprefix('k')}"),
        public_key=public_key(n),
        name=f"h{n}",
        signing_key=public_text(key),
    )


def scenario() -> World:
    """Networks office and lab, host 1 in both, host 2 in office (tagged
    web), host 4 office's relay (lab/h1 lab's), a policy on lab, admins of
    every role; every change signed as the control plane records it."""
    world = World()
    world.add_root_admin(ROOT)
    for name, cidr in [("office", "10.10.0.0/24"), ("lab", "10.20.0.0/24")]:
        world.run(CreateNetwork(name=name, cidr=cidr), ROOT)
        world.run(CreateEnrollmentKey(network=name, uses=None), ROOT)
    world.run(CreateNetwork(name="annex", cidr="10.30.0.0/24"), ROOT)
    world.run(join(world, "office", 1, HOST1), HOST1)
    world.run(join(world, "lab", 1, HOST1), HOST1)
    world.run(join(world, "office", 2, HOST2), HOST2)
    world.run(TagNode(node="office/h2", tags=("web",)), ROOT)
    world.run(SetPolicy(network="lab", document='{rules: [{from: ["*"], to: ["*"]}]}'), ROOT)
    world.run(AddEgress(node="lab/h1", ranges=("172.16.0.0/16",)), ROOT)
    world.run(AddEgress(node="office/h2", ranges=("0.0.0.0/0",)), ROOT)
    world.run(AddDnsRecord(network="lab", name="files", a=("10.20.0.9",)), ROOT)
    world.run(AddIngress(node="lab/h1"), ROOT)
    world.run(CreateClient(network="lab", name="phone", via="h1", public_key=public_key(90)), ROOT)
    world.run(join(world, "office", 4, HOST4), HOST4)
    for n, key in ((1, HOST1), (2, HOST2), (4, HOST4)):
        world.run(ReportEndpoint(host_id=host(world, n), endpoints=(f"192.0.2.{n}",)), key)
    world.run(AddRelay(node="lab/h1"), ROOT)
    world.run(AddRelay(node="office/h4"), ROOT)
    for name, key, role, networks in [
        ("olga", OLGA, "network-admin", NETWORKS_OF["olga"]),
        ("larry", LARRY, "network-admin", NETWORKS_OF["larry"]),
        ("aldo", ALDO, "auditor", ()),
        ("spare", SPARE, "admin", ()),
    ]:
        world.run(
            AddAdmin(name=name, public_key=public_text(key), role=role, networks=networks), ROOT
        )
    world.run(DeleteNetwork(name="annex"), ROOT)
    world.run(AddHook(url="https://hooks.example.net/netmesh", events="*"), ROOT)
    world.run(CreateAdminToken(name="ci", networks=("lab",), role="network-admin"), ROOT)
    return world


def host(world: World, n: int) -> str:
    return world.topology.host_by_public_key[public_key(n)]


Sample = Callable[[World], AnyCommand]


def exiting(world: World, node: str, via: str) -> ClearExit:
    """Turning an exit off needs one on: set by the root admin first."""
    world.run(SetExit(node=node, via=via), ROOT)
    return ClearExit(node=node)


# Samples of every admin command (in the scenario), each with the network it is
# about (None: only a full admin may send it). A new command needs one here.
ADMIN_SAMPLES: dict[str, tuple[Sample, str | None]] = {
    "create annex": (lambda w: CreateNetwork(name="annex", cidr="10.30.0.0/24"), "annex"),
    "delete office": (lambda w: DeleteNetwork(name="office", force=True), "office"),
    "update lab": (lambda w: UpdateNetwork(name="lab", mtu=1380), "lab"),
    "key for office": (lambda w: CreateEnrollmentKey(network="office"), "office"),
    "tagged key for lab": (lambda w: CreateEnrollmentKey(network="lab", tags=("db",)), "lab"),
    "revoke office key": (lambda w: RevokeEnrollmentKey(key_id=key_of(w, "office")), "office"),
    "remove office/h1": (lambda w: RemoveNode(node="office/h1"), "office"),
    "remove lab/h1": (lambda w: RemoveNode(node="lab/h1"), "lab"),
    # Host 1 is in both networks: the node named decides, not the host.
    "rotate office/h1": (lambda w: RequestKeyRotation(node="office/h1"), "office"),
    "rotate lab/h1": (lambda w: RequestKeyRotation(node="lab/h1"), "lab"),
    "rotate h2": (lambda w: RequestKeyRotation(node="h2"), "office"),
    "tag office/h1": (lambda w: TagNode(node="office/h1", tags=("web", "db")), "office"),
    "tag lab/h1": (lambda w: TagNode(node="lab/h1", tags=("web",)), "lab"),
    "untag h2": (lambda w: UntagNode(node="h2", tags=("web", "ops")), "office"),
    "policy for office": (
        lambda w: SetPolicy(network="office", document='{rules: [{from: ["*"], to: ["*"]}]}'),
        "office",
    ),
    "clear lab's policy": (lambda w: ClearPolicy(network="lab"), "lab"),
    "egress office/h1": (
        lambda w: AddEgress(node="office/h1", ranges=("192.168.50.0/24",)),
        "office",
    ),
    "egress off lab/h1": (lambda w: RemoveEgress(node="lab/h1"), "lab"),
    "exit office/h1": (lambda w: SetExit(node="office/h1", via="h2"), "office"),
    "exit off office/h1": (lambda w: exiting(w, "office/h1", "h2"), "office"),
    "ingress office/h2": (lambda w: AddIngress(node="office/h2"), "office"),
    "ingress off lab/h1": (lambda w: RemoveIngress(node="lab/h1"), "lab"),
    "client in lab": (
        lambda w: CreateClient(network="lab", name="tab", via="h1", public_key=public_key(91)),
        "lab",
    ),
    "remove a client of lab": (lambda w: RemoveClient(network="lab", name="phone"), "lab"),
    "name in office": (
        lambda w: AddDnsRecord(network="office", name="db", a=("10.10.0.50",)),
        "office",
    ),
    "remove a name in lab": (
        lambda w: RemoveDnsRecord(network="lab", name="files.lab.internal"),
        "lab",
    ),
    "domain of lab": (lambda w: UpdateNetwork(name="lab", dns_domain="lab.corp.example"), "lab"),
    "add admin": (
        lambda w: AddAdmin(name="newbie", public_key=public_text(SigningKey.generate())),
        None,
    ),
    "remove admin": (lambda w: RemoveAdmin(name="spare"), None),
    "add hook": (lambda w: AddHook(url="http://127.0.0.1:8080/in", events="node.*"), None),
    "remove hook": (lambda w: RemoveHook(hook_id=next(iter(w.topology.hooks))), None),
    "make a token": (lambda w: CreateAdminToken(name="grafana", expires_in=60.0), None),
    "revoke a token": (lambda w: RevokeAdminToken(name="ci"), None),
    "relay office/h2": (lambda w: AddRelay(node="office/h2", ports="53000-53009"), "office"),
    "relay off lab/h1": (lambda w: RemoveRelay(node="lab/h1"), "lab"),
}

# Samples of every command a host sends, the key that may sign it, and another
# key that may not.
HOST_SAMPLES: dict[str, tuple[Sample, SigningKey, SigningKey]] = {
    "join": (lambda w: join(w, "lab", 3, HOST3), HOST3, HOST2),
    "endpoint report": (
        lambda w: ReportEndpoint(host_id=host(w, 1), endpoints=("192.0.2.9",)),
        HOST1,
        HOST2,
    ),
    "leave": (lambda w: LeaveNetworks(host_id=host(w, 1), network="lab"), HOST1, HOST2),
    "rotate key": (
        lambda w: RotateHostKey(host_id=host(w, 1), public_key=public_key(9)),
        HOST1,
        HOST2,
    ),
    "peer seen": (
        lambda w: ReportSeenEndpoint(
            host_id=host(w, 1), peer_key=public_key(2), endpoint="198.51.100.7:40000"
        ),
        HOST1,
        HOST2,
    ),
    "relay wanted": (
        lambda w: RequestRelay(host_id=host(w, 1), peer_key=public_key(2)),
        HOST1,
        HOST2,
    ),
}
SAMPLES: dict[str, Sample] = {
    **{label: sample for label, (sample, _) in ADMIN_SAMPLES.items()},
    **{label: sample for label, (sample, _, _) in HOST_SAMPLES.items()},
}


def verbs_of(samples: dict[str, Sample]) -> set[str]:
    world = scenario()
    return {command_verb(sample(world)) for sample in samples.values()}


def test_every_command_has_exactly_one_spec() -> None:
    assert sorted(spec.command.__name__ for spec in SPECS) == sorted(
        cls.__name__ for cls in COMMAND_TYPES
    )
    for cls in COMMAND_TYPES:
        (spec,) = [s for s in SPECS if s.command is cls]
        assert spec_for_verb(spec.verb) is spec
    admin_samples = {label: sample for label, (sample, _) in ADMIN_SAMPLES.items()}
    assert verbs_of(admin_samples) == set(verbs_sent_by(Sender.ADMIN))
    assert verbs_of(SAMPLES) == {spec.verb for spec in SPECS}


@pytest.mark.parametrize("label", SAMPLES)
def test_decide_reaches_every_specs_handler(monkeypatch: pytest.MonkeyPatch, label: str) -> None:
    command = SAMPLES[label](scenario())
    spec = spec_for(command)
    assert spec.verb == command_verb(command)
    seen: list[Command] = []

    def handler(_topology: Topology, cmd: Command, _ctx: Context) -> Decision:
        seen.append(cmd)
        return Decision()

    monkeypatch.setitem(rules._BY_TYPE, spec.command, dataclasses.replace(spec, handler=handler))
    decide(Topology(), command, Context(now=0.0, actor="test"))
    assert seen == [command]


def test_the_scenario_verifies() -> None:
    report = verify_log(scenario().log, root=public_text(ROOT))
    assert report.problems == [] and report.unsigned_events == 0


def _outcomes(sample: Sample, key: SigningKey) -> tuple[bool, list[str]]:
    """(whether the rules let `key` send the sample, the problems `events
    verify` finds in a log where `key` did)."""
    world = scenario()
    before = len(world.log)
    command, _ = world.signed(sample(world), key)
    try:
        authorize(world.topology, command, public_text(key), None, world.now)
        allowed = True
    except Rejected as exc:
        assert exc.code == "unauthorized"
        allowed = False
    world.run(command, key)
    assert len(world.log) > before, "the sample must produce an event"
    problems = [why for _, why in verify_log(world.log, public_text(ROOT)).problems]
    return allowed, problems


@pytest.mark.parametrize("who", SIGNERS)
@pytest.mark.parametrize("label", ADMIN_SAMPLES)
def test_rules_and_audit_agree_on_each_role_and_scope(who: str, label: str) -> None:
    sample, network = ADMIN_SAMPLES[label]
    allowed, problems = _outcomes(sample, SIGNERS[who])
    assert allowed == (problems == []), problems
    # And both say what the roles mean.
    assert allowed == (who == "admin" or network in NETWORKS_OF.get(who, ()))


@pytest.mark.parametrize("label", HOST_SAMPLES)
def test_rules_and_audit_agree_on_whose_key_signs_a_hosts_command(label: str) -> None:
    sample, right, wrong = HOST_SAMPLES[label]
    assert _outcomes(sample, right) == (True, [])
    allowed, problems = _outcomes(sample, wrong)
    assert not allowed and problems
