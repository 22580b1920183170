"""Real traffic for the emulated mesh.

MeshTraffic: every router sends UDP to the own address of each router whose
name sorts after its own, routed by Babel: to its neighbors through their
tunnel at `rate`, to the routers beyond them at `far_rate`, through relays
who bill the hop before them at their advertised price and pay the hop after
them its own. One way only: traffic as large both ways nets to no debt, and
nothing would be paid.

InternetTraffic: the routers that use an exit download a file from a web
server on the internet node, through their exit tunnel, again and again.
"""

from __future__ import annotations

import contextlib
import socket
import subprocess
import sys
import threading
from pathlib import Path

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


class WebServer:
    """python's http.server on an internet node, serving one file of `size`
    bytes (lines starting with `marker`) from workdir/www; its log, in
    workdir, names the address each request came from."""

    def __init__(self, mesh: EmulatedMesh, node: str, workdir: Path, size: int,
                 marker: bytes = b"mesh-demo") -> None:
        root = workdir / "www"
        root.mkdir(parents=True, exist_ok=True)
        line = marker + b" " + b"x" * 100 + b"\n"
        (root / "file").write_bytes(line * (size // len(line)))
        self.log = workdir / "http.log"
        self.address = mesh.fabric.nodes[node].ipv6
        argv = [sys.executable, "-m", "http.server", "80", "--bind", self.address,
                "--directory", str(root)]
        with self.log.open("wb") as log:
            self.process = subprocess.Popen(mesh.fabric.exec_argv(node, argv),
                                            stdout=log, stderr=subprocess.STDOUT)

    @property
    def url(self) -> str:
        return f"http://[{self.address}]/file"

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(5)
        except subprocess.TimeoutExpired:
            self.process.kill()


class InternetTraffic:
    """Every router that uses an exit downloads the internet host's file
    again and again, through its exit tunnel."""

    def __init__(self, mesh: EmulatedMesh, workdir: Path, size: int = 100_000,
                 pause: float = 4.0) -> None:
        internet = [n.name for n in mesh.topology.nodes if n.role == "internet"]
        self.clients = [name for name, router in mesh.routers.items()
                        if router.config.get("exit", {}).get("exits")]
        self.server = WebServer(mesh, internet[0], workdir, size) if internet and \
            self.clients else None
        self.mesh = mesh
        self.pause = pause
        self.stop = threading.Event()
        self.threads = [threading.Thread(target=self._run, args=(c,), daemon=True,
                                         name=f"internet-{c}") for c in self.clients]

    def _run(self, router: str) -> None:
        assert self.server is not None
        while not self.stop.is_set():
            # A failed download (the exit changing, say) is simply the next one's turn.
            self.mesh.fabric.run(router, ["curl", "-sS", "-g", "-o", "/dev/null", "--max-time",
                                          "20", self.server.url], check=False)
            self.stop.wait(self.pause)

    def __enter__(self) -> InternetTraffic:
        for thread in self.threads:
            thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join(timeout=30)
        if self.server is not None:
            self.server.stop()
