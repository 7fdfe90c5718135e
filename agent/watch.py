"""Wake the agent when its interface changes under it (rtnetlink events):
drift is repaired at once instead of at the next resync."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from typing import Any

import structlog
from pyroute2 import AsyncIPRoute
from pyroute2.netlink.rtnl import RTMGRP_IPV4_IFADDR, RTMGRP_IPV6_IFADDR, RTMGRP_LINK

log = structlog.get_logger("netmesh.agent")


def concerns(msg: Any, interface: str, index: int | None) -> bool:
    """Whether an rtnetlink message is about our interface."""
    if msg.get("event") in ("RTM_NEWLINK", "RTM_DELLINK"):
        return bool(msg.get_attr("IFLA_IFNAME") == interface)
    if msg.get("event") in ("RTM_NEWADDR", "RTM_DELADDR"):
        return bool(msg.get("index") == index or msg.get_attr("IFA_LABEL") == interface)
    return False


async def watch_interface(interface: str, wake: Callable[[], None]) -> None:
    """Call `wake` on every link or address change of `interface`, forever.
    Netlink trouble is logged and the watch restarts; it never stops the agent."""
    while True:
        ipr = AsyncIPRoute()
        try:
            await ipr.bind(groups=RTMGRP_LINK | RTMGRP_IPV4_IFADDR | RTMGRP_IPV6_IFADDR)
            index: int | None = None
            while True:
                async for msg in ipr.get():
                    if msg.get("event") in ("RTM_NEWLINK", "RTM_DELLINK") and (
                        msg.get_attr("IFLA_IFNAME") == interface
                    ):
                        index = msg.get("index") if msg.get("event") == "RTM_NEWLINK" else None
                    if concerns(msg, interface, index):
                        wake()
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.warning("interface watch failed, restarting", error=repr(exc))
            await asyncio.sleep(5)
        finally:
            with contextlib.suppress(Exception):
                ipr.close()
