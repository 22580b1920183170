"""The Babel route table, the source table (feasibility distances), and route
selection with a price (RFC 8966 3.5-3.7). Feasibility compares the metric a
neighbor advertised with the distance we advertised, as babeld does.

Feasibility stays on the metric: only feasible routes are candidates, so any
choice among them is loop-free. Among feasible routes the operator's knob,
`price_weight` in permille, ranks by a blend of metric and price, each
relative to the largest among the candidates:

    score = (1000 - w) * metric / max_metric + w * price / max_price

with the price term 0 when every candidate is free. w = 0 is Babel's own
choice, w = 1000 the cheapest route; ties go to the lower metric, then the
lower price, then the neighbor's name, so the ranking is total.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from fractions import Fraction

from .codec import INFINITY, Address, Network, Update
from .neighbors import seqno_after

SOURCE_GC_SECONDS = 180.0
MAX_WEIGHT = 1000


@dataclass
class Route:
    prefix: Network
    neighbor: str
    router_id: bytes
    seqno: int
    advertised_metric: int
    price: int | None  # the path price the neighbor advertised; None: no sub-TLV
    next_hop: Address | None
    expires: float


@dataclass
class Source:
    seqno: int
    metric: int
    used: float  # last time an Update of ours used it, for garbage collection


@dataclass(frozen=True)
class Selected:
    prefix: Network
    neighbor: str
    router_id: bytes
    seqno: int
    metric: int  # advertised metric + link cost, what we advertise onward
    advertised_metric: int
    penalty: int
    path_price: int
    price_defaulted: bool
    next_hop: Address | None


def add_metric(a: int, b: int) -> int:
    return min(INFINITY, a + b)


class RouteTable:
    def __init__(self, default_path_price: int) -> None:
        self.default_path_price = default_path_price
        self.routes: dict[Network, dict[str, Route]] = {}
        self.sources: dict[tuple[Network, bytes], Source] = {}

    # -- feasibility ---------------------------------------------------------------

    def feasible(self, prefix: Network, router_id: bytes, seqno: int, metric: int) -> bool:
        """RFC 8966 3.5.1: newer seqno, or the same one with a smaller metric."""
        if metric >= INFINITY:
            return True
        source = self.sources.get((prefix, router_id))
        if source is None:
            return True
        return seqno_after(seqno, source.seqno) or (seqno == source.seqno
                                                    and metric < source.metric)

    def advertised(self, prefix: Network, router_id: bytes, seqno: int, metric: int,
                   now: float) -> None:
        """We sent this Update: the feasibility distance can only improve."""
        if metric >= INFINITY:
            return
        key = (prefix, router_id)
        source = self.sources.get(key)
        if source is None or seqno_after(seqno, source.seqno) or (
                seqno == source.seqno and metric < source.metric):
            self.sources[key] = Source(seqno, metric, now)
        else:
            source.used = now

    def source_seqno(self, prefix: Network, router_id: bytes) -> int | None:
        source = self.sources.get((prefix, router_id))
        return None if source is None else source.seqno

    # -- updates -------------------------------------------------------------------

    def update(self, neighbor: str, update: Update, now: float, selected: Selected | None
               ) -> bool:
        """Apply one received Update (RFC 8966 3.5.4); False if it was ignored."""
        routes = self.routes.setdefault(update.prefix, {})
        entry = routes.get(neighbor)
        feasible = self.feasible(update.prefix, update.router_id, update.seqno, update.metric)
        if entry is None:
            # Unfeasible routes are kept (RFC 8966 3.5.4 allows either): one
            # we would prefer is worth a seqno request.
            if update.metric >= INFINITY:
                if not routes:
                    del self.routes[update.prefix]
                return False
            entry = routes[neighbor] = Route(update.prefix, neighbor, update.router_id,
                                             update.seqno, update.metric, update.price,
                                             update.next_hop, 0.0)
        elif (not feasible and selected is not None and selected.neighbor == neighbor
              and update.router_id == entry.router_id):
            return False  # would make our selected route unfeasible: keep the old one
        entry.router_id, entry.seqno = update.router_id, update.seqno
        entry.advertised_metric, entry.price = update.metric, update.price
        entry.next_hop = update.next_hop
        if update.metric < INFINITY:
            # 3.5 intervals, so two lost periodic Updates do not lose the route.
            entry.expires = now + 3.5 * update.interval / 100 if update.interval else float("inf")
        return True

    def retract_all(self, neighbor: str) -> None:
        """A wildcard retraction, or the neighbor is gone."""
        for prefix in list(self.routes):
            self.routes[prefix].pop(neighbor, None)
            if not self.routes[prefix]:
                del self.routes[prefix]

    def expire(self, now: float) -> set[Network]:
        """Retract routes not refreshed in time, drop old retractions and
        unused sources; the prefixes whose routes changed."""
        changed = set()
        for prefix in list(self.routes):
            routes = self.routes[prefix]
            for neighbor in [n for n, r in routes.items() if r.expires <= now]:
                changed.add(prefix)
                if routes[neighbor].advertised_metric < INFINITY:
                    # Retracted first, removed a little later, like an explicit retraction.
                    routes[neighbor].advertised_metric = INFINITY
                    routes[neighbor].expires = now + 60.0
                else:
                    del routes[neighbor]
            if not routes:
                del self.routes[prefix]
        for key in [k for k, s in self.sources.items() if now - s.used > SOURCE_GC_SECONDS]:
            del self.sources[key]
        return changed

    # -- selection -----------------------------------------------------------------

    def candidates(self, prefix: Network, costs: dict[str, int],
                   penalties: dict[str, int | None], feasible_only: bool = True,
                   origins: Mapping[str, bytes] | None = None) -> list[Selected]:
        """Every feasible, reachable route to prefix through a neighbor with a
        finite link cost, its penalty applied (None excludes the neighbor),
        but to those it originates (origins: its router-id, by neighbor)."""
        found = []
        for route in self.routes.get(prefix, {}).values():
            cost = costs.get(route.neighbor, INFINITY)
            penalty = penalties.get(route.neighbor, 0)
            if origins and origins.get(route.neighbor) == route.router_id:
                # A route to the penalized neighbor itself: one link, whose
                # cost our own Hellos measure, whatever it claims elsewhere.
                penalty = 0
            metric = add_metric(route.advertised_metric, cost)
            if penalty is None or metric >= INFINITY or (feasible_only and not self.feasible(
                    prefix, route.router_id, route.seqno, route.advertised_metric)):
                continue
            price = self.default_path_price if route.price is None else route.price
            found.append(Selected(prefix, route.neighbor, route.router_id, route.seqno, metric,
                                  route.advertised_metric, penalty, price,
                                  route.price is None, route.next_hop))
        return found

    def select(self, prefix: Network, costs: dict[str, int],
               penalties: dict[str, int | None], weight: int,
               origins: Mapping[str, bytes] | None = None
               ) -> tuple[Selected | None, Selected | None]:
        """The best feasible route, and the best route were every route
        feasible: when they differ, a newer seqno from the source would let us
        take the one we prefer (RFC 8966 3.8.2.2)."""
        return (best(self.candidates(prefix, costs, penalties, origins=origins), weight),
                best(self.candidates(prefix, costs, penalties, feasible_only=False,
                                     origins=origins), weight))


def score(route: Selected, weight: int, max_metric: int, max_price: int
          ) -> tuple[Fraction, int, int, str]:
    metric = route.metric + route.penalty
    blend = Fraction((MAX_WEIGHT - weight) * metric, max(max_metric, 1))
    if max_price:
        blend += Fraction(weight * route.path_price, max_price)
    return blend, metric, route.path_price, route.neighbor


def best(candidates: list[Selected], weight: int) -> Selected | None:
    if not candidates:
        return None
    max_metric = max(c.metric + c.penalty for c in candidates)
    max_price = max(c.path_price for c in candidates)
    return min(candidates, key=lambda c: score(c, weight, max_metric, max_price))
