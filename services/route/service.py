"""route's definition, settings, and its loop: a Babel speaker on each link's
tunnel (and on raw interfaces when configured), selections published as
RouteChanged, the kernel's routes reconciled with them.

Order of effects: a seqno bump is stored (SeqnoIncreased) before any Update
carrying it leaves, so a restart never goes back on a seqno; a route reaches
the kernel only after its RouteChanged is stored.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import struct
import time
from dataclasses import dataclass, field
from typing import Any

import grpc
from mesh.route.v1 import control_pb2, control_pb2_grpc, route_pb2

from services.common.config import ConfigError
from services.common.identity import Identity
from services.common.inspect import Control
from services.common.interfaces import link_local_address
from services.common.logs import kv
from services.common.money import amount, money
from services.common.netlink import NetlinkThread
from services.common.runtime import Outgoing, ServiceDefinition, ServiceRuntime
from services.meter.service import MeterSettings

from .babel.codec import MULTICAST_GROUP, PORT, network
from .babel.speaker import Datagram, InterfaceSpec, Speaker
from .babel.table import Selected
from .handlers import HANDLERS, MAX_WEIGHT, prefix_token, router_id_of, summarize
from .kernel import KernelRoute, KernelRoutes

log = logging.getLogger("route")

PKTINFO = struct.Struct("16sI")  # struct in6_pktinfo
TICK_SECONDS = 0.1
LOOPBACK_REFRESH_SECONDS = 5.0
# A metric change smaller than this is not worth a RouteChanged.
METRIC_HYSTERESIS = 16


@dataclass(frozen=True)
class RouteSettings:
    hello_interval: float = field(default=4.0, metadata={
        "help": "seconds between Babel Hellos (babeld's default); Updates every 4 of them"})
    price_weight_permille: int = field(default=250, metadata={
        "help": "0 picks routes by metric alone, 1000 by price alone; "
                "`meshctl route tradeoff` overrides it"})
    default_path_price: int = field(default=1_000_000, metadata={
        "help": "path price (wei/B) assumed for a route learned without the price "
                "sub-TLV, through a stock babeld"})
    link_cost: str = field(default="wired", metadata={
        "help": "wired (2-out-of-3) or etx (for lossy links)"})
    tunnels: bool = field(default=True, metadata={
        "help": "speak Babel on every link's WireGuard tunnel"})
    interfaces: tuple[str, ...] = field(default=(), metadata={
        "help": "raw interfaces to speak Babel on as well (multicast, e.g. to a babeld)"})
    originate: tuple[str, ...] = field(default=(), metadata={
        "help": "prefixes to announce besides the router's own addresses"})
    originate_loopback: bool = field(default=True, metadata={
        "help": "announce the global addresses on lo (the router's own)"})
    overclaim: bool = field(default=False, metadata={
        "help": "TEST ONLY: advertise every route we forward as metric 0, a router that "
                "claims far better routes than it delivers (for verify's tests)"})

    def __post_init__(self) -> None:
        if self.hello_interval <= 0 or self.hello_interval > 600:
            raise ConfigError("[route] hello_interval must be in (0, 600] seconds")
        if not 0 <= self.price_weight_permille <= MAX_WEIGHT:
            raise ConfigError(f"[route] price_weight_permille must be in 0..{MAX_WEIGHT}")
        if self.link_cost not in {"wired", "etx"}:
            raise ConfigError(f"[route] link_cost {self.link_cost!r} is not wired or etx")
        if self.default_path_price < 0:
            raise ConfigError("[route] default_path_price must not be negative")
        for prefix in self.originate:
            try:
                network(prefix)
            except ValueError as err:
                raise ConfigError(f"[route] originate: {err}") from None


class RouteLoop:
    def __init__(self, rt: ServiceRuntime[route_pb2.RouteState]) -> None:
        self.rt = rt
        self.settings = rt.cfg.section("route", RouteSettings)
        identity = Identity.load_or_create(rt.cfg.node.data_dir / "keys")
        self.router_id = router_id_of(identity.identity_key)
        self.kernel = KernelRoutes()
        self.kernel_thread = NetlinkThread("kernel")
        # Built before the projection is loaded: run() gives it the seqno.
        self.speaker = Speaker(
            self.router_id, 0, hello_interval=self.settings.hello_interval,
            default_path_price=self.settings.default_path_price,
            price_weight=self.settings.price_weight_permille)
        self.speaker.overclaim = self.settings.overclaim
        self.hold_retractions_until = 0.0
        self.own_prefixes: list[str] = []
        self.loopback: list[str] = []
        self.own_refreshed = -LOOPBACK_REFRESH_SECONDS
        self.sock = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_RECVPKTINFO, 1)
        self.sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_MULTICAST_LOOP, 0)
        self.sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_MULTICAST_HOPS, 1)
        self.sock.bind(("::", PORT))
        self.sock.setblocking(False)
        self.joined: set[str] = set()

    def own_price(self) -> int:
        if self.rt.state.price.HasField("price"):
            return amount(self.rt.state.price.price)
        return self.rt.cfg.section("meter", MeterSettings).price

    def price_weight(self) -> int:
        if self.rt.state.tradeoff_set:
            return self.rt.state.price_weight_permille
        return self.settings.price_weight_permille

    # -- interfaces ----------------------------------------------------------------

    def interface_specs(self) -> list[InterfaceSpec]:
        specs = []
        if self.settings.tunnels:
            for neighbor in self.rt.state.neighbors.values():
                if neighbor.up:
                    specs.append(InterfaceSpec(neighbor.tunnel_interface, neighbor.address,
                                               self.settings.link_cost,
                                               neighbor.local_address))
        for name in self.settings.interfaces:
            if name not in self.joined:
                with contextlib.suppress(OSError):
                    group = socket.inet_pton(socket.AF_INET6, MULTICAST_GROUP)
                    index = socket.if_nametoindex(name)
                    self.sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_JOIN_GROUP,
                                         group + struct.pack("@I", index))
                    self.joined.add(name)
            if name in self.joined:
                specs.append(InterfaceSpec(name, MULTICAST_GROUP, self.settings.link_cost,
                                           link_local_address(name)))
        return specs

    def interface_of(self, neighbor_key: str) -> tuple[str, str]:
        interface, _, address = neighbor_key.partition("/")
        return interface, address

    def penalties(self) -> dict[str, int | None]:
        """verify's penalties by Babel neighbor: None excludes its routes."""
        penalties = self.rt.state.penalties
        found: dict[str, int | None] = {}
        for key, neighbor in self.speaker.neighbors.items():
            penalty = penalties.get(self.neighbor_id(neighbor.interface, neighbor.address))
            if penalty is not None:
                found[key] = None if penalty.exclude else penalty.metric
        return found

    def origins(self) -> dict[str, bytes]:
        """The router-id of each Babel neighbor that came up as a link."""
        neighbors = self.rt.state.neighbors
        return {key: neighbors[node_id].router_id
                for key, neighbor in self.speaker.neighbors.items()
                if (node_id := self.tunnel_node_id(neighbor.interface))
                and neighbors[node_id].router_id}

    def tunnel_node_id(self, interface: str) -> str:
        """The node id of the link whose tunnel this is, or ""."""
        return next((node_id for node_id, neighbor in self.rt.state.neighbors.items()
                     if neighbor.tunnel_interface == interface), "")

    def neighbor_id(self, interface: str, address: str) -> str:
        """Our name for a Babel neighbor: its node id on a tunnel, else
        address%interface (a babeld, say)."""
        return self.tunnel_node_id(interface) or f"{address}%{interface}"

    # -- selections -> events ---------------------------------------------------------

    def babel_status(self) -> control_pb2.GetBabelResponse:
        speaker, stats = self.speaker, self.speaker.stats
        return control_pb2.GetBabelResponse(
            router_id=speaker.router_id, seqno=speaker.seqno,
            neighbors=[control_pb2.BabelNeighbor(
                interface=n.interface, address=n.address,
                node_id=self.tunnel_node_id(n.interface), rxcost=n.rxcost(), txcost=n.txcost,
                cost=n.cost(), hellos_received=n.hellos_received)
                for n in speaker.neighbors.values()],
            packets_received=stats.packets, updates_received=stats.updates,
            packets_rejected=dict(stats.rejected), tlvs_dropped=dict(stats.dropped),
            seqno_requests_sent=stats.seqno_requests,
            table_routes=sum(len(r) for r in speaker.table.routes.values()),
            sources=len(speaker.table.sources), price_weight_permille=speaker.price_weight)

    def alternatives(self, selected: Selected) -> list[route_pb2.RouteChanged.Alternative]:
        others = self.speaker.table.candidates(selected.prefix, self.speaker.costs(),
                                               self.speaker.penalties, feasible_only=False,
                                               origins=self.speaker.origins)
        found = []
        for other in sorted(others, key=lambda o: o.neighbor):
            if other.neighbor == selected.neighbor:
                continue
            interface, address = self.interface_of(other.neighbor)
            found.append(route_pb2.RouteChanged.Alternative(
                next_hop_id=self.neighbor_id(interface, address),
                next_hop_address=str(other.next_hop or address), tunnel_interface=interface,
                advertised_metric=other.advertised_metric, metric=other.metric,
                price=money(other.path_price)))
        return found

    def route_event(self, selected: Selected) -> route_pb2.RouteChanged:
        interface, address = self.interface_of(selected.neighbor)
        return route_pb2.RouteChanged(
            alternatives=self.alternatives(selected),
            prefix=str(selected.prefix), next_hop_id=self.neighbor_id(interface, address),
            next_hop_address=str(selected.next_hop or address), tunnel_interface=interface,
            metric=selected.metric, advertised_metric=selected.advertised_metric,
            penalty=selected.penalty, path_price=money(selected.path_price),
            advertised_price=money(self.speaker.own_price + selected.path_price),
            price_defaulted=selected.price_defaulted, router_id=selected.router_id,
            seqno=selected.seqno,
        )

    async def publish_changes(self, now: float) -> None:
        current = self.rt.state.routes
        for prefix, selected in self.speaker.selected.items():
            event = self.route_event(selected)
            old = current.get(str(prefix))
            if old is not None and not worth_telling(old, event):
                continue
            if old is None:
                event.change = route_pb2.ROUTE_CHANGE_SELECTED
            elif old.next_hop_id != event.next_hop_id:
                event.change = route_pb2.ROUTE_CHANGE_NEXT_HOP_CHANGED
            else:
                event.change = route_pb2.ROUTE_CHANGE_UPDATED
            log.info(kv("route.selected", prefix=event.prefix, via=event.next_hop_id,
                        metric=event.metric, price=self.speaker.own_price + selected.path_price,
                        change=route_pb2.RouteChange.Name(event.change)))
            await self.rt.publish(Outgoing("changed", prefix_token(event.prefix), event))
        if now < self.hold_retractions_until:
            return
        selected_now = {str(p) for p in self.speaker.selected}
        for prefix in [p for p in current if p not in selected_now]:
            log.info(kv("route.retracted", prefix=prefix))
            await self.rt.publish(Outgoing("changed", prefix_token(prefix), route_pb2.RouteChanged(
                prefix=prefix, change=route_pb2.ROUTE_CHANGE_RETRACTED)))

    def wanted_routes(self) -> dict[str, KernelRoute]:
        return {prefix: KernelRoute(prefix, route.next_hop_address, route.tunnel_interface)
                for prefix, route in self.rt.state.routes.items()}

    # -- the loop -----------------------------------------------------------------------

    async def persist_seqno(self) -> None:
        if self.speaker.seqno != self.rt.state.seqno or self.rt.state.router_id != self.router_id:
            sequence = await self.rt.publish(Outgoing("seqno", self.rt.node_id,
                                                      route_pb2.SeqnoIncreased(
                                                          router_id=self.router_id,
                                                          seqno=self.speaker.seqno)))
            await self.rt.wait_handled(sequence)

    def send(self, datagram: Datagram) -> None:
        """From the interface's own link-local address when known: a tunnel has
        two, and neighbors know us (and IHUs name us) by the one link announced."""
        try:
            index = socket.if_nametoindex(datagram.interface)
            pktinfo = []
            if datagram.source:
                pktinfo = [(socket.IPPROTO_IPV6, socket.IPV6_PKTINFO, PKTINFO.pack(
                    socket.inet_pton(socket.AF_INET6, datagram.source), index))]
            self.sock.sendmsg([datagram.data], pktinfo, 0,
                              (datagram.destination, PORT, 0, index))
        except OSError as err:
            log.debug(kv("babel.unsent", interface=datagram.interface, error=err))

    async def refresh_own(self, now: float) -> None:
        if now - self.own_refreshed >= LOOPBACK_REFRESH_SECONDS:
            self.own_refreshed = now
            self.loopback = (await self.kernel_thread.run(self.kernel.loopback_prefixes)
                             if self.settings.originate_loopback else [])
        own = list(self.settings.originate) + self.loopback
        if own != self.own_prefixes:
            self.own_prefixes = own
            log.info(kv("route.originate", prefixes=",".join(own) or "-"))
        self.speaker.originate(network(p) for p in own)

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        inbox: asyncio.Queue[tuple[bytes, str, str]] = asyncio.Queue(maxsize=4096)

        def readable() -> None:
            while True:
                try:
                    data, ancillary, _flags, source = self.sock.recvmsg(
                        65535, socket.CMSG_SPACE(PKTINFO.size))
                except BlockingIOError:
                    return
                index = next((PKTINFO.unpack(data_)[1] for level, kind, data_ in ancillary
                              if level == socket.IPPROTO_IPV6 and kind == socket.IPV6_PKTINFO),
                             source[3])
                address = source[0].split("%")[0]
                if not address.lower().startswith("fe80:"):
                    continue  # RFC 8966 4.1: Babel comes from link-local addresses
                with contextlib.suppress(OSError, asyncio.QueueFull):
                    inbox.put_nowait((data, address, socket.if_indextoname(index)))

        loop.add_reader(self.sock.fileno(), readable)
        # One past the last seqno stored: never one a neighbor may have seen.
        self.speaker.seqno = (self.rt.state.seqno + 1) & 0xFFFF
        # Retractions wait until Babel had time to relearn what the log holds.
        self.hold_retractions_until = time.monotonic() + 1.5 * self.speaker.update_interval
        await self.persist_seqno()
        log.info(kv("babel.started", router_id=self.router_id.hex(), seqno=self.speaker.seqno,
                    hello_interval=self.settings.hello_interval))
        kernel_version = -1
        next_tick = 0.0
        while True:
            with contextlib.suppress(TimeoutError):
                data, address, interface = await asyncio.wait_for(
                    inbox.get(), timeout=max(0.0, next_tick - time.monotonic()))
                self.speaker.receive(interface, address, data, time.monotonic())
            now = time.monotonic()
            if now >= next_tick:
                next_tick = now + TICK_SECONDS
                await self.tick(now)
            if self.rt.changes.version != kernel_version:
                kernel_version = self.rt.changes.version
                failed = await self.kernel_thread.run(self.kernel.reconcile, self.wanted_routes())
                if failed:
                    kernel_version = -1  # try again next time round
                    log.warning(kv("kernel.route_failed", prefixes=",".join(failed)))

    async def tick(self, now: float) -> None:
        await self.refresh_own(now)
        self.speaker.set_interfaces(self.interface_specs(), now)
        self.speaker.set_price(self.own_price(), self.settings.default_path_price)
        self.speaker.set_weight(self.price_weight())
        self.speaker.set_penalties(self.penalties(), self.origins())
        self.speaker.tick(now)
        await self.persist_seqno()
        for datagram in self.speaker.take_outbox():
            self.send(datagram)
        await self.publish_changes(now)


def worth_telling(old: route_pb2.RouteChanged, new: route_pb2.RouteChanged) -> bool:
    """A new selection, new prices or next hop, or a metric change beyond the
    hysteresis: what meter, verify and the operator care about."""
    same = (old.next_hop_id == new.next_hop_id and old.next_hop_address == new.next_hop_address
            and old.tunnel_interface == new.tunnel_interface
            and old.path_price == new.path_price and old.advertised_price == new.advertised_price
            and old.penalty == new.penalty and old.router_id == new.router_id
            and [(a.next_hop_id, a.price) for a in old.alternatives]
            == [(a.next_hop_id, a.price) for a in new.alternatives])
    if not same:
        return True
    metrics = [(old.metric, new.metric)] + [
        (a.metric, b.metric) for a, b in zip(old.alternatives, new.alternatives, strict=True)]
    return any(abs(a - b) >= METRIC_HYSTERESIS for a, b in metrics)


async def route_loop(rt: ServiceRuntime[route_pb2.RouteState]) -> None:
    await rt.context.run()


class ControlServicer(control_pb2_grpc.RouteControlServicer):
    def __init__(self, route: RouteLoop) -> None:
        self.route = route

    async def SetTradeoff(
        self, request: control_pb2.SetTradeoffRequest, context: grpc.aio.ServicerContext
    ) -> control_pb2.SetTradeoffResponse:
        weight = request.price_weight_permille
        if weight > MAX_WEIGHT:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                f"price weight {weight} permille is over {MAX_WEIGHT}")
        rt = self.route.rt
        previous = self.route.price_weight()
        sequence = await rt.publish(Outgoing("tradeoff", rt.node_id, route_pb2.TradeoffChanged(
            price_weight_permille=weight, previous_permille=previous)))
        await rt.wait_handled(sequence)
        log.info(kv("route.tradeoff", price_weight_permille=weight, previous=previous))
        return control_pb2.SetTradeoffResponse(price_weight_permille=self.route.price_weight())

    async def GetBabel(
        self, request: control_pb2.GetBabelRequest, context: grpc.aio.ServicerContext
    ) -> control_pb2.GetBabelResponse:
        return self.route.babel_status()


def control(rt: ServiceRuntime[route_pb2.RouteState]) -> Control:
    servicer = ControlServicer(rt.context)
    return Control(
        register=lambda server: control_pb2_grpc.add_RouteControlServicer_to_server(
            servicer, server),
        name=control_pb2.DESCRIPTOR.services_by_name["RouteControl"].full_name,
    )


DEFINITION: ServiceDefinition[Any] = ServiceDefinition(
    name="route",
    state_type=route_pb2.RouteState,
    subjects=("evt.link.up.>", "evt.link.down.>", "evt.meter.price.>", "evt.route.changed.>",
              "evt.route.seqno.>", "evt.route.tradeoff.>", "evt.verify.penalized.>",
              "evt.verify.pardoned.>"),
    handlers=HANDLERS,
    summarize=summarize,
    tasks=(route_loop,),
    controls=(control,),
    context=RouteLoop,
)
