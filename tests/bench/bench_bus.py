"""Benchmark of the chassis on a live node (real nats-server, real supervisord).

    .venv/bin/python -m tests.bench.bench_bus [--events N]

Prints, each against a baseline measured in the same run on the same server:
  - latency of one event from publish to its handling (sharp's pong seen),
    p50/p99, against a bare NATS publish -> subscriber round trip;
  - events/s through the log and a service, against bare JetStream publishes;
  - RSS of one idle router: supervisord, nats-server and every service.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from pathlib import Path

from mesh.sharp.v1 import sharp_pb2

from deploy.node import init_node as _init_node
from services.common.bus import Bus

from ..conftest import RunningNode, free_port


def percentile(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def process_tree(root: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    tree, todo = [], [root]
    while todo:
        pid = todo.pop()
        tree.append(pid)
        todo.extend(children.get(pid, []))
    return tree


async def bare_latency(url: str, samples: int) -> list[float]:
    bus = await Bus.connect(url, "bench-bare")
    got: asyncio.Queue[float] = asyncio.Queue()
    async def arrived(_msg: object) -> None:
        got.put_nowait(time.perf_counter())

    await bus.nc.subscribe("bench.bare", cb=arrived)
    out = []
    for _ in range(samples):
        start = time.perf_counter()
        await bus.nc.publish("bench.bare", b"x" * 64)
        out.append((await got.get()) - start)
    await bus.close()
    return out


async def event_latency(url: str, samples: int) -> list[float]:
    bus = await Bus.connect(url, "bench-events")
    got: asyncio.Queue[float] = asyncio.Queue()
    async def arrived(_msg: object) -> None:
        got.put_nowait(time.perf_counter())

    await bus.nc.subscribe("evt.sharp.pong.lat", cb=arrived)
    out = []
    for seq in range(samples):
        start = time.perf_counter()
        await bus.publish_event(sharp_pb2.PingSent(sequence=seq, value=1, origin="lat"),
                                service="sharp", kind="ping", aggregate_id="lat",
                                node_id="bench", source="bench")
        out.append((await got.get()) - start)
    await bus.close()
    return out


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
            time.sleep(2.0)  # let the idle router settle before reading its memory
            supervisord = int(layout.supervisor_pidfile.read_text())
            pids = process_tree(supervisord)
            idle_rss = sum(rss_kib(p) for p in pids)
            url = node.nats_url
            bare = asyncio.run(bare_latency(url, args.samples))
            events = asyncio.run(event_latency(url, args.samples))
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
    print(f"bench: idle router RSS {idle_rss / 1024:.1f} MiB over {len(pids)} processes "
          f"(supervisord + nats-server + {len(pids) - 2} services)")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
