"""Benchmark of Babel convergence: our route service against Debian's babeld
in the same seats of the same six-router ring, with the same Hello interval.

    .venv/bin/python -m tests.bench.bench_route_convergence [--hello 1.0]

Both run on the ring's raw veths (ours: `[route] tunnels = false`). Each
measurement is taken the same way for both, from the kernel's routing table:

- cold start: every speaker runs but all Babel traffic is dropped (nftables);
  the drop is lifted at once on every router, and the clock runs until every
  router has a usable route to every other one's address;
- link cut: r2-r3 silently drops everything (no carrier change, so only
  Hellos going missing tell), and the clock runs until r1 routes to r3 the
  other way round the ring (through r4).

Prints each time for both and the ratio ours / babeld (target: at most 1.0).
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from deploy.emulator.fabric import Fabric
from deploy.emulator.mesh import EmulatedMesh, clean, supervisorctl
from deploy.emulator.topology import Topology
from deploy.meshctl import client
from deploy.node import NodeLayout
from tests.netns.babeld import Babeld, running

NAMES = ("r1", "r2", "r3", "r4", "r5", "r6")
RING = [("r1", "r2"), ("r2", "r3"), ("r3", "r6"), ("r6", "r5"), ("r5", "r4"), ("r4", "r1")]
BLOCK_BABEL = """table inet bench_block {
    chain in { type filter hook input priority -100; udp dport 6696 drop; }
    chain out { type filter hook output priority -100; udp dport 6696 drop; }
}
"""


def cut(peer_interface: str) -> str:
    return f"""table inet bench_cut {{
    chain cut_in {{
        type filter hook input priority -100;
        iifname "{peer_interface}" drop
    }}
    chain cut_forward {{
        type filter hook forward priority -100;
        iifname "{peer_interface}" drop
        oifname "{peer_interface}" drop
    }}
    chain cut_out {{
        type filter hook output priority -100;
        oifname "{peer_interface}" drop
    }}
}}
"""


def facing(node: str) -> list[str]:
    return sorted(f"v-{b if a == node else a}" for a, b in RING if node in (a, b))


def topology(ours: bool) -> Topology:
    nodes: list[dict[str, object]] = []
    for name in NAMES:
        if ours:
            # Babel on no interface yet: enabled, with a restart, for the clock.
            nodes.append({"name": name, "config": {"route": {"tunnels": False,
                                                             "interfaces": []}}})
        else:
            nodes.append({"name": name, "role": "host"})  # nothing of ours runs there
    return Topology.from_dict({"name": "ring6-raw", "node": nodes,
                               "link": [{"a": a, "b": b} for a, b in RING]})


def nft(fabric: Fabric, node: str, script: str) -> None:
    fabric.run(node, ["nft", "-f", "-"], input=script)


def usable(fabric: Fabric, node: str, proto: str) -> dict[str, str]:
    """Destination -> device of the node's Babel routes that forward."""
    shown = fabric.run(node, ["ip", "-j", "-6", "route", "show", "proto", proto]).stdout
    return {r["dst"]: r["dev"] for r in json.loads(shown or "[]") if r.get("gateway")}


def clock(check: Callable[[], bool], timeout: float = 120.0) -> float:
    started = time.monotonic()
    while not check():
        if time.monotonic() - started > timeout:
            raise TimeoutError(f"no convergence within {timeout:.0f}s")
        time.sleep(0.05)
    return time.monotonic() - started


def measure(fabric: Fabric, proto: str) -> tuple[float, float]:
    """(cold start, link cut) in seconds, with every speaker running and
    Babel blocked everywhere on entry."""
    addresses = {n: fabric.nodes[n].ipv6 for n in NAMES}

    def converged() -> bool:
        return all(set(usable(fabric, n, proto)) >= {a for m, a in addresses.items() if m != n}
                   for n in NAMES)

    for node in NAMES:
        fabric.run(node, ["nft", "delete", "table", "inet", "bench_block"])
    cold = clock(converged)
    # Settled on the short way round before the cut.
    clock(lambda: usable(fabric, "r1", proto).get(addresses["r3"]) == "v-r2")
    for node, peer in (("r2", "r3"), ("r3", "r2")):
        nft(fabric, node, cut(f"v-{peer}"))
    cut_after = clock(lambda: usable(fabric, "r1", proto).get(addresses["r3"]) == "v-r4")
    return cold, cut_after


def wait_healthy(layout: NodeLayout) -> None:
    clock(lambda: client.health(layout.socket("route")) == "SERVING", timeout=60)


def run_babeld(root: Path, prefix: str, hello: float) -> tuple[float, float]:
    fabric = Fabric(prefix)
    with fabric.up(topology(ours=False)):
        for node in NAMES:
            nft(fabric, node, BLOCK_BABEL)
        babelds = [Babeld(fabric, n, facing(n), root / "babeld", hello) for n in NAMES]
        with running(babelds):
            time.sleep(2 * hello)  # running and Hello-ing into the drop, like ours
            return measure(fabric, "babel")


def run_ours(root: Path, prefix: str, hello: float) -> tuple[float, float]:
    mesh = EmulatedMesh(topology(ours=True), prefix=prefix, root=root, services=("route",),
                        sections={"route": {"hello_interval": hello}})
    try:
        mesh.start()
        for node in NAMES:
            nft(mesh.fabric, node, BLOCK_BABEL)
            layout = mesh.routers[node].layout
            text = layout.node_file.read_text()
            listed = ", ".join(f'"{i}"' for i in facing(node))
            layout.node_file.write_text(text.replace("interfaces = []",
                                                     f"interfaces = [{listed}]"))
            supervisorctl(layout, "restart", "route", check=True)
        for node in NAMES:
            wait_healthy(mesh.routers[node].layout)
        time.sleep(2 * hello)
        return measure(mesh.fabric, "77")
    finally:
        mesh.stop()
        clean(prefix, root)


def main(argv: Sequence[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(prog="python -m tests.bench.bench_route_convergence",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--hello", type=float, default=1.0, help="Hello interval, seconds")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="bench-route-") as tmp:
        root = Path(tmp)
        tag = os.getpid() % 10000
        babeld_cold, babeld_cut = run_babeld(root, f"cb{tag}", args.hello)
        ours_cold, ours_cut = run_ours(root, f"co{tag}", args.hello)
    print(f"bench: cold start to full routes: ours {ours_cold:.2f}s, babeld {babeld_cold:.2f}s, "
          f"ratio {ours_cold / babeld_cold:.2f} (target <= 1.0); six-router ring, Hello "
          f"{args.hello:g}s")
    print(f"bench: silent link cut to rerouted: ours {ours_cut:.2f}s, babeld {babeld_cut:.2f}s, "
          f"ratio {ours_cut / babeld_cut:.2f} (target <= 1.0)")
    return {"ours_cold": ours_cold, "babeld_cold": babeld_cold, "ours_cut": ours_cut,
            "babeld_cut": babeld_cut}


if __name__ == "__main__":
    main()
