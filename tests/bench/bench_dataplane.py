"""Benchmark of the dataplane's usage counters and enforcement (needs root).

    .venv/bin/python -m tests.bench.bench_dataplane [--neighbors 50] [--destinations 1000]
        [--seconds 3] [--rounds 5] [--samples 20]

In namespaces a - r - b (tests/netns/test_metering_dataplane.py), with r's
forwarding policy on throughout, r is loaded with the state of a busy
router: `--destinations` prefixes (b's among them), and `--neighbors`
neighbors (a, b and made-up ones) each of which has sent traffic to every
destination, each destination routed out through one of them (one counter
per neighbor and destination, the densest that state gets), and every
made-up neighbor throttled or blocked (a and b are open). Prints, each
against a baseline from the same run:

  - iperf3 TCP throughput a -> b through r with counting and enforcement on,
    against the same path with their chains unhooked (rounds alternate);
  - the time of one snapshot of that state (median of --samples), against a
    plain `nft list ruleset` subprocess in r;
  - the kernel memory of that state: the growth of Slab + Percpu +
    VmallocUsed in /proc/meminfo while it is loaded (machine-wide, so other
    activity adds noise), per counter element.
"""

from __future__ import annotations

import argparse
import ipaddress
import os
import statistics
import subprocess
import sys
import time
import zlib
from collections.abc import Callable, Sequence
from pathlib import Path

from dataplane.counters import NAME as METER
from dataplane.counters import OTHER_LEN, SHARDS, Counters, parse_destinations
from dataplane.enforcement import NAME as ENFORCE
from dataplane.enforcement import Enforcer, Mode
from dataplane.policy import ForwardingPolicy
from dataplane.shim import Nft
from tests.netns.test_metering_dataplane import B6, B_NET6, SPEC, Line, a_r_b, iperf3

HOOKED = {METER: "metering", ENFORCE: "gate"}  # each table's base chain


def meminfo_kib() -> int:
    """Slab + Percpu + VmallocUsed: where nftables state lives, in KiB."""
    fields = dict(line.split(":", 1) for line in Path("/proc/meminfo").read_text().splitlines())
    return sum(int(fields[name].split()[0]) for name in ("Slab", "Percpu", "VmallocUsed"))


def destinations(count: int) -> list[str]:
    """b's prefix, then IPv6 /64s and every tenth an IPv4 /24, none overlapping."""
    prefixes = [B_NET6]
    for i in range(1, count):
        prefixes.append(str(ipaddress.ip_network(f"10.{i // 256}.{i % 256}.0/24")) if i % 10 == 0
                        else f"2001:db8:1:{i:x}::/64")
    return prefixes


def load(nft: Nft, counters: Counters, enforcer: Enforcer, n_neighbors: int,
         n_destinations: int) -> int:
    """Load the busy router's state; returns how many counter elements it has."""
    prefixes = destinations(n_destinations)
    counters.set_destinations(prefixes)
    fake = [f"nb{i:02d}" for i in range(n_neighbors - 2)]
    neighbors = ["v-a", "v-b", *fake]
    keys = [(n.version, n.network_address, n.prefixlen) for n in parse_destinations(prefixes)]
    keys.append((6, "::", OTHER_LEN))
    by_set: dict[str, list[str]] = {}
    for i, (version, address, length) in enumerate(keys):
        out = neighbors[i % len(neighbors)]  # the route to this destination
        for inside in neighbors:
            # Where the kernel's hash of the two names would put it, near enough.
            k = zlib.crc32(f"{inside}.{out}".encode()) % SHARDS
            by_set.setdefault(f"u{version}_{k}", []).append(
                f'"{inside}" . "{out}" . {address} . {length}')
    for name, elements in by_set.items():
        for start in range(0, len(elements), 2000):
            chunk = ", ".join(elements[start:start + 2000])
            nft.run(f"add element inet {METER} {name} {{ {chunk} }}")
    for i, name in enumerate(fake):
        if i % 2:
            enforcer.apply(name, Mode.BLOCKED)
        else:
            enforcer.apply(name, Mode.THROTTLED, 1_000_000)
    return len(keys) * len(neighbors)


def median_time(call: Callable[[], object], samples: int) -> float:
    times = []
    for _ in range(samples):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def throughput(line: Line, seconds: int) -> float:
    return iperf3(line, B6, "-t", str(seconds))["end"]["sum_received"]["bits_per_second"]


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--neighbors", type=int, default=50)
    parser.add_argument("--destinations", type=int, default=1000)
    parser.add_argument("--seconds", type=int, default=3, help="per iperf3 run")
    parser.add_argument("--rounds", type=int, default=5, help="iperf3 runs with and without")
    parser.add_argument("--samples", type=int, default=20, help="snapshots timed")
    args = parser.parse_args(argv)
    if os.geteuid() != 0:
        sys.exit("bench_dataplane needs root (network namespaces)")

    with a_r_b(f"bd{os.getpid() % 100000}") as line, Nft(netns=line.r) as nft:
        policy = ForwardingPolicy(nft)
        policy.install(SPEC)
        policy.set_tunnels(["v-a", "v-b"])

        before_kib = meminfo_kib()
        counters, enforcer = Counters(nft), Enforcer(nft)
        elements = load(nft, counters, enforcer, args.neighbors, args.destinations)
        state_kib = meminfo_kib() - before_kib
        chains = {table: nft.run(f"list chain inet {table} {chain}")
                  for table, chain in HOOKED.items()}

        def hooked(on: bool) -> None:
            for table, chain in HOOKED.items():
                nft.run(chains[table] if on else f"delete chain inet {table} {chain}")

        with_rules, without = [], []
        for _ in range(args.rounds):
            hooked(False)
            without.append(throughput(line, args.seconds))
            hooked(True)
            with_rules.append(throughput(line, args.seconds))
        on, off = statistics.median(with_rules), statistics.median(without)
        snap = counters.snapshot()
        assert snap.usage("v-a", B_NET6).rx_bytes > 0, "the counters did not count a -> b"
        print(f"bench: forwarding a->b through r (iperf3 TCP, median of {args.rounds} x "
              f"{args.seconds} s): {on / 1e9:.2f} Gbit/s with counters and enforcement "
              f"({args.neighbors} neighbors, {args.destinations} destinations), "
              f"{off / 1e9:.2f} Gbit/s without; ratio {on / off:.3f} (target >= 0.95)")

        took = median_time(counters.snapshot, args.samples)
        listing = median_time(
            lambda: subprocess.run(["ip", "netns", "exec", line.r, "nft", "list", "ruleset"],
                                   check=True, capture_output=True),
            max(1, args.samples // 5),
        )
        print(f"bench: one snapshot of {args.neighbors} neighbors x {args.destinations + 1} "
              f"destinations ({elements} counters): {took * 1e3:.1f} ms median of "
              f"{args.samples}, {took / elements * 1e6:.2f} us per counter (target < 20 ms); "
              f"`nft list ruleset` subprocess: {listing * 1e3:.1f} ms; "
              f"ratio {took / listing:.3f}")
        print(f"bench: kernel memory of that state: {state_kib / 1024:.1f} MiB "
              f"({state_kib * 1024 / elements:.0f} bytes per counter; growth of "
              "Slab + Percpu + VmallocUsed in /proc/meminfo while loading it)")


if __name__ == "__main__":
    main()
