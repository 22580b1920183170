"""meter's definition, settings, and its loops: the sampler, the enforcement
reconciler, the automatic price, and the MeterControl gRPC service."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
from dataclasses import dataclass, field
from typing import Any

import grpc
from mesh.meter.v1 import control_pb2, control_pb2_grpc, meter_pb2

from services.common.config import ConfigError, NodeConfig
from services.common.inspect import Control
from services.common.logs import kv
from services.common.money import MoneyError, amount, money
from services.common.runtime import Outgoing, ServiceDefinition, ServiceRuntime

from . import pricing
from .handlers import Policy, make_handlers, summarize
from .ledger import MAX_SANE_PRICE, Thresholds

log = logging.getLogger("meter")



@dataclass(frozen=True)
class MeterSettings:
    price: int = field(default=1_000_000, metadata={
        "help": "this router's price per forwarded byte, in wei (1e6 wei/B = 1e12 wei/MB)"})
    pricing: str = field(default="manual", metadata={
        "help": "manual (the price above) or automatic (rises with link utilisation)"})
    min_price: int = field(default=100_000, metadata={"help": "automatic pricing's floor"})
    max_price: int = field(default=10_000_000, metadata={"help": "automatic pricing's ceiling"})
    link_capacity_bps: int = field(default=100_000_000, metadata={
        "help": "a tunnel's capacity, the 100% of automatic pricing's utilisation"})
    default_neighbor_price: int = field(default=1_000_000, metadata={
        "help": "what a neighbor is paid per byte to a destination it advertised no price for"})
    pay_threshold: int = field(default=10**12, metadata={
        "help": "we pay a neighbor once we owe it this much (wei; 1 MB at the default price)"})
    throttle_threshold: int = field(default=5 * 10**12, metadata={
        "help": "a neighbor owing us this much is throttled"})
    cutoff_threshold: int = field(default=10**13, metadata={
        "help": "a neighbor owing us this much is cut off"})
    throttle_rate_bps: int = field(default=1_000_000, metadata={
        "help": "the rate a throttled neighbor is held to"})
    sample_interval: float = field(default=1.0, metadata={
        "help": "seconds between counter samples"})

    def __post_init__(self) -> None:
        if self.pricing not in {"manual", "automatic"}:
            raise ConfigError(f"[meter] pricing {self.pricing!r} is not manual or automatic")
        for name in ("price", "min_price", "max_price"):
            value = getattr(self, name)
            if not 0 <= value <= MAX_SANE_PRICE:
                raise ConfigError(f"[meter] {name} {value} is outside 0..{MAX_SANE_PRICE}")
        if self.min_price > self.max_price:
            raise ConfigError("[meter] min_price is above max_price")
        if not 0 < self.throttle_threshold <= self.cutoff_threshold:
            raise ConfigError("[meter] need 0 < throttle_threshold <= cutoff_threshold")
        if self.throttle_rate_bps <= 0:
            raise ConfigError("[meter] throttle_rate_bps must be positive")


def policy_of(settings: MeterSettings) -> Policy:
    return Policy(
        thresholds=Thresholds(pay=settings.pay_threshold, throttle=settings.throttle_threshold,
                              cutoff=settings.cutoff_threshold,
                              throttle_rate_bps=settings.throttle_rate_bps),
        default_neighbor_price=settings.default_neighbor_price,
    )


class Meter:
    """The side effects of one meter: kernel counters in, enforcement out."""

    def __init__(self, rt: ServiceRuntime[meter_pb2.MeterState]) -> None:
        from .effects import Dataplane

        self.rt = rt
        self.settings = rt.cfg.section("meter", MeterSettings)
        self.dataplane = Dataplane()
        self.automatic = self.settings.pricing == "automatic"
        self.util = 0.0
        self.unbilled: set[str] = set()
        self.counted: set[str] | None = None  # the prefixes the kernel counts by

    async def set_price(self, price: int, automatic: bool, util: float = 0.0) -> None:
        previous = self.rt.state.price.price
        mode = meter_pb2.PRICING_MODE_AUTOMATIC if automatic else meter_pb2.PRICING_MODE_MANUAL
        event = meter_pb2.PriceSet(price=money(price), previous=previous, mode=mode,
                                   utilisation_ppm=int(util * 1e6),
                                   min_price=money(self.settings.min_price),
                                   max_price=money(self.settings.max_price))
        log.info(kv("price.set", price=price, mode="automatic" if automatic else "manual"))
        await self.rt.publish(Outgoing("price", self.rt.node_id, event))

    def note_unbilled(self, sample: meter_pb2.CountersSampled) -> None:
        """Log, once each, interfaces that forward traffic but belong to no neighbor."""
        known = {ledger.tunnel_interface for ledger in self.rt.state.ledgers.values()}
        for neighbor in sample.neighbors:
            name = neighbor.tunnel_interface
            if name not in known and name not in self.unbilled:
                self.unbilled.add(name)
                log.info(kv("usage.unbilled", interface=name,
                            why="no LinkUp names it: its traffic is counted, not billed"))

    async def set_destinations(self, prefixes: set[str]) -> None:
        if prefixes != self.counted:
            await asyncio.to_thread(self.dataplane.set_destinations, prefixes)
            self.counted = prefixes

    async def count_new_destinations(self, until: float) -> None:
        """Until the next sample is due: count each new route's prefix as soon
        as its RouteChanged is handled. Bytes to it before that would count as
        `other`, priced unlike the neighbor at the other end prices them."""
        while True:
            version = self.rt.changes.version
            await self.set_destinations((self.counted or set()) | set(self.rt.state.routes))
            left = until - time.monotonic()
            if left <= 0:
                return
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.rt.changes.wait_past(version), left)

    async def run(self) -> None:
        state = self.rt.state
        configured = self.settings.price
        if not state.HasField("price") or (
            not self.automatic and amount(state.price.price) != configured
        ):
            await self.set_price(configured if not self.automatic else self.settings.min_price,
                                 self.automatic)
        last_sample: bytes = b""
        last_totals: dict[str, int] = {}
        last_time = time.monotonic()
        while True:
            await self.count_new_destinations(last_time + self.settings.sample_interval)
            sample = await asyncio.to_thread(self.dataplane.sample)
            # Only now that what they counted is in a sample: forgotten
            # (retracted, then idle) destinations stop being counted.
            await self.set_destinations(set(state.routes))
            encoded = sample.SerializeToString(deterministic=True)
            if encoded != last_sample:
                last_sample = encoded
                self.note_unbilled(sample)
                await self.rt.publish(Outgoing("sampled", self.rt.node_id, sample))
            wanted = {ledger.tunnel_interface: (ledger.enforcement, ledger.rate_limit_bps)
                      for ledger in state.ledgers.values() if ledger.tunnel_interface}
            await asyncio.to_thread(self.dataplane.enforce, wanted)
            now = time.monotonic()
            totals = {n.tunnel_interface: sum(d.rx_bytes + d.tx_bytes for d in n.destinations)
                      for n in sample.neighbors}
            busiest = max((totals[t] - last_totals.get(t, totals[t]) for t in totals), default=0)
            last_totals, elapsed, last_time = totals, now - last_time, now
            self.util = pricing.smooth(self.util, pricing.utilisation(
                8 * busiest / max(elapsed, 1e-3), self.settings.link_capacity_bps))
            if self.automatic:
                proposed = pricing.automatic_price(self.util, self.settings.min_price,
                                                   self.settings.max_price)
                if pricing.worth_announcing(amount(state.price.price), proposed):
                    await self.set_price(proposed, True, self.util)


class ControlServicer(control_pb2_grpc.MeterControlServicer):
    def __init__(self, meter: Meter) -> None:
        self.meter = meter

    async def SetPrice(
        self, request: control_pb2.SetPriceRequest, context: grpc.aio.ServicerContext
    ) -> control_pb2.SetPriceResponse:
        if request.WhichOneof("mode") == "automatic":
            self.meter.automatic = request.automatic
            if not request.automatic:
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                    "automatic=false: give a price instead")
        elif request.WhichOneof("mode") == "price":
            try:
                price = amount(request.price)
            except MoneyError as err:
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(err))
            if price > MAX_SANE_PRICE:
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                    f"price {price} wei/byte is absurd (over {MAX_SANE_PRICE})")
            self.meter.automatic = False
            await self.meter.set_price(price, False)
        else:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "give a price or automatic")
        return control_pb2.SetPriceResponse(price=money(self.current_price()),
                                            automatic=self.meter.automatic)

    def current_price(self) -> int:
        return amount(self.meter.rt.state.price.price)


async def meter_loop(rt: ServiceRuntime[meter_pb2.MeterState]) -> None:
    await rt.context.run()


def control(rt: ServiceRuntime[meter_pb2.MeterState]) -> Control:
    servicer = ControlServicer(rt.context)
    return Control(
        register=lambda server: control_pb2_grpc.add_MeterControlServicer_to_server(
            servicer, server),
        name=control_pb2.DESCRIPTOR.services_by_name["MeterControl"].full_name,
    )


DEFINITION: ServiceDefinition[Any] = ServiceDefinition(
    name="meter",
    state_type=meter_pb2.MeterState,
    subjects=("evt.link.up.>", "evt.route.changed.>", "evt.meter.price.>",
              "evt.meter.sampled.>", "evt.pay.received.>", "evt.pay.sent.>",
              "evt.pay.reverted.>"),
    handlers=make_handlers(policy_of(MeterSettings())),
    summarize=summarize,
    tasks=(meter_loop,),
    controls=(control,),
    context=Meter,
)


def configure(definition: ServiceDefinition[Any], cfg: NodeConfig) -> ServiceDefinition[Any]:
    settings = cfg.section("meter", MeterSettings)
    return dataclasses.replace(definition, handlers=make_handlers(policy_of(settings)))
