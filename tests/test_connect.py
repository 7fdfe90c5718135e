"""NetmeshClient: nats-py's client with a faster header parser that must parse
exactly as nats-py does."""

from __future__ import annotations

import inspect

from hypothesis import given, settings
from hypothesis import strategies as st
from nats.aio.client import Client

from controlplane.embedded import EmbeddedNats
from events.connect import _HEADER_NAMES_MAX, NetmeshClient, connect, parse_header_lines

NAMES = st.one_of(
    st.sampled_from(
        [b"Netmesh-Mac", b"Nats-Batch-Id", b" Spaced ", b"in side", b"tab\tname", b"\x1cX", b""]
    ),
    st.binary(max_size=12),
)
VALUES = st.one_of(st.sampled_from([b" v", b"", b"\xff\xfe", b" a: b ", b"\tx"]), st.binary())
SEPARATORS = st.sampled_from([b":", b": ", b":\t", b"", b"::"])
LINES = st.tuples(NAMES, SEPARATORS, VALUES).map(lambda t: t[0] + t[1] + t[2])
BLOCKS = st.lists(LINES, max_size=6).map(b"\r\n".join)


@settings(max_examples=500)
@given(BLOCKS, st.binary(max_size=40))
def test_headers_parse_as_nats_py_parses_them(block: bytes, tail: bytes) -> None:
    for raw in (block, block + b"\r\n\r\n", block + tail):
        assert parse_header_lines(raw) == Client._parse_header_lines(raw)
        assert parse_header_lines(raw) == Client._parse_header_lines(raw)  # names now cached


def test_many_header_names_still_parse() -> None:
    raw = b"\r\n".join(b"Name-%d: %d" % (i, i) for i in range(2 * _HEADER_NAMES_MAX))
    assert parse_header_lines(raw) == Client._parse_header_lines(raw)
    assert len(parse_header_lines(raw)) == 2 * _HEADER_NAMES_MAX


def test_nats_py_still_parses_headers_where_netmesh_client_overrides_it() -> None:
    # If nats-py renames or stops calling it, the override would silently do nothing.
    assert "self._parse_header_lines(" in inspect.getsource(Client._process_headers)
    assert NetmeshClient._parse_header_lines is parse_header_lines


async def test_headers_arrive_through_a_real_server(nats_server: EmbeddedNats) -> None:
    nc = await connect(nats_server.url)
    try:
        sub = await nc.subscribe("h")
        headers = {"Netmesh-Mac": "abc=", "Nats-Msg-Id": "x.1", "Odd": " é "}
        await nc.publish("h", b"data", headers=headers)
        msg = await sub.next_msg(timeout=5)
        assert msg.headers == {"Netmesh-Mac": "abc=", "Nats-Msg-Id": "x.1", "Odd": "é"}
    finally:
        await nc.close()
