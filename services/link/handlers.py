"""link's projection: the neighbors it may link with and the links it has.

Pure functions of (state, event). A neighbor discovery has lost takes its link
down here, as a decision, so that a replay decides the same."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Final

from google.protobuf.message import Message
from mesh.discovery.v1 import discovery_pb2
from mesh.link.v1 import link_pb2

from services.common.envelope import Event
from services.common.runtime import Handler, Outgoing


def on_neighbor_seen(
    state: link_pb2.LinkState, event: Event[discovery_pb2.NeighborSeen]
) -> list[Outgoing]:
    state.neighbors[event.payload.neighbor_id].CopyFrom(event.payload)
    return []


def on_neighbor_lost(
    state: link_pb2.LinkState, event: Event[discovery_pb2.NeighborLost]
) -> list[Outgoing]:
    lost = event.payload
    known = state.neighbors.get(lost.neighbor_id)
    if known is None or known.interface_name != lost.interface_name:
        return []  # still heard on the interface its link uses
    del state.neighbors[lost.neighbor_id]
    link = state.links.get(lost.neighbor_id)
    if link is None or link.status != link_pb2.LINK_STATUS_UP:
        return []
    down = link_pb2.LinkDown(
        neighbor_id=lost.neighbor_id, tunnel_interface=link.up.tunnel_interface,
        reason=link_pb2.LINK_DOWN_REASON_NEIGHBOR_LOST,
        detail=f"no hello on {lost.interface_name}",
    )
    return [Outgoing("down", lost.neighbor_id, down)]


def on_link_up(state: link_pb2.LinkState, event: Event[link_pb2.LinkUp]) -> list[Outgoing]:
    link = state.links[event.payload.neighbor_id]
    link.up.CopyFrom(event.payload)
    link.status = link_pb2.LINK_STATUS_UP
    link.changed_at.CopyFrom(event.occurred_at)
    return []


def on_link_down(state: link_pb2.LinkState, event: Event[link_pb2.LinkDown]) -> list[Outgoing]:
    link = state.links.get(event.payload.neighbor_id)
    if link is None or link.status != link_pb2.LINK_STATUS_UP:
        return []
    if link.up.tunnel_interface != event.payload.tunnel_interface:
        return []  # about a tunnel that was replaced since
    link.status = link_pb2.LINK_STATUS_DOWN
    link.last_down_reason = event.payload.reason
    link.downs += 1
    link.changed_at.CopyFrom(event.occurred_at)
    return []


def on_link_rejected(
    state: link_pb2.LinkState, event: Event[link_pb2.LinkRejected]
) -> list[Outgoing]:
    reason = link_pb2.LinkRejectReason.Name(event.payload.reason)
    state.rejections[reason] += 1 + event.payload.suppressed
    return []


def links_up(state: link_pb2.LinkState) -> dict[str, link_pb2.LinkUp]:
    return {n: link.up for n, link in state.links.items()
            if link.status == link_pb2.LINK_STATUS_UP}


def summarize(state: link_pb2.LinkState) -> Mapping[str, Any]:
    up = links_up(state)
    return {
        "up": ",".join(sorted(up)) or "-",
        "down": ",".join(sorted(set(state.links) - set(up))) or "-",
        "heard": len(state.neighbors),
        "rejected": sum(state.rejections.values()),
    }


HANDLERS: Final[Mapping[type[Message], Handler[Any]]] = {
    discovery_pb2.NeighborSeen: on_neighbor_seen,
    discovery_pb2.NeighborLost: on_neighbor_lost,
    link_pb2.LinkUp: on_link_up,
    link_pb2.LinkDown: on_link_down,
    link_pb2.LinkRejected: on_link_rejected,
}
