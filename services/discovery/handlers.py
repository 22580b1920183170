"""discovery's projection: the neighbor table as its own events left it."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Final

from google.protobuf.message import Message
from mesh.discovery.v1 import discovery_pb2

from services.common.envelope import Event
from services.common.runtime import Handler, Outgoing

from .table import entry_key


def on_seen(
    state: discovery_pb2.DiscoveryState, event: Event[discovery_pb2.NeighborSeen]
) -> list[Outgoing]:
    seen = event.payload
    entry = state.neighbors[entry_key(seen.neighbor_id, seen.interface_name)]
    if not entry.HasField("first_seen_at"):
        entry.first_seen_at.CopyFrom(event.occurred_at)
    entry.seen.CopyFrom(seen)
    entry.updated_at.CopyFrom(event.occurred_at)
    return []


def on_lost(
    state: discovery_pb2.DiscoveryState, event: Event[discovery_pb2.NeighborLost]
) -> list[Outgoing]:
    lost = event.payload
    key = entry_key(lost.neighbor_id, lost.interface_name)
    if key in state.neighbors:
        del state.neighbors[key]
        state.neighbors_lost += 1
    return []


def summarize(state: discovery_pb2.DiscoveryState) -> Mapping[str, Any]:
    return {
        "neighbors": ",".join(sorted(state.neighbors)) or "-",
        "lost": state.neighbors_lost,
    }


HANDLERS: Final[Mapping[type[Message], Handler[Any]]] = {
    discovery_pb2.NeighborSeen: on_seen,
    discovery_pb2.NeighborLost: on_lost,
}
