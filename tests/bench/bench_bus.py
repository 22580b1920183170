"""Benchmark of the chassis on a live node (real nats-server, real supervisord).

    .venv/bin/python -m tests.bench.bench_bus [--events N]

Prints, each against a baseline measured in the same run on the same server:
  - latency of one event from publish to its handling (sharp's pong seen),
    p50/p99, against a bare NATS publish -> subscriber round trip;
  - events/s through the log and a service, against bare JetStream publishes;
  - RSS of one idle router of the emulated mesh (needs root): every process in
    its namespace (supervisord, nats-server, each service, its wireguard-go
    tunnels), in a line of three so the middle one has two tunnels.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

from mesh.link.v1 import link_pb2
from mesh.sharp.v1 import sharp_pb2

from deploy.emulator.mesh import EmulatedMesh
from deploy.emulator.topology import TOPOLOGIES_DIR, Topology
from deploy.meshctl import client
from deploy.node import init_node as _init_node
from services.common.bus import Bus

from ..conftest import RunningNode, free_port


def percentile(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def name_and_rss_kib(pid: int) -> tuple[str, int] | None:
    """The process's name and resident KiB; None if it has exited meanwhile
    (a service's short-lived `wg` or `nft`, say)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text().splitlines()
    except (FileNotFoundError, ProcessLookupError):
        return None
    fields = dict(line.split(":", 1) for line in status if ":" in line)
    rss = fields.get("VmRSS", "0 kB").split()[0]
    return fields["Name"].strip(), int(rss)


def pids_in_netns(name: str) -> list[int]:
    target = os.stat(f"/var/run/netns/{name}").st_ino
    pids = []
    for ns in Path("/proc").glob("[0-9]*/ns/net"):
        try:
            if os.stat(ns).st_ino == target:
                pids.append(int(ns.parent.parent.name))
        except OSError:
            continue
    return pids


def idle_router_rss() -> tuple[int, list[str]]:
    """KiB of RSS and the process names of the middle router of an idle line of three."""
    topology = Topology.load(TOPOLOGIES_DIR / "line3.toml")
    with tempfile.TemporaryDirectory(prefix="mesh-bench-") as tmp:
        mesh = EmulatedMesh(topology, prefix=f"bench{os.getpid() % 1000}", root=Path(tmp))
        with mesh.running():
            ups = 0
            deadline = time.monotonic() + 60
            while ups < 2 and time.monotonic() < deadline:
                state = link_pb2.LinkState()
                client.status(mesh.routers["r2"].layout.socket("link")).state.Unpack(state)
                ups = sum(1 for link in state.links.values()
                          if link.status == link_pb2.LINK_STATUS_UP)
                time.sleep(0.2)
            time.sleep(3.0)  # let the idle router settle before reading its memory
            alive = [found for pid in pids_in_netns(mesh.fabric.netns("r2"))
                     if (found := name_and_rss_kib(pid)) is not None]
            return sum(rss for _, rss in alive), sorted(name for name, _ in alive)


async def latency(url: str, watch: str, send: Callable[[Bus, int], Awaitable[object]],
                  samples: int) -> list[float]:
    """Seconds from each send() until a message arrives on `watch`."""
    bus = await Bus.connect(url, "bench-latency")
    got: asyncio.Queue[float] = asyncio.Queue()

    async def arrived(_msg: object) -> None:
        got.put_nowait(time.perf_counter())

    await bus.nc.subscribe(watch, cb=arrived)
    out = []
    for seq in range(samples):
        start = time.perf_counter()
        await send(bus, seq)
        out.append((await got.get()) - start)
    await bus.close()
    return out


async def bare_publish(bus: Bus, _seq: int) -> None:
    await bus.nc.publish("bench.bare", b"x" * 64)


async def ping(bus: Bus, seq: int) -> None:
    await bus.publish_event(sharp_pb2.PingSent(sequence=seq, value=1, origin="lat"),
                            service="sharp", kind="ping", aggregate_id="lat",
                            node_id="bench", source="bench")


async def bare_throughput(url: str, count: int) -> float:
    bus = await Bus.connect(url, "bench-bare-js")
    start = time.perf_counter()
    for chunk in range(0, count, 100):
        await asyncio.gather(*(
            bus.js.publish("evt.bench.bare.x", b"x" * 100)
            for _ in range(min(100, count - chunk))
        ))
    elapsed = time.perf_counter() - start
    await bus.close()
    return count / elapsed


async def event_throughput(url: str, count: int) -> float:
    bus = await Bus.connect(url, "bench-tput")
    done = asyncio.Event()
    seen = 0

    async def on_pong(_msg: object) -> None:
        nonlocal seen
        seen += 1
        if seen == count:
            done.set()

    await bus.nc.subscribe("evt.sharp.pong.tput", cb=on_pong)
    start = time.perf_counter()
    for chunk in range(0, count, 100):
        await asyncio.gather(*(
            bus.publish_event(sharp_pb2.PingSent(sequence=i, value=1, origin="tput"),
                              service="sharp", kind="ping", aggregate_id="tput",
                              node_id="bench", source="bench")
            for i in range(chunk, min(chunk + 100, count))
        ))
    await done.wait()
    elapsed = time.perf_counter() - start
    await bus.close()
    return count / elapsed


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m tests.bench.bench_bus",
                                     description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--events", type=int, default=5000, help="events for throughput")
    parser.add_argument("--samples", type=int, default=1000, help="latency samples")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="mesh-bench-") as tmp:
        port = free_port()
        layout = _init_node(Path(tmp) / "node", "bench", services=("sharp",), nats_port=port)
        node = RunningNode(layout, port, ("sharp",))
        node.start()
        try:
            url = node.nats_url
            bare = asyncio.run(latency(url, "bench.bare", bare_publish, args.samples))
            events = asyncio.run(latency(url, "evt.sharp.pong.lat", ping, args.samples))
            bare_tput = asyncio.run(bare_throughput(url, args.events))
            tput = asyncio.run(event_throughput(url, args.events))
        finally:
            node.stop()
    ms = 1e3
    print(f"bench: publish->handled latency p50 {percentile(events, .5) * ms:.3f} ms "
          f"p99 {percentile(events, .99) * ms:.3f} ms "
          f"(bare NATS p50 {percentile(bare, .5) * ms:.3f} ms p99 "
          f"{percentile(bare, .99) * ms:.3f} ms; ratio p50 "
          f"{statistics.median(events) / statistics.median(bare):.1f}x)")
    print(f"bench: events/s through log + service {tput:,.0f} "
          f"(bare JetStream publishes {bare_tput:,.0f}/s; ratio {tput / bare_tput:.2f})")
    if os.geteuid() == 0:
        idle_rss, names = idle_router_rss()
        print(f"bench: idle router RSS {idle_rss / 1024:.1f} MiB over {len(names)} processes "
              f"({', '.join(names)})")
    else:
        print("bench: idle router RSS not measured (needs root for the emulated mesh)")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
