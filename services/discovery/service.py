"""discovery's definition, settings, and the hello loop (its side effects)."""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import random
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from mesh.discovery.v1 import discovery_pb2

from services.common.config import ConfigError
from services.common.identity import Identity
from services.common.interfaces import Interface, physical_interfaces
from services.common.logs import kv
from services.common.runtime import Outgoing, ServiceDefinition, ServiceRuntime
from services.link.handshake import HANDSHAKE_PORT

from . import effects
from .handlers import HANDLERS, summarize
from .hello import HELLO_GROUP, HelloRejected, decode_hello, encode_hello
from .table import NeighborTable, RateLimited, Replayed, TableFull, unicast_targets

log = logging.getLogger("discovery")

REJECTION_LOG_EVERY_MS = 10_000


@dataclass(frozen=True)
class DiscoverySettings:
    hello_interval_ms: int = field(default=1000, metadata={"help": "ms between hellos"})
    dead_intervals: float = field(
        default=3.5, metadata={"help": "a neighbor is lost after this many of its hello intervals"}
    )
    max_neighbors: int = field(
        default=64, metadata={"help": "neighbors kept per interface; more are refused"}
    )
    max_hellos_per_second: float = field(
        default=10.0, metadata={"help": "hellos accepted per second from one source address"}
    )
    internet_peers: tuple[str, ...] = field(default=(), metadata={
        "help": "IPv6 addresses of routers across the internet (exits) to hello, unicast, "
                "out of every [node] uplink: a gateway's links to its exits"})
    answer_internet_peers: bool = field(default=False, metadata={
        "help": "hello back to any router that hellos us over an uplink (an exit's "
                "setting); off, an uplink hears only the configured internet_peers"})

    def __post_init__(self) -> None:
        canonical = []
        for address in self.internet_peers:
            try:
                canonical.append(str(ipaddress.IPv6Address(address)))
            except ValueError:
                raise ConfigError(f"[discovery] internet_peers: {address!r} is not an "
                                  "IPv6 address") from None
        # As a hello's source reads, so that one from a peer is recognised.
        object.__setattr__(self, "internet_peers", tuple(canonical))


def now_ms() -> int:
    return time.time_ns() // 1_000_000


class HelloLoop:
    """Sends hellos on every physical interface and turns what it hears into events."""

    def __init__(self, rt: ServiceRuntime[discovery_pb2.DiscoveryState]) -> None:
        self.rt = rt
        self.settings = rt.cfg.section("discovery", DiscoverySettings)
        self.identity = Identity.load_or_create(rt.cfg.node.data_dir / "keys")
        self.table = NeighborTable(
            dead_intervals=self.settings.dead_intervals,
            max_per_interface=self.settings.max_neighbors,
            max_hellos_per_second=self.settings.max_hellos_per_second,
        )
        self.sockets: dict[str, tuple[Interface, socket.socket]] = {}
        self.uplink_sockets: dict[str, tuple[Interface, socket.socket]] = {}
        self.inbox: asyncio.Queue[tuple[bytes, str, str]] = asyncio.Queue(maxsize=1024)
        self.rejections: dict[tuple[str, str], int] = {}
        self.last_rejection_log: dict[tuple[str, str], int] = {}

    @property
    def on_internet(self) -> bool:
        return bool(self.settings.internet_peers) or self.settings.answer_internet_peers

    def refresh_interfaces(self) -> None:
        node = self.rt.cfg.node
        self._refresh(self.sockets, physical_interfaces(node.interfaces, node.uplinks),
                      effects.open_socket)
        # Uplinks by name, as configured: they carry no link-local hellos.
        uplinks = physical_interfaces(node.uplinks) if self.on_internet else []
        self._refresh(self.uplink_sockets, uplinks, effects.open_uplink_socket)

    def _refresh(self, sockets: dict[str, tuple[Interface, socket.socket]],
                 interfaces: list[Interface],
                 opener: Callable[[Interface], socket.socket]) -> None:
        loop = asyncio.get_running_loop()
        wanted = {i.name: i for i in interfaces}
        for name in list(sockets):
            if name not in wanted or wanted[name].index != sockets[name][0].index:
                interface, sock = sockets.pop(name)
                loop.remove_reader(sock.fileno())
                sock.close()
                log.info(kv("interface.removed", interface=name))
        for name, interface in wanted.items():
            if name in sockets:
                continue
            try:
                sock = opener(interface)
            except OSError as err:
                log.warning(kv("interface.unusable", interface=name, error=err))
                continue
            sockets[name] = (interface, sock)
            loop.add_reader(sock.fileno(), self._readable, interface, sock)
            log.info(kv("interface.added", interface=name,
                        kind="uplink" if sockets is self.uplink_sockets else "link"))

    def _readable(self, interface: Interface, sock: socket.socket) -> None:
        while (got := effects.receive(sock)) is not None:
            data, source = got
            if self.inbox.full():
                self._reject(interface.name, source, "overload", "inbox full")
                continue
            self.inbox.put_nowait((data, source, interface.name))

    def _reject(self, interface: str, source: str, reason: str, detail: str) -> None:
        key = (source, reason)
        self.rejections[key] = self.rejections.get(key, 0) + 1
        now = now_ms()
        if now - self.last_rejection_log.get(key, -REJECTION_LOG_EVERY_MS) >= (
            REJECTION_LOG_EVERY_MS
        ):
            self.last_rejection_log[key] = now
            log.info(kv("hello.rejected", interface=interface, source=source, reason=reason,
                        detail=detail, count=self.rejections[key]))

    async def handle(self, data: bytes, source: str, interface: str) -> None:
        now = now_ms()
        if interface in self.uplink_sockets and not self.settings.answer_internet_peers and (
                source not in self.settings.internet_peers):
            self._reject(interface, source, "not-a-peer",
                         "an uplink hears only [discovery] internet_peers")
            return
        try:
            self.table.admit(source, now)
            hello = decode_hello(data, now)
            if hello.identity_key == self.identity.identity_key:
                return  # our own hello, looped back on a shared segment
            seen = self.table.heard(hello, interface, source, now)
        except HelloRejected as err:
            self._reject(interface, source, err.reason, str(err))
            return
        except Replayed as err:
            self._reject(interface, source, "replay", str(err))
            return
        except (RateLimited, TableFull) as err:
            self._reject(interface, source, type(err).__name__, str(err))
            return
        if seen is not None:
            log.info(kv("neighbor.seen", neighbor=seen.neighbor_id, interface=interface,
                        address=source, reason=discovery_pb2.NeighborSeenReason.Name(seen.reason)))
            await self.rt.publish(Outgoing("seen", seen.neighbor_id, seen))

    def send_hellos(self, now: int) -> None:
        """A hello out of every interface, each stamped 1 ms after the one
        before (the table refuses one no newer than a hello already heard):
        to the hello group on links, to the internet peers out of uplinks."""
        interval = self.settings.hello_interval_ms
        sockets = [*self.sockets.values(), *self.uplink_sockets.values()]
        for offset, (interface, sock) in enumerate(sockets):
            hello = encode_hello(self.identity, self.rt.node_id, HANDSHAKE_PORT, interval,
                                 now + offset)
            targets = [HELLO_GROUP]
            if interface.name in self.uplink_sockets:
                targets = unicast_targets(self.settings.internet_peers,
                                          self.settings.answer_internet_peers,
                                          self.table.sources_on(interface.name))
            for address in targets:
                try:
                    effects.send_hello(sock, interface, hello, address)
                except OSError as err:
                    log.debug(kv("hello.unsent", interface=interface.name, to=address,
                                 error=err))

    async def run(self) -> None:
        now = now_ms()
        for entry in self.rt.state.neighbors.values():
            self.table.restore(entry.seen, now)
        log.info(kv("identity", node=self.rt.node_id, key=self.identity.identity_key.hex(),
                    address="0x" + self.identity.chain_address.hex()))
        interval = self.settings.hello_interval_ms
        next_hello = 0
        while True:
            now = now_ms()
            if now >= next_hello:
                self.refresh_interfaces()
                self.send_hellos(now)
                # Jitter keeps neighbors that started together from staying in step.
                next_hello = now + int(interval * random.uniform(0.9, 1.1))
            for lost in self.table.expire(now):
                log.info(kv("neighbor.lost", neighbor=lost.neighbor_id,
                            interface=lost.interface_name))
                await self.rt.publish(Outgoing("lost", lost.neighbor_id, lost))
            try:
                got = await asyncio.wait_for(self.inbox.get(), timeout=0.1)
            except TimeoutError:
                continue
            await self.handle(*got)
            while not self.inbox.empty():
                await self.handle(*self.inbox.get_nowait())


async def hello_loop(rt: ServiceRuntime[discovery_pb2.DiscoveryState]) -> None:
    await HelloLoop(rt).run()


DEFINITION = ServiceDefinition(
    name="discovery",
    state_type=discovery_pb2.DiscoveryState,
    subjects=("evt.discovery.seen.>", "evt.discovery.lost.>"),
    handlers=HANDLERS,
    summarize=summarize,
    tasks=(hello_loop,),
)
