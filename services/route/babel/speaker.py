"""A Babel speaker without I/O: datagrams and a clock in, datagrams and route
selections out. The route service gives it sockets and the kernel; tests give
it each other.

Timers follow babeld's defaults relative to the Hello interval: an IHU with
every Hello, a full Update every 4 Hello intervals, routes expiring after 3.5
Update intervals. Triggered Updates go out on the next tick after a
selection changes; a lost route with only unfeasible alternatives gets a
Seqno Request (RFC 8966 3.8.2.1).
"""

from __future__ import annotations

import dataclasses
import random
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from ipaddress import IPv6Address, ip_address

from .codec import (
    INFINITY,
    MULTICAST_GROUP,
    Ack,
    AckRequest,
    BabelRejected,
    Hello,
    Ihu,
    Message,
    Network,
    RouteRequest,
    SeqnoRequest,
    Update,
    WildcardRetraction,
    decode,
    encode,
)
from .neighbors import Neighbor, seqno_after
from .table import RouteTable, Selected

UPDATES_PER_HELLO = 4
# A metric change smaller than this is not worth a triggered Update.
TRIGGER_METRIC_CHANGE = 32
REQUEST_HOLD_SECONDS = 2.0


@dataclass(frozen=True)
class InterfaceSpec:
    name: str
    # Where our packets go: the peer's link-local address on a tunnel, the
    # Babel multicast group on a shared link.
    destination: str = MULTICAST_GROUP
    rule: str = "wired"
    local_address: str = ""  # our link-local address there, if known


@dataclass(frozen=True)
class Datagram:
    interface: str
    destination: str
    data: bytes
    source: str = ""  # the interface's address to send from, if one is set


@dataclass
class _Interface:
    spec: InterfaceSpec
    hello_seqno: int = field(default_factory=lambda: random.randrange(0x10000))
    next_hello: float = 0.0
    next_update: float = 0.0
    pending: list[Message] = field(default_factory=list)


@dataclass
class Stats:
    packets: int = 0
    rejected: Counter[str] = field(default_factory=Counter)  # whole datagrams
    dropped: Counter[str] = field(default_factory=Counter)  # single TLVs
    updates: int = 0
    seqno_requests: int = 0  # sent by us for routes we lack or prefer


class Speaker:
    def __init__(self, router_id: bytes, seqno: int, *, hello_interval: float = 4.0,
                 own_price: int = 0, default_path_price: int = 0, price_weight: int = 0
                 ) -> None:
        self.router_id = router_id
        self.seqno = seqno & 0xFFFF
        self.hello_interval = hello_interval
        self.update_interval = UPDATES_PER_HELLO * hello_interval
        self.own_price = own_price
        self.price_weight = price_weight
        self.table = RouteTable(default_path_price)
        self.interfaces: dict[str, _Interface] = {}
        self.neighbors: dict[str, Neighbor] = {}  # by "interface/address"
        self.own: set[Network] = set()
        self.penalties: dict[str, int | None] = {}  # by neighbor key
        self.origins: dict[str, bytes] = {}  # neighbors' router-ids, by key
        self.selected: dict[Network, Selected] = {}
        self.stats = Stats()
        self.outbox: list[Datagram] = []
        self.triggered: set[Network] = set()
        self.requested: dict[tuple[Network, bytes], float] = {}
        # A test-only liar: every route it forwards advertised as metric 0.
        self.overclaim = False
        # Selection runs over the prefixes whose inputs changed, not the table.
        self.dirty: set[Network] = set()
        self.all_dirty = True
        self.last_costs: dict[str, int] = {}
        self.next_expiry = 0.0

    # -- configuration ----------------------------------------------------------------

    def set_interfaces(self, specs: Iterable[InterfaceSpec], now: float) -> None:
        wanted = {spec.name: spec for spec in specs}
        for name in set(self.interfaces) - set(wanted):
            del self.interfaces[name]
            for key in [k for k, n in self.neighbors.items() if n.interface == name]:
                self._forget(key)
        for name, spec in wanted.items():
            current = self.interfaces.get(name)
            if current is None or current.spec != spec:
                self.interfaces[name] = interface = _Interface(spec, next_hello=now)
                # Ask for everything at once rather than wait a full Update interval.
                interface.pending.append(RouteRequest(None))
                interface.next_update = now

    def originate(self, prefixes: Iterable[Network]) -> None:
        """Announce prefixes as ours, at metric 0."""
        prefixes = set(prefixes)
        if prefixes != self.own:
            self.triggered |= prefixes ^ self.own
            self.dirty |= prefixes ^ self.own
            # A prefix we now originate is no longer routed through a
            # neighbor: the route learned for it is dropped.
            for prefix in prefixes - self.own:
                self.selected.pop(prefix, None)
            self.own = prefixes

    def set_price(self, own_price: int, default_path_price: int) -> None:
        if (own_price, default_path_price) != (self.own_price, self.table.default_path_price):
            self.own_price, self.table.default_path_price = own_price, default_path_price
            self.triggered |= self.own | set(self.selected)

    def set_weight(self, price_weight: int) -> None:
        if price_weight != self.price_weight:
            self.price_weight = price_weight
            self.all_dirty = True

    def set_penalties(self, penalties: dict[str, int | None], origins: dict[str, bytes]) -> None:
        """verify's penalties by neighbor (None excludes), and the neighbors'
        router-ids, whose own routes a penalty leaves alone."""
        if penalties != self.penalties or origins != self.origins:
            self.penalties, self.origins = dict(penalties), dict(origins)
            self.all_dirty = True

    # -- receiving ----------------------------------------------------------------------

    def receive(self, interface: str, source: str, data: bytes, now: float) -> None:
        if interface not in self.interfaces:
            return
        self.stats.packets += 1
        try:
            packet = decode(data, IPv6Address(source))
        except BabelRejected as err:
            self.stats.rejected[err.reason] += 1
            return
        self.stats.dropped.update(packet.dropped)
        key = f"{interface}/{source}"
        # Any packet makes its sender a neighbor (as babeld does), so Updates
        # that come before its first Hello is counted are kept, not lost until
        # the next full dump.
        self._neighbor(key, interface, source)
        for message in packet.messages:
            self._handle(key, interface, source, message, now)

    def _neighbor(self, key: str, interface: str, source: str) -> Neighbor:
        neighbor = self.neighbors.get(key)
        if neighbor is None:
            rule = self.interfaces[interface].spec.rule
            neighbor = self.neighbors[key] = Neighbor(interface, source, rule)
            # A new neighbor gets a Hello (with its IHU) and everything we know
            # without waiting: it counts our Hellos sooner, and so do we its.
            self.interfaces[interface].next_update = 0.0
            self.interfaces[interface].next_hello = 0.0
        return neighbor

    def _handle(self, key: str, interface: str, source: str, message: Message,
                now: float) -> None:
        match message:
            case Hello(seqno=seqno, interval=interval):
                self._neighbor(key, interface, source).on_hello(seqno, interval, now)
            case Ihu(rxcost=rxcost, interval=interval, address=address):
                if address is None or self._is_ours(interface, str(address)):
                    neighbor = self.neighbors.get(key)
                    if neighbor is not None:
                        neighbor.on_ihu(rxcost, interval, now)
            case Update():
                if message.router_id != self.router_id:
                    self.stats.updates += 1
                    self.table.update(key, message, now, self.selected.get(message.prefix))
                    self.dirty.add(message.prefix)
            case WildcardRetraction():
                self.table.retract_all(key)
                self.all_dirty = True
            case RouteRequest(prefix=prefix):
                self._queue(interface, self._updates(None if prefix is None else [prefix],
                                                     interface))
            case SeqnoRequest():
                self._seqno_request(key, interface, message, now)
            case AckRequest(opaque=opaque):
                self._queue(interface, [Ack(opaque)])
            case Ack():
                pass

    def _is_ours(self, interface: str, address: str) -> bool:
        """An IHU names the neighbor it is about: ours is the interface's
        link-local address, when the service told us which it is."""
        local = self.interfaces[interface].spec.local_address
        return address == local if local else ip_address(address).is_link_local

    def _seqno_request(self, key: str, interface: str, request: SeqnoRequest,
                       now: float) -> None:
        prefix = request.prefix
        if prefix in self.own and request.router_id == self.router_id:
            if seqno_after(request.seqno, self.seqno):
                # Straight to the seqno asked for: +1 at a time (babeld) takes
                # one round trip per step after a restart without our seqno.
                self.seqno = request.seqno
            self.triggered.add(prefix)
            return
        selected = self.selected.get(prefix)
        if selected is None:
            return
        if selected.router_id != request.router_id or not seqno_after(request.seqno,
                                                                      selected.seqno):
            self.triggered.add(prefix)  # what we have satisfies it
            return
        if request.hop_count >= 2 and selected.neighbor != key:
            self._forward_request(selected, SeqnoRequest(prefix, request.seqno,
                                                         request.hop_count - 1,
                                                         request.router_id), now)

    def _forward_request(self, selected: Selected, request: SeqnoRequest, now: float) -> None:
        hold = (request.prefix, request.router_id)
        if self.requested.get(hold, 0.0) > now:
            return
        self.requested[hold] = now + REQUEST_HOLD_SECONDS
        neighbor = self.neighbors.get(selected.neighbor)
        if neighbor is not None:
            self._queue(neighbor.interface, [request])

    def _forget(self, key: str) -> None:
        self.neighbors.pop(key, None)
        self.table.retract_all(key)
        self.all_dirty = True

    # -- sending ------------------------------------------------------------------------

    def _queue(self, interface: str, messages: Iterable[Message]) -> None:
        if interface in self.interfaces:
            self.interfaces[interface].pending.extend(messages)

    def _own_update(self, prefix: Network) -> Update:
        return Update(prefix, self.router_id, self.seqno, 0,
                      int(self.update_interval * 100),
                      price=self.own_price, v4_via_v6=prefix.version == 4)

    def _updates(self, prefixes: Iterable[Network] | None, interface: str | None = None
                 ) -> list[Message]:
        """Updates for prefixes (all we know if None); a route learned on
        `interface` goes back on it as a retraction (split horizon with
        poison reverse: a neighbor that heard of a route of ours before we
        chose one through it must not keep it, and steer traffic, and
        verify's probes, into a bounce priced as the route we gave up)."""
        chosen = set(self.own) | set(self.selected) if prefixes is None else set(prefixes)
        interval = int(self.update_interval * 100)
        messages: list[Message] = []
        for prefix in sorted(chosen, key=lambda p: (p.version, p)):
            if prefix in self.own:
                messages.append(self._own_update(prefix))
                continue
            route = self.selected.get(prefix)
            # IPv4 prefixes go with IPv6 next hops (RFC 9229): links have no IPv4.
            v4 = prefix.version == 4
            learned_on = self.neighbors.get(route.neighbor) if route is not None else None
            if route is None or (learned_on is not None and learned_on.interface == interface):
                messages.append(Update(prefix, self.router_id, self.seqno, INFINITY, interval,
                                       v4_via_v6=v4))
                continue
            messages.append(Update(prefix, route.router_id, route.seqno, route.metric, interval,
                                   price=self.own_price + route.path_price, v4_via_v6=v4))
        return messages

    def tick(self, now: float) -> None:
        """Run the timers: Hellos, IHUs, Updates, expiry, selection."""
        for neighbor in list(self.neighbors.values()):
            neighbor.tick(now)
        for key in [k for k, n in self.neighbors.items() if n.silent]:
            self._forget(key)
        if now >= self.next_expiry:
            self.next_expiry = now + 1.0
            self.dirty |= self.table.expire(now)
            self.requested = {k: until for k, until in self.requested.items() if until > now}
        self._select(now)
        for name, interface in self.interfaces.items():
            if now >= interface.next_hello:
                interface.next_hello = now + self.hello_interval * random.uniform(0.9, 1.0)
                interface.hello_seqno = (interface.hello_seqno + 1) & 0xFFFF
                hello: list[Message] = [Hello(interface.hello_seqno,
                                              int(self.hello_interval * 100))]
                hello += [Ihu(n.rxcost(), int(self.hello_interval * 100), ip_address(n.address))
                          for n in self.neighbors.values() if n.interface == name]
                interface.pending[:0] = hello
            if now >= interface.next_update:
                interface.next_update = now + self.update_interval
                interface.pending.extend(self._updates(None, name))
            elif self.triggered:
                interface.pending.extend(self._updates(self.triggered, name))
        self.triggered.clear()
        self._flush(now)

    def _flush(self, now: float) -> None:
        for name, interface in self.interfaces.items():
            if not interface.pending:
                continue
            for message in interface.pending:
                if isinstance(message, Update):
                    self.table.advertised(message.prefix, message.router_id, message.seqno,
                                          message.metric, now)
            for data in encode(self._lie(m) for m in interface.pending):
                self.outbox.append(Datagram(name, interface.spec.destination, data,
                                            interface.spec.local_address))
            interface.pending.clear()

    def _lie(self, message: Message) -> Message:
        """The test-only liar lies on the wire alone: its feasibility
        distances stay true, so its own routing keeps working."""
        if (self.overclaim and isinstance(message, Update) and message.metric < INFINITY
                and message.router_id != self.router_id):
            return dataclasses.replace(message, metric=0)
        return message

    def take_outbox(self) -> list[Datagram]:
        out, self.outbox = self.outbox, []
        return out

    # -- selection ----------------------------------------------------------------------

    def costs(self) -> dict[str, int]:
        return {key: n.cost() for key, n in self.neighbors.items()}

    def _select(self, now: float) -> None:
        costs = self.costs()
        if costs != self.last_costs:
            self.last_costs = costs
            self.all_dirty = True
        prefixes = (set(self.table.routes) | set(self.selected)) if self.all_dirty else self.dirty
        self.all_dirty, self.dirty = False, set()
        for prefix in prefixes - self.own:
            old = self.selected.get(prefix)
            new, preferred = self.table.select(prefix, costs, self.penalties, self.price_weight,
                                               self.origins)
            if preferred is not None and (new is None or preferred.neighbor != new.neighbor):
                # Starving, or kept from the route we prefer by feasibility:
                # ask, and look again next time.
                self._request_newer(prefix, preferred.router_id, now)
                self.dirty.add(prefix)
                if old is not None and new is not None and self._awaiting(new, now):
                    # A fresh seqno came first another way: advertising it now
                    # would make the preferred route unfeasible again when its
                    # copy arrives. Keep the old route for the request's hold.
                    continue
            if new is None:
                if old is not None:
                    del self.selected[prefix]
                    self.triggered.add(prefix)
                continue
            self.selected[prefix] = new
            if old is None or _differs(old, new):
                self.triggered.add(prefix)

    def _awaiting(self, route: Selected, now: float) -> bool:
        """We asked for a newer seqno of route's source, and route has one we
        have not advertised yet."""
        if self.requested.get((route.prefix, route.router_id), 0.0) <= now:
            return False
        advertised = self.table.source_seqno(route.prefix, route.router_id)
        return advertised is None or seqno_after(route.seqno, advertised)

    def _request_newer(self, prefix: Network, router_id: bytes, now: float) -> None:
        hold = (prefix, router_id)
        if self.requested.get(hold, 0.0) > now:
            return
        self.requested[hold] = now + REQUEST_HOLD_SECONDS
        seqno = self.table.source_seqno(prefix, router_id)
        request = SeqnoRequest(prefix, ((seqno or 0) + 1) & 0xFFFF, 64, router_id)
        self.stats.seqno_requests += 1
        for key in self.table.routes.get(prefix, {}):
            if key in self.neighbors:
                self._queue(self.neighbors[key].interface, [request])

    def neighbor_of(self, interface: str) -> str | None:
        return next((k for k, n in self.neighbors.items() if n.interface == interface), None)


def _differs(old: Selected, new: Selected) -> bool:
    return (old.neighbor != new.neighbor or old.router_id != new.router_id
            or old.seqno != new.seqno or old.path_price != new.path_price
            or abs(old.metric - new.metric) >= TRIGGER_METRIC_CHANGE
            or (old.metric >= INFINITY) != (new.metric >= INFINITY))
