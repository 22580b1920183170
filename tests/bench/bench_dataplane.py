"""Benchmark of the dataplane's usage counters (needs root).

    .venv/bin/python -m tests.bench.bench_dataplane [--neighbors 50] [--destinations 1000]
        [--seconds 2] [--rounds 10] [--samples 20]

In namespaces a - r - b (tests/netns/test_metering_dataplane.py), twice
(the twin is the throughput's baseline), with r's
forwarding policy on throughout, r is loaded with the state of a busy
router: `--destinations` prefixes (b's among them), and `--neighbors`
neighbors (a, b and made-up ones: tun devices, like tunnels) each of which has sent
traffic to every destination, each destination routed out through one of
them (one counter per neighbor and destination, the densest that state
gets), and every made-up neighbor throttled or blocked (a and b are open).
Prints, each against a baseline from the same run:

  - iperf3 TCP throughput a -> b through r with the eBPF counting program
    on r's interfaces, against the twin path without it, both at the same
    time (on a machine shared with other work one run differs from the next
    by more than the program costs; two at once see the same load), the
    program moving to the other relay each round; the ratio is the median
    of the rounds' ratios. The program's own time per packet is printed
    too, from the kernel's BPF run statistics (kernel.bpf_stats_enabled is
    on during the runs);
  - the time of one snapshot of that state (median of --samples), against
    the nftables path it replaced: the same counters as elements of the
    sharded nft sets, read by meshdp_usage_dump (and a plain `nft list
    ruleset` subprocess in r, for scale);
  - the kernel memory of that state: the growth of Slab + Percpu +
    VmallocUsed in /proc/meminfo while it is loaded (machine-wide, so other
    activity adds noise), per counter, for both.
"""

from __future__ import annotations

import argparse
import contextlib
import ipaddress
import json
import mmap
import os
import statistics
import struct
import subprocess
import sys
import time
import zlib
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import NamedTuple

from dataplane.counters import (
    LABEL,
    OTHER_LEN,
    SETS,
    SHARDS,
    Counters,
    parse_destinations,
    parse_usage,
    usage_sets,
)
from dataplane.enforcement import Enforcer, Mode
from dataplane.policy import ForwardingPolicy
from dataplane.shim import Nft
from tests.netns.test_metering_dataplane import B6, B_NET6, SPEC, Line, a_r_b, in_ns, iperf3

BASELINE = "mesh_meter_nft"  # the nftables path's sets, loaded for comparison
SLOT = struct.Struct("=4I16s2Q16x")  # struct meshbpf_slot (dataplane/meshbpf.h)
SLOTS = 1 << 17  # meshbpf.c: SLOTS
RAW = 0x80000000  # meshbpf.h: MESHBPF_RAW

Key = tuple[int, str, int]  # IP version, network address, prefix length


def meminfo_kib() -> int:
    """Slab + Percpu + VmallocUsed: where nftables and eBPF state live, in KiB."""
    fields = dict(line.split(":", 1) for line in Path("/proc/meminfo").read_text().splitlines())
    return sum(int(fields[name].split()[0]) for name in ("Slab", "Percpu", "VmallocUsed"))


def destinations(count: int) -> list[str]:
    """b's prefix, then IPv6 /64s and every tenth an IPv4 /24, none overlapping."""
    prefixes = [B_NET6]
    for i in range(1, count):
        prefixes.append(str(ipaddress.ip_network(f"10.{i // 256}.{i % 256}.0/24")) if i % 10 == 0
                        else f"2001:db8:1:{i:x}::/64")
    return prefixes


def counter_keys(prefixes: list[str]) -> list[Key]:
    keys: list[Key] = [(n.version, str(n.network_address), n.prefixlen)
                       for n in parse_destinations(prefixes)]
    return [*keys, (6, "::", OTHER_LEN)]


def fill_program(nft: Nft, ifindexes: dict[str, int], neighbors: list[str],
                 keys: list[Key]) -> int:
    """Every neighbor's counters as the program would have made them (written
    before any traffic: the program allocates elements too). How many.

    Interfaces by ifindex | MESHBPF_RAW (as the program keys one no sweep has
    named yet): the first snapshot names them."""
    with mmap.mmap(nft.bpf_usage_fd(), SLOTS * SLOT.size) as slots:
        (start,) = struct.unpack_from("=Q", slots, 32)
        at = start
        for i, (version, address, length) in enumerate(keys):
            out = ifindexes[neighbors[i % len(neighbors)]] | RAW  # the route to it
            packed = ipaddress.ip_address(address).packed
            for inside in neighbors:
                SLOT.pack_into(slots, at * SLOT.size, ifindexes[inside] | RAW, out, version,
                               length, packed, 1000, 1_000_000)
                at += 1
        struct.pack_into("=Q", slots, 32, at)
    return at - start


def fill_nft(nft: Nft, neighbors: list[str], keys: list[Key], prefixes: list[str]) -> None:
    """The same counters in the nftables path's sets (a table of their own)."""
    nft.run(f"table inet {BASELINE} {{\n{usage_sets()}}}\n")
    by_set: dict[str, list[str]] = {
        "u6_0": [f'"{LABEL}" . "{LABEL}" . :: . {OTHER_LEN} comment "epoch baseline"']}
    for n in parse_destinations(prefixes):
        by_set.setdefault(f"u{n.version}_0", []).append(
            f'"{LABEL}" . "{LABEL}" . {n.network_address} . {n.prefixlen} comment "{n}"')
    for i, (version, address, length) in enumerate(keys):
        out = neighbors[i % len(neighbors)]
        for inside in neighbors:
            # Where the kernel's hash of the two names would put it, near enough.
            k = zlib.crc32(f"{inside}.{out}".encode()) % SHARDS
            by_set.setdefault(f"u{version}_{k}", []).append(
                f'"{inside}" . "{out}" . {address} . {length}')
    for name, elements in by_set.items():
        for start in range(0, len(elements), 2000):
            chunk = ", ".join(elements[start:start + 2000])
            nft.run(f"add element inet {BASELINE} {name} {{ {chunk} }}")


def median_time(call: Callable[[], object], samples: int) -> float:
    times = []
    for _ in range(samples):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def throughput(line: Line, seconds: int, cpus: str) -> float:
    # iperf3's client (whose CPU also forwards, in softirq) and server pinned
    # to CPUs (-A client,server): else the scheduler moving them about varies
    # a run by more than the program costs.
    result = iperf3(line, B6, "-t", str(seconds), "-A", cpus)
    return result["end"]["sum_received"]["bits_per_second"]


def side_by_side(with_program: Line, without: Line, seconds: int) -> tuple[float, float]:
    """Throughput of the two paths, measured at the same time: a machine
    shared with other work varies from one run to the next by more than the
    program costs, but it slows two runs at the same time alike."""
    two_cpus = (os.cpu_count() or 1) >= 2
    with ThreadPoolExecutor(2) as pool:
        on = pool.submit(throughput, with_program, seconds, "0,1" if two_cpus else "0,0")
        off = pool.submit(throughput, without, seconds, "1,0" if two_cpus else "0,0")
        return on.result(), off.result()


class Relay(NamedTuple):
    line: Line
    nft: Nft
    counters: Counters
    neighbors: list[str]  # r's interfaces: v-a, v-b and the made-up ones
    elements: int  # counters filled in
    program_kib: int  # kernel memory the program's state took


@contextlib.contextmanager
def busy_relay(tag: str, neighbors: int, prefixes: list[str]) -> Iterator[Relay]:
    """a - r - b, with r's forwarding policy on and the program's state of a
    busy router: every neighbor has sent to every destination, and every
    made-up neighbor is throttled or blocked."""
    with a_r_b(tag) as line, Nft(netns=line.r) as nft:
        policy = ForwardingPolicy(nft)
        policy.install(SPEC)
        policy.set_tunnels(["v-a", "v-b"])
        fake = [f"nb{i:02d}" for i in range(neighbors - 2)]
        for name in fake:
            in_ns(line.r, "ip", "tuntap", "add", "dev", name, "mode", "tun")
        ifindexes = {link["ifname"]: link["ifindex"]
                     for link in json.loads(in_ns(line.r, "ip", "-j", "link", "show"))}
        neighbors = ["v-a", "v-b", *fake]
        before_kib = meminfo_kib()
        counters, enforcer = Counters(nft), Enforcer(nft)
        counters.set_destinations(prefixes)
        elements = fill_program(nft, ifindexes, neighbors, counter_keys(prefixes))
        program_kib = meminfo_kib() - before_kib
        for i, name in enumerate(fake):
            if i % 2:
                enforcer.apply(name, Mode.BLOCKED)
            else:
                enforcer.apply(name, Mode.THROTTLED, 1_000_000)
        yield Relay(line, nft, counters, neighbors, elements, program_kib)


def attach(relay: Relay, on: bool) -> None:
    """The program on r's two veths, or neither."""
    if on:
        relay.nft.bpf_sweep(force=True)
        return
    for dev in ("v-a", "v-b"):
        if "clsact" in in_ns(relay.line.r, "tc", "qdisc", "show", "dev", dev):
            in_ns(relay.line.r, "tc", "qdisc", "del", "dev", dev, "clsact")


def program_runs() -> tuple[int, int]:
    """Runs and nanoseconds of the BPF programs this process holds (the
    counters' own), while kernel.bpf_stats_enabled is on."""
    runs = nanoseconds = 0
    for fd in os.listdir("/proc/self/fd"):
        try:
            if "bpf-prog" not in os.readlink(f"/proc/self/fd/{fd}"):
                continue
            info = Path(f"/proc/self/fdinfo/{fd}").read_text()
        except OSError:  # the listing's own fd, gone
            continue
        fields = dict(line.split(":", 1) for line in info.splitlines() if ":" in line)
        runs += int(fields.get("run_cnt", 0))
        nanoseconds += int(fields.get("run_time_ns", 0))
    return runs, nanoseconds


def bpf_stats(on: bool) -> None:
    Path("/proc/sys/kernel/bpf_stats_enabled").write_text("1" if on else "0")


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--neighbors", type=int, default=50)
    parser.add_argument("--destinations", type=int, default=1000)
    parser.add_argument("--seconds", type=int, default=2, help="per iperf3 run")
    parser.add_argument("--rounds", type=int, default=10, help="iperf3 runs with and without")
    parser.add_argument("--samples", type=int, default=20, help="snapshots timed")
    args = parser.parse_args(argv)
    if os.geteuid() != 0:
        sys.exit("bench_dataplane needs root (network namespaces)")

    tag = f"bd{os.getpid() % 100000}"
    prefixes = destinations(args.destinations)
    with busy_relay(f"{tag}x", args.neighbors, prefixes) as relay, \
            busy_relay(f"{tag}y", args.neighbors, prefixes) as twin:
        line, nft, counters, elements = relay.line, relay.nft, relay.counters, relay.elements
        before_kib = meminfo_kib()
        fill_nft(nft, relay.neighbors, counter_keys(prefixes), prefixes)
        nft_kib = meminfo_kib() - before_kib

        with_program, without = [], []
        bpf_stats(True)
        try:
            for round_ in range(args.rounds):
                # The program goes from one relay to the other each round, so
                # that any difference between the two paths weighs on both.
                on, off = (relay, twin) if round_ % 2 == 0 else (twin, relay)
                attach(on, True)
                attach(off, False)
                rates = side_by_side(on.line, off.line, args.seconds)
                with_program.append(rates[0])
                without.append(rates[1])
            runs, nanoseconds = program_runs()
        finally:
            bpf_stats(False)
        rate_on, rate_off = statistics.median(with_program), statistics.median(without)
        ratio = statistics.median(w / wo for w, wo in zip(with_program, without, strict=True))
        snap = counters.snapshot()
        # (1,000,000 of them were filled in.)
        assert snap.usage("v-a", B_NET6).rx_bytes > 1_000_000, "the program did not count a -> b"
        print(f"bench: forwarding a->b through r (iperf3 TCP, {args.rounds} rounds of "
              f"{args.seconds} s, each a path with the program and a twin without, "
              "at the same time): "
              f"{rate_on / 1e9:.2f} Gbit/s with the eBPF counting program ({args.neighbors} "
              f"neighbors, {args.destinations} destinations, enforcement on), "
              f"{rate_off / 1e9:.2f} Gbit/s without (medians); ratio {ratio:.3f} (median of the "
              f"rounds'; target >= 0.95); rounds with "
              f"{' '.join(f'{r / 1e9:.2f}' for r in with_program)}, without "
              f"{' '.join(f'{r / 1e9:.2f}' for r in without)}; the program ran "
              f"{nanoseconds / max(runs, 1):.0f} ns per packet ({runs} runs, "
              f"{nanoseconds / 1e9 / (args.rounds * args.seconds) * 100:.2f}% of one CPU)")

        took = median_time(counters.snapshot, args.samples)
        baseline = median_time(lambda: parse_usage(nft.usage_dump(BASELINE, SETS, LABEL)),
                               args.samples)
        listing = median_time(
            lambda: subprocess.run(["ip", "netns", "exec", line.r, "nft", "list", "ruleset"],
                                   check=True, capture_output=True),
            max(1, args.samples // 5),
        )
        print(f"bench: one snapshot of {args.neighbors} neighbors x {args.destinations + 1} "
              f"destinations ({elements} counters): {took * 1e3:.1f} ms median of "
              f"{args.samples}, {took / elements * 1e6:.2f} us per counter (target < 20 ms); "
              f"the nftables path (the same counters in nft sets): {baseline * 1e3:.1f} ms, "
              f"ratio {took / baseline:.3f}; `nft list ruleset` subprocess: "
              f"{listing * 1e3:.1f} ms")
        program_kib = relay.program_kib
        print(f"bench: kernel memory of that state: {program_kib / 1024:.1f} MiB with the eBPF "
              f"program ({program_kib * 1024 / elements:.0f} bytes per counter; its array is "
              f"allocated whole, {SLOTS} counters), {nft_kib / 1024:.1f} MiB in nft sets "
              f"({nft_kib * 1024 / elements:.0f} bytes per counter; growth of Slab + Percpu + "
              "VmallocUsed in /proc/meminfo while loading it)")


if __name__ == "__main__":
    main()
