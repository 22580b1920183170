"""Real traffic for the emulated mesh, one way only (traffic as large both
ways nets to no debt, and nothing would be paid):

- to neighbors: every router sends UDP through the tunnel to each linked
  neighbor whose name sorts after its own;
- across the mesh (`far_rate`): every router sends UDP to the own address of
  each router that is not its neighbor and whose name sorts after its own,
  routed by Babel through relays, who bill the hop before them at their
  advertised price and pay the hop after them its own.
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


class MeshTraffic:
    def __init__(self, mesh: EmulatedMesh, bytes_per_second: int, far_rate: int = 0) -> None:
        self.mesh = mesh
        self.rate = bytes_per_second
        self.far_rate = far_rate
        self.stop = threading.Event()
        self.sent = 0
        self.sinks = {}
        for name, router in mesh.routers.items():
            sink = netns.create_socket(router.namespace, socket.AF_INET6, socket.SOCK_DGRAM, 0,
                                       flags=0)
            sink.bind(("::", PORT))
            self.sinks[name] = sink
        self.targets: list[tuple[socket.socket, str, int]] = []
        self.far: list[tuple[socket.socket, str]] = []
        self.indexes: dict[tuple[str, str], int] = {}  # (router, tunnel) -> ifindex
        self.thread = threading.Thread(target=self._run, name="mesh-traffic", daemon=True)

    def refresh(self) -> None:
        """Find every link up (links come and go). Call it from the thread that
        made this object: it forks (`ip netns exec`), and a fork beside gRPC
        calls on another thread is unsafe."""
        targets, far = [], []
        for name, router in self.mesh.routers.items():
            if "link" not in router.services:
                continue
            node = client.Node.open(router.layout.root)
            with contextlib.suppress(client.NodeError):
                rows = client.link_rows(node)
                neighbors = {row["neighbor"] for row in rows}
                far += [(self.sinks[name], self.mesh.fabric.nodes[other].ipv6)
                        for other in self.mesh.routers
                        if other > name and other not in neighbors]
                for row in rows:
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
        self.targets, self.far = targets, far

    def _run(self) -> None:
        payload = b"m" * DATAGRAM
        # One tick per datagram to each neighbor; far targets get one every
        # `far_every` ticks, which sets their rate.
        far_every = max(1, round(self.rate / self.far_rate)) if self.far_rate else 0
        tick = 0
        while not self.stop.is_set():
            for sock, address, index in self.targets:
                with contextlib.suppress(OSError):
                    sock.sendto(payload, (address, PORT, 0, index))
                    self.sent += DATAGRAM
            if far_every and tick % far_every == 0:
                for sock, address in self.far:
                    # No route yet (Babel still converging) is no traffic yet.
                    with contextlib.suppress(OSError):
                        sock.sendto(payload, (address, PORT))
                        self.sent += DATAGRAM
            tick += 1
            self.stop.wait(DATAGRAM / self.rate)

    def __enter__(self) -> MeshTraffic:
        self.refresh()
        self.thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self.stop.set()
        self.thread.join(timeout=10)
        for sink in self.sinks.values():
            sink.close()
