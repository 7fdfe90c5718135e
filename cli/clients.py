"""`netmesh gateway ingress add/remove` and `netmesh client ...`: external
WireGuard clients (phones, stock WireGuard apps, routers) through ingress
gateways. Attached to the root group of `cli.main`.

A client's key pair is made here, on the admin's machine: only the public key
is sent. The private key is printed once (or written to `--output`, mode
0600) inside a wg-quick configuration, and exists nowhere else.
"""

from __future__ import annotations

import base64
from pathlib import Path
from typing import Any

import click
from nacl.public import PrivateKey

from cli.main import (
    admin_command,
    admin_query,
    cli,
    emit_json,
    gateway,
    json_option,
    plannable,
    run,
    table,
    when,
)
from cli.past import at_option
from cli.secretfile import removed_on_failure, secret_file
from cli.wait import waitable

KEEPALIVE = 25  # seconds: keeps the client's NAT mapping open towards the gateway
EVERYTHING = ("0.0.0.0/0", "::/0")


@gateway.group("ingress")
def ingress() -> None:
    """Ingress: external WireGuard clients reach the network through a node."""


@ingress.command("add")
@click.argument("node_ref", metavar="NODE")
@json_option
@plannable
@waitable
@click.pass_obj
def ingress_add(server: str, node_ref: str, as_json: bool) -> None:
    """Make NODE an ingress gateway (it needs an endpoint clients can reach)."""
    result = run(admin_command(server, "ingress.add", node=node_ref))
    if as_json:
        emit_json(result)
        return
    state = "is already" if not result["changed"] else "is now"
    click.echo(f"node {result['network']}/{result['name']} {state} an ingress gateway")


@ingress.command("remove")
@click.argument("node_ref", metavar="NODE")
@json_option
@plannable
@waitable
@click.pass_obj
def ingress_remove(server: str, node_ref: str, as_json: bool) -> None:
    """NODE is no longer an ingress gateway: its clients are removed with it."""
    result = run(admin_command(server, "ingress.remove", node=node_ref))
    if as_json:
        emit_json(result)
        return
    gone = result["clients_removed"]
    clients = f" and its clients {', '.join(gone)}" if gone else ""
    click.echo(
        f"node {result['network']}/{result['name']} is no longer an ingress gateway{clients}"
    )


def client_config(view: dict[str, Any], private_key: str | None, *, dns: bool = True) -> str:
    """The wg-quick configuration of a client (pure): `view` is the control
    plane's answer (`client.create`, or the `client` query); without a
    private key, a line says where it goes."""
    gateway = view["gateway"]
    allowed = list(EVERYTHING) if view["full_tunnel"] else [view["network_cidr"], *view["ranges"]]
    lines = [
        "[Interface]",
        f"# netmesh client {view['name']} in network {view['network']}, via {gateway['name']}",
        f"PrivateKey = {private_key}"
        if private_key
        else "# PrivateKey = (the device's own: this configuration was made for its public key)",
        f"Address = {view['address']}/32",
        f"MTU = {view['mtu']}",
    ]
    if dns and gateway["address"]:
        lines.append(f"DNS = {gateway['address']}, {view['dns_domain']}")
    lines += [
        "",
        "[Peer]",
        f"# {gateway['name']} (ingress gateway)",
        f"PublicKey = {gateway['public_key']}",
        f"Endpoint = {view['endpoint']}"
        if view["endpoint"]
        else "# Endpoint = (unknown: the gateway's HOST:PORT, reachable by the client)",
        f"AllowedIPs = {', '.join(allowed)}",
        f"PersistentKeepalive = {KEEPALIVE}",
    ]
    return "\n".join(lines) + "\n"


def qr_text(config: str) -> str:
    """The configuration as a QR code for a terminal (WireGuard apps scan it)."""
    import io

    import segno

    out = io.StringIO()
    segno.make(config, error="l").terminal(out=out, compact=True)
    return out.getvalue()


@cli.group()
def client() -> None:
    """External clients: WireGuard devices without the agent, via an ingress gateway."""


@client.command("create")
@click.argument("name")
@click.option("--network", "network_name", required=True, help="The client's network.")
@click.option("--via", "via", required=True, metavar="NODE", help="Its ingress gateway.")
@click.option(
    "--full-tunnel",
    is_flag=True,
    help="Send everything through the gateway (it must be an internet gateway).",
)
@click.option(
    "--public-key",
    "public_key",
    default=None,
    help="Register this key (made on the device) instead of making a key pair here.",
)
@click.option(
    "--endpoint",
    default=None,
    metavar="HOST:PORT",
    help="Where the client reaches the gateway (default: the gateway's first endpoint).",
)
@click.option(
    "--output",
    type=click.Path(path_type=Path, dir_okay=False),
    default=None,
    help="Write the configuration here (mode 0600, a new file) instead of printing it.",
)
@click.option("--qr", is_flag=True, help="Print the configuration as a QR code too.")
@click.option("--no-dns", is_flag=True, help="Leave DNS out of the configuration.")
@json_option
@plannable
@waitable
@click.pass_obj
def client_create(
    server: str,
    name: str,
    network_name: str,
    via: str,
    full_tunnel: bool,
    public_key: str | None,
    endpoint: str | None,
    output: Path | None,
    qr: bool,
    no_dns: bool,
    as_json: bool,
) -> None:
    """Register client NAME and print its wg-quick configuration (with its
    new private key: printed once, kept nowhere)."""
    private_key = None
    if public_key is None:
        key = PrivateKey.generate()
        private_key = base64.b64encode(bytes(key)).decode()
        public_key = base64.b64encode(bytes(key.public_key)).decode()
    out = secret_file(output, "the configuration", exclusive=True)
    with removed_on_failure(out):
        result = run(
            admin_command(
                server,
                "client.create",
                network=network_name,
                name=name,
                via=via,
                public_key=public_key,
                full_tunnel=full_tunnel,
            )
        )
    result["endpoint"] = endpoint or result["gateway"]["endpoint"]
    if not result["endpoint"]:
        # Registered: the key pair must not be lost, the configuration says what is missing.
        click.echo(
            f"warning: gateway {result['gateway']['name']} has no known endpoint: set Endpoint "
            "in the configuration (next time: --endpoint HOST:PORT)",
            err=True,
        )
    config = client_config(result, private_key, dns=not no_dns)
    if out is not None:
        out.write(config)
    if as_json:
        emit_json({**result, **({} if output else {"config": config})})
        return
    where = f" (configuration in {output})" if output else ""
    click.echo(
        f"client {result['network']}/{name} {result['address']} via {result['via']}{where}",
        err=output is None,
    )
    if output is None:
        click.echo(config, nl=False)
    if qr:
        click.echo(qr_text(config), nl=False)


def _split(ref: str, network: str | None) -> tuple[str, str]:
    """NETWORK/NAME, or NAME with --network."""
    net, slash, name = ref.rpartition("/")
    if slash:
        return net, name
    if network is None:
        raise click.UsageError(f"name the client as NETWORK/{ref} or give --network")
    return network, ref


@client.command("list")
@click.option("--network", "network_name", default=None, help="Only this network.")
@json_option
@at_option
@click.pass_obj
def client_list(server: str, network_name: str | None, as_json: bool) -> None:
    """Every external client."""
    rows = run(admin_query(server, "clients", network=network_name))
    if as_json:
        emit_json(rows)
        return
    table(
        [
            (
                c["network"],
                c["name"],
                c["address"],
                c["via"],
                "yes" if c["full_tunnel"] else "no",
                when(c["created_at"]),
            )
            for c in rows
        ],
        ["NETWORK", "CLIENT", "ADDRESS", "VIA", "FULL-TUNNEL", "CREATED"],
    )


@client.command("show")
@click.argument("ref", metavar="[NETWORK/]NAME")
@click.option("--network", "network_name", default=None)
@click.option(
    "--config",
    "as_config",
    is_flag=True,
    help="Print its configuration, without a private key (for a device that made its own).",
)
@click.option("--endpoint", default=None, metavar="HOST:PORT", help="With --config.")
@json_option
@at_option
@click.pass_obj
def client_show(
    server: str,
    ref: str,
    network_name: str | None,
    as_config: bool,
    endpoint: str | None,
    as_json: bool,
) -> None:
    """One client."""
    network, name = _split(ref, network_name)
    view = run(admin_query(server, "client", network=network, name=name))
    view["endpoint"] = endpoint or view["gateway"]["endpoint"]
    if as_json:
        emit_json(view)
        return
    if as_config:
        click.echo(client_config(view, None), nl=False)
        return
    for label, value in (
        ("client", f"{view['network']}/{view['name']}"),
        ("address", view["address"]),
        ("public key", view["public_key"]),
        ("via", f"{view['via']} ({view['gateway']['endpoint'] or 'no known endpoint'})"),
        ("full tunnel", "yes" if view["full_tunnel"] else "no"),
        ("reaches", ", ".join([view["network_cidr"], *view["ranges"]])),
        ("created", when(view["created_at"])),
    ):
        click.echo(f"{label + ':':13} {value}")


@client.command("remove")
@click.argument("ref", metavar="[NETWORK/]NAME")
@click.option("--network", "network_name", default=None)
@json_option
@plannable
@waitable
@click.pass_obj
def client_remove(server: str, ref: str, network_name: str | None, as_json: bool) -> None:
    """Remove a client: its gateway drops it, no member reaches it any more."""
    network, name = _split(ref, network_name)
    result = run(admin_command(server, "client.remove", network=network, name=name))
    if as_json:
        emit_json(result)
        return
    click.echo(f"removed client {result['network']}/{result['name']} ({result['address']})")
