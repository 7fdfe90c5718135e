"""What every section of the desired state provides (see `__init__`)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar, Protocol

import msgspec

from events.model import Event
from projections.topology import Topology


class Reread(msgspec.Struct, frozen=True):
    """Viewers that must re-read `keys` of `section`: the `hosts` named and
    every member of the `networks` named. `owner`, for network rereads: the
    host whose own entry these keys are (a host is not its own peer), which
    does not re-read them unless another reread of the batch names them for
    someone else. A Struct: a replay makes one or two per event, and a Struct
    is ten times cheaper to make than a NamedTuple with keywords."""

    section: str
    keys: frozenset[str]
    hosts: frozenset[str] = frozenset()
    networks: frozenset[str] = frozenset()
    owner: str = ""


class SectionRule(Protocol):
    name: ClassVar[str]
    # The event types whose rereads this section has a rule for.
    reacts_to: ClassVar[tuple[type[Event], ...]]

    def __init__(self, topology: Topology) -> None: ...

    def entries(self, host_id: str) -> dict[str, Any]:
        """The whole section as `host_id` sees it, sorted by key (a builder
        may cache within its batch of events)."""
        ...

    def entry(self, host_id: str, key: str) -> Any | None:
        """Entry `key` as `host_id` sees it; None when it has none."""
        ...

    @staticmethod
    def rereads(topology: Topology, event: Event) -> Sequence[Reread]:
        """Whose entries `event` changed (the topology already includes it)."""
        ...
