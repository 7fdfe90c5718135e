"""The host's WireGuard key in the agent: the one in use, and when to make a new one.

A new key is made on this machine (it never leaves it), announced to the
control plane signed by the host's key, and only then put on the device;
peers switch to it in place.
"""

from __future__ import annotations

import asyncio
import time

import nats.errors
import structlog

from agent.session import Session
from agent.statedir import Identity, StateDir, StateDirError, private_key_b64, public_key_of
from events.desired import DesiredState

log = structlog.get_logger("netmesh.agent")

SCHEDULED_ROTATION_RETRY = 3600.0  # after a refused scheduled rotation


class HostKey:
    def __init__(
        self, state: StateDir, private_key: str, public_key: str, rotate_every: float | None
    ) -> None:
        self.state = state
        self.private_key = private_key  # base64; set on the device, never sent anywhere
        self.public_key = public_key
        # Make a new WireGuard key when the current one is this old (seconds).
        self.rotate_every = rotate_every
        self._next_scheduled_rotation = 0.0  # after a refusal: not before this
        # Held while a new key is made and announced (a join names the key).
        self.lock = asyncio.Lock()

    def reload(self) -> bool:
        """Take the key now in the state dir (after `netmesh agent rotate-key`,
        or our own rotation). False when it cannot be read."""
        try:
            key = self.state.private_key()
        except (OSError, ValueError, StateDirError) as exc:
            log.warning("key not reloaded", error=str(exc))
            return False
        self.private_key = private_key_b64(key)
        self.public_key = public_key_of(key)
        log.info("WireGuard key reloaded", public_key=self.public_key)
        return True

    def rotation_due(
        self, desired: DesiredState | None, identity: Identity, now: float
    ) -> str | None:
        """Why this host should make a new WireGuard key now, if it should: an
        admin asked (`netmesh node rotate-key`), or the key is older than
        `--rotate-key-every` (its file's age: a rotation replaces the file)."""
        if desired is None:
            return None
        if desired.interface.key_epoch > identity.key_epoch:
            return "requested"
        if self.rotate_every is not None and now >= self._next_scheduled_rotation:
            age = now - self.state.private_key_made_at()
            if age >= self.rotate_every:
                return "scheduled"
        return None

    async def rotate_if_due(
        self, desired: DesiredState | None, identity: Identity, session: Session
    ) -> bool:
        """Make a new key when one is due, announce it (signed), then switch
        to it. True when the key changed (the device needs it)."""
        why = self.rotation_due(desired, identity, time.time())
        if why is None or not session.connected:
            return False  # not due, or the next pass after reconnecting
        assert desired is not None
        async with self.lock:
            return await self._rotate(desired, identity, session, why)

    async def _rotate(
        self, desired: DesiredState, identity: Identity, session: Session, why: str
    ) -> bool:
        public_key = public_key_of(self.state.stage_private_key())
        try:
            reply = await session.command("host.rotate_key", {"public_key": public_key})
        except (nats.errors.Error, TimeoutError) as exc:
            log.info("key rotation not delivered, will retry", error=repr(exc))
            return False
        changed = False
        if reply.ok:
            self.state.commit_private_key()
            log.info("key rotated", why=why)
            changed = self.reload()
        else:  # not retried at once: it would fail the same way on every pass
            log.warning("key rotation refused", error=reply.error, why=why)
            self._next_scheduled_rotation = time.time() + SCHEDULED_ROTATION_RETRY
        identity.key_epoch = desired.interface.key_epoch
        self.state.save_identity(identity)
        return changed
