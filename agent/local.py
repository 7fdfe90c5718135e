"""`netmesh agent status|down|leave`: the local side, run next to the agent."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path
from typing import Any

import msgspec
import nats.errors

from agent.backend import BackendError, DeviceState, WireGuardBackend
from agent.exit import ExitRouting
from agent.exit import remove_all as remove_exit
from agent.firewall import FirewallControl, NftFirewall
from agent.forwarding import SysctlForwarding
from agent.kernel import KernelBackend, kernel_wireguard_available
from agent.link import Link
from agent.resolver import ResolverControl, host_resolver
from agent.session import AgentError, broker_login, send_host_command
from agent.statedir import Identity, StateDir, load_status, pid_alive, public_key_of
from agent.userspace import UserspaceBackend
from events.commands import Reply
from events.connect import connect_once


async def find_device(interface: str) -> tuple[WireGuardBackend | None, DeviceState | None]:
    """The interface's WireGuard device, whichever backend serves it."""
    userspace = UserspaceBackend(interface)
    if await userspace.exists():
        return userspace, await userspace.read()
    if await kernel_wireguard_available():
        kernel = KernelBackend(interface)
        try:
            if await kernel.exists():
                return kernel, await kernel.read()
        finally:
            await kernel.close()
    return None, None


def running_agent_pid(state_dir: Path) -> int | None:
    status = load_status(state_dir)
    if status is not None and pid_alive(status.pid):
        return status.pid
    return None


async def local_status(state_dir: Path, interface: str | None) -> dict[str, Any]:
    """Everything this machine knows, without asking the control plane."""
    state = StateDir(state_dir)
    identity = state.load_identity()
    status = load_status(state_dir)
    desired = state.load_desired()
    running = status is not None and pid_alive(status.pid)
    name = interface or (status.interface if status else "netmesh0")
    _, device = await find_device(name)
    link = Link(name)
    try:
        link_state = await link.state() if await link.exists() else None
    finally:
        await link.close()
    now = time.time()
    names = {key: p.name for key, p in desired.peers.items()} if desired else {}
    return {
        "host_id": identity.host_id if identity else None,
        "name": identity.name if identity else None,
        "server": identity.server if identity else None,
        "networks": identity.networks if identity else [],
        "agent": {
            "running": running,
            "pid": status.pid if status and running else None,
            "connected": bool(status and running and status.connected),
            "broker": status.broker if status and running and status.connected else None,
            "subscribed": bool(status and running and status.subscribed),
            "backend": status.backend if status else None,
            "last_error": status.last_error if status and running else None,
        },
        "interface": {
            "name": name,
            "present": device is not None,
            "public_key": device.public_key if device else None,
            "listen_port": device.listen_port if device else None,
            "addresses": list(link_state.addresses) if link_state else [],
            "mtu": link_state.mtu if link_state else None,
        },
        # On a relay host: each pair forwarded, per side its address and counters.
        "relays": msgspec.to_builtins(status.relays) if status and running else [],
        "revision": {
            "desired": desired.revision if desired else None,
            "applied": status.applied_revision if status else None,
        },
        "peers": [
            {
                "name": names.get(p.public_key, ""),
                "public_key": p.public_key,
                "endpoint": p.endpoint,
                "allowed_ips": list(p.allowed_ips),
                "handshake_age": round(now - p.last_handshake, 1) if p.last_handshake else None,
                "rx_bytes": p.rx_bytes,
                "tx_bytes": p.tx_bytes,
            }
            for p in (device.peers if device else ())
        ],
    }


async def interface_down(
    state_dir: Path,
    interface: str,
    firewall: FirewallControl | None = None,
    resolver: ResolverControl | None = None,
) -> bool:
    """Give the host's resolver back (the agent's block in resolv.conf, or its
    settings in systemd-resolved: a stopped agent gave them back already,
    unless it died), remove the interface, put IPv4 forwarding and the exit
    node's routing rules back where a gateway or an exit changed them, then
    remove the agent's firewall table (`inet netmesh`, nothing else: the table
    goes last, so nothing arrives or is forwarded unfiltered meanwhile).
    Returns whether there was an interface. Raises AgentError."""
    pid = running_agent_pid(state_dir)
    if pid is not None:
        raise AgentError(
            f"the agent is running (pid {pid}) and would bring {interface} back: stop it first"
        )
    try:
        await (resolver or host_resolver(interface)).restore()
    except BackendError as exc:
        raise AgentError(f"cannot give the host's resolver back: {exc}") from None
    backend, device = await find_device(interface)
    link = Link(interface)
    try:
        present = device is not None or await link.exists()
        if backend is not None:
            await backend.destroy()
        elif present:
            await link.delete()
    except BackendError as exc:
        raise AgentError(f"cannot remove {interface}: {exc}") from None
    finally:
        await link.close()
        if backend is not None:
            await backend.close()
    if firewall is None:
        nft = NftFirewall()
        # Without nft this machine cannot hold a table the agent made.
        firewall = nft if nft.available() else None
    try:
        # Before the table goes: its forward chain guards the interfaces
        # switched on for a gateway until they are back as they were.
        await SysctlForwarding(state_dir).restore_all()
        await remove_exit(ExitRouting(interface))
    except BackendError as exc:
        raise AgentError(f"cannot restore forwarding: {exc}") from None
    if firewall is not None:
        try:
            await firewall.remove()
        except BackendError as exc:
            raise AgentError(f"cannot remove the firewall of {interface}: {exc}") from None
    return present


async def host_command(
    state: StateDir, identity: Identity, server: str | None, verb: str, fields: dict[str, Any]
) -> Reply:
    """Send one command as this host (its own connection); the accepted reply.
    Raises AgentError (unreachable, no answer, refused)."""
    url = server or identity.server
    try:
        nc = await connect_once(
            url,
            timeout=5,
            name=f"netmesh-agent-{verb}-{identity.name}",
            **broker_login(state, identity, url),
        )
    except (OSError, nats.errors.Error, TimeoutError) as exc:
        raise AgentError(f"cannot reach the control plane at {url}: {exc}") from None
    try:
        reply = await send_host_command(nc, state, identity, verb, fields, timeout=15)
    except (nats.errors.NoRespondersError, nats.errors.TimeoutError, TimeoutError):
        raise AgentError(f"no netmesh control plane is answering at {url}") from None
    finally:
        await nc.close()
    if not reply.ok:
        raise AgentError(f"{verb} refused: {reply.error}")
    return reply


async def rotate_key(state_dir: Path, server: str | None) -> str:
    """Make a new WireGuard key here, tell the control plane, then switch to it
    (a running agent is told with SIGHUP). Returns the new public key. Raises
    AgentError; on refusal nothing changed."""
    state = StateDir(state_dir)
    identity = state.load_identity()
    if identity is None:
        raise AgentError(f"not enrolled ({state_dir} has no identity): nothing to rotate")
    public_key = public_key_of(state.stage_private_key())
    await host_command(state, identity, server, "host.rotate_key", {"public_key": public_key})
    state.commit_private_key()
    pid = running_agent_pid(state_dir)
    if pid is not None:
        os.kill(pid, signal.SIGHUP)  # the running agent switches to the new key
    return public_key


async def leave(state_dir: Path, server: str | None, network: str | None) -> list[str]:
    """Take this host out of its networks (or one). Raises AgentError."""
    state = StateDir(state_dir)
    identity = state.load_identity()
    if identity is None:
        raise AgentError(f"not enrolled ({state_dir} has no identity): nothing to leave")
    fields: dict[str, Any] = {} if network is None else {"network": network}
    reply = await host_command(state, identity, server, "host.leave", fields)
    left: list[str] = list(reply.result["left"])
    identity.networks = [n for n in identity.networks if n not in left]
    state.save_identity(identity)
    return left
