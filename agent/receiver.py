"""The agent's desired-state subject as it reads it: is a message authentic,
what it does to the state held (the pure `DesiredFeed`), the cache on disk,
and when to re-read the subject or ask for a snapshot.

No connection of its own: what needs one (re-reading, asking for a snapshot)
and what follows a new state (a reconcile pass) are the daemon's callbacks.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

import structlog

from agent.statedir import StateDir
from events.desired import DesiredMessage
from events.feed import DesiredFeed, Outcome
from events.signing import verify, verify_key_of

log = structlog.get_logger("netmesh.agent")

RESYNC_GRACE = 10.0  # seconds a re-read may take to find its snapshot


class DesiredReceiver:
    def __init__(
        self,
        host_id: str,
        state: StateDir,
        server_key: str,
        *,
        on_state: Callable[[], None],
        on_rejection: Callable[[], None],
        reread: Callable[[], None],
        ask_for_snapshot: Callable[[], None],
    ) -> None:
        self.state = state
        self.feed = DesiredFeed(host_id, state.load_desired())
        # The control plane's key pinned at enrollment (none: enrolled with an old token).
        self.verify_key = verify_key_of(server_key) if server_key else None
        self.rejected = 0
        self.last_rejection: str | None = None
        self.unsaved = False  # the feed moved since the state was last saved and applied
        self.resynced_for = 0  # the `seen` revision of the last re-read for a gap
        self.warned_unpinned = False
        self.on_state = on_state  # a new state is held: reconcile
        self.on_rejection = on_rejection  # a forged message was refused: report it
        self.reread = reread  # read the subject again from its snapshot
        self.ask_for_snapshot = ask_for_snapshot  # have the control plane append one

    def offer(self, message: DesiredMessage, *, pending: int = 0) -> Outcome:
        """Take a snapshot or delta from the subject. `pending` is how many more
        messages the subject holds for us: the state is saved and applied once
        the burst is read (one pass for many messages, no timer)."""
        outcome = self.feed.take(message)
        if outcome is Outcome.FOREIGN:
            log.warning("desired state for another host ignored", host_id=message.host_id)
        elif outcome is Outcome.GAP:
            log.info(
                "desired-state delta does not follow ours, skipped",
                have=self.feed.revision,
                base=getattr(message, "base", None),
                revision=message.revision,
            )
        elif outcome is Outcome.TAKEN:
            self.unsaved = True
        if pending > 0 or self.feed.resyncing:
            return outcome
        if self.feed.settle():
            log.warning(
                "re-reading desired states gave an older state; keeping ours",
                revision=self.feed.revision,
            )
        if self.unsaved:
            self.unsaved = False
            state = self.feed.state
            assert state is not None
            try:
                self.state.save_desired(state)
            except OSError as exc:  # a full disk must not lose the state we were sent
                log.warning("desired state not cached on disk", error=str(exc))
            log.info("desired state received", revision=state.revision, peers=len(state.peers))
            self.on_state()
        if self.feed.behind:
            self.resync()
        return outcome

    def resync(self) -> None:
        """Re-read the subject from its snapshot, once per revision we cannot
        reach: a subject whose chain stays broken after that (a bad message)
        must not make us re-read it in a loop."""
        if self.resynced_for >= self.feed.seen:
            log.warning(
                "desired states still do not chain after re-reading; "
                "asking the control plane for a snapshot",
                have=self.feed.revision,
                seen=self.feed.seen,
            )
            self.feed.seen = self.feed.revision  # forget it; later deltas apply as usual
            self.ask_for_snapshot()
            return
        self.resynced_for = self.feed.seen
        log.info("re-reading desired states from the snapshot", have=self.feed.revision)
        self.feed.begin_resync()
        self.reread()
        # A subject with no snapshot to re-read from (purged) must not leave us
        # skipping deltas for good.
        asyncio.get_running_loop().call_later(RESYNC_GRACE, self._end_resync)

    def _end_resync(self) -> None:
        if self.feed.resyncing:
            log.warning("no snapshot found when re-reading desired states; going on")
            self.feed.resyncing = False
            self.feed.settle()

    def authentic(self, data: bytes, signature: str | None) -> bool:
        """Whether a desired-state message comes from our control plane. A
        refused one changes nothing; it is counted, logged and reported."""
        if self.verify_key is None:
            if not self.warned_unpinned:
                self.warned_unpinned = True
                log.warning(
                    "no control-plane key pinned (enrolled with an old token): desired "
                    "states are not verified; re-enroll with a new token to pin one"
                )
            return True
        why = verify(self.verify_key, data, signature)
        if why is None:
            return True
        self.rejected += 1
        self.last_rejection = f"{why} desired state refused at {time.strftime('%H:%M:%S')}"
        log.warning("desired state refused", why=why, rejected=self.rejected)
        self.on_rejection()
        return False
