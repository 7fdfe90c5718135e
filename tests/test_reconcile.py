"""The agent's reconcilers, one per part of the machine: golden op tables on
the fake machine, and one failing reconciler not blocking the others."""

from __future__ import annotations

import base64

from nacl.public import PrivateKey

from agent.backend import BackendError
from agent.fake import FakeBackend, FakeFirewall, FakeLink, FakeMachine
from agent.plan import Actual, plan_routes
from agent.reconcile import ENFORCED_SECTIONS, RECONCILERS, reconcile
from agent.statedir import private_key_b64, public_key_of
from events.desired import SECTION_NAMES, PeerEntry
from tests.desired_states import desired_state

KEY = PrivateKey(bytes(range(32)))
PEER = base64.b64encode(bytes([7]) * 32).decode()
ENTRY = PeerEntry(allowed_ips=("10.0.0.2/32",), endpoint="192.0.2.2:51820", name="p")


class RefusingAddresses(FakeLink):
    """A link that refuses addresses (say, one the kernel finds invalid)."""

    async def add_address(self, cidr: str) -> None:
        raise BackendError(f"add address {cidr}: EINVAL", retryable=False)


async def run(
    machine: FakeMachine, link: FakeLink, firewall: FakeFirewall | None = None, **state: object
) -> dict[str, list[str]]:
    """One pass; the ops each reconciler planned, as printed (the firewall's
    only when the test gives it one to watch)."""
    desired = desired_state(**state)  # type: ignore[arg-type]
    result = await reconcile(
        desired,
        FakeBackend("nm0", machine),
        link,
        firewall=firewall or FakeFirewall(),
        public_key=public_key_of(KEY),
        private_key=private_key_b64(KEY),
        previous={},
    )
    shown = [o for o in result.outcomes if firewall is not None or o.name != "firewall"]
    return {o.name: [str(op) for op in o.ops] for o in shown if o.ops} | {
        f"{o.name} error": [o.error] for o in shown if o.error
    }


def test_one_reconciler_per_part_of_the_machine() -> None:
    assert [r.name for r in RECONCILERS] == [
        *("firewall", "interface", "link", "peers", "routes", "exit", "forwarding", "dns"),
        "relays",
    ]
    # Every section the control plane may send is enforced by some reconciler:
    # agents advertise these, and a section nobody enforces must not pass.
    assert set(ENFORCED_SECTIONS) == set(SECTION_NAMES)


async def test_a_pass_on_a_bare_machine_plans_each_part_in_turn() -> None:
    machine = FakeMachine()
    link = FakeLink("nm0", machine)
    ops = await run(machine, link, addresses=("10.0.0.1/24",), peers=[(PEER, ENTRY)])
    assert ops == {
        "interface": [
            "create interface",
            f"set private key (public {public_key_of(KEY)})",
            "set listen port 51820",
        ],
        "link": ["set mtu 1420", "add address 10.0.0.1/24", "set link up"],
        "peers": [f"add peer p {PEER} allowed 10.0.0.2/32 endpoint 192.0.2.2:51820 keepalive 0"],
    }
    # Again: nothing to do.
    assert await run(machine, link, addresses=("10.0.0.1/24",), peers=[(PEER, ENTRY)]) == {}


async def test_routes_are_added_and_only_the_agents_own_are_removed() -> None:
    machine = FakeMachine()
    link = FakeLink("nm0", machine)
    await run(machine, link, routes=("192.168.10.0/24",))
    assert "route add 192.168.10.0/24" in machine.ops
    machine.ops.clear()
    assert await run(machine, link, routes=("192.168.20.0/24",)) == {
        "routes": ["add route 192.168.20.0/24", "remove route 192.168.10.0/24"]
    }
    # The link lists only the routes the agent made (RTPROT_NETMESH on a real
    # kernel), so anything else is outside the plan whatever the desired state.
    actual = Actual(device=None, link=None)
    assert plan_routes(desired_state(), actual) == []


async def test_a_failing_reconciler_does_not_block_the_others() -> None:
    machine = FakeMachine()
    link = RefusingAddresses("nm0", machine)
    ops = await run(
        machine, link, addresses=("10.0.0.1/24",), peers=[(PEER, ENTRY)], routes=("10.9.0.0/16",)
    )
    assert ops["link error"] == ["add address 10.0.0.1/24: add address 10.0.0.1/24: EINVAL"]
    assert set(ops) == {"interface", "link", "link error", "peers", "routes"}
    # What came after the link's failure was still done: peers and routes.
    device = machine.devices["nm0"]
    assert list(device.peers) == [PEER] and device.routes == {"10.9.0.0/16"}
    assert device.addresses == set()
