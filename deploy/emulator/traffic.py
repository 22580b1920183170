"""Real traffic for the emulated mesh: every router sends UDP through the
tunnel to each linked neighbor whose name sorts after its own, at a steady
rate, so the neighbors' meters bill it and their pay services settle the
debts over their channels. One way only: traffic as large both ways nets to
no debt, and nothing would be paid.

Only traffic between neighbors for now: it needs no routes (routing comes
with the route service), and a router pays its neighbor for what it sends
through their tunnel just as it would for forwarded traffic.
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time

from pyroute2 import netns

from deploy.meshctl import client

from .mesh import EmulatedMesh

PORT = 9199  # each router's sink
DATAGRAM = 1_000


class NeighborTraffic:
    def __init__(self, mesh: EmulatedMesh, bytes_per_second: int) -> None:
        self.mesh = mesh
        self.rate = bytes_per_second
        self.stop = threading.Event()
        self.sent = 0
        self.sinks = {}
        for name, router in mesh.routers.items():
            sink = netns.create_socket(router.namespace, socket.AF_INET6, socket.SOCK_DGRAM, 0,
                                       flags=0)
            sink.bind(("::", PORT))
            self.sinks[name] = sink
        self.thread = threading.Thread(target=self._run, name="neighbor-traffic", daemon=True)

    def _targets(self) -> list[tuple[socket.socket, str, int]]:
        """(a socket in the router's namespace, the neighbor's tunnel address,
        the tunnel's index) for every link up."""
        targets = []
        for name, router in self.mesh.routers.items():
            if "link" not in router.services:
                continue
            node = client.Node.open(router.layout.root)
            with contextlib.suppress(client.NodeError):
                for row in client.link_rows(node):
                    if row["neighbor"] <= name:
                        continue
                    index = int(self.mesh.fabric.run(
                        name, ["cat", f"/sys/class/net/{row['tunnel']}/ifindex"]).stdout)
                    targets.append((self.sinks[name], row["peer_address"], index))
        return targets

    def _run(self) -> None:
        targets: list[tuple[socket.socket, str, int]] = []
        refreshed = 0.0
        payload = b"m" * DATAGRAM
        while not self.stop.is_set():
            if time.monotonic() - refreshed > 5.0:  # links come and go
                with contextlib.suppress(Exception):
                    targets = self._targets()
                refreshed = time.monotonic()
            for sock, address, index in targets:
                with contextlib.suppress(OSError):
                    sock.sendto(payload, (address, PORT, 0, index))
                    self.sent += DATAGRAM
            # one datagram per link per tick: the tick sets the rate
            self.stop.wait(DATAGRAM / self.rate)

    def __enter__(self) -> NeighborTraffic:
        self.thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self.stop.set()
        self.thread.join(timeout=10)
        for sink in self.sinks.values():
            sink.close()
