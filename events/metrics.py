"""The `/metrics` endpoint both processes serve with `--metrics-listen HOST:PORT`.

Each process (and each test) has its own `CollectorRegistry`: never the
library's global one, so that several control planes and agents can run in one
process and count apart. prometheus_client's HTTP server runs in a thread of
its own; collectors read the process's state as it stands at the scrape.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, start_http_server


def split_metrics_listen(
    listen: str, option: str = "--metrics-listen", example: str = "127.0.0.1:9470"
) -> tuple[str, int]:
    """ "HOST:PORT" -> (host, port), port 0 meaning any free one. Raises
    ValueError with a readable message. The host is bound as given: no
    default to every address."""
    host, sep, port = listen.rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) < 65536:
        raise ValueError(f"invalid {option} {listen!r}: expected HOST:PORT, e.g. {example}")
    return host, int(port)


@dataclass
class MetricsServer:
    """A running `/metrics` endpoint; `close()` stops it."""

    server: WSGIServer
    thread: threading.Thread

    @property
    def port(self) -> int:
        return int(self.server.server_port)

    @property
    def url(self) -> str:
        host = str(self.server.server_address[0])
        return f"http://{f'[{host}]' if ':' in host else host}:{self.port}/metrics"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(5)


def serve_metrics(registry: CollectorRegistry, listen: str) -> MetricsServer:
    """Serve `registry` on `listen` (HOST:PORT). Raises ValueError for a bad
    address, OSError when it cannot be bound."""
    host, port = split_metrics_listen(listen)
    server, thread = start_http_server(port, addr=host, registry=registry)
    return MetricsServer(server, thread)
