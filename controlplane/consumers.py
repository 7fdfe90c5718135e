"""Consumers the control plane makes for its clients: agents (of their own
desired subject) and readers of the event stream (admins, auditors,
integrations). Clients make none themselves: a consumer's deliver subject is
not checked against its creator's permissions, so a client that could create
one could have JetStream deliver anywhere. Also: an agent's request for a
fresh snapshot of its desired state."""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import msgspec
import structlog
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

from controlplane.brokerauth import delivery_problem, reader_problem
from controlplane.replies import Responder
from events.commands import ErrorCode, Reply
from events.desired import PROTOCOL, SECTION_NAMES
from events.subjects import DESIRED_STREAM, EVENTS_PREFIX, EVENTS_STREAM, desired_subject
from projections.runner import ProjectionRunner
from projections.topology import Topology

log = structlog.get_logger("netmesh.controlplane")

CLIENT_CONSUMER_INACTIVE = 60.0
# Making a consumer goes through JetStream's meta leader. On a cluster whose
# meta leader (or the member it placed the consumer on) was just killed the
# request is lost, not refused: one 5-s try then failed and the agent backed
# off (its desired state delivered 5-10 s after its broker died,
# tests/test_e2e_cluster.py). Short tries, repeated until one is made (a new
# leader is elected in 4-9 s here), within the agent's 10-s request.
CONSUMER_TRY_TIMEOUT = 1.0
CONSUMER_MAKE_WITHIN = 8.0
CONSUME_AT_ONCE = 64
CONSUMER_LIST_PAGE = 256  # JetStream lists consumers this many at a time


class ConsumeRequest(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    deliver_subject: str
    start_seq: int = 1  # event stream readers: where to start
    # Agents: the desired-state protocol they read and its sections (older
    # agents send neither, and cannot read what this control plane writes).
    protocol: int = 0
    sections: tuple[str, ...] = ()
    # Agents, after a reconnect: the consumer they read from until then. Kept
    # when it still delivers to `deliver_subject` (see `_agent`).
    consumer: str = ""


def agent_protocol_problem(protocol: int, sections: tuple[str, ...]) -> str | None:
    """Why an agent reading desired-state `protocol` with `sections` cannot
    follow what this control plane publishes; None when it can."""
    if protocol < PROTOCOL:
        return (
            f"this agent reads desired-state protocol {protocol or '2 or older'}, the control "
            f"plane writes {PROTOCOL}: upgrade the agent"
        )
    missing = sorted(set(SECTION_NAMES) - set(sections))
    if missing:
        return f"this agent does not know section(s) {', '.join(missing)}: upgrade the agent"
    return None


class Consumers:
    def __init__(
        self,
        nc: Client,
        responder: Responder,
        topology: Callable[[], Topology],
        runner: Callable[[], ProjectionRunner | None],
        guarded: bool,
    ) -> None:
        self._js = nc.jetstream()
        self._js_try = nc.jetstream(timeout=CONSUMER_TRY_TIMEOUT)
        self._responder = responder
        self._topology = topology
        self._runner = runner
        # On an open broker anyone may make consumers anyway: the rules are
        # only enforced where they protect something.
        self._guarded = guarded
        # host -> the consumer made last for its agent (the one before goes).
        self._agent_consumers: dict[str, str] = {}
        self._answering: set[asyncio.Task[None]] = set()
        # Agents' requests answered at once, at most (a thousand reconnecting).
        self._at_once = asyncio.Semaphore(CONSUME_AT_ONCE)

    async def connected_agents(self) -> int:
        return len(await self.connected_hosts())

    async def connected_hosts(self) -> set[str]:
        """Hosts whose agent listens now on a consumer made for it (by any
        replica): JetStream says a push consumer is bound while someone is
        subscribed to its deliver subject."""
        hosts: set[str] = set()
        offset = 0
        while True:
            page = await self._js.consumers_info(DESIRED_STREAM, offset=offset)
            for info in page:
                name = info.name or ""
                if name.startswith("agent-") and info.push_bound:
                    hosts.add(name.removeprefix("agent-").rpartition("-")[0])
            offset += len(page)
            if len(page) < CONSUMER_LIST_PAGE:
                return hosts

    async def on_resync(self, msg: Msg) -> None:
        """An agent cannot follow its subject: send it a fresh snapshot."""
        host_id = msg.subject.rpartition(".")[2]
        runner = self._runner()
        assert runner is not None
        try:
            sent = await runner.resend_snapshot(host_id)
        except Exception:  # the service must outlive any one request
            log.exception("resync failed", host_id=host_id)
            sent = False
        log.info("snapshot requested", host_id=host_id, sent=sent)
        await self._responder.answer(msg, Reply(ok=sent))

    async def on_consume(self, msg: Msg) -> None:
        """An agent asks for a consumer of its desired subject. Answered in a
        task of its own: nats-py runs a subscription's callbacks one at a
        time, and one consumer held up by a dead broker (seconds) held up every
        agent behind it."""
        task = asyncio.get_running_loop().create_task(self._answer_consume(msg))
        self._answering.add(task)
        task.add_done_callback(self._answering.discard)

    async def _answer_consume(self, msg: Msg) -> None:
        host_id = msg.subject.rpartition(".")[2]
        async with self._at_once:
            reply = await self._consumer_for(msg, self._agent, host_id)
        await self._responder.answer(msg, reply)

    async def close(self) -> None:
        """Stop answering: requests being answered are dropped (agents ask again)."""
        for task in list(self._answering):
            task.cancel()
        if self._answering:
            await asyncio.wait(self._answering, timeout=5)

    async def on_read_events(self, msg: Msg) -> None:
        """A reader asks for a consumer of the event stream, into its inbox."""
        nkey = msg.subject.rpartition(".")[2]
        await self._responder.answer(msg, await self._consumer_for(msg, self._reader, nkey))

    async def _consumer_for(
        self,
        msg: Msg,
        make: Callable[[str, ConsumeRequest], Awaitable[Reply]],
        asker: str,
    ) -> Reply:
        try:
            request = msgspec.json.decode(msg.data, type=ConsumeRequest)
        except msgspec.DecodeError as exc:
            return Reply.refused(ErrorCode.INVALID, f"invalid consumer request: {exc}")
        return await make(asker, request)

    async def _reader(self, nkey: str, request: ConsumeRequest) -> Reply:
        problem = reader_problem(self._topology(), nkey, request.deliver_subject)
        config = _delivering_consumer(
            f"reader-{uuid.uuid4().hex[:12]}",
            f"{EVENTS_PREFIX}.>",
            request.deliver_subject,
            deliver_policy=DeliverPolicy.BY_START_SEQUENCE,
            opt_start_seq=max(request.start_seq, 1),
        )
        return await self._make(EVENTS_STREAM, config, problem)

    async def _agent(self, host_id: str, request: ConsumeRequest) -> Reply:
        outdated = agent_protocol_problem(request.protocol, request.sections)
        if outdated is not None:
            log.info("agent too old for this control plane", host_id=host_id, why=outdated)
            return Reply.refused(ErrorCode.UPGRADE_REQUIRED, outdated)
        problem = delivery_problem(self._topology(), host_id, request.deliver_subject)
        may_keep = request.consumer and (problem is None or not self._guarded)
        if may_keep and await self._still_delivers(
            host_id, request.consumer, request.deliver_subject
        ):
            self._agent_consumers[host_id] = request.consumer
            return Reply(ok=True, result={"consumer": request.consumer, "kept": True})
        config = _delivering_consumer(
            f"agent-{host_id}-{uuid.uuid4().hex[:8]}",
            desired_subject(host_id),
            request.deliver_subject,
            deliver_policy=DeliverPolicy.ALL,
        )
        reply = await self._make(DESIRED_STREAM, config, problem)
        if reply.ok:
            assert config.name is not None
            previous = {self._agent_consumers.pop(host_id, None), request.consumer}
            self._agent_consumers[host_id] = config.name
            for name in previous - {None, "", config.name}:
                assert name is not None
                if name.startswith(f"agent-{host_id}-"):
                    # Short: its leader may have died with a broker (then it
                    # goes by itself a minute after nobody listens).
                    with contextlib.suppress(Exception):
                        await self._js_try.delete_consumer(DESIRED_STREAM, name)
        return reply

    async def _still_delivers(self, host_id: str, name: str, deliver_subject: str) -> bool:
        """Whether the host's consumer `name` still exists and delivers to
        `deliver_subject`. An agent whose broker died reconnects to another
        (its subscription with it) while its consumer, on a broker that is
        still up (two times in three), goes on: one request, where a new one
        needs JetStream's meta leader. A consumer lives on one broker (R1,
        JetStream's default for these): no answer means it died with it."""
        if not name.startswith(f"agent-{host_id}-"):
            return False
        try:
            info = await self._js_try.consumer_info(DESIRED_STREAM, name)
        except Exception:  # gone (NotFoundError), or with its broker
            return False
        return bool(info.config.deliver_subject == deliver_subject)

    async def _make(self, stream: str, config: ConsumerConfig, problem: str | None) -> Reply:
        """Create it, unless a guarded broker's rules say no (`problem`)."""
        if self._guarded and problem is not None:
            return Reply.refused(ErrorCode.UNAUTHORIZED, problem)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + CONSUMER_MAKE_WITHIN
        assert config.name is not None
        tried: list[str] = []
        while True:
            if tried:
                # A new name each try (its random tail): JetStream may have
                # placed the last one on a member that just died (it does not
                # know yet), and would keep it there.
                config.name = f"{tried[0].rpartition('-')[0]}-{uuid.uuid4().hex[:8]}"
            tried.append(config.name)
            try:
                await self._js_try.add_consumer(stream, config)
                break
            except Exception as exc:  # the service must outlive any one request
                if loop.time() + CONSUMER_TRY_TIMEOUT > deadline:
                    log.warning(
                        "consumer not made", stream=stream, error=repr(exc), tries=len(tried)
                    )
                    self._forget(stream, tried)
                    return Reply.refused(ErrorCode.INTERNAL, "could not make a consumer; retry")
                if not isinstance(exc, TimeoutError):  # refused at once: not so fast again
                    await asyncio.sleep(0.2)
        if len(tried) > 1:
            log.info("consumer made", stream=stream, tries=len(tried))
            # A try whose answer was lost may have made one too: it would
            # deliver the same messages again into the same inbox.
            self._forget(stream, tried[:-1])
        return Reply(ok=True, result={"consumer": config.name})

    def _forget(self, stream: str, names: list[str]) -> None:
        """Delete them, after the answer (their broker may not answer)."""

        async def delete() -> None:
            for name in names:
                with contextlib.suppress(Exception):
                    await self._js_try.delete_consumer(stream, name)

        task = asyncio.get_running_loop().create_task(delete())
        self._answering.add(task)
        task.add_done_callback(self._answering.discard)


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
