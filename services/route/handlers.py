"""route's projection: the selected routes (what the kernel gets), the links
Babel runs on, our own price and seqno, and the knob.

Pure functions of (state, event). The Babel speaker's soft state (Hello
histories, every neighbor's routes) is not here: it is relearned from the
neighbors within seconds, as RFC 8966 intends; what must survive a restart
(the seqno, the installed routes, the knob) is.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from typing import Any, Final

from google.protobuf.message import Message
from mesh.link.v1 import link_pb2
from mesh.meter.v1 import meter_pb2
from mesh.route.v1 import route_pb2
from mesh.verify.v1 import verify_pb2

from services.common.envelope import Event, MalformedEvent
from services.common.money import MoneyError, amount
from services.common.runtime import Handler, Outgoing

from .babel.codec import INFINITY

MAX_WEIGHT = 1000


def prefix_token(prefix: str) -> str:
    """A CIDR as a subject token: 10.0.3.0/24 -> 10-0-3-0_24."""
    return prefix.replace(".", "-").replace(":", "-").replace("/", "_")


def router_id_of(identity_key: bytes) -> bytes:
    """A stable Babel router-id from the identity key (never all 0s or 1s)."""
    return hashlib.sha256(b"mesh-babel-router-id" + identity_key).digest()[:8]


def on_link_up(state: route_pb2.RouteState, event: Event[link_pb2.LinkUp]) -> list[Outgoing]:
    up = event.payload
    state.neighbors[up.neighbor_id].CopyFrom(route_pb2.RouteState.Neighbor(
        tunnel_interface=up.tunnel_interface, address=up.tunnel_peer_address, up=True,
        local_address=up.tunnel_local_address, router_id=router_id_of(up.identity_key)))
    return []


def on_link_down(state: route_pb2.RouteState, event: Event[link_pb2.LinkDown]) -> list[Outgoing]:
    neighbor = state.neighbors.get(event.payload.neighbor_id)
    if neighbor is not None and neighbor.tunnel_interface == event.payload.tunnel_interface:
        neighbor.up = False
    return []


def on_route_changed(
    state: route_pb2.RouteState, event: Event[route_pb2.RouteChanged]
) -> list[Outgoing]:
    route = event.payload
    if route.change == route_pb2.ROUTE_CHANGE_RETRACTED:
        state.routes.pop(route.prefix, None)
        return []
    if route.metric >= INFINITY:
        raise MalformedEvent(f"route to {route.prefix}: a selected route of infinite metric")
    state.routes[route.prefix].CopyFrom(route)
    return []


def on_seqno_increased(
    state: route_pb2.RouteState, event: Event[route_pb2.SeqnoIncreased]
) -> list[Outgoing]:
    state.router_id = event.payload.router_id
    state.seqno = event.payload.seqno
    return []


def on_tradeoff_changed(
    state: route_pb2.RouteState, event: Event[route_pb2.TradeoffChanged]
) -> list[Outgoing]:
    weight = event.payload.price_weight_permille
    if weight > MAX_WEIGHT:
        raise MalformedEvent(f"price weight {weight} permille is over {MAX_WEIGHT}")
    state.price_weight_permille = weight
    state.tradeoff_set = True
    return []


def on_price_set(state: route_pb2.RouteState, event: Event[meter_pb2.PriceSet]) -> list[Outgoing]:
    try:
        amount(event.payload.price)
    except MoneyError as err:
        raise MalformedEvent(f"own price: {err}") from None
    state.price.price.CopyFrom(event.payload.price)
    return []


def on_penalized(
    state: route_pb2.RouteState, event: Event[verify_pb2.NeighborPenalized]
) -> list[Outgoing]:
    penalized = event.payload
    state.penalties[penalized.neighbor_id].CopyFrom(route_pb2.RouteState.Penalty(
        metric=penalized.penalty_metric,
        exclude=penalized.mode == verify_pb2.PENALTY_MODE_EXCLUDE,
        expires_at=penalized.expires_at))
    return []


def on_pardoned(
    state: route_pb2.RouteState, event: Event[verify_pb2.NeighborPardoned]
) -> list[Outgoing]:
    state.penalties.pop(event.payload.neighbor_id, None)
    return []


def summarize(state: route_pb2.RouteState) -> Mapping[str, Any]:
    return {
        "routes": len(state.routes),
        "neighbors": ",".join(sorted(n for n, v in state.neighbors.items() if v.up)) or "-",
        "seqno": state.seqno,
        "price_weight_permille": state.price_weight_permille,
        "penalized": ",".join(sorted(state.penalties)) or "-",
    }


HANDLERS: Final[Mapping[type[Message], Handler[Any]]] = {
    link_pb2.LinkUp: on_link_up,
    link_pb2.LinkDown: on_link_down,
    route_pb2.RouteChanged: on_route_changed,
    route_pb2.SeqnoIncreased: on_seqno_increased,
    route_pb2.TradeoffChanged: on_tradeoff_changed,
    meter_pb2.PriceSet: on_price_set,
    verify_pb2.NeighborPenalized: on_penalized,
    verify_pb2.NeighborPardoned: on_pardoned,
}
