"""`netmesh`: the command line. Admin commands are sent to the control plane
over NATS; `server` and `agent up` run the long-lived processes."""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import re
import sys
import uuid
from collections.abc import Callable, Coroutine, Sequence
from pathlib import Path
from typing import Any, TypeVar

import click
import msgspec

from cli.client import (
    DEFAULT_SERVER,
    CliError,
    Login,
    command,
    load_admin_key,
    login_from,
    plan,
    query,
)
from cli.logs import configure_logging, quiet_tls_noise
from cli.past import asked_point, at_option
from cli.wait import (
    asked_wait,
    converge,
    outcome,
    wait_after_command,
    waitable,
    waitable_network,
)
from events.commands import ROLES

T = TypeVar("T")
FC = TypeVar("FC", bound=Callable[..., Any])


def run(coro: Coroutine[Any, Any, T]) -> T:
    try:
        return asyncio.run(coro)
    except CliError as exc:
        raise click.ClickException(str(exc)) from None


def emit_json(data: Any) -> None:
    click.echo(json.dumps(data, indent=2, sort_keys=True, default=str))


def when(ts: float | None) -> str:
    if ts is None:
        return "never"
    return dt.datetime.fromtimestamp(ts, dt.UTC).strftime("%Y-%m-%d %H:%M:%SZ")


def table(rows: Sequence[Sequence[Any]], headers: Sequence[str]) -> None:
    cells = [[str(h) for h in headers]] + [["-" if c is None else str(c) for c in r] for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    for row in cells:
        click.echo("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())


DURATION = re.compile(r"^(\d+)([smhdw])$")
UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def parse_duration(text: str) -> float | None:
    """ "90s", "30m", "1h", "7d", "2w" -> seconds; "never" -> None."""
    if text == "never":
        return None
    match = DURATION.match(text.strip())
    if not match or int(match.group(1)) == 0:
        raise click.BadParameter(f"{text!r}: use e.g. 30m, 1h, 7d or never")
    return int(match.group(1)) * UNITS[match.group(2)]


json_option: Callable[[FC], FC] = click.option(
    "--json", "as_json", is_flag=True, help="Print JSON."
)
DEFAULT_ADMIN_KEY = Path("netmesh-data/admin.key")
DEFAULT_CA = Path("netmesh-data/tls/ca.pem")


async def admin_command(server: str, verb: str, **fields: Any) -> Any:
    """A command signed with the admin key given to `netmesh` (or the default)."""
    return await admin_command_seq(server, verb, None, fields)


async def admin_command_seq(
    server: str, verb: str, seq_as: str | None, fields: dict[str, Any]
) -> Any:
    """`admin_command`, with the sequence of its last event in the result as
    `seq_as`. Under `--plan` (`plannable`), the command is planned instead:
    what it would do is printed and the CLI exits (0), nothing written."""
    ctx = click.get_current_context()
    key = load_admin_key(ctx.find_root().params.get("admin_key"))
    who = Login(key, login().ca)
    if ctx.meta.get(PLAN_ONLY):
        show_plan(await plan(server, verb, login=who, **fields))
        raise click.exceptions.Exit(0)
    wait = asked_wait()
    if wait is None:
        return await command(server, verb, login=who, seq_as=seq_as, **fields)
    # --wait: which command it was (its id) and where its events end.
    fields.setdefault("command_id", uuid.uuid4().hex)
    result = await command(server, verb, login=who, seq_as=seq_as or LAST_SEQ, **fields)
    seq = result.get(seq_as or LAST_SEQ) if isinstance(result, dict) else None
    if seq_as is None and isinstance(result, dict):
        result.pop(LAST_SEQ, None)
    wait_after_command(server, who, seq, fields["command_id"], wait)
    return result


LAST_SEQ = "netmesh.last_seq"  # where a waited command's last sequence is passed up


PLAN_ONLY = "netmesh.plan"


def _plan_only(ctx: click.Context, _param: click.Parameter, value: bool) -> None:
    if value:
        ctx.meta[PLAN_ONLY] = True


# A changing admin command takes --plan: it is decided as it would be, and
# what it would change is printed (`--json`: as JSON); nothing is written.
plannable: Callable[[FC], FC] = click.option(
    "--plan",
    is_flag=True,
    expose_value=False,
    callback=_plan_only,
    help="Print the events it would append and what would change on each host; write nothing.",
)


def show_plan(result: dict[str, Any]) -> None:
    """A command's plan (`CommandPipeline.plan`), as JSON under `--json`."""
    if click.get_current_context().params.get("as_json"):
        emit_json(result)
        return
    events = result["events"]
    if not events:
        click.echo(f"{result['verb']} would change nothing: no event")
        return
    click.echo(f"{result['verb']} would append {len(events)} event(s):")
    for event in events:
        data = {k: v for k, v in event["data"].items() if k != "type"}
        click.echo(f"  {event['type']} on {event['subject']} {json.dumps(data, sort_keys=True)}")
    if not result["text"]:
        click.echo("no host's desired state would change")
        return
    click.echo(f"{len(result['text'])} host(s) would change:")
    click.echo("\n".join(result["text"]))


async def admin_query(server: str, what: str, **args: Any) -> Any:
    """A query, logged in as the admin given to `netmesh` (where there is one);
    under `--at`, as of that point of the log."""
    point = asked_point()
    if point is not None:
        args["at"] = msgspec.to_builtins(point)
    return await query(server, what, login=login(), **args)


def login() -> Login:
    """The admin key and broker CA given to `netmesh` (or the defaults), where
    they exist: who this CLI is to the broker, for queries and events too."""
    params = click.get_current_context().find_root().params
    return login_from(params.get("admin_key"), params.get("ca"))


def explicit_server(ctx: click.Context) -> str | None:
    """`netmesh --server URL` (or NETMESH_SERVER) when the user gave one. The
    default does not count: agents then use the server their identity names."""
    root = ctx.find_root()
    if root.get_parameter_source("server") in (
        click.core.ParameterSource.COMMANDLINE,
        click.core.ParameterSource.ENVIRONMENT,
    ):
        return str(root.params["server"])
    return None


@click.group(name="netmesh", context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--server",
    envvar="NETMESH_SERVER",
    default=DEFAULT_SERVER,
    show_default=True,
    help="NATS URL of the netmesh control plane (env NETMESH_SERVER).",
)
@click.option(
    "--admin-key",
    envvar="NETMESH_ADMIN_KEY",
    type=click.Path(path_type=Path, dir_okay=False),
    default=DEFAULT_ADMIN_KEY,
    show_default=True,
    help="Key that signs admin commands (env NETMESH_ADMIN_KEY); the server writes the "
    "first one to <data-dir>/admin.key.",
)
@click.option(
    "--ca",
    envvar="NETMESH_CA",
    type=click.Path(path_type=Path, dir_okay=False),
    default=DEFAULT_CA,
    show_default=True,
    help="CA certificate of a tls:// server (env NETMESH_CA); the server writes it to "
    "<data-dir>/tls/ca.pem.",
)
@click.pass_context
def cli(ctx: click.Context, server: str, admin_key: Path, ca: Path) -> None:
    """netmesh: WireGuard overlay networks, event-sourced on NATS JetStream."""
    from cli import lastwrite

    quiet_tls_noise()
    lastwrite.remembered = lastwrite.LastWrite(lastwrite.default_path())
    ctx.obj = server


# -- server ------------------------------------------------------------------


def check_metrics_listen(
    listen: str | None, option: str = "--metrics-listen", example: str = "127.0.0.1:9470"
) -> None:
    """--metrics-listen (or another HOST:PORT option), checked before anything starts."""
    from events.metrics import split_metrics_listen

    if listen is not None:
        try:
            split_metrics_listen(listen, option, example)
        except ValueError as exc:
            raise click.BadParameter(str(exc), param_hint=option) from None


@cli.command()
@click.option(
    "--data-dir",
    type=click.Path(path_type=Path),
    default=Path("./netmesh-data"),
    show_default=True,
    help="Read model, logs and (embedded) JetStream data.",
)
@click.option(
    "--listen",
    default="127.0.0.1:4222",
    show_default=True,
    help="Where the embedded nats-server listens (ignored with --nats-url).",
)
@click.option(
    "--nats-url",
    default=None,
    help="Join this NATS instead of embedding one; URL[,URL...] for the brokers of a "
    "JetStream cluster (`netmesh broker`), tried in that order: this machine's broker first.",
)
@click.option(
    "--replicas",
    type=click.IntRange(1, 5),
    default=1,
    show_default=True,
    help="Copies of each stream (with --nats-url on a JetStream cluster: 3 for three "
    "brokers); an existing stream is raised to it.",
)
@click.option(
    "--advertise", default=None, help="NATS URL agents are told to use (put in enrollment tokens)."
)
@click.option("--log-format", type=click.Choice(["auto", "console", "json"]), default="auto")
@click.option(
    "--log-level", type=click.Choice(["debug", "info", "warning", "error"]), default="info"
)
@click.option(
    "--print-nats-config",
    is_flag=True,
    help="Print the nats-server configuration that lets this control plane guard an "
    "external NATS (--nats-url), then exit.",
)
@click.option(
    "--desired-states",
    type=click.Choice(["deltas", "full"]),
    default="deltas",
    hidden=True,
    help="full: a whole desired state to every affected host on every change "
    "(the baseline `make bench` compares against).",
)
@click.option(
    "--metrics-listen",
    default=None,
    metavar="HOST:PORT",
    help="Serve Prometheus metrics on http://HOST:PORT/metrics [default: off].",
)
@click.option(
    "--http",
    "http_listen",
    default=None,
    metavar="HOST:PORT",
    help="Serve the read API (/api/) and the dashboard on http://HOST:PORT [default: off].",
)
def server(
    data_dir: Path,
    listen: str,
    nats_url: str | None,
    advertise: str | None,
    log_format: str,
    log_level: str,
    print_nats_config: bool,
    desired_states: str,
    metrics_listen: str | None,
    http_listen: str | None,
    replicas: int,
) -> None:
    """Run the control plane (foreground; stops on SIGINT/SIGTERM)."""
    from nats.js.errors import APIError

    from controlplane.brokertls import BrokerTlsError
    from controlplane.embedded import NatsServerError
    from controlplane.server import ControlPlaneFailed, broker_config, run_server, split_listen
    from events.signing import SigningKeyError

    if print_nats_config:
        try:
            click.echo(broker_config(data_dir.resolve()))
        except (SigningKeyError, BrokerTlsError, OSError) as exc:
            raise click.ClickException(str(exc)) from None
        return
    check_metrics_listen(metrics_listen)
    check_metrics_listen(http_listen, "--http", "127.0.0.1:8080")
    configure_logging(log_format, log_level)
    if nats_url is None:
        try:
            split_listen(listen)
        except ValueError as exc:
            raise click.BadParameter(str(exc), param_hint="--listen") from None
    try:
        asyncio.run(
            run_server(
                data_dir.resolve(),
                listen,
                nats_url,
                advertise,
                snapshots_only=desired_states == "full",
                metrics_listen=metrics_listen,
                http_listen=http_listen,
                replicas=replicas,
            )
        )
    except (NatsServerError, ControlPlaneFailed, SigningKeyError, BrokerTlsError) as exc:
        raise click.ClickException(str(exc)) from None
    except OSError as exc:
        raise click.ClickException(f"cannot start: {exc}") from None
    except APIError as exc:
        # e.g. --replicas 3 on a cluster of fewer brokers: "insufficient resources".
        raise click.ClickException(f"the streams could not be made: {exc.description}") from None


@cli.command()
@click.option(
    "--data-dir",
    type=click.Path(path_type=Path),
    default=Path("./netmesh-broker"),
    show_default=True,
    help="JetStream data and the config; put the control plane's signing.key (and tls/) here.",
)
@click.option(
    "--listen", default="127.0.0.1:4222", show_default=True, help="Where clients connect."
)
@click.option(
    "--cluster-listen",
    required=True,
    metavar="HOST:PORT",
    help="Where the other brokers' routes connect, e.g. 10.0.0.1:6222.",
)
@click.option(
    "--routes",
    required=True,
    metavar="HOST:PORT[,...]",
    help="The cluster addresses of the members (this one's may be among them).",
)
@click.option(
    "--server-name",
    default=None,
    help="This member's name, unique and stable (JetStream remembers it) [default: hostname].",
)
@click.option("--cluster-name", default="netmesh", show_default=True)
@click.option(
    "--print-config",
    is_flag=True,
    help="Print the nats-server configuration (and write it to the data dir), then exit.",
)
@click.option("--log-format", type=click.Choice(["auto", "console", "json"]), default="auto")
@click.option(
    "--log-level", type=click.Choice(["debug", "info", "warning", "error"]), default="info"
)
def broker(
    data_dir: Path,
    listen: str,
    cluster_listen: str,
    routes: str,
    server_name: str | None,
    cluster_name: str,
    print_config: bool,
    log_format: str,
    log_level: str,
) -> None:
    """Run one broker of a JetStream cluster (nats-server, guarded by the control planes).

    Three of these (on three machines, or ports) form the cluster; then `netmesh server
    --nats-url URL,URL,URL --replicas 3` on each control-plane machine."""
    import socket

    from controlplane.broker import ClusterMember, cluster_member, run_broker
    from controlplane.brokertls import BrokerTlsError
    from controlplane.embedded import NatsServerError
    from events.signing import SigningKeyError

    member = ClusterMember(
        server_name=server_name or socket.gethostname().split(".")[0],
        cluster_listen=cluster_listen,
        routes=tuple(r.strip() for r in routes.split(",") if r.strip()),
        cluster_name=cluster_name,
    )
    data_dir = data_dir.resolve()
    try:
        if print_config:
            click.echo(Path(str(cluster_member(data_dir, listen, member).config)).read_text())
            return
        configure_logging(log_format, log_level)
        asyncio.run(run_broker(data_dir, listen, member))
    except (ValueError, NatsServerError, SigningKeyError, BrokerTlsError) as exc:
        raise click.ClickException(str(exc)) from None
    except OSError as exc:
        raise click.ClickException(f"cannot start: {exc}") from None


# -- networks -----------------------------------------------------------------


@cli.group()
def network() -> None:
    """Create, list, show and delete networks."""


@network.command("create")
@click.argument("name")
@click.option("--cidr", required=True, help="Overlay address range, e.g. 10.10.0.0/24.")
@click.option("--listen-port", type=int, default=51820, show_default=True)
@click.option("--mtu", type=int, default=1420, show_default=True)
@click.option(
    "--keepalive",
    type=int,
    default=25,
    show_default=True,
    help="Persistent keepalive in seconds (0 = off).",
)
@click.option("--dns-domain", default="", help="Suffix of its nodes' names [NAME.internal].")
@json_option
@plannable
@waitable
@click.pass_obj
def network_create(
    server: str,
    name: str,
    cidr: str,
    listen_port: int,
    mtu: int,
    keepalive: int,
    dns_domain: str,
    as_json: bool,
) -> None:
    """Create network NAME."""
    result = run(
        admin_command(
            server,
            "network.create",
            name=name,
            cidr=cidr,
            listen_port=listen_port,
            mtu=mtu,
            keepalive=keepalive,
            dns_domain=dns_domain,
        )
    )
    if as_json:
        emit_json(result)
    else:
        names = f"names *.{result['dns_domain']}"
        click.echo(f"created network {result['network']} ({result['cidr']}, {names})")


@network.command("list")
@json_option
@at_option
@click.pass_obj
def network_list(server: str, as_json: bool) -> None:
    """List networks."""
    rows = run(admin_query(server, "networks"))
    if as_json:
        emit_json(rows)
        return
    table(
        [
            (
                r["name"],
                r["cidr"],
                r["nodes"],
                r["listen_port"],
                r["mtu"],
                r["keepalive"],
                r["dns_domain"],
            )
            for r in rows
        ],
        ["NAME", "CIDR", "NODES", "PORT", "MTU", "KEEPALIVE", "DNS DOMAIN"],
    )


@network.command("show")
@click.argument("name")
@json_option
@at_option
@click.pass_obj
def network_show(server: str, name: str, as_json: bool) -> None:
    """Show network NAME, its nodes and keys."""
    net = run(admin_query(server, "network", name=name))
    if as_json:
        emit_json(net)
        return
    click.echo(
        f"network    {net['name']}\ncidr       {net['cidr']}\nlisten     {net['listen_port']}"
        f"\nmtu        {net['mtu']}\nkeepalive  {net['keepalive']}s"
        f"\ndns domain {net['dns_domain']}"
        f"\ncreated    {when(net['created_at'])}\n"
    )
    _print_nodes(net["members"])
    click.echo()
    _print_keys(net["keys"])


@network.command("update")
@click.argument("name")
@click.option("--mtu", type=int, default=None, help="Interface MTU of its members.")
@click.option(
    "--keepalive", type=int, default=None, help="Persistent keepalive in seconds (0 = off)."
)
@click.option("--dns-domain", default=None, help="Suffix of its nodes' names.")
@json_option
@plannable
@waitable
@click.pass_obj
def network_update(
    server: str,
    name: str,
    mtu: int | None,
    keepalive: int | None,
    dns_domain: str | None,
    as_json: bool,
) -> None:
    """Change network NAME's MTU, keepalive or DNS domain; its members follow in place."""
    if mtu is None and keepalive is None and dns_domain is None:
        raise click.UsageError("nothing to update: give --mtu, --keepalive or --dns-domain")
    given = (("mtu", mtu), ("keepalive", keepalive), ("dns_domain", dns_domain))
    fields = {k: v for k, v in given if v is not None}
    result = run(admin_command(server, "network.update", name=name, **fields))
    if as_json:
        emit_json(result)
    elif result["changed"]:
        click.echo(
            f"updated network {result['network']}: mtu {result['mtu']}, "
            f"keepalive {result['keepalive']}s, names *.{result['dns_domain']}"
        )
    else:
        click.echo(f"network {result['network']} already has these settings")


@network.command("delete")
@click.argument("name")
@click.option("--force", is_flag=True, help="Delete even if nodes are in it (disconnects them).")
@json_option
@plannable
@waitable
@click.pass_obj
def network_delete(server: str, name: str, force: bool, as_json: bool) -> None:
    """Delete network NAME; its keys stop working (refused while it has nodes)."""
    result = run(admin_command(server, "network.delete", name=name, force=force))
    if as_json:
        emit_json(result)
    else:
        click.echo(f"deleted network {result['network']}")


# -- enrollment keys ------------------------------------------------------------


@cli.group()
def key() -> None:
    """Enrollment keys: how hosts join networks."""


@key.command("create")
@click.option("--network", "network_name", required=True)
@click.option(
    "--uses",
    type=click.IntRange(min=1),
    default=None,
    help="How many hosts may join with it [default: 1].",
)
@click.option("--unlimited", is_flag=True, help="Any number of hosts may join with it.")
@click.option(
    "--expires", default="24h", show_default=True, help="Lifetime: 30m, 1h, 7d, 2w or never."
)
@click.option(
    "--tag", "tags", multiple=True, help="Nodes joining with it carry this tag (repeatable)."
)
@json_option
@plannable
@waitable
@click.pass_obj
def key_create(
    server: str,
    network_name: str,
    uses: int | None,
    unlimited: bool,
    expires: str,
    tags: tuple[str, ...],
    as_json: bool,
) -> None:
    """Create an enrollment key; print its token (only the token) on stdout."""
    if unlimited and uses is not None:
        raise click.UsageError("--uses and --unlimited exclude each other")
    expires_in = parse_duration(expires)
    result = run(
        admin_command(
            server,
            "key.create",
            network=network_name,
            uses=None if unlimited else (uses or 1),
            expires_in=expires_in,
            **({"tags": list(tags)} if tags else {}),
        )
    )
    if as_json:
        emit_json(result)
    else:
        click.echo(result["token"])


def _print_keys(rows: list[dict[str, Any]]) -> None:
    table(
        [
            (
                r["key_id"],
                r["network"],
                r["state"],
                r["used"],
                "unlimited" if r["uses"] is None else r["uses"],
                when(r["expires_at"]),
                ",".join(r["tags"]) or "-",
            )
            for r in rows
        ],
        ["KEY", "NETWORK", "STATE", "USED", "USES", "EXPIRES", "TAGS"],
    )


@key.command("list")
@json_option
@at_option
@click.pass_obj
def key_list(server: str, as_json: bool) -> None:
    """List enrollment keys (never their secrets)."""
    rows = run(admin_query(server, "keys"))
    if as_json:
        emit_json(rows)
    else:
        _print_keys(rows)


@key.command("revoke")
@click.argument("key_id")
@json_option
@plannable
@waitable
@click.pass_obj
def key_revoke(server: str, key_id: str, as_json: bool) -> None:
    """Revoke enrollment key KEY_ID: it can no longer be used to join."""
    result = run(admin_command(server, "key.revoke", key_id=key_id))
    if as_json:
        emit_json(result)
    else:
        click.echo(f"revoked key {result['key_id']}")


# -- nodes ------------------------------------------------------------------------


def _print_nodes(rows: list[dict[str, Any]]) -> None:
    table(
        [
            (
                r["id"],
                r["name"],
                r["network"],
                r["address"],
                ",".join(r["tags"]) or "-",
                r["endpoint"],
                r["public_key"],
            )
            for r in rows
        ],
        ["ID", "NAME", "NETWORK", "ADDRESS", "TAGS", "ENDPOINT", "PUBLIC KEY"],
    )


@cli.group()
def node() -> None:
    """Nodes: hosts in networks."""


@node.command("list")
@click.option("--network", "network_name", default=None)
@json_option
@at_option
@click.pass_obj
def node_list(server: str, network_name: str | None, as_json: bool) -> None:
    """List nodes."""
    rows = run(admin_query(server, "nodes", network=network_name))
    if as_json:
        emit_json(rows)
    else:
        _print_nodes(rows)


@node.command("show")
@click.argument("node_ref", metavar="NODE")
@json_option
@at_option
@click.pass_obj
def node_show(server: str, node_ref: str, as_json: bool) -> None:
    """Show NODE (id, NETWORK/NAME, or a unique name)."""
    n = run(admin_query(server, "node", node=node_ref))
    if as_json:
        emit_json(n)
        return
    status = n.get("status") or {}
    for label, value in [
        ("id", n["id"]),
        ("name", n["name"]),
        ("network", n["network"]),
        ("address", n["interface_address"]),
        ("tags", ", ".join(n["tags"]) or None),
        ("host", n["host_id"]),
        ("public key", n["public_key"]),
        ("endpoint", n["endpoint"]),
        ("joined", when(n["joined_at"])),
        *(
            [
                ("state", status.get("state")),
                (
                    "revision",
                    f"{status.get('applied_revision')} applied / "
                    f"{status.get('desired_revision')} desired",
                ),
            ]
            if "status" in n  # not as of a past point: reports are not in the log
            else []
        ),
    ]:
        click.echo(f"{label:<11}{'-' if value is None else value}")
    if status.get("peers"):
        click.echo(f"\npeers as reported by the agent at {when(status.get('reported_at'))}:")
        table(
            [
                (
                    p["name"] or p["public_key"][:12],
                    p["endpoint"],
                    p.get("path") or "-",
                    "yes" if p["connected"] else "no",
                    _age(p["handshake_age"]),
                    p["rx_bytes"],
                    p["tx_bytes"],
                )
                for p in status["peers"]
            ],
            ["PEER", "ENDPOINT", "PATH", "CONNECTED", "HANDSHAKE", "RX", "TX"],
        )


@node.command("rotate-key")
@click.argument("node_ref", metavar="NODE")
@plannable
@waitable
@click.pass_obj
def node_rotate_key(server: str, node_ref: str) -> None:
    """Ask NODE's host for a new WireGuard key (made there; peers switch in place)."""
    result = run(admin_command(server, "node.rotate_key", node=node_ref))
    click.echo(f"asked host {result['host_id']} for a new key (epoch {result['epoch']})")


def _tagging(server: str, verb: str, node_ref: str, tags: tuple[str, ...], as_json: bool) -> None:
    result = run(admin_command(server, verb, node=node_ref, tags=list(tags)))
    if as_json:
        emit_json(result)
        return
    where = f"{result['network']}/{result['name']}"
    now = ", ".join(result["tags"]) or "none"
    if not result["changed"]:
        state = "already carries" if verb == "node.tag" else "does not carry"
        click.echo(f"node {where} {state} {', '.join(tags)}: nothing changed")
    else:
        done = "tagged" if verb == "node.tag" else "untagged"
        click.echo(f"{done} node {where}: {', '.join(result['changed'])} (tags now: {now})")


@node.command("tag")
@click.argument("node_ref", metavar="NODE")
@click.argument("tags", metavar="TAG...", nargs=-1, required=True)
@json_option
@plannable
@waitable
@click.pass_obj
def node_tag(server: str, node_ref: str, tags: tuple[str, ...], as_json: bool) -> None:
    """Add TAGs to NODE (tags are 1-32 of a-z, 0-9 and '-'); policies name them."""
    _tagging(server, "node.tag", node_ref, tags, as_json)


@node.command("untag")
@click.argument("node_ref", metavar="NODE")
@click.argument("tags", metavar="TAG...", nargs=-1, required=True)
@json_option
@plannable
@waitable
@click.pass_obj
def node_untag(server: str, node_ref: str, tags: tuple[str, ...], as_json: bool) -> None:
    """Take TAGs from NODE."""
    _tagging(server, "node.untag", node_ref, tags, as_json)


@node.command("exit")
@click.argument("node_ref", metavar="NODE")
@click.option("--via", "via", metavar="GATEWAY", help="An internet gateway of NODE's network.")
@click.option("--off", is_flag=True, help="Route as the host does again.")
@json_option
@plannable
@click.pass_obj
def node_exit(server: str, node_ref: str, via: str | None, off: bool, as_json: bool) -> None:
    """Send NODE's default route through GATEWAY (an egress gateway to 0.0.0.0/0)."""
    if off == (via is not None):
        raise click.UsageError("give either --via GATEWAY or --off")
    if off:
        result = run(admin_command(server, "node.exit_off", node=node_ref))
    else:
        result = run(admin_command(server, "node.exit", node=node_ref, via=via))
    if as_json:
        emit_json(result)
        return
    where = f"{result['network']}/{result['name']}"
    if off:
        click.echo(
            f"node {where} routes as its host does" + ("" if result["changed"] else " (it did)")
        )
    else:
        state = "exits" if result["changed"] else "already exits"
        click.echo(f"node {where} {state} through {result['via']}")


@node.command("remove")
@click.argument("node_ref", metavar="NODE")
@json_option
@plannable
@waitable
@click.pass_obj
def node_remove(server: str, node_ref: str, as_json: bool) -> None:
    """Remove NODE from its network: every peer drops it."""
    result = run(admin_command(server, "node.remove", node=node_ref))
    if as_json:
        emit_json(result)
    else:
        click.echo(f"removed node {result['network']}/{result['name']} ({result['node_id']})")


# -- gateways -----------------------------------------------------------------------


@cli.group()
def gateway() -> None:
    """Gateways: nodes that forward between the network and ranges beyond it."""


@gateway.group("egress")
def egress() -> None:
    """Egress: members reach a LAN, a VPC... through a node that is on it."""


@egress.command("add")
@click.argument("node_ref", metavar="NODE")
@click.option(
    "--range",
    "ranges",
    metavar="CIDR",
    multiple=True,
    required=True,
    help="An IPv4 range NODE reaches (repeat for several).",
)
@click.option(
    "--no-nat",
    is_flag=True,
    help="Do not masquerade: the range sees members' overlay addresses (it needs a route back).",
)
@click.option(
    "--metric",
    type=int,
    default=100,
    show_default=True,
    help="Among gateways of one range, members use the lowest metric that is up.",
)
@json_option
@plannable
@waitable
@click.pass_obj
def egress_add(
    server: str, node_ref: str, ranges: tuple[str, ...], no_nat: bool, metric: int, as_json: bool
) -> None:
    """Make NODE an egress gateway to the --range CIDRs (or give it more)."""
    result = run(
        admin_command(
            server, "egress.add", node=node_ref, ranges=list(ranges), nat=not no_nat, metric=metric
        )
    )
    if as_json:
        emit_json(result)
        return
    where = f"{result['network']}/{result['name']}"
    state = "is already an egress gateway to" if not result["changed"] else "forwards to"
    nat = "masqueraded" if result["nat"] else "not masqueraded"
    click.echo(
        f"node {where} {state} {', '.join(result['ranges'])} ({nat}, metric {result['metric']})"
    )


@egress.command("remove")
@click.argument("node_ref", metavar="NODE")
@click.option(
    "--range", "ranges", metavar="CIDR", multiple=True, help="Only this range (default: all)."
)
@json_option
@plannable
@waitable
@click.pass_obj
def egress_remove(server: str, node_ref: str, ranges: tuple[str, ...], as_json: bool) -> None:
    """Take ranges from egress gateway NODE (all of them by default)."""
    result = run(admin_command(server, "egress.remove", node=node_ref, ranges=list(ranges)))
    if as_json:
        emit_json(result)
        return
    where = f"{result['network']}/{result['name']}"
    left = f" (still forwards to {', '.join(result['ranges'])})" if result["ranges"] else ""
    click.echo(f"node {where} no longer forwards to {', '.join(result['removed'])}{left}")


@gateway.command("list")
@click.option("--network", "network_name", default=None, help="Only this network.")
@json_option
@at_option
@click.pass_obj
def gateway_list(server: str, network_name: str | None, as_json: bool) -> None:
    """Every gateway: egress with its ranges, ingress with its clients."""
    rows = run(admin_query(server, "gateways", network=network_name))
    if as_json:
        emit_json(rows)
        return
    table(
        [
            (
                g["network"],
                g["name"],
                g["address"],
                g["kind"],
                ",".join(g["ranges"]) if g["kind"] == "egress" else None,
                ("yes" if g["nat"] else "no") if g["kind"] == "egress" else None,
                g.get("metric"),
                ",".join(g["clients"]) if g["kind"] == "ingress" else None,
            )
            for g in rows
        ],
        ["NETWORK", "NODE", "ADDRESS", "KIND", "RANGES", "NAT", "METRIC", "CLIENTS"],
    )


# -- access policy -----------------------------------------------------------------


@cli.group()
def policy() -> None:
    """A network's access policy: who may reach whom, on which ports."""


def _warn(warnings: list[str]) -> None:
    for warning in warnings:
        click.echo(f"warning: {warning}", err=True)


@policy.command("set")
@click.argument("network_name", metavar="NETWORK")
@click.argument("file", type=click.File("r", encoding="utf-8"))
@click.option("--plan", is_flag=True, help="Print what would change on each host; write nothing.")
@waitable
@json_option
@click.pass_obj
def policy_set(server: str, network_name: str, file: Any, plan: bool, as_json: bool) -> None:
    """Put the policy in FILE (JSON5; - for stdin) in force in NETWORK.

    Refused (nothing written) when it is malformed or its tests fail; tags and
    node names no member has yet are warnings."""
    from events.policy import PolicyError, parse_policy

    document = file.read()
    try:
        parse_policy(document)  # a fast answer; the control plane checks it again
    except PolicyError as exc:
        raise click.ClickException(f"invalid policy: {exc}") from None
    if plan:
        result = run(admin_query(server, "policy_plan", network=network_name, document=document))
        if as_json:
            emit_json(result)
            return
        _warn(result["warnings"])
        if not result["changed"]:
            click.echo(f"network {network_name} has this policy already: nothing would change")
        elif not result["text"]:
            click.echo("no host's peers or firewall would change")
        else:
            click.echo("\n".join(result["text"]))
        return
    result = run(
        admin_command_seq(
            server, "policy.set", "revision", {"network": network_name, "document": document}
        )
    )
    if as_json:
        emit_json(result)
        return
    _warn(result["warnings"])
    if result["changed"]:
        click.echo(f"set the policy of network {network_name} (revision {result['revision']})")
    else:
        click.echo(
            f"network {network_name} has this policy already (revision {result['revision']}): "
            "nothing changed"
        )


@policy.command("show")
@click.argument("network_name", metavar="NETWORK")
@json_option
@at_option
@click.pass_obj
def policy_show(server: str, network_name: str, as_json: bool) -> None:
    """Print NETWORK's policy as it was written, and its revision."""
    shown = run(admin_query(server, "policy", network=network_name))
    if as_json:
        emit_json(shown)
        return
    if not shown["policy"]:
        click.echo("no policy: everyone reaches everyone")
        return
    click.echo(f"// policy of network {shown['network']}, revision {shown['revision']}")
    if shown["error"]:
        click.echo(f"// not in force as written, everything is denied: {shown['error']}")
    click.echo(shown["document"].rstrip("\n"))


@policy.command("clear")
@click.argument("network_name", metavar="NETWORK")
@json_option
@plannable
@waitable
@click.pass_obj
def policy_clear(server: str, network_name: str, as_json: bool) -> None:
    """Drop NETWORK's policy: everyone reaches everyone again."""
    result = run(admin_command(server, "policy.clear", network=network_name))
    if as_json:
        emit_json(result)
    elif result["changed"]:
        click.echo(f"cleared the policy of network {network_name}: everyone reaches everyone")
    else:
        click.echo(f"network {network_name} has no policy: nothing changed")


@policy.command("explain")
@click.argument("network_name", metavar="NETWORK")
@click.argument("source", metavar="FROM")
@click.argument("destination", metavar="TO")
@click.option("--port", default=None, help="e.g. 443/tcp, 53/udp, icmp.")
@json_option
@click.pass_obj
def policy_explain(
    server: str, network_name: str, source: str, destination: str, port: str | None, as_json: bool
) -> None:
    """May node FROM open PORT towards node TO, and by which rule? Without
    --port: what FROM may open towards TO, and by which rules."""
    answer = run(
        admin_query(
            server,
            "policy_explain",
            network=network_name,
            source=source,
            destination=destination,
            port=port,
        )
    )
    if as_json:
        emit_json(answer)
        return
    what = f"{source} -> {destination}" + (f" {port}" if port else "")
    if not answer["policy"]:
        click.echo(f"{what}: allowed ({answer['reason']})")
    elif port is not None:
        verdict = "allowed" if answer["allowed"] else "denied"
        rule = f" by {answer['rules'][0]['rule']}" if answer["rules"] else " (no rule allows it)"
        click.echo(f"{what}: {verdict}{rule}")
    elif not answer["allowed"]:
        click.echo(f"{what}: denied (no rule allows anything)")
    else:
        click.echo(f"{what}: allowed {', '.join(answer['allowed'])}")
        for rule in answer["rules"]:
            click.echo(f"  {rule['rule']}")
    if answer.get("error"):
        click.echo(f"warning: the recorded policy does not parse: {answer['error']}", err=True)


# -- names (DNS) -------------------------------------------------------------------


@cli.group()
def dns() -> None:
    """Names in a network's domain: every node is NODE.DOMAIN; add your own."""


@dns.command("add")
@click.argument("network_name", metavar="NETWORK")
@click.argument("name")
@click.option("--a", "a", multiple=True, metavar="IP", help="An IPv4 address (repeatable).")
@click.option("--aaaa", multiple=True, metavar="IP", help="An IPv6 address (repeatable).")
@click.option("--cname", default="", metavar="NAME", help="The name it is an alias of.")
@json_option
@plannable
@click.pass_obj
def dns_add(
    server: str,
    network_name: str,
    name: str,
    a: tuple[str, ...],
    aaaa: tuple[str, ...],
    cname: str,
    as_json: bool,
) -> None:
    """Add NAME (relative, `db`, or whole, `db.office.internal`) to NETWORK's domain."""
    fields = {"network": network_name, "name": name, "a": list(a), "aaaa": list(aaaa)}
    result = run(admin_command(server, "dns.add", cname=cname, **fields))
    if as_json:
        emit_json(result)
    else:
        click.echo(f"added {result['name']} -> {', '.join([*a, *aaaa]) or cname}")


@dns.command("remove")
@click.argument("network_name", metavar="NETWORK")
@click.argument("name")
@json_option
@plannable
@click.pass_obj
def dns_remove(server: str, network_name: str, name: str, as_json: bool) -> None:
    """Remove the custom record NAME from NETWORK's domain."""
    result = run(admin_command(server, "dns.remove", network=network_name, name=name))
    if as_json:
        emit_json(result)
    else:
        click.echo(f"removed {result['name']}")


@dns.command("list")
@click.argument("network_name", metavar="[NETWORK]", required=False)
@json_option
@at_option
@click.pass_obj
def dns_list(server: str, network_name: str | None, as_json: bool) -> None:
    """Every name the hosts' DNS servers answer: nodes' names and custom records."""
    rows = run(admin_query(server, "dns", network=network_name))
    if as_json:
        emit_json(rows)
        return
    table(
        [
            (
                r["name"],
                r["type"],
                r["value"],
                r["source"] + (" (shadowed by a node)" if r["shadowed"] else ""),
            )
            for r in rows
        ],
        ["NAME", "TYPE", "VALUE", "FROM"],
    )


# -- status and events -------------------------------------------------------------


@cli.command()
@json_option
@waitable_network
@click.pass_obj
def status(server: str, as_json: bool) -> None:
    """Each node: is its interface at the revision the control plane wants?
    With --wait: once every host in a network has applied its desired state."""
    wait = asked_wait()
    waited = None if wait is None else run(converge(server, login(), None, None, wait))
    rows = run(admin_query(server, "status"))
    if waited is not None:
        assert wait is not None
        ctx = click.get_current_context()
        ctx.call_on_close(lambda: click.echo(outcome(*waited, wait), err=True))
    if as_json:
        emit_json(rows)
        return
    table(
        [
            (
                r["network"],
                r["name"],
                r["address"],
                r["desired_revision"],
                r["applied_revision"],
                r["state"] if not r["error"] else f"error: {r['error']}",
                f"{sum(p['connected'] for p in r['peers'])}/{len(r['peers'])}",
            )
            for r in rows
        ],
        ["NETWORK", "NODE", "ADDRESS", "DESIRED", "APPLIED", "STATE", "PEERS UP"],
    )


@cli.group()
def admin() -> None:
    """Who may sign commands: admins, network admins, auditors."""


@admin.command("keygen")
@click.argument("path", type=click.Path(path_type=Path, dir_okay=False))
def admin_keygen(path: Path) -> None:
    """Make a new admin key in PATH (0600) and print its public key, for `admin add`."""
    from events.signing import load_or_create, public_text

    if path.exists():
        raise click.ClickException(f"{path} exists: not overwriting a key")
    click.echo(public_text(load_or_create(path)))


@admin.command("add")
@click.argument("name")
@click.option("--key", "public_key", required=True, help="Their public key (from `admin keygen`).")
@click.option(
    "--role",
    type=click.Choice(ROLES),
    default="admin",
    show_default=True,
)
@click.option(
    "--network", "networks", multiple=True, help="A network-admin's network (repeatable)."
)
@json_option
@plannable
@waitable
@click.pass_obj
def admin_add(
    server: str, name: str, public_key: str, role: str, networks: tuple[str, ...], as_json: bool
) -> None:
    """Let NAME sign commands, with ROLE."""
    result = run(
        admin_command(
            server,
            "admin.add",
            name=name,
            public_key=public_key,
            role=role,
            networks=list(networks),
        )
    )
    if as_json:
        emit_json(result)
    else:
        scope = f" of {', '.join(networks)}" if networks else ""
        click.echo(f"added {role} {name}{scope}")


@admin.command("list")
@json_option
@at_option
@click.pass_obj
def admin_list(server: str, as_json: bool) -> None:
    """Admins, their roles and keys."""
    rows = run(admin_query(server, "admins"))
    if as_json:
        emit_json(rows)
        return
    table(
        [[r["name"], r["role"], ",".join(r["networks"]) or "-", r["public_key"]] for r in rows],
        ["NAME", "ROLE", "NETWORKS", "PUBLIC KEY"],
    )


@admin.command("remove")
@click.argument("name")
@plannable
@waitable
@click.pass_obj
def admin_remove(server: str, name: str) -> None:
    """NAME may no longer sign commands (the last admin cannot be removed)."""
    run(admin_command(server, "admin.remove", name=name))
    click.echo(f"removed admin {name}")


@cli.group()
def events() -> None:
    """The event stream: the audit log."""


# -- agent -------------------------------------------------------------------------


@cli.group()
def agent() -> None:
    """The agent: the daemon that configures WireGuard on this machine."""


DEFAULT_AGENT_CONFIG = Path("/etc/netmesh/agent.toml")


def _load_config(ctx: click.Context, _param: click.Parameter, value: Path | None) -> Path | None:
    """Options from a TOML file become defaults: the command line and environment
    still win. Keys are option names (`state-dir` or `state_dir`)."""
    import tomllib

    path = value or (DEFAULT_AGENT_CONFIG if DEFAULT_AGENT_CONFIG.exists() else None)
    if path is None:
        return None
    try:
        data = tomllib.loads(path.read_text())
    except OSError as exc:
        raise click.BadParameter(f"cannot read {path}: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise click.BadParameter(f"{path} is not valid TOML: {exc}") from None
    known = {p.name for p in ctx.command.params if p.name}
    defaults = {}
    for key, item in data.items():
        name = key.replace("-", "_")
        if name == "endpoint":
            name = "endpoints"
        if name not in known or name == "config":
            raise click.BadParameter(f"{path}: unknown setting {key!r}")
        defaults[name] = item
    ctx.default_map = {**(ctx.default_map or {}), **defaults}
    return path


@agent.command("up")
@click.option(
    "--config",
    type=click.Path(path_type=Path, dir_okay=False),
    default=None,
    is_eager=True,
    expose_value=False,
    callback=_load_config,
    help=f"TOML file of option defaults [default: {DEFAULT_AGENT_CONFIG} if present].",
)
@click.option(
    "--token",
    envvar="NETMESH_TOKEN",
    default=None,
    help="Enrollment token (needed only the first time; env NETMESH_TOKEN).",
)
@click.option(
    "--server", "server", default=None, help="Control plane NATS URL [default: the token's]."
)
@click.option("--name", default=None, help="This host's name [default: hostname].")
@click.option(
    "--state-dir",
    type=click.Path(path_type=Path),
    default=Path("/var/lib/netmesh"),
    show_default=True,
    envvar="NETMESH_STATE_DIR",
)
@click.option(
    "--endpoint",
    "endpoints",
    multiple=True,
    help="Address peers reach this host at (IP or IP:PORT; repeatable).",
)
@click.option(
    "--backend",
    type=click.Choice(["auto", "kernel", "userspace"]),
    default="auto",
    show_default=True,
)
@click.option("--interface", default="netmesh0", show_default=True)
@click.option(
    "--listen-port",
    type=click.IntRange(1, 65535),
    default=None,
    help="WireGuard UDP port [default: the network's, 51820].",
)
@click.option(
    "--resync-interval",
    type=click.FloatRange(min=0.2),
    default=30.0,
    show_default=True,
    help="Seconds between full re-checks of the interface (drift repair).",
)
@click.option(
    "--rotate-key-every",
    default="never",
    show_default=True,
    help="Make a new WireGuard key when the current one is this old (e.g. 30d); peers "
    "switch to it in place.",
)
@click.option(
    "--metrics-listen",
    default=None,
    metavar="HOST:PORT",
    help="Serve Prometheus metrics on http://HOST:PORT/metrics [default: off].",
)
@click.option("--log-format", type=click.Choice(["auto", "console", "json"]), default="auto")
@click.option(
    "--log-level", type=click.Choice(["debug", "info", "warning", "error"]), default="info"
)
@click.pass_context
def agent_up(
    ctx: click.Context,
    token: str | None,
    server: str | None,
    name: str | None,
    state_dir: Path,
    endpoints: tuple[str, ...],
    backend: str,
    interface: str,
    listen_port: int | None,
    resync_interval: float,
    rotate_key_every: str,
    metrics_listen: str | None,
    log_format: str,
    log_level: str,
) -> None:
    """Enroll (once) and run the agent in the foreground."""
    from agent.daemon import AgentError, run_agent

    try:
        rotate_every = parse_duration(rotate_key_every)
    except click.BadParameter as exc:
        exc.param_hint = "--rotate-key-every"
        raise
    check_metrics_listen(metrics_listen)
    configure_logging(log_format, log_level)
    if server is None:
        # `netmesh --server URL agent up` (or NETMESH_SERVER) works too; the
        # default URL does not count: then the token says where the server is.
        server = explicit_server(ctx)
    try:
        asyncio.run(
            run_agent(
                token=token,
                server=server,
                name=name,
                state_dir=state_dir,
                endpoints=endpoints,
                backend=backend,
                interface=interface,
                listen_port=listen_port,
                resync_interval=resync_interval,
                rotate_every=rotate_every,
                metrics_listen=metrics_listen,
            )
        )
    except AgentError as exc:
        raise click.ClickException(str(exc)) from None
    except KeyboardInterrupt:
        pass


state_dir_option = click.option(
    "--state-dir",
    type=click.Path(path_type=Path),
    default=Path("/var/lib/netmesh"),
    show_default=True,
    envvar="NETMESH_STATE_DIR",
)


def _age(seconds: float | None) -> str:
    if seconds is None:
        return "never"
    if seconds < 120:
        return f"{seconds:.0f}s ago"
    if seconds < 7200:
        return f"{seconds / 60:.0f}m ago"
    return f"{seconds / 3600:.0f}h ago"


@agent.command("status")
@state_dir_option
@click.option("--interface", default=None, help="[default: the running agent's, or netmesh0]")
@json_option
def agent_status(state_dir: Path, interface: str | None, as_json: bool) -> None:
    """This machine's view: identity, agent, interface, peers (no server needed)."""
    from agent.local import local_status

    info = asyncio.run(local_status(state_dir, interface))
    if as_json:
        emit_json(info)
        return
    a, i, r = info["agent"], info["interface"], info["revision"]
    running = f"running (pid {a['pid']})" if a["running"] else "not running"
    connection = f"connected to {a['broker']}" if a["connected"] else "not connected"
    if a["connected"] and not a["subscribed"]:
        connection += ", desired state not delivered yet"
    click.echo(f"host       {info['host_id'] or '(not enrolled)'} {info['name'] or ''}".rstrip())
    click.echo(f"server     {info['server'] or '-'} ({connection})")
    click.echo(f"agent      {running}{' - error: ' + a['last_error'] if a['last_error'] else ''}")
    if i["present"]:
        click.echo(
            f"interface  {i['name']} listen {i['listen_port']} mtu {i['mtu']} "
            f"{' '.join(i['addresses'])}"
        )
    else:
        click.echo(f"interface  {i['name']} (absent)")
    click.echo(f"revision   {r['applied']} applied / {r['desired']} desired")
    if info["peers"]:
        click.echo()
        table(
            [
                (
                    p["name"],
                    p["endpoint"],
                    ",".join(p["allowed_ips"]),
                    _age(p["handshake_age"]),
                    p["rx_bytes"],
                    p["tx_bytes"],
                )
                for p in info["peers"]
            ],
            ["PEER", "ENDPOINT", "ALLOWED IPS", "HANDSHAKE", "RX", "TX"],
        )
    if info["relays"]:
        click.echo("\nrelayed pairs (datagrams forwarded as they are):")
        table(
            [
                (
                    f"{s['name'] or s['host']}" + (f" ({pair['error']})" if pair["error"] else ""),
                    s["port"],
                    s["address"] or "-",
                    s["forwarded"],
                    s["forwarded_bytes"],
                    s["dropped_unknown"] + s["dropped_junk"],
                )
                for pair in info["relays"]
                for s in pair["sides"]
            ],
            ["FROM", "PORT", "SEEN AT", "FORWARDED", "BYTES", "DROPPED"],
        )


@agent.command("down")
@state_dir_option
@click.option("--interface", default="netmesh0", show_default=True)
def agent_down(state_dir: Path, interface: str) -> None:
    """Remove the WireGuard interface (stop the agent first). Identity and key stay."""
    from agent.daemon import AgentError
    from agent.local import interface_down

    try:
        present = asyncio.run(interface_down(state_dir, interface))
    except AgentError as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(f"removed {interface}" if present else f"{interface} was not there")


@agent.command("leave")
@state_dir_option
@click.option("--network", "network_name", default=None, help="Leave only this network.")
@click.option("--interface", default="netmesh0", show_default=True)
@click.pass_context
def agent_leave(
    ctx: click.Context, state_dir: Path, network_name: str | None, interface: str
) -> None:
    """Take this host out of its networks; remove the interface if the agent is stopped."""
    from agent.daemon import AgentError
    from agent.local import interface_down, leave, running_agent_pid
    from agent.statedir import StateDir

    try:
        left = asyncio.run(leave(state_dir, explicit_server(ctx), network_name))
        click.echo(f"left {', '.join(left) if left else 'no network (was in none)'}")
        identity = StateDir(state_dir).load_identity()
        if running_agent_pid(state_dir) is None and identity is not None and not identity.networks:
            StateDir(state_dir).forget_desired()
            if asyncio.run(interface_down(state_dir, interface)):
                click.echo(f"removed {interface}")
    except AgentError as exc:
        raise click.ClickException(str(exc)) from None


@agent.command("rotate-key")
@state_dir_option
@click.pass_context
def agent_rotate_key(ctx: click.Context, state_dir: Path) -> None:
    """Make a new WireGuard key on this machine; peers switch to it in place."""
    from agent.daemon import AgentError
    from agent.local import rotate_key

    try:
        public_key = asyncio.run(rotate_key(state_dir, explicit_server(ctx)))
    except AgentError as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(f"new public key {public_key}")


# Commands kept in their own modules (they import the helpers above) attach
# themselves to the groups above, or are attached here.
from cli import clients as _clients  # noqa: E402, F401
from cli import eventlog as _eventlog  # noqa: E402, F401
from cli import hooks as _hooks  # noqa: E402, F401
from cli import relays as _relays  # noqa: E402, F401
from cli.tokens import token as _token_group  # noqa: E402

admin.add_command(_token_group)


def main(argv: Sequence[str] | None = None) -> None:
    """Entry point: every error is one line on stderr and a non-zero exit."""
    try:
        # Every option can also come from NETMESH_<COMMAND>_<OPTION>, e.g.
        # NETMESH_AGENT_UP_INTERFACE=wg1 (explicit envvars above take precedence).
        cli.main(
            args=argv, prog_name="netmesh", standalone_mode=False, auto_envvar_prefix="NETMESH"
        )
    except click.exceptions.Abort:
        click.echo("Error: aborted", err=True)
        sys.exit(130)
    except click.UsageError as exc:
        # Click would print the usage block too; one line says it all.
        hint = f" (see: {exc.ctx.command_path} --help)" if exc.ctx else ""
        click.echo(f"Error: {exc.format_message()}{hint}", err=True)
        sys.exit(exc.exit_code)
    except click.ClickException as exc:
        click.echo(f"Error: {exc.format_message()}", err=True)
        sys.exit(exc.exit_code)
    except click.exceptions.Exit as exc:
        sys.exit(exc.exit_code)


if __name__ == "__main__":  # pragma: no cover
    main()
