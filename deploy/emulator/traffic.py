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
        self.targets: list[tuple[socket.socket, str, int]] = []
        self.indexes: dict[tuple[str, str], int] = {}  # (router, tunnel) -> ifindex
        self.thread = threading.Thread(target=self._run, name="neighbor-traffic", daemon=True)

    def refresh(self) -> None:
        """Find every link up (links come and go). Call it from the thread that
        made this object: it forks (`ip netns exec`), and a fork beside gRPC
        calls on another thread is unsafe."""
        targets = []
        for name, router in self.mesh.routers.items():
            if "link" not in router.services:
                continue
            node = client.Node.open(router.layout.root)
            with contextlib.suppress(client.NodeError):
                for row in client.link_rows(node):
                    if row["neighbor"] <= name:
                        continue
                    key = (name, row["tunnel"])
                    if not self.indexes.get(key):
                        self.indexes[key] = int(self.mesh.fabric.run(
                            name, ["cat", f"/sys/class/net/{row['tunnel']}/ifindex"],
                            check=False).stdout or 0)
                    index = self.indexes[key]
                    if index:
                        targets.append((self.sinks[name], row["peer_address"], index))
        self.targets = targets

    def _run(self) -> None:
        payload = b"m" * DATAGRAM
        while not self.stop.is_set():
            for sock, address, index in self.targets:
                with contextlib.suppress(OSError):
                    sock.sendto(payload, (address, PORT, 0, index))
                    self.sent += DATAGRAM
            # one datagram per link per tick: the tick sets the rate
            self.stop.wait(DATAGRAM / self.rate)

    def __enter__(self) -> NeighborTraffic:
        self.refresh()
        self.thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self.stop.set()
        self.thread.join(timeout=10)
        for sink in self.sinks.values():
            sink.close()
