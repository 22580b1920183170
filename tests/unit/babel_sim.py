"""Babel speakers wired to each other in memory, on a simulated clock: for
testing the protocol logic (the namespace tests run the real thing)."""

from __future__ import annotations

from collections.abc import Iterable

from services.route.babel.codec import network
from services.route.babel.speaker import InterfaceSpec, Speaker
from services.route.babel.table import Selected


def own_prefix(index: int) -> str:
    return f"2001:db8:0:{index:x}::1/128"


class SimulatedMesh:
    def __init__(self, edges: Iterable[tuple[str, str]], prices: dict[str, int] | None = None,
                 hello: float = 1.0) -> None:
        edges = list(edges)
        self.names = sorted({n for edge in edges for n in edge})
        self.speakers: dict[str, Speaker] = {}
        self.address = {n: f"fe80::{i + 1:x}" for i, n in enumerate(self.names)}
        self.prefix = {n: network(own_prefix(i + 1)) for i, n in enumerate(self.names)}
        self.links: dict[tuple[str, str], tuple[str, str]] = {}
        self.cut: set[frozenset[str]] = set()
        self.now = 0.0
        for a, b in edges:
            self.links[(a, f"to-{b}")] = (b, f"to-{a}")
            self.links[(b, f"to-{a}")] = (a, f"to-{b}")
        for i, name in enumerate(self.names):
            self.speakers[name] = self.start(name, i, (prices or {}).get(name, 0), hello)

    def start(self, name: str, index: int, price: int, hello: float, seqno: int = 0) -> Speaker:
        speaker = Speaker(bytes(7) + bytes((index + 1,)), seqno, hello_interval=hello,
                          own_price=price)
        speaker.originate([self.prefix[name]])
        speaker.set_interfaces(self.interfaces(name), self.now)
        return speaker

    def interfaces(self, name: str) -> list[InterfaceSpec]:
        return [InterfaceSpec(iface, self.address[peer], local_address=self.address[name])
                for (node, iface), (peer, _) in self.links.items() if node == name]

    def run(self, seconds: float, step: float = 0.05) -> None:
        for _ in range(round(seconds / step)):
            self.now += step
            for speaker in self.speakers.values():
                speaker.tick(self.now)
            for name, speaker in self.speakers.items():
                for datagram in speaker.take_outbox():
                    peer, peer_interface = self.links[(name, datagram.interface)]
                    if frozenset((name, peer)) not in self.cut:
                        self.speakers[peer].receive(peer_interface, self.address[name],
                                                    datagram.data, self.now)

    def route(self, name: str, to: str) -> Selected | None:
        return self.speakers[name].selected.get(self.prefix[to])

    def via(self, name: str, to: str) -> str | None:
        """The neighbor name's route to `to` goes through."""
        route = self.route(name, to)
        return None if route is None else route.neighbor.split("/")[0].removeprefix("to-")

    def converged(self) -> bool:
        return all(self.route(a, b) is not None for a in self.names for b in self.names
                   if a != b)
