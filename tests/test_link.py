"""agent/link.py against a real kernel, inside a test host (a veth pair stands in
for the WireGuard interface: this kernel has no dummy links)."""

from __future__ import annotations

from typing import Any

import msgspec
import pytest

from agent.link import LinkState
from tests.netns import (
    Driver,
    Host,
    RemoteError,
    TestNet,
    testnet_fixture,  # noqa: F401  (the `testnet` fixture)
)

pytestmark = pytest.mark.netns


async def _state(driver: Driver, name: str = "link") -> LinkState:
    return msgspec.convert(await driver.call(name, "state"), LinkState)


async def _host_with_veth(testnet: TestNet) -> tuple[Host, Driver]:
    host = await testnet.add_host("a")
    await host.run("ip", "link", "add", "t0", "type", "veth", "peer", "name", "t1")
    await host.run("ip", "link", "set", "t1", "up")
    driver = await host.driver()
    await driver.new("link", "agent.link:Link", "t0")
    return host, driver


async def test_link_state_and_idempotent_changes(testnet: TestNet) -> None:
    host, driver = await _host_with_veth(testnet)
    assert await driver.call("link", "exists") is True
    before = await _state(driver)
    assert not before.up
    assert before.addresses == ()
    assert before.routes == ()

    await driver.call("link", "set_mtu", mtu=1380)
    for _ in range(2):
        await driver.call("link", "set_up")
        for cidr in ("10.50.0.1/24", "fd50::1/64"):
            await driver.call("link", "add_address", cidr=cidr)
        for cidr in ("10.60.0.0/16", "10.61.0.7/32", "fd60::/48", "10.62.0.9/16"):
            await driver.call("link", "add_route", cidr=cidr)

    state = await _state(driver)
    assert state.index == before.index
    assert state.mtu == 1380
    assert state.up
    assert state.addresses == ("10.50.0.1/24", "fd50::1/64")
    # The kernel's own prefix routes (10.50.0.0/24, fd50::/64) are not listed;
    # a destination with host bits is stored as its network.
    assert state.routes == ("10.60.0.0/16", "10.61.0.7/32", "10.62.0.0/16", "fd60::/48")

    # The kernel agrees.
    shown = (await host.run("ip", "route", "show", "dev", "t0")).stdout
    assert "10.60.0.0/16" in shown
    assert "10.61.0.7" in shown
    shown6 = (await host.run("ip", "-6", "route", "show", "dev", "t0")).stdout
    assert "fd60::/48" in shown6
    assert "mtu 1380" in (await host.run("ip", "link", "show", "t0")).stdout
    assert "proto 77" in shown  # marked as the agent's own

    # A route someone else put on the interface is not the agent's: not listed,
    # and removing the agent's route to the same place leaves it alone.
    await host.run("ip", "route", "add", "10.80.0.0/16", "dev", "t0")
    assert "10.80.0.0/16" not in (await _state(driver)).routes
    await driver.call("link", "remove_route", cidr="10.80.0.0/16")
    assert "10.80.0.0/16" in (await host.run("ip", "route", "show", "dev", "t0")).stdout

    for _ in range(2):
        for cidr in ("10.50.0.1/24", "fd50::1/64"):
            await driver.call("link", "remove_address", cidr=cidr)
        for cidr in ("10.60.0.0/16", "10.61.0.7/32", "fd60::/48", "10.62.0.0/16"):
            await driver.call("link", "remove_route", cidr=cidr)
    after = await _state(driver)
    assert after.addresses == ()
    assert after.routes == ()

    await driver.call("link", "delete")
    await driver.call("link", "delete")
    assert await driver.call("link", "exists") is False
    await driver.call("link", "close")


async def test_link_conflicts_and_errors(testnet: TestNet) -> None:
    _host, driver = await _host_with_veth(testnet)
    await driver.new("other", "agent.link:Link", "t1")
    await driver.new("missing", "agent.link:Link", "nope0")
    await driver.call("link", "set_up")

    assert await driver.call("missing", "exists") is False
    for method, kwargs in [("state", {}), ("set_mtu", {"mtu": 1400}), ("set_up", {})]:
        with pytest.raises(RemoteError) as info:
            await driver.call("missing", method, **kwargs)
        assert info.value.type_name == "LinkError"
        assert info.value.retryable is True  # the interface may appear later
    await driver.call("missing", "delete")  # absent: nothing to do

    # Same destination via another interface: not silently "already there".
    await driver.call("other", "add_route", cidr="10.70.0.0/16")
    with pytest.raises(RemoteError, match="another interface"):
        await driver.call("link", "add_route", cidr="10.70.0.0/16")
    # IPv6 keys addresses without the prefix.
    await driver.call("link", "add_address", cidr="fd50::1/64")
    with pytest.raises(RemoteError, match="another prefix"):
        await driver.call("link", "add_address", cidr="fd50::1/80")

    invalid: list[tuple[str, dict[str, Any]]] = [
        ("add_address", {"cidr": "10.0.0.300/24"}),
        ("add_route", {"cidr": "bogus"}),
        ("set_mtu", {"mtu": 10}),  # below the minimum: EINVAL
    ]
    for method, kwargs in invalid:
        with pytest.raises(RemoteError) as info:
            await driver.call("link", method, **kwargs)
        assert info.value.type_name == "LinkError"
        assert info.value.retryable is False
