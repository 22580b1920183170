"""Benchmark of the Babel route table: Updates processed per second.

    .venv/bin/python -m tests.bench.bench_route_table [--prefixes N] [--neighbors K]

K neighbors each announce N prefixes in full-size packets; the speaker
decodes them, applies every Update to the route table (feasibility, one
route per neighbor and prefix) and selects a route per prefix. Printed
against a baseline from the same run: decoding the same packets alone.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Sequence
from ipaddress import IPv6Network

from services.route.babel.codec import Hello, Ihu, Update, decode, encode
from services.route.babel.speaker import InterfaceSpec, Speaker


def packets_from(neighbor: int, prefixes: int) -> list[bytes]:
    router_id = bytes(6) + neighbor.to_bytes(2)
    updates = [Update(IPv6Network((0x20010DB8 << 96 | i << 64, 64)), router_id, 1,
                      96 * (1 + neighbor % 3), 1600, None, 1000 + neighbor)
               for i in range(prefixes)]
    return encode(updates)


def main(argv: Sequence[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(prog="python -m tests.bench.bench_route_table",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--prefixes", type=int, default=5_000, help="prefixes per neighbor")
    parser.add_argument("--neighbors", type=int, default=4, help="neighbors announcing them")
    args = parser.parse_args(argv)
    speaker = Speaker(bytes(7) + b"\x01", 0, hello_interval=1.0, price_weight=250)
    speaker.set_interfaces([InterfaceSpec(f"mw{n}", f"fe80::{n + 1:x}")
                            for n in range(args.neighbors)], now=0.0)
    for n in range(args.neighbors):  # two Hellos and an IHU: a link with a cost
        for seqno in (1, 2):
            for data in encode([Hello(seqno, 100), Ihu(96, 300, None)]):
                speaker.receive(f"mw{n}", f"fe80::{n + 1:x}", data, now=seqno * 0.1)
    sent = {n: packets_from(n, args.prefixes) for n in range(args.neighbors)}
    total = args.neighbors * args.prefixes

    started = time.perf_counter()
    for packets in sent.values():
        for data in packets:
            decode(data)
    decoded = total / (time.perf_counter() - started)

    started = time.perf_counter()
    for n, packets in sent.items():
        for data in packets:
            speaker.receive(f"mw{n}", f"fe80::{n + 1:x}", data, now=0.5)
    speaker.tick(0.6)  # selection over every prefix
    processed = total / (time.perf_counter() - started)
    selected = len(speaker.selected)
    print(f"bench: {processed:,.0f} Updates/s into the route table with selection "
          f"({args.neighbors} neighbors x {args.prefixes} prefixes, {selected} selected); "
          f"decoding alone {decoded:,.0f}/s; ratio {processed / decoded:.2f}")
    return {"processed": processed, "decoded": decoded, "selected": selected}


if __name__ == "__main__":
    main()
