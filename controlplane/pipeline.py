"""The command pipeline: from a request on `netmesh.cmd.<verb>` to events in
the stream and a reply.

Every step is the same for every command; what differs between commands is in
their specs (`controlplane.rules`): decode into the command's type, throttle
(if its spec says failures count), check the signature and who may send it,
decide against the write model, append with optimistic concurrency (a conflict
means catch up and decide again, a bounded number of times), answer once the
read model has the change too (read-your-writes).

A command is answered once per command id, and a retry gets that answer again
(`Reply.repeated`), so a client whose answer was lost to a crash can ask again
with the same id and learn what happened, and nothing is applied twice:

- Applied (events appended): the answer, minus secrets, is recorded on the
  command's last event (`Envelope.answer`) with a digest of the request (verb,
  signer, exact payload). A retry finds the event by the command id (the write
  model remembers the most recent COMMAND_MEMORY ids) and reads it back, on
  any replica, after any restart. Another request under the same id is refused
  (`duplicate`). An enrollment key's token is not recorded: its id and secret
  are derived from the command id (`controlplane.enrollment`), so the token is
  made again, sealed to the signer's key (see below).
- Not applied (refused, or nothing to change): the decision is made again,
  except for a signed admin command this replica has seen, which gets the
  answer it got (remembered in memory), so a refused signed command cannot be
  replayed into success later (within the 5 minutes its signature is valid).
  A refusal that decided nothing (the store unavailable, busy) is not kept.
- In flight: a retry of a signed admin command waits for the first one.

A replay of a signed admin command by someone else is the same request (the
same signed bytes), so it gets the same answer and changes nothing. The signed
bytes are in the log for every reader (auditors included), so a repeated
answer must not hand out a secret: a repeated `key.create` carries the token
only sealed to the signer's key (`sealed_token`), which only they can open.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import random
import time
import uuid
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import msgspec
import structlog
from nats.aio.msg import Msg

from controlplane.authorization import authorize
from controlplane.decide import decide
from controlplane.metrics import NO_METRICS, ControlPlaneMetrics
from controlplane.replies import Responder
from controlplane.rules import spec_for_verb
from controlplane.rules.base import Context, Decision, Rejected
from controlplane.rules.spec import ByAdmin, CommandSpec, Need
from controlplane.rules.tokens import bearer_token
from controlplane.throttle import FailureWindow
from controlplane.writemodel import WriteModel
from events.commands import Command, ErrorCode, Join, Reply
from events.envelope import Answer, make_envelope
from events.model import AdminAdded, event_type
from events.signing import (
    COMMAND_SIGNER_HEADER,
    ENROLLMENT_TOKEN_HEADER,
    SIGNATURE_HEADER,
    load_or_create,
    public_text,
    seal_for,
    signed_command,
    signed_plan,
    token_digest,
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
from projections.plan import plan_events
from projections.topology import COMMAND_MEMORY

log = structlog.get_logger("netmesh.controlplane")

MAX_ATTEMPTS = 10
# How long an append is tried again while the store is unavailable (a stream
# leader election takes a few seconds; the CLI waits 15 s for an answer).
STORE_RETRY_FOR = 12.0
READ_YOUR_WRITES_TIMEOUT = 5.0

# Until the read model has applied a sequence (or the timeout passes).
ReadYourWrites = Callable[[int, float], Awaitable[object]]


class Enrollment(Protocol):
    """Enrollment keys for the commands that make them (`controlplane.enrollment`)."""

    def key_for(self, command_id: str) -> tuple[str, str]:
        """(key id, secret) of the key command `command_id` makes: the same every time."""
        ...

    def token(self, key_id: str, secret: str) -> str:
        """The enrollment token a user hands to an agent."""
        ...


@dataclass(frozen=True)
class Proof:
    signed: str  # the exact signed text: context, verb, payload
    signer: str
    signature: str


@dataclass(slots=True)
class Seen:
    """A signed admin command this replica has taken."""

    request: str  # its request digest
    # How it ended: the reply when nothing was appended (a refusal by the
    # rules, nothing to change); None when events were (the log has the answer).
    outcome: Reply | None = None
    # Set when it has ended, then dropped (COMMAND_MEMORY of these are kept).
    running: asyncio.Event | None = field(default_factory=asyncio.Event)


# Refusals that decided nothing: a retry of the command is taken afresh.
UNDECIDED = frozenset({ErrorCode.UNAVAILABLE, ErrorCode.BUSY, ErrorCode.INTERNAL})


def request_digest(verb: str, payload: bytes, signer: str | None) -> str:
    """What identifies a request: a retry of a command sends the same."""
    head = f"{verb}\n{signer or ''}\n".encode()
    return hashlib.sha256(head + payload).hexdigest()


def _signature_problem(signed: bytes, signer: str | None, signature: str | None) -> str | None:
    """None when `signature` is `signer`'s over `signed`, else why not."""
    if not signer or not signature:
        return "unsigned"
    try:
        key = verify_key_of(signer)
    except ValueError:
        return "the signer is not an Ed25519 public key"
    return verify(key, signed, signature)


def _duplicate(command_id: str, seq: int | None) -> Reply:
    """A command id taken, and no answer to give again (applied by a version
    that did not record answers, or no longer remembered)."""
    where = f" (event #{seq})" if seq is not None else ""
    return Reply.refused(
        ErrorCode.DUPLICATE, f"command id {command_id!r} was already applied{where}; send a new id"
    )


def _taken(command_id: str, seq: int | None) -> Reply:
    where = f" (event #{seq})" if seq is not None else ""
    return Reply.refused(
        ErrorCode.DUPLICATE,
        f"command id {command_id!r} was used by another command{where}; send a new id",
    )


_INTERNAL = Reply.refused(ErrorCode.INTERNAL, "internal error (see the server log)")


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
        enrollment: Enrollment,
        read_your_writes: ReadYourWrites,
        metrics: ControlPlaneMetrics = NO_METRICS,
    ) -> None:
        self._store = store
        self._metrics = metrics
        self._write = write
        self._responder = responder
        self._failures = failures
        self._enrollment = enrollment
        self._read_your_writes = read_your_writes
        self._lock = asyncio.Lock()
        # Signed admin commands seen (most recent COMMAND_MEMORY), whatever came of them.
        # Oldest first; an OrderedDict drops its oldest in O(1) (a dict's
        # next(iter()) scans past every key deleted before it).
        self._signed: OrderedDict[str, Seen] = OrderedDict()

    async def on_command(self, msg: Msg) -> None:
        verb = msg.subject[len(COMMAND_PREFIX) + 1 :]
        started = time.monotonic()
        try:
            headers = msg.headers or {}
            reply = await self.handle(
                verb,
                msg.data,
                actor=_actor(msg),
                signer=headers.get(COMMAND_SIGNER_HEADER),
                signature=headers.get(SIGNATURE_HEADER),
                enrollment_token=headers.get(ENROLLMENT_TOKEN_HEADER),
            )
        except StoreError as exc:
            # The stream did not answer while catching up (a cluster electing
            # its leader): the command may be sent again, as for an append.
            log.warning("command not decided: event store unavailable", verb=verb, error=str(exc))
            reply = Reply.refused(ErrorCode.UNAVAILABLE, f"event store: {exc}")
            self._metrics.command(verb, ErrorCode.UNAVAILABLE, time.monotonic() - started)
        except Exception:  # the service must outlive any one command
            log.exception("command failed", verb=verb)
            reply = Reply.refused(ErrorCode.INTERNAL, "internal error (see the server log)")
            self._metrics.command(verb, ErrorCode.INTERNAL, time.monotonic() - started)
        await self._responder.answer(msg, reply)

    async def handle(
        self,
        verb: str,
        payload: bytes,
        *,
        actor: str,
        signer: str | None = None,
        signature: str | None = None,
        enrollment_token: str | None = None,
    ) -> Reply:
        started = time.monotonic()
        reply = await self._handle(
            verb,
            payload,
            actor=actor,
            signer=signer,
            signature=signature,
            enrollment_token=enrollment_token,
        )
        outcome = "ok" if reply.ok else str(reply.code or ErrorCode.INTERNAL)
        self._metrics.command(verb, outcome, time.monotonic() - started)
        if reply.error is not None:
            # Refusals quote what was sent (field names, values): keep them on
            # one line whatever it contained.
            reply.error = one_line(reply.error)
        return reply

    def plan(
        self, verb: str, payload: bytes, *, signer: str | None, signature: str | None
    ) -> Reply:
        """What the admin command `verb` would do now, written nowhere: the
        same decoding, authorization (signed under the plan context,
        `signed_plan`) and decision as the command, then its events and, per
        host, what would change in its desired state (`plan_events`). Not
        remembered as a command: the command itself, sent after, is taken
        afresh. Synchronous: it decides and derives against one view of the
        write model, with no await in between."""
        reply = self._plan(verb, payload, signer, signature)
        if reply.error is not None:
            reply.error = one_line(reply.error)
        return reply

    def _plan(self, verb: str, payload: bytes, signer: str | None, signature: str | None) -> Reply:
        spec = spec_for_verb(verb)
        if spec is None:
            return Reply.refused(ErrorCode.INVALID, f"unknown command {verb!r}")
        if not isinstance(spec.sender, ByAdmin):
            return Reply.refused(ErrorCode.INVALID, f"{verb} is not an admin command: no plan")
        command = _decoded(spec, payload)
        if isinstance(command, Reply):
            return command
        topology = self._write.topology
        now = time.time()
        problem = _signature_problem(signed_plan(verb, payload), signer, signature)
        try:
            actor = authorize(topology, command, signer, problem, now) or "anonymous"
            # A fresh key's id and secret are not the command's (those derive
            # from its id): a plan hands out nothing the command would make.
            key_id, secret = ("", "")
            if Need.FRESH_KEY in spec.needs:
                key_id, secret = self._enrollment.key_for(f"plan-{uuid.uuid4().hex}")
            ctx = Context(now=now, actor=actor, new_key_id=key_id, new_secret=secret)
            decision = decide(topology, command, ctx)
        except Rejected as exc:
            return _refused(exc)
        hosts = plan_events(topology, decision.events, now=now, actor=actor)
        return Reply(
            ok=True,
            result={
                "verb": verb,
                "seq": topology.last_seq,
                "events": [
                    {
                        "subject": subject,
                        "type": event_type(event),
                        "data": msgspec.to_builtins(event),
                    }
                    for subject, event in decision.events
                ],
                "hosts": [msgspec.to_builtins(host) for host in hosts],
                "text": [str(host) for host in hosts],
            },
        )

    async def _handle(
        self,
        verb: str,
        payload: bytes,
        *,
        actor: str,
        signer: str | None,
        signature: str | None,
        enrollment_token: str | None = None,
    ) -> Reply:
        spec = spec_for_verb(verb)
        if spec is None:
            return Reply.refused(ErrorCode.INVALID, f"unknown command {verb!r}")
        command = _decoded(spec, payload)
        if isinstance(command, Reply):
            return command
        if isinstance(command, Join):
            joining = with_token(command, enrollment_token)
            if isinstance(joining, Reply):
                return joining
            command = joining
        throttle = spec.throttle
        bucket = throttle.bucket(self._write.topology, command) if throttle is not None else None
        now = time.time()
        if throttle is not None and bucket is not None and not self._failures.allowed(bucket, now):
            wait = self._failures.retry_after(bucket, now)
            return Reply.refused(
                ErrorCode.RATE_LIMITED, f"too many {throttle.what}; try again in {wait:.0f} s"
            )
        request = request_digest(verb, payload, signer)
        reply = await self._authorized(spec, payload, command, request, actor, signer, signature)
        if throttle is not None and bucket is not None and reply.code in throttle.counted:
            self._failures.failed(bucket, now)
        return reply

    async def _authorized(
        self,
        spec: CommandSpec[Any],
        payload: bytes,
        command: Command,
        request: str,
        actor: str,
        signer: str | None,
        signature: str | None,
    ) -> Reply:
        verb = spec.verb
        proof: Proof | None = None
        seen: Seen | None = None
        problem = _signature_problem(signed_command(verb, payload), signer, signature)

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
            # nothing (or was refused) must not be replayable into another
            # outcome later either; a retry gets the outcome it had.
            earlier = self._signed.get(command.command_id)
            if earlier is not None:
                return await self._seen_before(spec, command.command_id, earlier, request, signer)
            applied_at = self._write.topology.commands.get(command.command_id)
            if applied_at is not None:  # applied before this replica started
                return await self._answer_again(
                    spec, command.command_id, applied_at, request, signer
                )
            seen = Seen(request)
            self._signed[command.command_id] = seen
            if len(self._signed) > COMMAND_MEMORY:
                self._signed.popitem(last=False)
            actor = admin
            assert signer is not None and signature is not None
            proof = Proof(signed_command(verb, payload).decode(), signer, signature)
        outcome: Reply | None = _INTERNAL
        try:
            async with self._lock:
                reply = await self._execute(
                    spec, command, request, actor, signer, proof, authorized
                )
            # Read-your-writes: answer once the read model has the change too. Not
            # under the lock: the next command only needs the write model, and the
            # projection takes the events of commands that queue up in one batch.
            if reply.seq is not None:
                await self._read_your_writes(reply.seq, READ_YOUR_WRITES_TIMEOUT)
            outcome = None if reply.seq is not None else reply
            return reply
        finally:
            if seen is not None:
                self._ended(command.command_id, seen, outcome)

    def _ended(self, command_id: str, seen: Seen, outcome: Reply | None) -> None:
        seen.outcome = outcome
        running, seen.running = seen.running, None
        if (
            outcome is not None
            and outcome.code in UNDECIDED
            and self._signed.get(command_id) is seen
        ):
            del self._signed[command_id]  # nothing was decided: a retry is taken afresh
        if running is not None:
            running.set()

    async def _seen_before(
        self, spec: CommandSpec[Any], command_id: str, seen: Seen, request: str, signer: str | None
    ) -> Reply:
        """The answer to a signed admin command whose id this replica has seen."""
        if not hmac.compare_digest(seen.request, request):
            return _taken(command_id, None)
        if seen.running is not None:  # the first is in flight
            await seen.running.wait()
        if seen.outcome is not None:
            return msgspec.structs.replace(seen.outcome, repeated=True)
        seq = self._write.topology.commands.get(command_id)
        if seq is None:  # no longer remembered
            return _duplicate(command_id, None)
        return await self._answer_again(spec, command_id, seq, request, signer)

    async def _answer_again(
        self, spec: CommandSpec[Any], command_id: str, seq: int, request: str, signer: str | None
    ) -> Reply:
        """The answer command `command_id` got when it was applied (its last
        event is `seq`), from the log; refused if this is another request."""
        try:
            recorded = await self._store.read(seq)
        except StoreError as exc:
            return Reply.refused(ErrorCode.UNAVAILABLE, f"event store: {exc}")
        answer = None
        if (
            recorded is not None
            and recorded.signature in ("valid", "unchecked")
            and recorded.envelope.command_id == command_id
        ):
            answer = recorded.envelope.answer
        if answer is None:  # applied by a version that recorded no answers
            return _duplicate(command_id, seq)
        if not hmac.compare_digest(answer.request, request):
            return _taken(command_id, seq)
        result = msgspec.json.decode(answer.result)
        token = self._token(spec, *self._enrollment.key_for(command_id))
        if token is not None and isinstance(result, dict) and signer:
            # Never in the clear: anyone who can read the log holds the signed
            # request, and so can send it again.
            result["sealed_token"] = seal_for(signer, token)
        if Need.HOOK_SECRET in spec.needs and isinstance(result, dict) and signer:
            result["sealed_secret"] = seal_for(signer, self._enrollment.key_for(command_id)[1])
        log.info("command answered again", verb=spec.verb, seq=seq)
        return Reply(ok=True, result=result, seq=seq, repeated=True)

    async def _execute(
        self,
        spec: CommandSpec[Any],
        command: Command,
        request: str,
        actor: str,
        signer: str | None,
        proof: Proof | None,
        authorized: Callable[[], str | None],
    ) -> Reply:
        verb = spec.verb
        command_id = command.command_id or uuid.uuid4().hex
        key_id, secret = ("", "")
        if Need.FRESH_KEY in spec.needs:
            key_id, secret = self._enrollment.key_for(command_id)
        ctx = Context(now=time.time(), actor=actor, new_key_id=key_id, new_secret=secret)
        topology = self._write.topology
        refreshed = False
        for attempt in range(1, MAX_ATTEMPTS + 1):
            applied_at = topology.commands.get(command_id)
            if applied_at is not None:
                return await self._answer_again(spec, command_id, applied_at, request, signer)
            try:
                if attempt > 1:
                    authorized()
                decision = decide(topology, command, ctx)
            except Rejected as exc:
                if not refreshed and await self._behind():
                    # Refused by a view that lags the stream (another replica
                    # just made the network this names): decide again on all of it.
                    refreshed = True
                    await self._write.catch_up()
                    continue
                log.info("command refused", verb=verb, code=exc.code, reason=exc.message)
                return _refused(exc)
            if not decision.events:
                return Reply(ok=True, result=self._result(spec, decision, ctx))
            pending = pending_events(decision, ctx, command_id, proof, request)
            try:
                seq = await self._append(pending, decision.expect, command_id)
            except DuplicateAppend:
                # JetStream knows the id (its duplicate window) before our write
                # model does: wait for it, then answer as above.
                await self._write.catch_up()
                applied_at = topology.commands.get(command_id)
                if applied_at is None:
                    return _duplicate(command_id, None)
                return await self._answer_again(spec, command_id, applied_at, request, signer)
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
                if exc.retryable and await self._landed(command_id):
                    # The last try's answer was lost, not its events.
                    applied_at = topology.commands[command_id]
                    return await self._answer_again(spec, command_id, applied_at, request, signer)
                return Reply.refused(ErrorCode.UNAVAILABLE, f"event store: {exc}")
            self._metrics.appended(len(pending))
            await self._write.apply_own(seq, pending)
            log.info("command applied", verb=verb, seq=seq, events=len(decision.events))
            return Reply(ok=True, result=self._result(spec, decision, ctx), seq=seq)
        return Reply.refused(ErrorCode.BUSY, "too many concurrent changes; try again")

    async def _landed(self, command_id: str) -> bool:
        """Whether the events of `command_id` are in the stream after all (an
        append whose every answer was lost), as far as the stream says now."""
        try:
            await self._write.catch_up(timeout=5.0)
        except (StoreError, TimeoutError):
            return False
        return command_id in self._write.topology.commands

    async def _behind(self) -> bool:
        """Whether the stream holds events the write model has not applied yet."""
        try:
            return await self._store.last_sequence() > self._write.topology.last_seq
        except StoreError:
            return False

    async def _append(
        self, pending: list[PendingEvent], expect: Sequence[Expectation], command_id: str
    ) -> int:
        """Append, sending the same events again (the same `Nats-Msg-Id`, so
        never twice) while the store says it is only unavailable for now: a
        JetStream cluster electing a new stream leader answers nobody (or
        10163, 10158) for a few seconds. Raises StoreError when it lasts
        longer than STORE_RETRY_FOR, or is not retryable."""
        loop = asyncio.get_running_loop()
        give_up = loop.time() + STORE_RETRY_FOR
        pause = 0.05
        while True:
            try:
                return await self._store.append(pending, expect=expect, msg_id=command_id)
            except (ConcurrencyConflict, DuplicateAppend):
                raise
            except StoreError as exc:
                if not exc.retryable or loop.time() + pause > give_up:
                    raise
                log.info("event store unavailable, appending again", why=str(exc))
                await asyncio.sleep(pause * random.uniform(0.5, 1.0))
                pause = min(pause * 2, 1.0)

    def _result(self, spec: CommandSpec[Any], decision: Decision, ctx: Context) -> dict[str, Any]:
        result = dict(decision.result)
        token = self._token(spec, ctx.new_key_id, ctx.new_secret)
        if token is not None:
            result["token"] = token
        if Need.HOOK_SECRET in spec.needs:
            result["secret"] = ctx.new_secret
        return result

    def _token(self, spec: CommandSpec[Any], key_id: str, secret: str) -> str | None:
        """The secret token the command's answer carries (never recorded), if any."""
        if Need.ENROLLMENT_TOKEN in spec.needs:
            return self._enrollment.token(key_id, secret)
        if Need.BEARER_TOKEN in spec.needs:
            return bearer_token(secret)
        return None

    async def record(self, decision: Decision, actor: str) -> int | None:
        """Append what the control plane itself observed (no command, no
        proof): the stream sequence, or None when the decision has no events
        or someone wrote the aggregate first (then theirs stands)."""
        if not decision.events:
            return None
        ctx = Context(now=time.time(), actor=actor)
        pending = pending_events(decision, ctx, command_id="", proof=None)
        async with self._lock:
            try:
                seq = await self._store.append(pending, expect=decision.expect)
            except ConcurrencyConflict:
                await self._write.catch_up()
                return None
            except StoreError as exc:
                log.warning("not recorded", events=len(pending), why=str(exc))
                return None
            self._metrics.appended(len(pending))
            await self._write.apply_own(seq, pending)
        return seq

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
        self._metrics.appended(1)
        await self._write.wait_for(seq)
        log.info("first admin created", key_file=str(data_dir / "admin.key"))


def _decoded(spec: CommandSpec[Any], payload: bytes) -> Command | Reply:
    """The command in `payload`, or the one-line refusal of what it is not."""
    try:
        command: Command = msgspec.json.decode(payload, type=spec.command)
    except msgspec.ValidationError as exc:
        return Reply.refused(ErrorCode.INVALID, f"invalid {spec.verb} command: {exc}")
    except msgspec.DecodeError:
        return Reply.refused(ErrorCode.INVALID, f"invalid {spec.verb} command: not JSON")
    return command


def with_token(command: Join, token: str | None) -> Join | Reply:
    """A join with its enrollment token: in the payload (an agent that signs
    it whole, which puts it in the log), or beside it in a header, the signed
    payload holding its digest. Refused when they do not agree."""
    if not command.token_sha256:
        if token and token != command.token:
            return Reply.refused(ErrorCode.INVALID_TOKEN, "join: two different enrollment tokens")
        return command
    if command.token and token_digest(command.token) != command.token_sha256:
        return Reply.refused(ErrorCode.INVALID_TOKEN, "join: the token is not the signed one")
    given = token or command.token
    if not given:
        return Reply.refused(
            ErrorCode.INVALID_TOKEN,
            f"join: the enrollment token goes in the {ENROLLMENT_TOKEN_HEADER} header",
        )
    if not hmac.compare_digest(token_digest(given), command.token_sha256):
        return Reply.refused(ErrorCode.INVALID_TOKEN, "join: the token is not the signed one")
    return msgspec.structs.replace(command, token=given)


def pending_events(
    decision: Decision, ctx: Context, command_id: str, proof: Proof | None, request: str = ""
) -> list[PendingEvent]:
    """The decision's events in their envelopes, ready to append; the last
    carries the answer (the decision's result: the rules put no secret there)."""
    pending = []
    last = len(decision.events) - 1
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
        if i == last and request:
            answer = Answer(request=request, result=msgspec.Raw(_encoder.encode(decision.result)))
            envelope = msgspec.structs.replace(envelope, answer=answer)
        pending.append(PendingEvent(subject, envelope))
    return pending


_encoder = msgspec.json.Encoder()
