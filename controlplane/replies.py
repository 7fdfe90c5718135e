"""Answering requests: only ever into an inbox."""

from __future__ import annotations

import msgspec
import structlog
from nats.aio.client import Client
from nats.aio.msg import Msg

from events import natsid
from events.commands import Reply

log = structlog.get_logger("netmesh.controlplane")

_reply_encoder = msgspec.json.Encoder()


class Responder:
    """Answers requests, but only into an inbox. The broker checks the subject
    a client publishes to, never the reply address it names, and the control
    plane's connection may publish anywhere: answering to `netmesh.ev.x` would
    write into the event stream. No stream captures inboxes, and each identity
    reads only its own."""

    def __init__(self, nc: Client) -> None:
        # Our own replies (JetStream acks among them) arrive under this prefix,
        # when it is our own (on an open broker everyone shares `_INBOX.`).
        prefix = bytes(nc._inbox_prefix).decode()
        self._own_inbox = f"{prefix}." if prefix != "_INBOX" else None
        self.not_answered = 0  # requests whose reply address was not an inbox

    async def answer(self, msg: Msg, reply: Reply) -> None:
        if not msg.reply:
            return
        ours = self._own_inbox is not None and msg.reply.startswith(self._own_inbox)
        if not natsid.is_inbox(msg.reply) or ours:
            self.not_answered += 1
            log.warning("not answered: reply address is not an inbox", subject=msg.subject)
            return
        await msg.respond(_reply_encoder.encode(reply))
