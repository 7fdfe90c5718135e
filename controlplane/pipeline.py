"""The command pipeline: from a request on `netmesh.cmd.<verb>` to events in
the stream and a reply.

Every step is the same for every command; what differs between commands is in
their specs (`controlplane.rules`): decode into the command's type, throttle
(if its spec says failures count), check the signature and who may send it,
decide against the write model, append with optimistic concurrency (a conflict
means catch up and decide again, a bounded number of times), answer once the
read model has the change too (read-your-writes).
"""

from __future__ import annotations

import asyncio
import random
import secrets
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgspec
import structlog
from nats.aio.msg import Msg

from controlplane.authorization import authorize
from controlplane.decide import decide
from controlplane.replies import Responder
from controlplane.rules import spec_for_verb
from controlplane.rules.base import Context, Decision, Rejected
from controlplane.rules.spec import CommandSpec, Need
from controlplane.throttle import FailureWindow
from controlplane.writemodel import WriteModel
from events.commands import Command, ErrorCode, Reply
from events.envelope import make_envelope
from events.model import AdminAdded
from events.signing import (
    COMMAND_SIGNER_HEADER,
    SIGNATURE_HEADER,
    load_or_create,
    public_text,
    signed_command,
    verify,
    verify_key_of,
)
from events.store import (
    ConcurrencyConflict,
    DuplicateAppend,
    EventStore,
    Expectation,
    PendingEvent,
    StoreError,
)
from events.subjects import COMMAND_PREFIX, aggregate_subject
from projections.topology import COMMAND_MEMORY

log = structlog.get_logger("netmesh.controlplane")

MAX_ATTEMPTS = 10
READ_YOUR_WRITES_TIMEOUT = 5.0

# (key id, secret) -> the enrollment token a user hands to an agent.
TokenMaker = Callable[[str, str], str]
# Until the read model has applied a sequence (or the timeout passes).
ReadYourWrites = Callable[[int, float], Awaitable[object]]


@dataclass(frozen=True)
class Proof:
    signed: str  # the exact signed text: context, verb, payload
    signer: str
    signature: str


def _signature_problem(
    verb: str, payload: bytes, signer: str | None, signature: str | None
) -> str | None:
    """None when `signature` is `signer`'s over the command, else why not."""
    if not signer or not signature:
        return "unsigned"
    try:
        key = verify_key_of(signer)
    except ValueError:
        return "the signer is not an Ed25519 public key"
    return verify(key, signed_command(verb, payload), signature)


def _duplicate(command_id: str, seq: int | None) -> Reply:
    where = f" (event #{seq})" if seq is not None else ""
    return Reply.refused(
        ErrorCode.DUPLICATE, f"command id {command_id!r} was already applied{where}; send a new id"
    )


def _refused(exc: Rejected) -> Reply:
    return Reply.refused(exc.code, exc.message)


def one_line(text: str) -> str:
    """`text` with control characters (newlines included) escaped."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def _actor(msg: Msg) -> str:
    # Until commands are signed (see DESIGN "Trust"), the actor is what the
    # sender says it is: recorded for the audit log, not trusted.
    if msg.headers and msg.headers.get("Netmesh-Actor"):
        return str(msg.headers["Netmesh-Actor"])[:128]
    return "anonymous"


class CommandPipeline:
    def __init__(
        self,
        store: EventStore,
        write: WriteModel,
        responder: Responder,
        failures: FailureWindow,
        token: TokenMaker,
        read_your_writes: ReadYourWrites,
    ) -> None:
        self._store = store
        self._write = write
        self._responder = responder
        self._failures = failures
        self._token = token
        self._read_your_writes = read_your_writes
        self._lock = asyncio.Lock()
        # Ids of signed commands seen (most recent COMMAND_MEMORY), whatever came of them.
        self._signed_ids: dict[str, None] = {}

    async def on_command(self, msg: Msg) -> None:
        verb = msg.subject[len(COMMAND_PREFIX) + 1 :]
        try:
            headers = msg.headers or {}
            reply = await self.handle(
                verb,
                msg.data,
                actor=_actor(msg),
                signer=headers.get(COMMAND_SIGNER_HEADER),
                signature=headers.get(SIGNATURE_HEADER),
            )
        except Exception:  # the service must outlive any one command
            log.exception("command failed", verb=verb)
            reply = Reply.refused(ErrorCode.INTERNAL, "internal error (see the server log)")
        await self._responder.answer(msg, reply)

    async def handle(
        self,
        verb: str,
        payload: bytes,
        *,
        actor: str,
        signer: str | None = None,
        signature: str | None = None,
    ) -> Reply:
        reply = await self._handle(verb, payload, actor=actor, signer=signer, signature=signature)
        if reply.error is not None:
            # Refusals quote what was sent (field names, values): keep them on
            # one line whatever it contained.
            reply.error = one_line(reply.error)
        return reply

    async def _handle(
        self, verb: str, payload: bytes, *, actor: str, signer: str | None, signature: str | None
    ) -> Reply:
        spec = spec_for_verb(verb)
        if spec is None:
            return Reply.refused(ErrorCode.INVALID, f"unknown command {verb!r}")
        try:
            command: Command = msgspec.json.decode(payload, type=spec.command)
        except msgspec.ValidationError as exc:
            return Reply.refused(ErrorCode.INVALID, f"invalid {verb} command: {exc}")
        except msgspec.DecodeError:
            return Reply.refused(ErrorCode.INVALID, f"invalid {verb} command: not JSON")
        throttle = spec.throttle
        bucket = throttle.bucket(self._write.topology, command) if throttle is not None else None
        now = time.time()
        if throttle is not None and bucket is not None and not self._failures.allowed(bucket, now):
            wait = self._failures.retry_after(bucket, now)
            return Reply.refused(
                ErrorCode.RATE_LIMITED, f"too many {throttle.what}; try again in {wait:.0f} s"
            )
        reply = await self._authorized(spec, payload, command, actor, signer, signature)
        if throttle is not None and bucket is not None and reply.code in throttle.counted:
            self._failures.failed(bucket, now)
        return reply

    async def _authorized(
        self,
        spec: CommandSpec[Any],
        payload: bytes,
        command: Command,
        actor: str,
        signer: str | None,
        signature: str | None,
    ) -> Reply:
        verb = spec.verb
        proof: Proof | None = None
        problem = _signature_problem(verb, payload, signer, signature)

        def authorized() -> str | None:
            # Checked again before each attempt: a retry decides against a
            # newer topology, and who may do what can have changed with it.
            return authorize(self._write.topology, command, signer, problem, time.time())

        try:
            admin = authorized()
        except Rejected as exc:
            log.warning("command refused", verb=verb, code=exc.code, reason=exc.message)
            return _refused(exc)
        if admin is not None:
            if not command.command_id:
                # The id is what makes a signed command impossible to replay,
                # and what ties its events to its proof.
                return Reply.refused(ErrorCode.INVALID, f"a signed {verb} needs a command_id")
            # Remembered whatever the outcome: a signed command that changed
            # nothing (or was refused) must not be replayable later either.
            if command.command_id in self._signed_ids:
                return _duplicate(command.command_id, None)
            self._signed_ids[command.command_id] = None
            if len(self._signed_ids) > COMMAND_MEMORY:
                del self._signed_ids[next(iter(self._signed_ids))]
            actor = admin
            assert signer is not None and signature is not None
            proof = Proof(signed_command(verb, payload).decode(), signer, signature)
        async with self._lock:
            reply = await self._execute(spec, command, actor, proof, authorized)
        # Read-your-writes: answer once the read model has the change too. Not
        # under the lock: the next command only needs the write model, and the
        # projection takes the events of commands that queue up in one batch.
        if reply.seq is not None:
            await self._read_your_writes(reply.seq, READ_YOUR_WRITES_TIMEOUT)
        return reply

    async def _execute(
        self,
        spec: CommandSpec[Any],
        command: Command,
        actor: str,
        proof: Proof | None,
        authorized: Callable[[], str | None],
    ) -> Reply:
        verb = spec.verb
        command_id = command.command_id or uuid.uuid4().hex
        fresh_key = Need.FRESH_KEY in spec.needs
        ctx = Context(
            now=time.time(),
            actor=actor,
            new_key_id="k" + secrets.token_hex(5) if fresh_key else "",
            new_secret=secrets.token_urlsafe(24) if fresh_key else "",
        )
        topology = self._write.topology
        for attempt in range(1, MAX_ATTEMPTS + 1):
            applied_at = topology.commands.get(command_id)
            if applied_at is not None:
                return _duplicate(command_id, applied_at)
            try:
                if attempt > 1:
                    authorized()
                decision = decide(topology, command, ctx)
            except Rejected as exc:
                log.info("command refused", verb=verb, code=exc.code, reason=exc.message)
                return _refused(exc)
            if not decision.events:
                return Reply(ok=True, result=self._result(spec, decision, ctx))
            pending = pending_events(decision, ctx, command_id, proof)
            try:
                seq = await self._store.append(pending, expect=decision.expect, msg_id=command_id)
            except DuplicateAppend:
                # JetStream knows the id (its duplicate window) before our write
                # model does: wait for it, then answer as above.
                await self._write.catch_up()
                return _duplicate(command_id, topology.commands.get(command_id))
            except ConcurrencyConflict as exc:
                # Someone wrote first: catch up and decide again against what is
                # there now.
                log.info(
                    "append conflict, deciding again", verb=verb, attempt=attempt, why=str(exc)
                )
                # Jittered backoff: two writers that keep colliding drift apart.
                await asyncio.sleep(random.uniform(0, 0.005 * attempt))
                await self._write.catch_up()
                continue
            except StoreError as exc:
                return Reply.refused(ErrorCode.UNAVAILABLE, f"event store: {exc}")
            await self._write.apply_own(seq, pending)
            log.info("command applied", verb=verb, seq=seq, events=len(decision.events))
            return Reply(ok=True, result=self._result(spec, decision, ctx), seq=seq)
        return Reply.refused(ErrorCode.BUSY, "too many concurrent changes; try again")

    def _result(self, spec: CommandSpec[Any], decision: Decision, ctx: Context) -> dict[str, Any]:
        result = dict(decision.result)
        if Need.ENROLLMENT_TOKEN in spec.needs:
            result["token"] = self._token(ctx.new_key_id, ctx.new_secret)
        return result

    async def bootstrap_admin(self, data_dir: Path) -> None:
        """On first start (no admin in the stream), make the first admin's key
        in the data dir (0600) and register it: the root of trust."""
        if self._write.topology.admins:
            return
        key = load_or_create(data_dir / "admin.key")
        subject = aggregate_subject("admin", "admin")
        event = AdminAdded(name="admin", public_key=public_text(key), role="admin")
        envelope = make_envelope(
            event, event_id=uuid.uuid4().hex, time=time.time(), actor="bootstrap", command_id=""
        )
        try:
            seq = await self._store.append(
                [PendingEvent(subject, envelope)], expect=[Expectation(subject, 0)]
            )
        except ConcurrencyConflict:  # another replica did it first
            await self._write.catch_up()
            return
        await self._write.wait_for(seq)
        log.info("first admin created", key_file=str(data_dir / "admin.key"))


def pending_events(
    decision: Decision, ctx: Context, command_id: str, proof: Proof | None
) -> list[PendingEvent]:
    """The decision's events in their envelopes, ready to append."""
    pending = []
    for i, (subject, event) in enumerate(decision.events):
        envelope = make_envelope(
            event,
            event_id=uuid.uuid4().hex,
            time=ctx.now,
            actor=ctx.actor,
            command_id=command_id,
        )
        if proof is not None and i == 0:
            # The command's proof goes with its first event: the log is
            # evidence of who asked for what (`netmesh events verify`).
            envelope = msgspec.structs.replace(
                envelope, signed=proof.signed, signer=proof.signer, signature=proof.signature
            )
        pending.append(PendingEvent(subject, envelope))
    return pending
