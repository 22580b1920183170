"""verify's definition, settings, and its loop: every window, probe the
destinations in use (and a random sample of the others) through each
neighbor that advertises a route to them (the one we route through and the
others route told of), judge each neighbor's claim, record a RouteVerified
per neighbor and destination; pardon penalties that have run out.

Only IPv6 host routes are probed: a router's own address answers echo
requests; a wider prefix has no address known to answer.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import random
import time
from dataclasses import dataclass, field
from ipaddress import IPv6Network, ip_network
from typing import Any

from google.protobuf import duration_pb2, timestamp_pb2
from mesh.verify.v1 import verify_pb2

from services.common.config import ConfigError, NodeConfig
from services.common.logs import kv
from services.common.netlink import NetlinkThread
from services.common.runtime import Outgoing, ServiceDefinition, ServiceRuntime

from .handlers import make_handlers, summarize
from .judge import PenaltyPolicy, Probes, Tolerance, measured_metric, median, percentile, verdict
from .probe import Prober, Target
from .steering import MAX_SLOTS, Path, Steering, mark_of

log = logging.getLogger("verify")


@dataclass(frozen=True)
class VerifySettings:
    window_seconds: float = field(default=10.0, metadata={
        "help": "seconds between verification windows"})
    probes: int = field(default=10, metadata={"help": "probes per destination per window"})
    probe_spacing: float = field(default=0.02, metadata={"help": "seconds between probes"})
    reply_timeout: float = field(default=1.0, metadata={
        "help": "seconds to wait for replies after the last probe"})
    targets_per_window: int = field(default=8, metadata={
        "help": "destinations probed per window: those in use first"})
    sampled_per_window: int = field(default=2, metadata={
        "help": "of them, at least this many drawn at random from those not in use"})
    tolerance_share: float = field(default=0.5, metadata={
        "help": "a measured metric may exceed ours by this share before it is an over-claim"})
    tolerance_slack: int = field(default=96, metadata={
        "help": "...plus this much (one link: replies may come back another way)"})
    evaluation_windows: int = field(default=6, metadata={
        "help": "the sliding evaluation: this many latest windows per neighbor"})
    overclaimed_windows: int = field(default=2, metadata={
        "help": "over-claims among them that bring a penalty"})
    settle_windows: float = field(default=2.0, metadata={
        "help": "a route is probed once it has not changed for this many windows"})
    penalty_seconds: int = field(default=60, metadata={
        "help": "the first penalty's length; each later one lasts twice as long"})

    def __post_init__(self) -> None:
        if self.window_seconds <= 0 or self.probes <= 0 or self.targets_per_window <= 0:
            raise ConfigError("[verify] window_seconds, probes and targets_per_window must "
                              "be positive")
        if not 0 < self.overclaimed_windows <= self.evaluation_windows:
            raise ConfigError("[verify] need 0 < overclaimed_windows <= evaluation_windows")
        if self.tolerance_share < 0 or self.tolerance_slack < 0:
            raise ConfigError("[verify] tolerances must not be negative")

    def policy(self) -> PenaltyPolicy:
        return PenaltyPolicy(windows=self.evaluation_windows,
                             overclaimed=self.overclaimed_windows,
                             base_seconds=self.penalty_seconds)


@dataclass(frozen=True)
class Via:
    """One neighbor advertising a route to a target, and our metric through it."""

    neighbor_id: str
    tunnel: str
    next_hop_address: str
    metric: int
    advertised_metric: int


def vias(target: verify_pb2.VerifyState.Target) -> list[Via]:
    """The neighbor we route through, then every other one advertising a route."""
    return [Via(target.next_hop_id, target.tunnel_interface, target.next_hop_address,
                target.metric, target.advertised_metric)] + [
        Via(a.next_hop_id, a.tunnel_interface, a.next_hop_address, a.metric,
            a.advertised_metric) for a in target.alternatives]


# Links to a target are counted again every this many windows.
REMEASURE_WINDOWS = 6

HopKey = tuple[str, str, str, int]


def hop_key(prefix: str, via: Via, target: verify_pb2.VerifyState.Target) -> HopKey:
    """A route to count links on: a new route (or a changed one) counts afresh."""
    return (prefix, via.neighbor_id, via.next_hop_address, target.changed_at.ToNanoseconds())


def probeable(prefix: str) -> bool:
    network = ip_network(prefix)
    return isinstance(network, IPv6Network) and network.prefixlen == 128


class Verifier:
    def __init__(self, rt: ServiceRuntime[verify_pb2.VerifyState]) -> None:
        self.rt = rt
        self.settings = rt.cfg.section("verify", VerifySettings)
        self.tolerance = Tolerance(self.settings.tolerance_share, self.settings.tolerance_slack)
        self.steering = Steering()
        self.netlink = NetlinkThread("steering")
        self.slots: dict[str, int] = {}  # neighbor id -> steering slot
        # Links to each target through each neighbor, for the route as it
        # stands: the last two counts (the fewer is used: a lost hop-limited
        # probe only ever adds one; only two, as the neighbor's own route
        # may change under ours), and windows since the last count.
        self.hops: dict[HopKey, tuple[int, int, int]] = {}

    def choose(self) -> list[tuple[str, verify_pb2.VerifyState.Target, bool]]:
        """(prefix, target, sampled): in use first, then a random sample, of
        the routes that have settled."""
        state = self.rt.state
        settled = time.time() - self.settings.settle_windows * self.settings.window_seconds
        candidates = {p: t for p, t in state.targets.items()
                      if probeable(p) and t.changed_at.ToNanoseconds() / 1e9 <= settled}
        in_use = sorted(p for p in candidates if p in state.in_use)
        others = [p for p in candidates if p not in state.in_use]
        room = self.settings.targets_per_window
        sample_size = min(len(others), max(self.settings.sampled_per_window,
                                           room - len(in_use)))
        chosen = [(p, False) for p in in_use[:max(0, room - sample_size)]]
        chosen += [(p, True) for p in random.sample(others, sample_size)]
        return [(p, candidates[p], sampled) for p, sampled in chosen[:room]]

    def slot(self, neighbor_id: str) -> int:
        if neighbor_id not in self.slots:
            used = set(self.slots.values())
            self.slots[neighbor_id] = next(s for s in range(MAX_SLOTS) if s not in used)
        return self.slots[neighbor_id]

    async def window(self, prober: Prober) -> None:
        chosen = self.choose()
        if not chosen:
            return
        # Every neighbor with a route of ours, not only this window's: no churn.
        paths = {self.slot(via.neighbor_id): Path(via.tunnel, via.next_hop_address)
                 for target in self.rt.state.targets.values() for via in vias(target)}
        failed = set(await self.netlink.run(self.steering.reconcile, paths))
        plans = [(prefix, via, sampled) for prefix, target, sampled in chosen
                 for via in vias(target) if self.slot(via.neighbor_id) not in failed]
        targets = [Target(f"{prefix} {via.neighbor_id}", str(ip_network(prefix).network_address),
                          mark_of(self.slot(via.neighbor_id))) for prefix, via, _ in plans]
        keys = {f"{prefix} {via.neighbor_id}": hop_key(prefix, via, self.rt.state.targets[prefix])
                for prefix, via, _ in plans}
        # Hop-limited probes die on the way, after the hop before has billed
        # them: they are sent only to count the links again now and then.
        count_hops = {name for name, key in keys.items()
                      if self.hops.get(key, (0, 0, REMEASURE_WINDOWS))[2] >= REMEASURE_WINDOWS}
        start = timestamp_pb2.Timestamp()
        start.GetCurrentTime()
        results = await prober.burst(targets, self.settings.probes, self.settings.probe_spacing,
                                     self.settings.reply_timeout, count_hops=count_hops)
        end = timestamp_pb2.Timestamp()
        end.GetCurrentTime()
        # Routes that changed or went count afresh.
        targets_now = self.rt.state.targets
        self.hops = {key: hops for key, hops in self.hops.items() if key[0] in targets_now
                     and key[3] == targets_now[key[0]].changed_at.ToNanoseconds()}
        for prefix, via, sampled in plans:
            name = f"{prefix} {via.neighbor_id}"
            await self.record(prefix, via, sampled, self.with_hops(keys[name], results[name]),
                              start, end)

    def with_hops(self, key: HopKey, probes: Probes) -> Probes:
        """The probes with the fewer links of the last two counts to their target."""
        latest, previous, age = self.hops.get(key, (0, 0, 0))
        if probes.forward_hops is not None:
            latest, previous, age = probes.forward_hops, latest, 0
        elif latest:
            age += 1
        else:
            return probes
        self.hops[key] = (latest, previous, age)
        return dataclasses.replace(probes, forward_hops=min(latest, previous or latest))

    async def record(self, prefix: str, via: Via, sampled: bool, probes: Probes,
                     start: timestamp_pb2.Timestamp, end: timestamp_pb2.Timestamp) -> None:
        judged = verdict(probes, via.metric, self.tolerance)
        verified = verify_pb2.RouteVerified(
            neighbor_id=via.neighbor_id, prefix=prefix,
            advertised_metric=via.advertised_metric, route_metric=via.metric,
            measured_metric=min(measured_metric(probes), 0xFFFFFFFF), hops=probes.hops,
            probes_sent=probes.sent, probes_answered=probes.answered,
            rtt_median=duration_pb2.Duration(nanos=int(median(probes.rtts) * 1e9)),
            rtt_p90=duration_pb2.Duration(nanos=int(percentile(probes.rtts, 0.9) * 1e9)),
            verdict=judged, window_start=start, window_end=end, sampled=sampled)
        if judged != verify_pb2.VERDICT_HONEST:
            log.info(kv("route.judged", neighbor=via.neighbor_id, prefix=prefix,
                        verdict=verify_pb2.Verdict.Name(judged), metric=via.metric,
                        measured=verified.measured_metric, answered=probes.answered))
        await self.rt.publish(Outgoing("verified", via.neighbor_id, verified))

    async def pardon_expired(self) -> None:
        now = time.time()
        for neighbor_id, record in list(self.rt.state.neighbors.items()):
            if record.HasField("penalty") and record.penalty.expires_at.seconds <= now:
                expires = record.penalty.expires_at.seconds
                log.info(kv("neighbor.pardoned", neighbor=neighbor_id, reason="expired"))
                await self.rt.publish(
                    Outgoing("pardoned", neighbor_id, verify_pb2.NeighborPardoned(
                        neighbor_id=neighbor_id, reason=verify_pb2.PARDON_REASON_EXPIRED)),
                    event_id=f"pardon.{neighbor_id}.{expires}")

    async def run(self) -> None:
        prober = Prober()
        log.info(kv("verify.started", window_seconds=self.settings.window_seconds,
                    probes=self.settings.probes))
        try:
            while True:
                started = time.monotonic()
                await self.pardon_expired()
                await self.window(prober)
                left = self.settings.window_seconds - (time.monotonic() - started)
                await asyncio.sleep(max(0.1, left))
        finally:
            prober.close()


async def verify_loop(rt: ServiceRuntime[verify_pb2.VerifyState]) -> None:
    await Verifier(rt).run()


def configure(definition: ServiceDefinition[Any], cfg: NodeConfig) -> ServiceDefinition[Any]:
    """Handlers closed over the configured penalty policy."""
    return dataclasses.replace(
        definition, handlers=make_handlers(cfg.section("verify", VerifySettings).policy()))


DEFINITION: ServiceDefinition[Any] = ServiceDefinition(
    name="verify",
    state_type=verify_pb2.VerifyState,
    subjects=("evt.route.changed.>", "evt.meter.usage.>", "evt.verify.verified.>",
              "evt.verify.penalized.>", "evt.verify.pardoned.>"),
    handlers=make_handlers(VerifySettings().policy()),
    summarize=summarize,
    tasks=(verify_loop,),
)
