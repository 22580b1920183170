"""exit's definition, settings and loops, one per role the node plays:

- exit (`serve`): the registration API on TCP, one WireGuard interface for
  every admitted client, NAT out of the uplinks;
- client (`exits`): picks an exit by its route and price, registers, brings
  up the tunnel with the default route through it, and fails over when the
  exit stops answering;

Order of effects: a registration is stored (ExitRegistered) before the exit
adds the client's peer or answers, so a restarted exit rebuilds every peer
from its log, and a client's before it builds its tunnel.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import ipaddress
import logging
import subprocess
import time
from dataclasses import dataclass, field
from typing import Any

import grpc
from mesh.exit.v1 import exit_pb2, registration_pb2, registration_pb2_grpc

from dataplane.shim import NftError
from services.common.config import ConfigError, NodeConfig
from services.common.identity import Identity, chain_address
from services.common.logs import kv
from services.common.money import amount, money
from services.common.runtime import Outgoing, ServiceDefinition, ServiceRuntime
from services.common.wireguard import WireGuardError

from . import effects
from .handlers import CLIENT, EXIT, make_handlers, summarize
from .registration import (
    Candidate,
    addresses_for,
    check_answer,
    check_offer,
    check_request,
    choose,
    client_access,
    exit_address,
    offer_message,
    peer_address,
    registration_message,
    repriced,
    response_price,
    usage_since,
)

log = logging.getLogger("exit")

TICK_SECONDS = 0.5
CALL_TIMEOUT = 3.0
# An exit that failed is tried again only after this long (unless it is the only one)...
AVOID_SECONDS = 30.0
# ...and never sooner than this (an exit that refuses us is not asked twice a second).
RETRY_SECONDS = 5.0
# A client whose tunnel has been quiet this long asks the exit for an answer.
PROBE_AFTER_SECONDS = 1.0


@dataclass(frozen=True)
class ExitAddress:
    """One configured exit: NAME=[ADDRESS]:PORT (the registration port)."""

    name: str
    address: str
    port: int

    @property
    def prefix(self) -> str:
        return f"{self.address}/128"

    @property
    def target(self) -> str:
        return f"[{self.address}]:{self.port}"

    @classmethod
    def parse(cls, spec: str, default_port: int) -> ExitAddress:
        name, sep, where = spec.partition("=")
        if not sep or not name:
            raise ConfigError(f"[exit] exit {spec!r}: want NAME=[ADDRESS]:PORT")
        address, port = where, default_port
        if where.startswith("["):
            address, _, rest = where[1:].partition("]")
            if rest:
                if not rest.startswith(":") or not rest[1:].isdigit():
                    raise ConfigError(f"[exit] exit {spec!r}: bad port {rest!r}")
                port = int(rest[1:])
        try:
            address = str(ipaddress.IPv6Address(address))
        except ValueError:
            raise ConfigError(f"[exit] exit {spec!r}: {address!r} is not an IPv6 address") from None
        if not 1 <= port <= 65535:
            raise ConfigError(f"[exit] exit {spec!r}: port {port} out of range")
        return cls(name, address, port)


@dataclass(frozen=True)
class ExitSettings:
    serve: bool = field(default=False, metadata={
        "help": "be an exit: admit clients, tunnel them, NAT them out of [node] uplinks"})
    registration_port: int = field(default=50080, metadata={
        "help": "TCP port of an exit's registration API (and the default in `exits`)"})
    tunnel_port: int = field(default=51820, metadata={
        "help": "UDP port of an exit's WireGuard interface"})
    client_pool: str = field(default="fd64:0:0:1::/64", metadata={
        "help": "IPv6 prefix an exit assigns its clients' tunnel addresses from"})
    price_up: int = field(default=1_000_000, metadata={
        "help": "wei per byte a client pays an exit for traffic to the internet"})
    fee_down: int = field(default=1_000_000, metadata={
        "help": "the exit's fee per byte of response traffic: a client pays it on top of "
                "what the mesh charges the exit to carry that traffic to the client (the "
                "exit's route price to it when the client registers)"})
    cut_off_debt: int = field(default=10**14, metadata={
        "help": "an exit cuts a client off when it owes more than this (wei) beyond "
                "debt_tolerance, and lets it back once it has paid"})
    throttle_debt: int = field(default=5 * 10**13, metadata={
        "help": "an exit throttles a client to throttle_rate_bps when it owes more than this "
                "(wei) beyond debt_tolerance, before it cuts it off"})
    throttle_rate_bps: int = field(default=1_000_000, metadata={
        "help": "bits per second a throttled client gets, each way"})
    debt_tolerance: float = field(default=0.1, metadata={
        "help": "share of a client's usage its debt may exceed throttle_debt and cut_off_debt "
                "by: what the exit sent and the client never received is on its bill only"})
    registration_window: float = field(default=300.0, metadata={
        "help": "seconds a registration's timestamp may be from the exit's clock"})
    exits: tuple[str, ...] = field(default=(), metadata={
        "help": "exits this router may send its internet traffic through, each "
                "NAME=[ADDRESS]:PORT; empty: not a client"})
    liveness_seconds: float = field(default=6.0, metadata={
        "help": "a client fails over when its exit tunnel receives nothing this long"})
    sample_interval: float = field(default=2.0, metadata={
        "help": "seconds between readings of the exit tunnels' byte counters (billing)"})
    requote_seconds: float = field(default=30.0, metadata={
        "help": "seconds between a client's checks of its exit's offer: it registers "
                "again at the new prices when they moved by 5% or more"})

    def __post_init__(self) -> None:
        try:
            pool = ipaddress.IPv6Network(self.client_pool)
        except ValueError as err:
            raise ConfigError(f"[exit] client_pool: {err}") from None
        if pool.num_addresses < 4:
            raise ConfigError(f"[exit] client_pool {self.client_pool} is too small")
        for port_field in ("registration_port", "tunnel_port"):
            if not 1 <= getattr(self, port_field) <= 65535:
                raise ConfigError(f"[exit] {port_field} must be 1-65535")
        if self.cut_off_debt < 0 or self.debt_tolerance < 0:
            raise ConfigError("[exit] cut_off_debt and debt_tolerance must not be negative")
        if not 0 <= self.throttle_debt <= self.cut_off_debt:
            raise ConfigError("[exit] throttle_debt must be between 0 and cut_off_debt")
        if self.throttle_rate_bps < 8_000:
            raise ConfigError("[exit] throttle_rate_bps must be at least 8000 (1 kB/s)")
        if self.price_up < 0 or self.fee_down < 0:
            raise ConfigError("[exit] prices must not be negative")
        if self.requote_seconds <= 0:
            raise ConfigError("[exit] requote_seconds must be positive")
        if self.liveness_seconds <= 2 * effects.KEEPALIVE_SECONDS:
            raise ConfigError("[exit] liveness_seconds must exceed two keepalives (2 s)")
        self.exit_addresses()

    def exit_addresses(self) -> list[ExitAddress]:
        return [ExitAddress.parse(s, self.registration_port) for s in self.exits]


def refusal_status(reason: exit_pb2.RefusalReason) -> grpc.StatusCode:
    return {
        exit_pb2.REFUSAL_REASON_MALFORMED: grpc.StatusCode.INVALID_ARGUMENT,
        exit_pb2.REFUSAL_REASON_BAD_SIGNATURE: grpc.StatusCode.UNAUTHENTICATED,
        exit_pb2.REFUSAL_REASON_STALE: grpc.StatusCode.UNAUTHENTICATED,
        exit_pb2.REFUSAL_REASON_ADDRESS_POOL_EXHAUSTED: grpc.StatusCode.RESOURCE_EXHAUSTED,
        exit_pb2.REFUSAL_REASON_BLOCKED: grpc.StatusCode.PERMISSION_DENIED,
    }.get(reason, grpc.StatusCode.FAILED_PRECONDITION)


def refusal_reason(err: grpc.aio.AioRpcError) -> exit_pb2.RefusalReason.ValueType:
    """The exit's reason, which its refusal names first; unreachable if it did not answer."""
    named = (err.details() or "").split(":")[0]
    if named in exit_pb2.RefusalReason.DESCRIPTOR.values_by_name:
        return exit_pb2.RefusalReason.Value(named)
    return exit_pb2.REFUSAL_REASON_UNREACHABLE


def now_ms() -> int:
    return time.time_ns() // 1_000_000


class ExitLoop:
    def __init__(self, rt: ServiceRuntime[exit_pb2.ExitState]) -> None:
        self.rt = rt
        self.settings = rt.cfg.section("exit", ExitSettings)
        self.identity = Identity.load_or_create(rt.cfg.node.data_dir / "keys")
        self.tunnels: effects.ExitTunnels | None = None
        if self.settings.serve or self.settings.exits:
            self.tunnels = effects.ExitTunnels(self.identity.wireguard_private_b64)
        self.exit_interface = effects.exit_interface(self.identity.wireguard_public)
        self.lock = asyncio.Lock()
        self.channels: dict[str, grpc.aio.Channel] = {}
        # Client side: exits that failed lately, and the tunnel's last traffic.
        self.avoid: dict[str, float] = {}
        self.client_tunnel = ""
        self.last_received = (0, 0.0)
        self.last_sampled = 0.0
        self.probes_sent = 0
        self.next_quote = 0.0

    def offer(self, client_address: str) -> registration_pb2.ExitOffer:
        """The offer to the client at client_address: response traffic at what
        the mesh charges the exit to carry it there, plus the exit's fee."""
        carried = response_price(self.rt.state.mesh_routes, client_address)
        offer = registration_pb2.ExitOffer(
            exit_id=self.rt.node_id, wireguard_key=self.identity.wireguard_public,
            tunnel_port=self.settings.tunnel_port, price_up=money(self.settings.price_up),
            price_down=money(self.settings.fee_down + carried),
            identity_key=self.identity.identity_key)
        offer.signature = self.identity.sign(offer_message(offer))
        return offer

    def stub(self, where: ExitAddress) -> registration_pb2_grpc.ExitRegistrationStub:
        channel = self.channels.get(where.target)
        if channel is None:
            channel = self.channels[where.target] = grpc.aio.insecure_channel(where.target)
        return registration_pb2_grpc.ExitRegistrationStub(channel)

    async def run(self) -> None:
        loops = []
        if self.settings.serve:
            if self.rt.cfg.node.uplinks:
                await asyncio.to_thread(effects.install_nat, self.rt.cfg.node.uplinks)
            loops.append(self.serve())
        if self.settings.exits:
            loops.append(self.use_exits())
        try:
            await asyncio.gather(*loops)
        finally:
            for channel in self.channels.values():
                await channel.close()

    # -- exit side ---------------------------------------------------------------

    async def serve(self) -> None:
        assert self.tunnels is not None
        tunnels = self.tunnels
        await asyncio.to_thread(tunnels.ensure_exit, self.exit_interface,
                                self.settings.tunnel_port, exit_address(self.settings.client_pool))
        await asyncio.to_thread(effects.install_enforcement, self.settings.throttle_rate_bps // 8)
        await asyncio.to_thread(effects.set_access, *self.addresses_by_access())
        for client in list(self.rt.state.clients.values()):
            registration = client.registration
            await asyncio.to_thread(tunnels.ensure_client_peer, self.exit_interface,
                                    registration.client_wireguard_key,
                                    list(registration.client_addresses))
        server = grpc.aio.server()
        registration_pb2_grpc.add_ExitRegistrationServicer_to_server(
            RegistrationServicer(self), server)
        server.add_insecure_port(f"[::]:{self.settings.registration_port}")
        await server.start()
        log.info(kv("exit.serving", port=self.settings.registration_port,
                    tunnel=self.exit_interface, tunnel_port=self.settings.tunnel_port,
                    clients=len(self.rt.state.clients)))
        try:
            while not self.rt.stopping.is_set():
                try:
                    await self.watch_clients()
                except (WireGuardError, OSError, NftError, subprocess.SubprocessError) as err:
                    log.warning(kv("exit.kernel_failed", error=str(err)))
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(self.rt.stopping.wait(), self.settings.sample_interval)
        finally:
            await server.stop(0.5)

    async def watch_clients(self) -> None:
        """ExitTunnelUp once a client's handshake arrived, Down when it went stale."""
        assert self.tunnels is not None
        peers = await asyncio.to_thread(self.tunnels.peer_transfer, self.exit_interface)
        for client_id, client in list(self.rt.state.clients.items()):
            key = effects.b64(client.registration.client_wireguard_key)
            handshake, received, sent = peers.get(key, (0, 0, 0))
            await self.meter(EXIT, self.rt.node_id, client_id, client, (received, sent),
                             client.registration)
            await self.enforce(client_id, self.rt.state.clients[client_id])
            # WireGuard renews the handshake every 2 minutes while traffic flows.
            alive = handshake > 0 and time.time() - handshake < 180
            if alive and not client.tunnel_up:
                await self.rt.publish(Outgoing("tunnel_up", client_id, exit_pb2.ExitTunnelUp(
                    role=EXIT, peer_id=client_id, tunnel_interface=self.exit_interface,
                    peer_wireguard_key=client.registration.client_wireguard_key,
                    peer_addresses=client.registration.client_addresses)))
                log.info(kv("exit.client_up", client=client_id))
            elif not alive and client.tunnel_up:
                await self.rt.publish(Outgoing("tunnel_down", client_id, exit_pb2.ExitTunnelDown(
                    role=EXIT, peer_id=client_id, tunnel_interface=self.exit_interface,
                    reason=exit_pb2.TUNNEL_DOWN_REASON_UNRESPONSIVE)))
                log.info(kv("exit.client_down", client=client_id))

    async def meter(self, role: exit_pb2.ExitRole, exit_id: str, client_id: str,
                    record: exit_pb2.ExitState.Client | exit_pb2.ExitState.Exit,
                    counters: tuple[int, int], registration: exit_pb2.ExitRegistered) -> None:
        """A ClientUsageMetered for the bytes since the last reading, if any:
        up is what the client sent, down what the exit sent it."""
        used = usage_since((record.up_counter, record.down_counter), counters,
                           (amount(registration.price_up), amount(registration.price_down)))
        if not (used.bytes_up or used.bytes_down or used.reset):
            return
        metered = exit_pb2.ClientUsageMetered(
            role=role, exit_id=exit_id, client_id=client_id, bytes_up=used.bytes_up,
            bytes_down=used.bytes_down, charged=money(used.charged),
            bytes_up_counter=counters[0], bytes_down_counter=counters[1],
            counters_reset=used.reset)
        metered.period_end.GetCurrentTime()
        peer = client_id if role == EXIT else exit_id
        sequence = await self.rt.publish(Outgoing("usage", peer, metered))
        await self.rt.wait_handled(sequence)
        # pay pays from this (a client), the operator reads it (either side).
        await self.rt.publish(Outgoing("debt", peer, record.balance))

    async def enforce(self, client_id: str, client: exit_pb2.ExitState.Client) -> None:
        """Throttle, then cut off a client (nothing of it is forwarded) while it
        owes too much; let it back once it has paid (its proofs still reach us)."""
        debt, usage = amount(client.balance.debt), amount(client.balance.usage_charged)
        access = client_access(debt, usage, self.settings.throttle_debt,
                               self.settings.cut_off_debt, self.settings.debt_tolerance)
        previous = client.access or exit_pb2.CLIENT_ACCESS_OPEN
        if access == previous:
            return
        sequence = await self.rt.publish(Outgoing("enforcement", client_id,
                                                  exit_pb2.ClientEnforcementChanged(
            client_id=client_id, access=access, previous=previous, debt=money(debt))))
        await self.rt.wait_handled(sequence)
        await asyncio.to_thread(effects.set_access, *self.addresses_by_access())
        if access == exit_pb2.CLIENT_ACCESS_BLOCKED:
            log.warning(kv("exit.cut_off", client=client_id, debt=debt))
        elif access == exit_pb2.CLIENT_ACCESS_THROTTLED:
            log.warning(kv("exit.throttled", client=client_id, debt=debt,
                           rate_bps=self.settings.throttle_rate_bps))
        else:
            log.info(kv("exit.let_back", client=client_id, debt=debt))

    def addresses_by_access(self) -> tuple[list[str], list[str]]:
        """The blocked clients' addresses, and the throttled ones'."""
        blocked: list[str] = []
        throttled: list[str] = []
        for client in self.rt.state.clients.values():
            if client.access == exit_pb2.CLIENT_ACCESS_BLOCKED:
                blocked += client.registration.client_addresses
            elif client.access == exit_pb2.CLIENT_ACCESS_THROTTLED:
                throttled += client.registration.client_addresses
        return blocked, throttled

    async def register(self, request: registration_pb2.RegisterRequest, client_address: str
                       ) -> exit_pb2.ExitRegistered | exit_pb2.RegistrationRefused:
        assert self.tunnels is not None
        async with self.lock:
            refusal = check_request(request, self.rt.node_id, now_ms(),
                                    int(self.settings.registration_window * 1000))
            addresses: list[str] | None = None
            if refusal is None:
                addresses = addresses_for(self.rt.state, request.client_id,
                                          request.identity_key, self.settings.client_pool)
                if addresses is None:
                    known = self.rt.state.clients.get(request.client_id)
                    refusal_reason = (exit_pb2.REFUSAL_REASON_BAD_SIGNATURE if known
                                      else exit_pb2.REFUSAL_REASON_ADDRESS_POOL_EXHAUSTED)
                    detail = ("the client id is registered to another identity" if known
                              else f"no free address in {self.settings.client_pool}")
                    return await self.refuse(request, refusal_reason, detail)
            if refusal is not None:
                return await self.refuse(request, refusal.reason, refusal.detail)
            known = self.rt.state.clients.get(request.client_id)
            if known is not None and known.access == exit_pb2.CLIENT_ACCESS_BLOCKED:
                return await self.refuse(
                    request, exit_pb2.REFUSAL_REASON_BLOCKED,
                    f"cut off for {amount(known.balance.debt)} wei unpaid: pay it first")
            assert addresses is not None
            offer = self.offer(client_address)
            registered = exit_pb2.ExitRegistered(
                role=EXIT, exit_id=self.rt.node_id, client_id=request.client_id,
                client_identity_key=request.identity_key,
                client_wireguard_key=request.wireguard_key,
                exit_wireguard_key=offer.wireguard_key, client_addresses=addresses,
                exit_endpoint_port=offer.tunnel_port, price_up=offer.price_up,
                price_down=offer.price_down,
                client_chain_address=chain_address(request.identity_key),
                exit_chain_address=self.identity.chain_address,
                exit_tunnel_address=exit_address(self.settings.client_pool).split("/")[0])
            sequence = await self.rt.publish(Outgoing("registered", request.client_id, registered))
            await self.rt.wait_handled(sequence)
            await asyncio.to_thread(self.tunnels.ensure_client_peer, self.exit_interface,
                                    request.wireguard_key, addresses)
            log.info(kv("exit.registered", client=request.client_id,
                        addresses=",".join(addresses)))
            return registered

    async def refuse(self, request: registration_pb2.RegisterRequest,
                     reason: exit_pb2.RefusalReason, detail: str) -> exit_pb2.RegistrationRefused:
        refused = exit_pb2.RegistrationRefused(
            role=EXIT, exit_id=self.rt.node_id, client_id=request.client_id[:64],
            reason=reason, detail=detail)
        log.warning(kv("exit.refused", client=refused.client_id,
                       reason=exit_pb2.RefusalReason.Name(reason), detail=detail))
        await self.rt.publish(Outgoing("refused", refused.client_id or "unknown", refused))
        return refused

    # -- client side -------------------------------------------------------------

    async def use_exits(self) -> None:
        while not self.rt.stopping.is_set():
            try:
                await self.client_tick()
            except grpc.aio.AioRpcError as err:
                log.info(kv("exit.call_failed", code=err.code().name, detail=err.details()))
            except (WireGuardError, OSError, subprocess.SubprocessError) as err:
                # The kernel refused a change: said, and tried again next tick.
                log.warning(kv("exit.tunnel_failed", tunnel=self.client_tunnel or "-",
                               error=str(err)))
                self.client_tunnel = ""
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self.rt.stopping.wait(), TICK_SECONDS)

    async def client_tick(self) -> None:
        assert self.tunnels is not None
        state = self.rt.state
        selected = state.selected_exit_id
        if selected and state.exits[selected].HasField("registration"):
            registration = state.exits[selected].registration
            name = effects.client_interface(self.identity.wireguard_public,
                                            registration.exit_wireguard_key)
            if name != self.client_tunnel:
                # First time since (re)start: make the kernel match the log.
                await asyncio.to_thread(
                    self.tunnels.ensure_client, name, registration.exit_wireguard_key,
                    f"[{registration.exit_endpoint_address}]:{registration.exit_endpoint_port}",
                    list(registration.client_addresses))
                self.client_tunnel, self.last_received = name, (0, time.monotonic())
            await self.check_liveness(selected, name)
            if state.exits[selected].tunnel_up and time.monotonic() >= self.next_quote:
                await self.requote(selected)
            return
        await self.select_exit()

    async def check_liveness(self, exit_id: str, name: str) -> None:
        assert self.tunnels is not None
        transfer = await asyncio.to_thread(self.tunnels.received, name)
        received, sent = transfer if transfer else (0, 0)
        now = time.monotonic()
        if transfer and now - self.last_sampled >= self.settings.sample_interval:
            self.last_sampled = now
            known = self.rt.state.exits[exit_id]
            await self.meter(CLIENT, exit_id, self.rt.node_id, known, (sent, received),
                             known.registration)
        if received != self.last_received[0]:
            self.last_received = (received, now)
            if not self.rt.state.exits[exit_id].tunnel_up:
                registration = self.rt.state.exits[exit_id].registration
                await self.rt.publish(Outgoing("tunnel_up", exit_id, exit_pb2.ExitTunnelUp(
                    role=CLIENT, peer_id=exit_id, tunnel_interface=name,
                    peer_wireguard_key=registration.exit_wireguard_key,
                    endpoint_address=registration.exit_endpoint_address,
                    endpoint_port=registration.exit_endpoint_port,
                    local_addresses=registration.client_addresses)))
                log.info(kv("exit.tunnel_up", exit=exit_id, tunnel=name))
            return
        silent = now - self.last_received[1]
        if silent < self.settings.liveness_seconds:
            if silent >= PROBE_AFTER_SECONDS:
                self.probes_sent += 1
                registration = self.rt.state.exits[exit_id].registration
                await asyncio.to_thread(effects.probe, registration.exit_tunnel_address, name,
                                        self.probes_sent)
            return
        log.warning(kv("exit.unresponsive", exit=exit_id, tunnel=name,
                       silent_s=round(silent, 1)))
        await self.rt.publish(Outgoing("tunnel_down", exit_id, exit_pb2.ExitTunnelDown(
            role=CLIENT, peer_id=exit_id, tunnel_interface=name,
            reason=exit_pb2.TUNNEL_DOWN_REASON_UNRESPONSIVE)))
        await asyncio.to_thread(self.tunnels.remove, name)
        self.client_tunnel = ""
        self.avoid[exit_id] = now

    async def select_exit(self) -> None:
        state = self.rt.state
        now = time.monotonic()
        configured = {e.name: e for e in self.settings.exit_addresses()}
        offers: dict[str, registration_pb2.ExitOffer] = {}
        candidates = []
        for exit_id, where in configured.items():
            known = state.exits.get(exit_id)
            if known is None or not known.HasField("route") \
                    or now - self.avoid.get(exit_id, -RETRY_SECONDS) < RETRY_SECONDS:
                continue
            try:
                offer = await self.checked_offer(where)
            except grpc.aio.AioRpcError as err:
                log.info(kv("exit.no_offer", exit=exit_id, code=err.code().name))
                offer = None
            if offer is None:
                self.avoid[exit_id] = now
                continue
            offers[exit_id] = offer
            candidates.append(Candidate(exit_id, known.route.metric, amount(
                known.route.path_price) + amount(offer.price_up) + amount(offer.price_down)))
        avoid = {e for e, at in self.avoid.items() if now - at < AVOID_SECONDS}
        chosen = choose(candidates, avoid)
        if chosen is None:
            return
        previous = self.client_tunnel_exit()
        offer = offers[chosen.exit_id]
        registered = await self.register_with(configured[chosen.exit_id], offer)
        if registered is None:
            return
        route = state.exits[chosen.exit_id].route
        sequence = await self.rt.publish(Outgoing("selected", chosen.exit_id, exit_pb2.ExitSelected(
            exit_id=chosen.exit_id, previous_exit_id=previous,
            reason=exit_pb2.SELECTION_REASON_FAILOVER if previous
            else exit_pb2.SELECTION_REASON_INITIAL, metric=route.metric,
            path_price=route.path_price, price_up=offer.price_up, price_down=offer.price_down)))
        await self.rt.wait_handled(sequence)
        log.info(kv("exit.selected", exit=chosen.exit_id, metric=route.metric,
                    previous=previous or "-", addresses=",".join(registered.client_addresses)))

    async def register_with(self, where: ExitAddress, offer: registration_pb2.ExitOffer
                            ) -> exit_pb2.ExitRegistered | None:
        """Register with the exit that made offer; the registration, recorded,
        or None (refused, or an answer not the offer's: the exit is avoided)."""
        request = registration_pb2.RegisterRequest(
            exit_id=where.name, client_id=self.rt.node_id,
            identity_key=self.identity.identity_key,
            wireguard_key=self.identity.wireguard_public, timestamp_ms=now_ms())
        request.signature = self.identity.sign(registration_message(request))
        try:
            answer = await self.stub(where).Register(request, timeout=CALL_TIMEOUT)
        except grpc.aio.AioRpcError as err:
            log.warning(kv("exit.registration_failed", exit=where.name,
                           code=err.code().name, detail=err.details()))
            await self.rt.publish(Outgoing("refused", where.name, exit_pb2.RegistrationRefused(
                role=CLIENT, exit_id=where.name, client_id=self.rt.node_id,
                reason=refusal_reason(err), detail=f"{err.code().name}: {err.details()}")))
            self.avoid[where.name] = time.monotonic()
            return None
        wrong = check_answer(answer, offer)
        if wrong is not None:
            log.warning(kv("exit.bad_answer", exit=where.name, why=wrong))
            self.avoid[where.name] = time.monotonic()
            return None
        registered = exit_pb2.ExitRegistered()
        registered.CopyFrom(answer)
        registered.role = CLIENT
        registered.exit_identity_key = offer.identity_key
        registered.exit_endpoint_address = where.address
        registered.exit_endpoint_port = offer.tunnel_port
        await self.rt.publish(Outgoing("registered", where.name, registered))
        self.next_quote = time.monotonic() + self.settings.requote_seconds
        return registered

    async def checked_offer(self, where: ExitAddress) -> registration_pb2.ExitOffer | None:
        """The exit's offer if it is its own, signed by the identity pinned at
        our first registration with it (if any); None, logged, if not."""
        offer = await self.stub(where).Offer(registration_pb2.OfferRequest(),
                                             timeout=CALL_TIMEOUT)
        known = self.rt.state.exits.get(where.name)
        pinned = known.registration.exit_identity_key if known is not None else b""
        wrong = check_offer(offer, where.name, pinned)
        if wrong is not None:
            log.warning(kv("exit.bad_offer", exit=where.name, why=wrong))
            return None
        return offer

    async def requote(self, exit_id: str) -> None:
        """Ask the exit in use for its offer now; register again (same tunnel,
        same addresses) when its prices moved: the exit's route to us, and so
        what our response traffic costs it, may have changed since."""
        self.next_quote = time.monotonic() + self.settings.requote_seconds
        where = {e.name: e for e in self.settings.exit_addresses()}.get(exit_id)
        if where is None:
            return
        offer = await self.checked_offer(where)
        registration = self.rt.state.exits[exit_id].registration
        if offer is None or not repriced(registration, offer):
            return
        log.info(kv("exit.requote", exit=exit_id, price_up=amount(offer.price_up),
                    price_down=amount(offer.price_down),
                    was_down=amount(registration.price_down)))
        await self.register_with(where, offer)

    def client_tunnel_exit(self) -> str:
        """The exit used before this selection (the one that failed), if any."""
        recent = [e for e, at in self.avoid.items() if time.monotonic() - at < AVOID_SECONDS]
        return max(recent, key=lambda e: self.avoid[e], default="")


class RegistrationServicer(registration_pb2_grpc.ExitRegistrationServicer):
    def __init__(self, loop: ExitLoop) -> None:
        self.loop = loop

    async def Offer(self, request: registration_pb2.OfferRequest,
                    context: grpc.aio.ServicerContext) -> registration_pb2.ExitOffer:
        return self.loop.offer(peer_address(context.peer()))

    async def Register(self, request: registration_pb2.RegisterRequest,
                       context: grpc.aio.ServicerContext) -> exit_pb2.ExitRegistered:
        answer = await self.loop.register(request, peer_address(context.peer()))
        if isinstance(answer, exit_pb2.RegistrationRefused):
            await context.abort(refusal_status(answer.reason),
                                f"{exit_pb2.RefusalReason.Name(answer.reason)}: {answer.detail}")
        assert isinstance(answer, exit_pb2.ExitRegistered)
        return answer


async def exit_loop(rt: ServiceRuntime[exit_pb2.ExitState]) -> None:
    await rt.context.run()


def exit_prefixes(settings: ExitSettings) -> dict[str, str]:
    return {e.prefix: e.name for e in settings.exit_addresses()}


def configure(definition: ServiceDefinition[Any], cfg: NodeConfig) -> ServiceDefinition[Any]:
    """Handlers closed over the configured exits' addresses."""
    settings = cfg.section("exit", ExitSettings)
    return dataclasses.replace(
        definition, handlers=make_handlers(exit_prefixes(settings), serving=settings.serve))


DEFINITION: ServiceDefinition[Any] = ServiceDefinition(
    name="exit",
    state_type=exit_pb2.ExitState,
    subjects=("evt.exit.registered.>", "evt.exit.selected.>", "evt.exit.tunnel_up.>",
              "evt.exit.tunnel_down.>", "evt.exit.usage.>", "evt.exit.enforcement.>",
              "evt.route.changed.>", "evt.pay.received.>", "evt.pay.sent.>",
              "evt.pay.reverted.>"),
    handlers=make_handlers({}),
    summarize=summarize,
    tasks=(exit_loop,),
    context=ExitLoop,
)
