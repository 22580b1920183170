"""meter's only I/O: the dataplane's counters and enforcement (kernel state)."""

from __future__ import annotations

from collections.abc import Iterable

from mesh.meter.v1 import meter_pb2

from dataplane.counters import Counters
from dataplane.enforcement import Enforcer, Mode
from dataplane.shim import Nft

_MODES = {
    meter_pb2.ENFORCEMENT_OPEN: Mode.OPEN,
    meter_pb2.ENFORCEMENT_THROTTLED: Mode.THROTTLED,
    meter_pb2.ENFORCEMENT_BLOCKED: Mode.BLOCKED,
}


class Dataplane:
    def __init__(self) -> None:
        self.nft = Nft()
        self.counters = Counters(self.nft)
        self.enforcer = Enforcer(self.nft)
        # Idempotent: an existing table (and its counts) is kept as it is.
        self.counters.install()
        self.enforcer.install()

    def set_destinations(self, prefixes: Iterable[str]) -> None:
        self.counters.set_destinations(sorted(prefixes))

    def sample(self) -> meter_pb2.CountersSampled:
        """One consistent snapshot of every neighbor's counters."""
        snap = self.counters.snapshot()
        sampled = meter_pb2.CountersSampled()
        by_tunnel: dict[str, meter_pb2.CountersSampled.NeighborCounters] = {}
        for tunnel, prefix, c in snap.items():
            if tunnel not in by_tunnel:
                by_tunnel[tunnel] = sampled.neighbors.add(tunnel_interface=tunnel)
            by_tunnel[tunnel].destinations.add(prefix=prefix, rx_bytes=c.rx_bytes,
                                               rx_packets=c.rx_packets, tx_bytes=c.tx_bytes,
                                               tx_packets=c.tx_packets)
        return sampled

    def enforce(self, wanted: dict[str, tuple[int, int]]) -> None:
        """Make the kernel's enforcement match {tunnel: (enforcement, rate bps)}."""
        current = self.enforcer.current()
        for tunnel, (enforcement, rate) in wanted.items():
            mode = _MODES[enforcement]
            if current.get(tunnel) != (mode, rate):
                self.enforcer.apply(tunnel, mode, rate)
        for tunnel in set(current) - set(wanted):
            self.enforcer.remove(tunnel)
