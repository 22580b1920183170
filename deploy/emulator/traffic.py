"""Real traffic for the emulated mesh: every router sends UDP to the own
address of each router whose name sorts after its own, routed by Babel: to
its neighbors through their tunnel at `rate`, to the routers beyond them at
`far_rate`, through relays who bill the hop before them at their advertised
price and pay the hop after them its own. One way only: traffic as large
both ways nets to no debt, and nothing would be paid.
"""

from __future__ import annotations

import contextlib
import socket
import threading

from pyroute2 import netns

from .mesh import EmulatedMesh

PORT = 9199  # each router's sink
DATAGRAM = 1_000


class MeshTraffic:
    def __init__(self, mesh: EmulatedMesh, rate: int, far_rate: int = 0) -> None:
        """Sockets are made here, on the caller's thread: pyroute2 forks to
        enter a namespace, and a fork beside gRPC calls on another thread is
        unsafe."""
        self.rate = rate
        self.far_rate = far_rate
        self.stop = threading.Event()
        self.sent = 0
        self.sinks = {}
        for name, router in mesh.routers.items():
            sink = netns.create_socket(router.namespace, socket.AF_INET6, socket.SOCK_DGRAM, 0,
                                       flags=0)
            sink.bind(("::", PORT))
            self.sinks[name] = sink
        linked = {frozenset((link.a, link.b)) for link in mesh.topology.links}
        self.near: list[tuple[socket.socket, str]] = []
        self.far: list[tuple[socket.socket, str]] = []
        for name in mesh.routers:
            for other in mesh.routers:
                if other > name:
                    target = (self.sinks[name], mesh.fabric.nodes[other].ipv6)
                    (self.near if frozenset((name, other)) in linked else self.far).append(target)
        self.thread = threading.Thread(target=self._run, name="mesh-traffic", daemon=True)

    def _run(self) -> None:
        payload = b"m" * DATAGRAM
        # One tick per datagram to each neighbor; far targets get one every
        # `far_every` ticks, which sets their rate.
        far_every = max(1, round(self.rate / self.far_rate)) if self.far_rate else 0
        tick = 0
        while not self.stop.is_set():
            targets = self.near + (self.far if far_every and tick % far_every == 0 else [])
            for sock, address in targets:
                # No route yet (Babel still converging) is no traffic yet.
                with contextlib.suppress(OSError):
                    sock.sendto(payload, (address, PORT))
                    self.sent += DATAGRAM
            tick += 1
            self.stop.wait(DATAGRAM / self.rate)

    def __enter__(self) -> MeshTraffic:
        self.thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self.stop.set()
        self.thread.join(timeout=10)
        for sink in self.sinks.values():
            sink.close()
