"""The control plane: command service, queries and projections, in one process.

Commands arrive on `netmesh.cmd.<verb>` (request/reply), are decided against
an in-memory topology kept current from the stream (the write model), and
become events appended with optimistic concurrency. A stale view is safe: the
append fails with a conflict and the command is decided again, a bounded number
of times. Queries on `netmesh.query.<what>` are answered from the SQLite read
model. Several replicas may run: they share the subjects through a queue group.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import secrets
import time
import uuid
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgspec
import structlog
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy
from nats.js.errors import NotFoundError

from controlplane import queries
from controlplane.authorization import authorize
from controlplane.brokerauth import (
    SWEEP_INTERVAL,
    BrokerGate,
    BrokerKeys,
    delivery_problem,
    names_at_stake,
    reader_problem,
    still_admitted,
)
from controlplane.decide import Context, Decision, Rejected, decide
from controlplane.publisher import JetStreamDesiredPublisher
from controlplane.rules import spec_for, spec_for_verb
from controlplane.rules.spec import Need
from controlplane.streams import ensure_streams
from controlplane.throttle import FailureWindow
from events import natsid
from events.commands import AnyCommand, ErrorCode, Reply
from events.connect import server_has_seen_everything
from events.envelope import make_envelope
from events.jetstream import JetStreamEventStore
from events.model import AdminAdded
from events.reports import APPLIED, applied_decoder
from events.signing import (
    COMMAND_SIGNER_HEADER,
    SIGNATURE_HEADER,
    event_mac_key,
    load_or_create,
    public_text,
    signed_command,
    verify,
    verify_key_of,
)
from events.store import (
    ConcurrencyConflict,
    DuplicateAppend,
    Expectation,
    PendingEvent,
    StoreError,
)
from events.subjects import (
    COMMAND_PREFIX,
    CONSUME_PREFIX,
    DESIRED_STREAM,
    EVENTS_PREFIX,
    EVENTS_STREAM,
    QUERY_PREFIX,
    READ_EVENTS_PREFIX,
    REPORTS_STREAM,
    RESYNC_PREFIX,
    aggregate_subject,
    desired_subject,
    report_subject,
)
from events.tokens import make_token
from projections.runner import ProjectionRunner
from projections.sqlite import ReadModel
from projections.topology import COMMAND_MEMORY, Topology, evolve

log = structlog.get_logger("netmesh.controlplane")

QUEUE_GROUP = "netmesh-controlplane"
MAX_ATTEMPTS = 10
READ_YOUR_WRITES_TIMEOUT = 5.0
CLIENT_CONSUMER_INACTIVE = 60.0

_reply_encoder = msgspec.json.Encoder()


class ConsumeRequest(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    deliver_subject: str
    start_seq: int = 1  # event stream readers: where to start


class QueryArgs(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    name: str | None = None
    network: str | None = None
    node: str | None = None


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
    return Reply(
        ok=False,
        code="duplicate",
        error=f"command id {command_id!r} was already applied{where}; send a new id",
    )


def one_line(text: str) -> str:
    """`text` with control characters (newlines included) escaped."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


class ControlPlane:
    def __init__(
        self,
        nc: Client,
        data_dir: Path,
        advertise_url: str,
        *,
        snapshots_only: bool = False,
        system_nc: Client | None = None,
        broker_ca: bytes | None = None,
    ) -> None:
        self._nc = nc
        self._snapshots_only = snapshots_only
        self._js = nc.jetstream()
        self.data_dir = data_dir
        # The key desired states are signed with; its public half goes into
        # every enrollment token, and agents pin it. Raises SigningKeyError.
        self.signing_key = load_or_create(data_dir / "signing.key")
        self.advertise_url = advertise_url
        self.broker_ca = broker_ca  # goes into tokens: agents pin it for tls://
        self.store = JetStreamEventStore(nc, mac_key=event_mac_key(self.signing_key))
        self.write_model = Topology()
        self._write_progress = asyncio.Condition()
        self._command_lock = asyncio.Lock()
        self._tasks: list[asyncio.Task[None]] = []
        self._background: set[asyncio.Task[None]] = set()
        # host -> the consumer made last for its agent (the one before goes).
        self._agent_consumers: dict[str, str] = {}
        self.not_answered = 0  # requests whose reply address was not an inbox
        # Our own replies (JetStream acks among them) arrive under this prefix,
        # when it is our own (on an open broker everyone shares `_INBOX.`).
        prefix = bytes(nc._inbox_prefix).decode()
        self._own_inbox = f"{prefix}." if prefix != "_INBOX" else None
        self._subs: list[Subscription] = []
        self.model: ReadModel | None = None
        self.runner: ProjectionRunner | None = None
        self.failed = asyncio.Event()  # set when a consumer the service needs has died
        self.failure: str | None = None
        self._stopping = False
        self._join_failures = FailureWindow()
        # Ids of signed commands seen (most recent COMMAND_MEMORY), whatever came of them.
        self._signed_ids: dict[str, None] = {}
        # With a connection to the broker's system account, this control plane
        # decides who may connect (auth callout) and disconnects who lost access.
        self.gate: BrokerGate | None = None
        if system_nc is not None:
            self.gate = BrokerGate(
                nc,
                system_nc,
                BrokerKeys.derive(self.signing_key),
                lambda: self.write_model,
                QUEUE_GROUP,
                self._join_failures,
            )

    async def start(self) -> None:
        """Create streams, catch up, then start answering. Raises on NATS errors."""
        self.data_dir.mkdir(parents=True, exist_ok=True)
        await ensure_streams(self._js)
        self.model = await ReadModel.open(self.data_dir / "readmodel.sqlite3")
        self.runner = ProjectionRunner(
            self.store,
            self.model,
            JetStreamDesiredPublisher(self._nc, self.signing_key),
            snapshots_only=self._snapshots_only,
        )
        self._tasks.append(
            asyncio.create_task(self._supervised("write model", self._follow_write_model()))
        )
        self._tasks.append(asyncio.create_task(self._supervised("projection", self.runner.run())))
        await self._catch_up()
        await self._bootstrap_admin()
        if self.gate is not None:
            await self.gate.start()
            self._background.add(asyncio.create_task(self._sweep_forever(), name="sweep"))
        await asyncio.wait_for(self.runner.caught_up.wait(), 120)
        self._subs.append(
            await self._nc.subscribe(f"{COMMAND_PREFIX}.>", queue=QUEUE_GROUP, cb=self._on_command)
        )
        self._subs.append(
            await self._nc.subscribe(f"{QUERY_PREFIX}.>", queue=QUEUE_GROUP, cb=self._on_query)
        )
        self._subs.append(
            await self._nc.subscribe(f"{RESYNC_PREFIX}.*", queue=QUEUE_GROUP, cb=self._on_resync)
        )
        self._subs.append(
            await self._nc.subscribe(f"{CONSUME_PREFIX}.*", queue=QUEUE_GROUP, cb=self._on_consume)
        )
        self._subs.append(
            await self._nc.subscribe(
                f"{READ_EVENTS_PREFIX}.*", queue=QUEUE_GROUP, cb=self._on_read_events
            )
        )
        # Make sure the server has our subscriptions before we say we are ready.
        await server_has_seen_everything(self._nc)
        log.info("control plane ready", seq=self.write_model.last_seq, url=self.advertise_url)

    async def stop(self, timeout: float = 10.0) -> list[str]:
        """Stop answering, stop the consumers, close the read model (bounded).

        Returns the names of tasks that did not stop in time (none, normally).
        """
        self._stopping = True
        if self.gate is not None:
            await self.gate.stop()
        for task in self._background:
            task.cancel()
        if self._background:
            await asyncio.wait(self._background, timeout=timeout / 4)
        for sub in self._subs:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()
        self._subs.clear()
        # Ending the consumers ends the tasks that follow them; cancellation is
        # only the fallback (cancelling a task inside nats-py's subscription
        # iterator has been seen to leave it stuck).
        await self.store.close()
        stuck: set[asyncio.Task[None]] = set()
        if self._tasks:
            _, stuck = await asyncio.wait(self._tasks, timeout=timeout / 2)
            for task in stuck:
                task.cancel()
        if stuck:
            _, stuck = await asyncio.wait(stuck, timeout=timeout / 2)
        for task in stuck:
            # Should not happen; say where it is stuck rather than hang.
            log.error("task did not stop", task=task.get_name(), awaiting=awaiting(task))
        self._tasks.clear()
        if self.model is not None:
            await self.model.close()
            self.model = None
        return sorted(task.get_name() for task in stuck)

    async def _supervised(self, what: str, work: Coroutine[Any, Any, None]) -> None:
        """Run a consumer the service cannot live without; if it ends, the
        service has failed (and says why) rather than answering from a dead view."""
        try:
            await work
            why = "stopped following the event stream"
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.exception("consumer failed", consumer=what)
            why = f"{type(exc).__name__}: {exc}"
        if not self._stopping:
            self.failure = f"{what} {why}"
            self.failed.set()

    async def _follow_write_model(self) -> None:
        async for recorded in self.store.follow(1):
            refused = self.write_model.refused
            at_stake = names_at_stake(self.write_model, recorded.envelope.data)
            evolve(self.write_model, recorded)
            if at_stake and self.gate is not None and self.runner is not None:
                lost = {n for n in at_stake if not still_admitted(self.write_model, n)}
                if lost and self.runner.caught_up.is_set():
                    self._spawn_disconnect(lost, recorded.seq)
            if self.write_model.refused > refused:
                log.warning(
                    "event not believed: not signed by this control plane",
                    seq=recorded.seq,
                    subject=recorded.subject,
                    type=recorded.envelope.type,
                    signature=recorded.signature,
                )
            async with self._write_progress:
                self._write_progress.notify_all()

    async def _sweep_forever(self) -> None:
        """Once caught up (a removal may have happened just before a restart)
        and then every minute: disconnect whoever is connected but no longer
        admitted. Only when every desired state the write model implies is
        published: a removed host gets its last state before it is cut off."""
        assert self.gate is not None and self.runner is not None
        await self.runner.caught_up.wait()
        while not self._stopping:
            if self.runner.published_through >= self.write_model.last_seq:
                try:
                    await self.gate.sweep()
                except Exception as exc:  # the broker is away: try again later
                    log.info("connection sweep failed", error=repr(exc))
            await asyncio.sleep(SWEEP_INTERVAL)

    def _spawn_disconnect(self, names: set[str], seq: int) -> None:
        async def disconnect() -> None:
            assert self.gate is not None and self.runner is not None
            # First let the host receive the desired state that removes it (its
            # agent tears its interface down), then cut it off.
            await self.runner.wait_published(seq, timeout=5)
            try:
                await self.gate.disconnect(names)
            except Exception as exc:  # the minute's sweep tries again
                log.info("disconnect failed", names=sorted(names), error=repr(exc))

        task = asyncio.create_task(disconnect(), name=f"disconnect {sorted(names)}")
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _wait_write_model(self, seq: int, timeout: float = 10.0) -> None:
        async with self._write_progress:
            if self.write_model.last_seq >= seq:
                return
            # asyncio.timeout, not wait_for: no extra task per command.
            async with asyncio.timeout(timeout):
                await self._write_progress.wait_for(lambda: self.write_model.last_seq >= seq)

    async def _catch_up(self) -> None:
        await self._wait_write_model(await self.store.last_sequence(), timeout=120)

    # -- commands -------------------------------------------------------------

    async def _on_command(self, msg: Msg) -> None:
        verb = msg.subject[len(COMMAND_PREFIX) + 1 :]
        try:
            headers = msg.headers or {}
            reply = await self.handle_command(
                verb,
                msg.data,
                actor=_actor(msg),
                signer=headers.get(COMMAND_SIGNER_HEADER),
                signature=headers.get(SIGNATURE_HEADER),
            )
        except Exception:  # the service must outlive any one command
            log.exception("command failed", verb=verb)
            reply = Reply(ok=False, code="internal", error="internal error (see the server log)")
        await self._answer(msg, reply)

    async def handle_command(
        self,
        verb: str,
        payload: bytes,
        *,
        actor: str,
        signer: str | None = None,
        signature: str | None = None,
    ) -> Reply:
        reply = await self._handle_command(
            verb, payload, actor=actor, signer=signer, signature=signature
        )
        if reply.error is not None:
            # Refusals quote what was sent (field names, values): keep them on
            # one line whatever it contained.
            reply.error = one_line(reply.error)
        return reply

    async def _handle_command(
        self, verb: str, payload: bytes, *, actor: str, signer: str | None, signature: str | None
    ) -> Reply:
        spec = spec_for_verb(verb)
        if spec is None:
            return Reply.refused(ErrorCode.INVALID, f"unknown command {verb!r}")
        try:
            command: AnyCommand = msgspec.json.decode(payload, type=spec.command)
        except msgspec.ValidationError as exc:
            return Reply(ok=False, code="invalid", error=f"invalid {verb} command: {exc}")
        except msgspec.DecodeError:
            return Reply(ok=False, code="invalid", error=f"invalid {verb} command: not JSON")
        throttle = spec.throttle
        bucket = throttle.bucket(self.write_model, command) if throttle is not None else None
        now = time.time()
        if (
            throttle is not None
            and bucket is not None
            and not self._join_failures.allowed(bucket, now)
        ):
            wait = self._join_failures.retry_after(bucket, now)
            return Reply.refused(
                ErrorCode.RATE_LIMITED, f"too many {throttle.what}; try again in {wait:.0f} s"
            )
        reply = await self._authorized(verb, payload, command, actor, signer, signature)
        if throttle is not None and bucket is not None and reply.code in throttle.counted:
            self._join_failures.failed(bucket, now)
        return reply

    async def _authorized(
        self,
        verb: str,
        payload: bytes,
        command: AnyCommand,
        actor: str,
        signer: str | None,
        signature: str | None,
    ) -> Reply:
        proof: Proof | None = None
        problem = _signature_problem(verb, payload, signer, signature)

        def authorized() -> str | None:
            # Checked again before each attempt: a retry decides against a
            # newer topology, and who may do what can have changed with it.
            return authorize(self.write_model, command, signer, problem, time.time())

        try:
            admin = authorized()
        except Rejected as exc:
            log.warning("command refused", verb=verb, code=exc.code, reason=exc.message)
            return Reply(ok=False, code=exc.code, error=exc.message)
        if admin is not None:
            if not command.command_id:
                # The id is what makes a signed command impossible to replay,
                # and what ties its events to its proof.
                return Reply(ok=False, code="invalid", error=f"a signed {verb} needs a command_id")
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
        async with self._command_lock:
            reply = await self._execute(verb, command, actor, proof, authorized)
        # Read-your-writes: answer once the read model has the change too. Not
        # under the lock: the next command only needs the write model, and the
        # projection takes the events of commands that queue up in one batch.
        if reply.seq is not None:
            assert self.runner is not None
            await self.runner.wait_for(reply.seq, READ_YOUR_WRITES_TIMEOUT)
        return reply

    async def _execute(
        self,
        verb: str,
        command: AnyCommand,
        actor: str,
        proof: Proof | None,
        authorized: Callable[[], str | None],
    ) -> Reply:
        command_id = command.command_id or uuid.uuid4().hex
        spec = spec_for(command)
        fresh_key = Need.FRESH_KEY in spec.needs
        ctx = Context(
            now=time.time(),
            actor=actor,
            new_key_id="k" + secrets.token_hex(5) if fresh_key else "",
            new_secret=secrets.token_urlsafe(24) if fresh_key else "",
        )
        for attempt in range(1, MAX_ATTEMPTS + 1):
            applied_at = self.write_model.commands.get(command_id)
            if applied_at is not None:
                return _duplicate(command_id, applied_at)
            try:
                if attempt > 1:
                    authorized()
                decision = decide(self.write_model, command, ctx)
            except Rejected as exc:
                log.info("command refused", verb=verb, code=exc.code, reason=exc.message)
                return Reply(ok=False, code=exc.code, error=exc.message)
            if not decision.events:
                return Reply(ok=True, result=self._result(spec.needs, decision, ctx))
            try:
                seq = await self.store.append(
                    self._pending(decision, ctx, command_id, proof),
                    expect=decision.expect,
                    msg_id=command_id,
                )
            except DuplicateAppend:
                # JetStream knows the id (its duplicate window) before our write
                # model does: wait for it, then answer as above.
                await self._catch_up()
                return _duplicate(command_id, self.write_model.commands.get(command_id))
            except ConcurrencyConflict as exc:
                # Someone wrote first: catch up and decide again against what is
                # there now.
                log.info(
                    "append conflict, deciding again", verb=verb, attempt=attempt, why=str(exc)
                )
                # Jittered backoff: two writers that keep colliding drift apart.
                await asyncio.sleep(random.uniform(0, 0.005 * attempt))
                await self._catch_up()
                continue
            except StoreError as exc:
                return Reply(ok=False, code="unavailable", error=f"event store: {exc}")
            await self._wait_write_model(seq)
            log.info("command applied", verb=verb, seq=seq, events=len(decision.events))
            return Reply(ok=True, result=self._result(spec.needs, decision, ctx), seq=seq)
        return Reply(ok=False, code="busy", error="too many concurrent changes; try again")

    def _pending(
        self, decision: Decision, ctx: Context, command_id: str, proof: Proof | None
    ) -> list[PendingEvent]:
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

    async def _bootstrap_admin(self) -> None:
        """On first start (no admin in the stream), make the first admin's key
        in the data dir (0600) and register it: the root of trust."""
        if self.write_model.admins:
            return
        key = load_or_create(self.data_dir / "admin.key")
        subject = aggregate_subject("admin", "admin")
        event = AdminAdded(name="admin", public_key=public_text(key), role="admin")
        envelope = make_envelope(
            event, event_id=uuid.uuid4().hex, time=time.time(), actor="bootstrap", command_id=""
        )
        try:
            seq = await self.store.append(
                [PendingEvent(subject, envelope)], expect=[Expectation(subject, 0)]
            )
        except ConcurrencyConflict:  # another replica did it first
            await self._catch_up()
            return
        await self._wait_write_model(seq)
        log.info("first admin created", key_file=str(self.data_dir / "admin.key"))

    def _result(self, needs: frozenset[Need], decision: Decision, ctx: Context) -> dict[str, Any]:
        result = dict(decision.result)
        if Need.ENROLLMENT_TOKEN in needs:
            result["token"] = make_token(
                self.advertise_url,
                ctx.new_key_id,
                ctx.new_secret,
                public_text(self.signing_key),
                self.broker_ca,
            )
        return result

    # -- queries --------------------------------------------------------------

    async def _on_resync(self, msg: Msg) -> None:
        """An agent cannot follow its subject: send it a fresh snapshot."""
        host_id = msg.subject.rpartition(".")[2]
        assert self.runner is not None
        try:
            sent = await self.runner.resend_snapshot(host_id)
        except Exception:  # the service must outlive any one request
            log.exception("resync failed", host_id=host_id)
            sent = False
        log.info("snapshot requested", host_id=host_id, sent=sent)
        await self._answer(msg, Reply(ok=sent))

    async def _on_consume(self, msg: Msg) -> None:
        """An agent asks for a consumer of its desired subject: made here, so
        that no agent may create consumers (whose deliver subject the broker
        does not check against the creator's permissions)."""
        host_id = msg.subject.rpartition(".")[2]
        await self._answer(msg, await self._consumer_for(msg, self._make_agent_consumer, host_id))

    async def _on_read_events(self, msg: Msg) -> None:
        """An admin, auditor or integration asks for a consumer of the event
        stream, delivering into its inbox (readers make none themselves, for
        the same reason as agents)."""
        nkey = msg.subject.rpartition(".")[2]
        await self._answer(msg, await self._consumer_for(msg, self._make_reader_consumer, nkey))

    async def _consumer_for(
        self,
        msg: Msg,
        make: Callable[[str, ConsumeRequest], Awaitable[Reply]],
        asker: str,
    ) -> Reply:
        try:
            request = msgspec.json.decode(msg.data, type=ConsumeRequest)
        except msgspec.DecodeError as exc:
            return Reply(ok=False, code="invalid", error=f"invalid consumer request: {exc}")
        return await make(asker, request)

    async def _make_reader_consumer(self, nkey: str, request: ConsumeRequest) -> Reply:
        problem = reader_problem(self.write_model, nkey, request.deliver_subject)
        config = _delivering_consumer(
            f"reader-{uuid.uuid4().hex[:12]}",
            f"{EVENTS_PREFIX}.>",
            request.deliver_subject,
            deliver_policy=DeliverPolicy.BY_START_SEQUENCE,
            opt_start_seq=max(request.start_seq, 1),
        )
        return await self._make_consumer(EVENTS_STREAM, config, problem)

    async def _make_agent_consumer(self, host_id: str, request: ConsumeRequest) -> Reply:
        problem = delivery_problem(self.write_model, host_id, request.deliver_subject)
        config = _delivering_consumer(
            f"agent-{host_id}-{uuid.uuid4().hex[:8]}",
            desired_subject(host_id),
            request.deliver_subject,
            deliver_policy=DeliverPolicy.ALL,
        )
        reply = await self._make_consumer(DESIRED_STREAM, config, problem)
        if reply.ok:
            assert config.name is not None
            previous = self._agent_consumers.pop(host_id, None)
            self._agent_consumers[host_id] = config.name
            if previous is not None:
                with contextlib.suppress(Exception):
                    await self._js.delete_consumer(DESIRED_STREAM, previous)
        return reply

    async def _make_consumer(
        self, stream: str, config: ConsumerConfig, problem: str | None
    ) -> Reply:
        """Create it, unless a guarded broker's rules say no (`problem`)."""
        if self.gate is not None and problem is not None:
            return Reply(ok=False, code="unauthorized", error=problem)
        try:
            await self._js.add_consumer(stream, config)
        except Exception as exc:  # the service must outlive any one request
            log.warning("consumer not made", stream=stream, error=repr(exc))
            return Reply(ok=False, code="internal", error="could not make a consumer; retry")
        return Reply(ok=True, result={"consumer": config.name})

    async def _answer(self, msg: Msg, reply: Reply) -> None:
        """Answer a request, but only into an inbox. The broker checks the
        subject a client publishes to, never the reply address it names, and
        this connection may publish anywhere: answering to `netmesh.ev.x` would
        write into the event stream. No stream captures inboxes, and each
        identity reads only its own."""
        if not msg.reply:
            return
        ours = self._own_inbox is not None and msg.reply.startswith(self._own_inbox)
        if not natsid.is_inbox(msg.reply) or ours:
            self.not_answered += 1
            log.warning("not answered: reply address is not an inbox", subject=msg.subject)
            return
        await msg.respond(_reply_encoder.encode(reply))

    async def _on_query(self, msg: Msg) -> None:
        what = msg.subject[len(QUERY_PREFIX) + 1 :]
        try:
            args = msgspec.json.decode(msg.data or b"{}", type=QueryArgs)
            reply = Reply(ok=True, result=await self.answer(what, args))
        except Rejected as exc:
            reply = Reply(ok=False, code=exc.code, error=exc.message)
        except (msgspec.ValidationError, msgspec.DecodeError) as exc:
            reply = Reply(ok=False, code="invalid", error=f"invalid query: {exc}")
        except Exception:
            log.exception("query failed", what=what)
            reply = Reply(ok=False, code="internal", error="internal error (see the server log)")
        await self._answer(msg, reply)

    async def answer(self, what: str, args: QueryArgs) -> Any:
        model = self.model
        assert model is not None
        match what:
            case "networks":
                return await queries.list_networks(model)
            case "network":
                return await queries.show_network(model, args.name or "", now=time.time())
            case "nodes":
                return await queries.list_nodes(model, args.network)
            case "node":
                node = await queries.find_node(model, args.node or "")
                rows = await queries.status(model, self.applied_report)
                node["status"] = next((r for r in rows if r["id"] == node["id"]), None)
                return node
            case "keys":
                return await queries.list_keys(model, now=time.time())
            case "status":
                return await queries.status(model, self.applied_report)
            case "admins":
                # From the write model: admins are a matter of authorization,
                # not of the read model.
                return sorted(
                    (
                        {
                            "name": a.name,
                            "role": a.role,
                            "networks": list(a.networks),
                            "public_key": a.public_key,
                        }
                        for a in self.write_model.admins.values()
                    ),
                    key=lambda a: str(a["name"]),
                )
        raise Rejected(ErrorCode.INVALID, f"unknown query {what!r}")

    async def applied_report(self, host_id: str) -> dict[str, Any] | None:
        try:
            msg = await self._js.get_last_msg(REPORTS_STREAM, report_subject(host_id, APPLIED))
        except NotFoundError:
            return None
        if not msg.data:
            return None
        try:
            report = applied_decoder.decode(msg.data)
        except msgspec.ValidationError:
            return None
        return msgspec.to_builtins(report)  # type: ignore[no-any-return]


def awaiting(task: asyncio.Task[Any]) -> list[str]:
    """Where a suspended task is, innermost last (for diagnostics)."""
    where: list[str] = []
    awaitable: Any = task.get_coro()
    while awaitable is not None:
        frame = getattr(awaitable, "cr_frame", None) or getattr(awaitable, "ag_frame", None)
        if frame is not None:
            where.append(f"{frame.f_code.co_filename}:{frame.f_lineno} {frame.f_code.co_name}")
        awaitable = getattr(awaitable, "cr_await", None) or getattr(awaitable, "ag_await", None)
    return where


def _delivering_consumer(
    name: str, filter_subject: str, deliver_subject: str, **start: Any
) -> ConsumerConfig:
    """A consumer made for a client: pushes into its inbox, no acks, in memory,
    gone a minute after nobody listens."""
    return ConsumerConfig(
        name=name,
        filter_subject=filter_subject,
        deliver_subject=deliver_subject,
        ack_policy=AckPolicy.NONE,
        inactive_threshold=CLIENT_CONSUMER_INACTIVE,
        mem_storage=True,
        **start,
    )


def _actor(msg: Msg) -> str:
    # Until commands are signed (see DESIGN "Trust"), the actor is what the
    # sender says it is: recorded for the audit log, not trusted.
    if msg.headers and msg.headers.get("Netmesh-Actor"):
        return str(msg.headers["Netmesh-Actor"])[:128]
    return "anonymous"
