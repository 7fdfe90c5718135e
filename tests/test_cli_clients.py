"""External clients from the command line, against a real control plane (a
real nats-server): the configuration printed (its key pair made by the CLI:
the private key is in the configuration and nowhere else), `--output`,
`--public-key`, `--qr`, list/show/remove, the ingress gateway's commands,
and one-line refusals (exit 1, the stream unchanged)."""

from __future__ import annotations

import base64
import json
import os
import stat
from pathlib import Path

import msgspec
import nats
import pytest
from nacl.public import PrivateKey

from events.commands import Reply
from tests.factories import public_key
from tests.secretscan import assert_nowhere, haystacks
from tests.test_cli import netmesh, one_line_error
from tests.test_cli import server as server  # the fixture
from tests.test_cli_policy import last_seq, ok

GATEWAY_ENDPOINT = "203.0.113.5"


async def office(url: str) -> None:
    """office (10.10.0.0/24): member a, and g, an ingress gateway with an endpoint."""
    await ok(url, "network", "create", "office", "--cidr", "10.10.0.0/24")
    nc = await nats.connect(url)
    try:
        for n, name in enumerate(("a", "g"), 1):
            token = (await ok(url, "key", "create", "--network", "office")).strip()
            fields = {
                "token": token,
                "public_key": public_key(n),
                "name": name,
                "endpoints": [GATEWAY_ENDPOINT] if name == "g" else [],
            }
            msg = await nc.request("netmesh.cmd.join", msgspec.json.encode(fields), timeout=10)
            assert msgspec.json.decode(msg.data, type=Reply).ok
    finally:
        await nc.close()
    out = await ok(url, "gateway", "ingress", "add", "g")
    assert out.strip() == "node office/g is now an ingress gateway"


def parse(config: str) -> dict[str, str]:
    """key = value lines of a wg-quick configuration (both sections)."""
    found = {}
    for line in config.splitlines():
        if "=" in line and not line.startswith("#"):
            key, _, value = line.partition("=")
            found[key.strip()] = value.strip()
    return found


async def test_create_prints_a_configuration_whose_key_is_nowhere_else(
    server: str, tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    await office(server)
    rc, out, err = await netmesh(
        server, "client", "create", "phone", "--network", "office", "--via", "g"
    )
    assert rc == 0, err
    assert err.strip() == "client office/phone 10.10.0.3 via g"
    config = parse(out)
    private = config["PrivateKey"]
    public = base64.b64encode(bytes(PrivateKey(base64.b64decode(private)).public_key)).decode()
    assert config == {
        "PrivateKey": private,
        "Address": "10.10.0.3/32",
        "MTU": "1420",
        "DNS": "10.10.0.2, office.internal",
        "PublicKey": public_key(2),
        "Endpoint": f"{GATEWAY_ENDPOINT}:51820",
        "AllowedIPs": "10.10.0.0/24",
        "PersistentKeepalive": "25",
    }
    (row,) = json.loads(await ok(server, "client", "list", "--json"))
    assert (row["name"], row["public_key"], row["via"]) == ("phone", public, "g")
    shown = json.loads(await ok(server, "client", "show", "office/phone", "--json"))
    assert shown["gateway"]["public_key"] == public_key(2) and shown["address"] == "10.10.0.3"
    again = await ok(server, "client", "show", "phone", "--network", "office", "--config")
    assert parse(again) == {k: v for k, v in config.items() if k != "PrivateKey"}
    # The private key: not in any stream, the read model or the server's log.
    nc = await nats.connect(server)
    try:
        logs = capfd.readouterr()
        found = await haystacks(nc, tmp_path / "cp", logs.out + logs.err)
    finally:
        await nc.close()
    assert any(public.encode() in data for data in found.values()), "the public key is recorded"
    key = base64.b64decode(private)
    assert_nowhere(found, {"private key": private, "private key (hex)": key.hex()})


async def test_output_public_key_and_qr(server: str, tmp_path: Path) -> None:
    await office(server)
    target = tmp_path / "phone.conf"
    out = await ok(
        server,
        "client",
        "create",
        "phone",
        "--network",
        "office",
        "--via",
        "g",
        "--output",
        str(target),
    )
    assert out.strip() == f"client office/phone 10.10.0.3 via g (configuration in {target})"
    assert stat.S_IMODE(os.stat(target).st_mode) == 0o600
    assert "PrivateKey" in parse(target.read_text())
    # An existing file is not overwritten, and then nothing is registered.
    before = await last_seq(server)
    rc, out, err = await netmesh(
        server,
        "client",
        "create",
        "tab",
        "--network",
        "office",
        "--via",
        "g",
        "--output",
        str(target),
    )
    one_line_error(rc, err, "File exists")
    assert await last_seq(server) == before
    # A key the device made: no private key in what is printed.
    device = base64.b64encode(bytes(PrivateKey.generate().public_key)).decode()
    out = await ok(
        server,
        "client",
        "create",
        "tab",
        "--network",
        "office",
        "--via",
        "g",
        "--public-key",
        device,
        "--qr",
    )
    assert "PrivateKey" not in parse(out) and parse(out)["Address"] == "10.10.0.4/32"
    assert "█" in out or "▀" in out or "▄" in out  # the QR code, for a terminal
    rows = json.loads(await ok(server, "client", "list", "--json"))
    assert {r["name"]: r["public_key"] for r in rows}["tab"] == device


async def test_list_remove_and_the_gateway_s_clients(server: str) -> None:
    await office(server)
    await ok(server, "client", "create", "phone", "--network", "office", "--via", "g")
    await ok(server, "client", "create", "tab", "--network", "office", "--via", "office/g")
    header, *lines = (await ok(server, "client", "list")).splitlines()
    assert header.split() == ["NETWORK", "CLIENT", "ADDRESS", "VIA", "FULL-TUNNEL", "CREATED"]
    assert [line.split()[:4] for line in lines] == [
        ["office", "phone", "10.10.0.3", "g"],
        ["office", "tab", "10.10.0.4", "g"],
    ]
    (row,) = json.loads(await ok(server, "gateway", "list", "--json"))
    assert (row["kind"], row["clients"]) == ("ingress", ["phone", "tab"])
    out = await ok(server, "client", "remove", "office/phone")
    assert out.strip() == "removed client office/phone (10.10.0.3)"
    out = await ok(server, "gateway", "ingress", "remove", "g")
    assert out.strip() == "node office/g is no longer an ingress gateway and its clients tab"
    assert json.loads(await ok(server, "client", "list", "--json")) == []
    assert json.loads(await ok(server, "gateway", "list", "--json")) == []


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (("client", "create", "p", "--network", "office", "--via", "a"), "not an ingress gateway"),
        (("client", "create", "p", "--network", "nope", "--via", "g"), "no network named 'nope'"),
        (("client", "create", "P_1", "--network", "office", "--via", "g"), "invalid client name"),
        (("client", "create", "a", "--network", "office", "--via", "g"), "node office/a's name"),
        (
            ("client", "create", "p", "--network", "office", "--via", "g", "--full-tunnel"),
            "not an internet gateway",
        ),
        (
            ("client", "create", "p", "--network", "office", "--via", "g", "--public-key", "xyz"),
            "public key",
        ),
        (("client", "remove", "office/nobody"), "no client named 'nobody'"),
        (("client", "remove", "nobody"), "NETWORK/nobody"),
        (("gateway", "ingress", "remove", "a"), "not an ingress gateway"),
        (("gateway", "ingress", "add", "nobody"), "nobody"),
    ],
)
async def test_client_refusals_are_one_line(
    server: str, args: tuple[str, ...], needle: str
) -> None:
    await office(server)
    before = await last_seq(server)
    rc, out, err = await netmesh(server, *args)
    assert out == ""
    one_line_error(rc, err, needle)
    assert await last_seq(server) == before


async def test_a_gateway_without_an_endpoint_leaves_the_line_to_fill_in(server: str) -> None:
    await office(server)
    await ok(server, "gateway", "ingress", "add", "a")  # joined without endpoints
    rc, out, err = await netmesh(
        server, "client", "create", "p", "--network", "office", "--via", "a"
    )
    assert rc == 0 and "warning: gateway a has no known endpoint" in err
    assert "PrivateKey" in parse(out) and "Endpoint" not in parse(out)
    assert "# Endpoint = (unknown" in out
    out = await ok(
        server, "client", "show", "office/p", "--config", "--endpoint", "198.51.100.1:51820"
    )
    assert parse(out)["Endpoint"] == "198.51.100.1:51820"
