"""`netmesh relay add/remove/list`: nodes that forward the WireGuard datagrams
of pairs that cannot reach each other directly (a symmetric NAT's host and
another NAT's), as they are: a relay holds no key and cannot read them.
Attached to the root group of `cli.main`."""

from __future__ import annotations

import click

from cli.main import admin_command, admin_query, cli, emit_json, json_option, plannable, run, table
from cli.past import at_option
from cli.wait import waitable


@cli.group()
def relay() -> None:
    """Relays: pairs that cannot reach each other directly go through one."""


@relay.command("add")
@click.argument("node_ref", metavar="NODE")
@click.option("--network", "network_name", default=None, help="The network NODE must be in.")
@click.option(
    "--ports",
    default="",
    metavar="LOW-HIGH",
    help="UDP ports it forwards on, two per pair (default 52000-52999).",
)
@json_option
@plannable
@waitable
@click.pass_obj
def relay_add(
    server: str, node_ref: str, network_name: str | None, ports: str, as_json: bool
) -> None:
    """Make NODE a relay (it needs an endpoint every host reaches, and its
    UDP ports open to them)."""
    fields = {"node": node_ref, "ports": ports}
    if network_name:
        fields["network"] = network_name
    result = run(admin_command(server, "relay.add", **fields))
    if as_json:
        emit_json(result)
        return
    state = "is already" if not result["changed"] else "is now"
    low, high = result["ports"]
    click.echo(f"node {result['network']}/{result['name']} {state} a relay (ports {low}-{high})")


@relay.command("remove")
@click.argument("node_ref", metavar="NODE")
@json_option
@plannable
@waitable
@click.pass_obj
def relay_remove(server: str, node_ref: str, as_json: bool) -> None:
    """NODE stops relaying: the pairs it carried go back to trying direct
    (and ask another relay if that fails)."""
    result = run(admin_command(server, "relay.remove", node=node_ref))
    if as_json:
        emit_json(result)
        return
    click.echo(
        f"node {result['network']}/{result['name']} is no longer a relay "
        f"({result['pairs_closed']} pairs closed)"
    )


@relay.command("list")
@click.option("--network", "network_name", default=None, help="Only this network.")
@json_option
@at_option
@click.pass_obj
def relay_list(server: str, network_name: str | None, as_json: bool) -> None:
    """Every relay, with the pairs it forwards."""
    rows = run(admin_query(server, "relays", network=network_name))
    if as_json:
        emit_json(rows)
        return
    table(
        [
            (
                r["network"],
                r["name"],
                r["endpoint"],
                r["ports"],
                ", ".join("<->".join(p["hosts"]) for p in r["pairs"]) or None,
            )
            for r in rows
        ],
        ["NETWORK", "NODE", "ENDPOINT", "PORTS", "PAIRS"],
    )
