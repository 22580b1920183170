"""The live neighbor table: pure, driven by (hello, interface, source, now).

It decides when a hello is news (a NeighborSeen), when a neighbor has gone
quiet (a NeighborLost), and bounds what a stranger can make the router keep:
a fixed number of neighbors per interface and a rate per source address.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from google.protobuf import duration_pb2, timestamp_pb2
from mesh.discovery.v1 import discovery_pb2

from .hello import HelloInfo


@dataclass
class Entry:
    seen: discovery_pb2.NeighborSeen
    last_heard_ms: int
    last_sent_at_ms: int


@dataclass
class _Bucket:
    tokens: float
    updated_ms: int


def entry_key(neighbor_id: str, interface: str) -> str:
    return f"{neighbor_id}/{interface}"


def _timestamp(ms: int) -> timestamp_pb2.Timestamp:
    return timestamp_pb2.Timestamp(seconds=ms // 1000, nanos=(ms % 1000) * 1_000_000)


class RateLimited(ValueError):
    """A source sends hellos faster than any honest neighbor would."""


class Replayed(ValueError):
    """A hello no newer than one already accepted from that neighbor on that link."""


class TableFull(ValueError):
    """The interface already has as many neighbors as the router will keep."""


@dataclass
class NeighborTable:
    dead_intervals: float = 3.5
    max_per_interface: int = 64
    max_hellos_per_second: float = 10.0
    entries: dict[str, Entry] = field(default_factory=dict)
    # Newest accepted sent_at per identity key, across interfaces: a hello
    # captured on one link and replayed on another is no newer, so refused.
    # Senders stamp each interface's hello 1 ms apart for this reason.
    last_sent_at: dict[bytes, int] = field(default_factory=dict)
    _buckets: dict[str, _Bucket] = field(default_factory=dict)

    def admit(self, source: str, now_ms: int) -> None:
        """Spend a token of source's bucket; RateLimited when it has none."""
        bucket = self._buckets.get(source)
        if bucket is None:
            if len(self._buckets) > 4 * self.max_per_interface:
                self._buckets.clear()  # bounded: forget every stranger at once
            bucket = self._buckets[source] = _Bucket(self.max_hellos_per_second, now_ms)
        elapsed = (now_ms - bucket.updated_ms) / 1000
        bucket.tokens = min(self.max_hellos_per_second,
                            bucket.tokens + elapsed * self.max_hellos_per_second)
        bucket.updated_ms = now_ms
        if bucket.tokens < 1:
            raise RateLimited(f"{source} sends over {self.max_hellos_per_second:g} hellos/s")
        bucket.tokens -= 1

    def heard(
        self, hello: HelloInfo, interface: str, source: str, now_ms: int
    ) -> discovery_pb2.NeighborSeen | None:
        """A valid hello arrived: the NeighborSeen to publish, or None if it is no news."""
        last = self.last_sent_at.get(hello.identity_key)
        if last is not None and hello.sent_at_ms <= last:
            raise Replayed(f"sent_at {hello.sent_at_ms} is not after {last}")
        key = entry_key(hello.node_id, interface)
        seen = discovery_pb2.NeighborSeen(
            neighbor_id=hello.node_id,
            identity_key=hello.identity_key,
            chain_address=hello.chain_address,
            interface_name=interface,
            link_local_address=source,
            endpoint_address=source,
            endpoint_port=hello.endpoint_port,
            hello_interval=duration_pb2.Duration(
                seconds=hello.hello_interval_ms // 1000,
                nanos=(hello.hello_interval_ms % 1000) * 1_000_000,
            ),
            hello_sent_at=_timestamp(hello.sent_at_ms),
        )
        entry = self.entries.get(key)
        if entry is None:
            on_interface = sum(1 for k in self.entries if k.endswith(f"/{interface}"))
            if on_interface >= self.max_per_interface:
                raise TableFull(f"{interface} has {on_interface} neighbors already")
            seen.reason = discovery_pb2.NEIGHBOR_SEEN_REASON_FIRST
            self.entries[key] = Entry(seen, now_ms, hello.sent_at_ms)
            self.last_sent_at[hello.identity_key] = hello.sent_at_ms
            return seen
        self.last_sent_at[hello.identity_key] = hello.sent_at_ms
        entry.last_heard_ms = now_ms
        entry.last_sent_at_ms = hello.sent_at_ms
        if _same_neighbor(entry.seen, seen):
            return None
        seen.reason = discovery_pb2.NEIGHBOR_SEEN_REASON_CHANGED
        entry.seen = seen
        return seen

    def expire(self, now_ms: int) -> list[discovery_pb2.NeighborLost]:
        lost = []
        for key, entry in list(self.entries.items()):
            interval = entry.seen.hello_interval.ToMilliseconds()
            if now_ms - entry.last_heard_ms > self.dead_intervals * interval:
                del self.entries[key]
                lost.append(discovery_pb2.NeighborLost(
                    neighbor_id=entry.seen.neighbor_id,
                    interface_name=entry.seen.interface_name,
                    reason=discovery_pb2.NEIGHBOR_LOST_REASON_HELLO_TIMEOUT,
                    last_heard_at=_timestamp(entry.last_heard_ms),
                ))
        return lost

    def sources_on(self, interface: str) -> list[str]:
        """The addresses of the neighbors heard on interface."""
        return sorted(e.seen.endpoint_address for e in self.entries.values()
                      if e.seen.interface_name == interface)

    def restore(self, seen: discovery_pb2.NeighborSeen, now_ms: int) -> None:
        """Take back a neighbor from the projection after a restart: it gets a
        fresh dead interval to be heard again instead of being dropped at once."""
        key = entry_key(seen.neighbor_id, seen.interface_name)
        self.entries[key] = Entry(seen, now_ms, seen.hello_sent_at.ToMilliseconds())
        self.last_sent_at[seen.identity_key] = max(
            self.last_sent_at.get(seen.identity_key, 0), seen.hello_sent_at.ToMilliseconds()
        )


def unicast_targets(peers: tuple[str, ...], answer: bool, heard: list[str]) -> list[str]:
    """Whom to hello over an uplink: the configured internet peers, and, when
    answering, whoever helloed us there (an exit hellos back its gateways)."""
    return sorted(set(peers) | (set(heard) if answer else set()))


def _same_neighbor(a: discovery_pb2.NeighborSeen, b: discovery_pb2.NeighborSeen) -> bool:
    """Equal in everything but the freshness field and the reason."""
    return (a.identity_key, a.endpoint_address, a.endpoint_port, a.hello_interval) == (
        b.identity_key, b.endpoint_address, b.endpoint_port, b.hello_interval
    )
