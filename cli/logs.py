"""structlog set-up for the CLI's long-running commands (server, agent)."""

from __future__ import annotations

import logging
import sys

import structlog


def configure_logging(fmt: str = "auto", level: str = "info") -> None:
    """fmt: "json", "console", or "auto" (console on a terminal, else JSON)."""
    if fmt == "auto":
        fmt = "console" if sys.stderr.isatty() else "json"
    renderer: structlog.typing.Processor = (
        structlog.processors.JSONRenderer()
        if fmt == "json"
        else structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty())
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.StackInfoRenderer(),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(
            logging.getLevelNamesMapping()[level.upper()]
        ),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=True,
    )
    quiet_tls_noise()


def quiet_tls_noise() -> None:
    """asyncio warns whenever a TLS connection ends ("returning true from
    eof_received() has no effect when using ssl", about nats-py's protocol
    class): noise, once per connection, with nothing to act on."""
    asyncio_log = logging.getLogger("asyncio")
    if _not_eof_received_noise not in asyncio_log.filters:
        asyncio_log.addFilter(_not_eof_received_noise)


def _not_eof_received_noise(record: logging.LogRecord) -> bool:
    return "eof_received" not in record.getMessage()
