"""link's definition, settings, and its loop: handshakes, tunnels, liveness.

Rule for who starts: of two neighbors, the one with the lower identity key
sends the HandshakeInit; the other answers. Every datagram on the handshake
port starts with one byte saying which message follows.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import socket
import struct
import time
from dataclasses import dataclass, field

from mesh.link.v1 import link_pb2

from dataplane.policy import ForwardingPolicy, PolicySpec
from dataplane.shim import Nft
from services.common.identity import Identity, chain_address
from services.common.interfaces import physical_interfaces
from services.common.logs import kv
from services.common.runtime import Outgoing, ServiceDefinition, ServiceRuntime
from services.common.wire import WireRejected
from services.common.wireguard import WireGuardError
from services.discovery.hello import HELLO_PORT

from .handlers import HANDLERS, links_up, summarize
from .handshake import (
    HANDSHAKE_PORT,
    MAX_HANDSHAKE_BYTES,
    HandshakeRejected,
    Initiator,
    Offer,
    Responder,
)
from .tunnels import Tunnels, TunnelSpec, link_local_for, tunnel_name

log = logging.getLogger("link")

INIT, RESPONSE = b"\x01", b"\x02"
PKTINFO = struct.Struct("16sI")  # struct in6_pktinfo
REJECTION_LOG_EVERY_S = 10.0

REJECT_REASONS = {
    "oversize": link_pb2.LINK_REJECT_REASON_MALFORMED,
    "decode": link_pb2.LINK_REJECT_REASON_MALFORMED,
    "field": link_pb2.LINK_REJECT_REASON_MALFORMED,
    "signature": link_pb2.LINK_REJECT_REASON_BAD_SIGNATURE,
    "stale": link_pb2.LINK_REJECT_REASON_STALE,
    "future": link_pb2.LINK_REJECT_REASON_STALE,
    "replay": link_pb2.LINK_REJECT_REASON_REPLAYED,
    "wrong-peer": link_pb2.LINK_REJECT_REASON_IDENTITY_MISMATCH,
    "unsolicited": link_pb2.LINK_REJECT_REASON_DENIED,
    "unknown-neighbor": link_pb2.LINK_REJECT_REASON_UNKNOWN_NEIGHBOR,
    "identity-mismatch": link_pb2.LINK_REJECT_REASON_IDENTITY_MISMATCH,
}


class Refused(WireRejected):
    """A well-formed handshake this router will not accept (who sent it, not how)."""

    WHAT = "handshake"
    REASONS = frozenset({"unknown-neighbor", "identity-mismatch"})


@dataclass(frozen=True)
class LinkSettings:
    wireguard_port_min: int = field(
        default=20000, metadata={"help": "lowest WireGuard listen port (below 32768)"}
    )
    wireguard_port_max: int = field(default=32000, metadata={"help": "highest one"})
    retry_seconds: float = field(
        default=1.0, metadata={"help": "seconds between handshake attempts to a neighbor"}
    )
    # Not shorter: while a neighbor only receives from us, WireGuard's keepalives
    # pause (any packet counts as traffic), and its passive keepalive answers
    # one-way traffic only after 10 s.
    liveness_seconds: float = field(
        default=15.0,
        metadata={"help": "a tunnel that receives nothing this long is down (over 10 s)"},
    )


def now_ms() -> int:
    return time.time_ns() // 1_000_000


def endpoint(address: str, interface: str, port: int) -> str:
    """WireGuard's endpoint for a neighbor: a link-local address needs its
    interface; a global one (a router across the internet) is routed."""
    if ipaddress.IPv6Address(address).is_link_local:
        return f"[{address}%{interface}]:{port}"
    return f"[{address}]:{port}"


@dataclass
class Pending:
    initiator: Initiator
    neighbor_id: str
    interface: str
    address: str
    listen_port: int


class LinkLoop:
    def __init__(self, rt: ServiceRuntime[link_pb2.LinkState]) -> None:
        self.rt = rt
        self.settings = rt.cfg.section("link", LinkSettings)
        self.identity = Identity.load_or_create(rt.cfg.node.data_dir / "keys")
        self.tunnels = Tunnels(self.identity.wireguard_private_b64)
        self.policy = ForwardingPolicy(Nft())
        self.responder = Responder(self.identity, rt.node_id)
        self.pending: dict[str, Pending] = {}
        self.assigned: dict[str, int] = {}
        self.last_attempt: dict[str, float] = {}
        self.rx: dict[str, tuple[int, float]] = {}
        self.rejections: dict[tuple[str, str], tuple[int, float]] = {}
        self.sock = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_RECVPKTINFO, 1)
        self.sock.bind(("::", HANDSHAKE_PORT))
        self.sock.setblocking(False)

    # -- the forwarding policy -------------------------------------------------

    def install_policy(self) -> None:
        node = self.rt.cfg.node
        physical = [i.name for i in physical_interfaces(node.interfaces, node.uplinks)]
        self.policy.install(PolicySpec(
            physical=tuple(physical), hello_port=HELLO_PORT, handshake_port=HANDSHAKE_PORT,
            wg_port_min=self.settings.wireguard_port_min,
            wg_port_max=self.settings.wireguard_port_max, uplinks=self.rt.cfg.node.uplinks,
        ))
        log.info(kv("policy.installed", physical=",".join(physical) or "-"))

    # -- handshakes --------------------------------------------------------------

    def port_for(self, neighbor_id: str) -> int:
        link = self.rt.state.links.get(neighbor_id)
        if link is not None and link.status == link_pb2.LINK_STATUS_UP:
            return link.up.listen_port
        if neighbor_id in self.pending:
            return self.pending[neighbor_id].listen_port
        if neighbor_id in self.assigned:
            return self.assigned[neighbor_id]
        used = {link.up.listen_port for link in self.rt.state.links.values()
                if link.status == link_pb2.LINK_STATUS_UP}
        # Ports of links announced but not yet back through the log count too.
        used |= {p.listen_port for p in self.pending.values()} | set(self.assigned.values())
        for port in range(self.settings.wireguard_port_min, self.settings.wireguard_port_max + 1):
            if port not in used:
                return port
        raise RuntimeError("every WireGuard port of the configured range is in use")

    async def initiate(self) -> None:
        now = time.monotonic()
        up = links_up(self.rt.state)
        for neighbor_id, seen in self.rt.state.neighbors.items():
            if neighbor_id in up or seen.identity_key <= self.identity.identity_key:
                continue  # linked already, or theirs to start
            if now - self.last_attempt.get(neighbor_id, 0) < self.settings.retry_seconds:
                continue
            self.last_attempt[neighbor_id] = now
            port = self.port_for(neighbor_id)
            initiator = Initiator(self.identity, self.rt.node_id, port, seen.identity_key,
                                  now_ms())
            self.pending[neighbor_id] = Pending(initiator, neighbor_id, seen.interface_name,
                                                seen.endpoint_address, port)
            self.send(INIT + initiator.message, seen.endpoint_address, seen.interface_name)

    def send(self, data: bytes, address: str, interface: str) -> None:
        try:
            index = socket.if_nametoindex(interface)
            self.sock.sendto(data, (address, HANDSHAKE_PORT, 0, index))
        except OSError as err:
            log.debug(kv("handshake.unsent", to=address, interface=interface, error=err))

    async def on_datagram(self, data: bytes, address: str, interface: str) -> None:
        kind, body = data[:1], data[1:]
        try:
            if kind == INIT:
                await self.answer(body, address, interface)
            elif kind == RESPONSE:
                await self.complete(body, address, interface)
            else:
                raise HandshakeRejected("decode", f"unknown message kind {kind.hex() or 'empty'}")
        except WireRejected as err:
            await self.reject(err.reason, str(err), address, interface)

    async def answer(self, body: bytes, address: str, interface: str) -> None:
        offer = self.responder.peek(body, now_ms())
        seen = self.rt.state.neighbors.get(offer.node_id)
        if seen is None or seen.interface_name != interface:
            raise Refused("unknown-neighbor",
                                    f"{offer.node_id} has sent no valid hello on {interface}")
        if seen.identity_key != offer.identity_key:
            raise Refused("identity-mismatch",
                                    f"{offer.node_id}'s hello was signed by another key")
        port = self.port_for(offer.node_id)
        response, offer = self.responder.respond(body, now_ms(), port)
        self.send(RESPONSE + response, address, interface)
        await self.link_up(offer, interface, address, port)

    async def complete(self, body: bytes, address: str, interface: str) -> None:
        for neighbor_id, pending in list(self.pending.items()):
            if pending.address != address or pending.interface != interface:
                continue
            offer = pending.initiator.accept(body, now_ms())
            del self.pending[neighbor_id]
            await self.link_up(offer, interface, address, pending.listen_port)
            return
        raise HandshakeRejected("unsolicited", "a response to no handshake of ours")

    async def link_up(self, offer: Offer, interface: str, address: str, port: int) -> None:
        up = link_pb2.LinkUp(
            neighbor_id=offer.node_id, identity_key=offer.identity_key,
            chain_address=chain_address(offer.identity_key), wireguard_key=offer.wireguard_key,
            tunnel_interface=tunnel_name(self.identity.identity_key, offer.identity_key),
            physical_interface=interface, endpoint_address=address,
            endpoint_port=offer.wireguard_port, listen_port=port,
            tunnel_local_address=link_local_for(self.identity.identity_key),
            tunnel_peer_address=link_local_for(offer.identity_key),
            backend=link_pb2.TUNNEL_BACKEND_KERNEL if self.tunnels.wireguard.kernel
            else link_pb2.TUNNEL_BACKEND_WIREGUARD_GO,
        )
        current = self.rt.state.links.get(offer.node_id)
        if current is not None and current.status == link_pb2.LINK_STATUS_UP and current.up == up:
            return  # a retried handshake that changes nothing
        self.assigned[offer.node_id] = port
        log.info(kv("link.up", neighbor=offer.node_id, tunnel=up.tunnel_interface,
                    interface=interface, port=port, peer_port=offer.wireguard_port))
        await self.rt.publish(Outgoing("up", offer.node_id, up))

    async def reject(self, reason: str, detail: str, address: str, interface: str) -> None:
        key = (address, reason)
        count, last = self.rejections.get(key, (0, 0.0))
        now = time.monotonic()
        if now - last < REJECTION_LOG_EVERY_S:
            self.rejections[key] = (count + 1, last)
            return
        self.rejections[key] = (0, now)
        log.info(kv("handshake.rejected", source=address, interface=interface, reason=reason,
                    detail=detail, suppressed=count))
        rejected = link_pb2.LinkRejected(
            physical_interface=interface, remote_address=address, remote_port=HANDSHAKE_PORT,
            reason=REJECT_REASONS.get(reason, link_pb2.LINK_REJECT_REASON_DENIED),
            detail=detail[:200], suppressed=count,
        )
        await self.rt.publish(Outgoing("rejected", interface, rejected))

    # -- tunnels -------------------------------------------------------------------

    def wanted_tunnels(self) -> dict[str, TunnelSpec]:
        wanted = {}
        for up in links_up(self.rt.state).values():
            wanted[up.tunnel_interface] = TunnelSpec(
                name=up.tunnel_interface, listen_port=up.listen_port,
                peer_key=up.wireguard_key,
                endpoint=endpoint(up.endpoint_address, up.physical_interface, up.endpoint_port),
                local_address=up.tunnel_local_address,
            )
        return wanted

    def reconcile(self, wanted: dict[str, TunnelSpec]) -> bool:
        """Make the kernel's tunnels and forwarding set match the projection;
        False if a tunnel could not be made (the caller tries again)."""
        for name in self.tunnels.existing() - set(wanted):
            self.tunnels.remove(name)
        working = set()
        for spec in wanted.values():
            try:
                self.tunnels.ensure(spec)
                working.add(spec.name)
            except WireGuardError as err:
                log.warning(kv("tunnel.failed", tunnel=spec.name, error=err))
        self.policy.set_tunnels(working)
        return working == set(wanted)

    async def check_liveness(self) -> None:
        now = time.monotonic()
        received = self.tunnels.received_bytes()
        for neighbor_id, up in links_up(self.rt.state).items():
            name = up.tunnel_interface
            total = received.get(name)
            if total is None:
                continue
            last_total, since = self.rx.get(name, (-1, now))
            if total != last_total:
                self.rx[name] = (total, now)
            elif now - since > self.settings.liveness_seconds:
                self.rx.pop(name, None)
                log.info(kv("link.down", neighbor=neighbor_id, tunnel=name,
                            reason="liveness", quiet_seconds=round(now - since, 1)))
                await self.rt.publish(Outgoing("down", neighbor_id, link_pb2.LinkDown(
                    neighbor_id=neighbor_id, tunnel_interface=name,
                    reason=link_pb2.LINK_DOWN_REASON_LIVENESS_LOST,
                    detail=f"nothing received for {self.settings.liveness_seconds:g}s",
                )))

    # -- the loop --------------------------------------------------------------------

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        inbox: asyncio.Queue[tuple[bytes, str, str]] = asyncio.Queue(maxsize=1024)

        def readable() -> None:
            while True:
                try:
                    data, ancillary, _flags, source = self.sock.recvmsg(
                        MAX_HANDSHAKE_BYTES + 2, socket.CMSG_SPACE(PKTINFO.size)
                    )
                except BlockingIOError:
                    return
                # The arrival interface from IPV6_PKTINFO: a global source
                # address carries no scope id to tell it.
                index = next((PKTINFO.unpack(data_)[1] for level, kind, data_ in ancillary
                              if level == socket.IPPROTO_IPV6 and kind == socket.IPV6_PKTINFO),
                             source[3])
                with contextlib.suppress(OSError, asyncio.QueueFull):
                    interface = socket.if_indextoname(index)
                    inbox.put_nowait((data, source[0].split("%")[0], interface))

        loop.add_reader(self.sock.fileno(), readable)
        self.install_policy()
        log.info(kv("tunnels.backend", backend=self.tunnels.backend))
        seen_version = -1
        retry_at = float("inf")
        next_liveness = 0.0
        while True:
            if self.rt.changes.version != seen_version or time.monotonic() >= retry_at:
                seen_version = self.rt.changes.version
                # The projection is read here, on the loop that owns it; the
                # slow kernel work runs in a thread.
                done = await asyncio.to_thread(self.reconcile, self.wanted_tunnels())
                retry_at = float("inf") if done else time.monotonic() + 1.0
            await self.initiate()
            if time.monotonic() >= next_liveness:
                next_liveness = time.monotonic() + 1.0
                await self.check_liveness()
            try:
                got = await asyncio.wait_for(inbox.get(), timeout=0.2)
            except TimeoutError:
                continue
            await self.on_datagram(*got)


async def link_loop(rt: ServiceRuntime[link_pb2.LinkState]) -> None:
    await LinkLoop(rt).run()


DEFINITION = ServiceDefinition(
    name="link",
    state_type=link_pb2.LinkState,
    subjects=("evt.discovery.seen.>", "evt.discovery.lost.>", "evt.link.up.>",
              "evt.link.down.>", "evt.link.rejected.>"),
    handlers=HANDLERS,
    summarize=summarize,
    tasks=(link_loop,),
)
