"""`--at SEQ|TIME`: a query answered as of that point of the log (the control
plane replays the stream up to it). The option stores the point where
`admin_query` finds it, so a command needs only the decorator."""

from __future__ import annotations

import click

from events.logfilter import BadFilter, Point, parse_point

AT_POINT = "netmesh.at"


def _at_point(ctx: click.Context, _param: click.Parameter, value: str | None) -> None:
    if value is not None:
        try:
            ctx.meta[AT_POINT] = parse_point(value)
        except BadFilter as exc:  # one line, exit 1 (not click's usage error)
            raise click.ClickException(str(exc)) from None


at_option = click.option(
    "--at",
    metavar="SEQ|TIME",
    expose_value=False,
    callback=_at_point,
    help="As of that event (its sequence) or time (e.g. 2026-12-02T07:00:00Z).",
)


def asked_point() -> Point | None:
    """The --at point of the command being run, if it was given one."""
    point = click.get_current_context().meta.get(AT_POINT)
    return point if isinstance(point, Point) else None
