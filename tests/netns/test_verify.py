"""verify on a live ring of six: a router that claims far better routes than
it delivers is caught by its neighbors and routed around; honest routers on a
lossy link are left alone. (The ring and its prices: tests/netns/test_route.py.)"""

from __future__ import annotations

import itertools
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from mesh.verify.v1 import verify_pb2

from deploy.emulator.mesh import EmulatedMesh, clean
from deploy.emulator.topology import Topology
from deploy.meshctl import client
from tests.conftest import require_root, wait_for
from tests.netns.test_route import NAMES, address, converged, reaches, ring, via

pytestmark = [pytest.mark.netns, pytest.mark.emulator]

SERVICES = ("discovery", "link", "route", "verify")
FAST = {"route": {"hello_interval": 1.0, "price_weight_permille": 0},
        "verify": {"window_seconds": 1.0, "probes": 10, "reply_timeout": 0.5,
                   "targets_per_window": 5}}
_prefixes = itertools.count()


@contextmanager
def running(tmp_path: Path, topology: Topology) -> Iterator[EmulatedMesh]:
    require_root()
    prefix = f"vf{os.getpid() % 10000}x{next(_prefixes)}"
    emulated = EmulatedMesh(topology, prefix=prefix, root=tmp_path, services=SERVICES,
                            sections=FAST)
    try:
        emulated.start()
        yield emulated
    finally:
        emulated.stop()
        clean(prefix, tmp_path)


def verify_state(mesh: EmulatedMesh, router: str) -> verify_pb2.VerifyState:
    state = verify_pb2.VerifyState()
    client.status(mesh.routers[router].layout.socket("verify")).state.Unpack(state)
    return state


def penalized(mesh: EmulatedMesh, router: str) -> set[str]:
    return {n for n, r in verify_state(mesh, router).neighbors.items() if r.HasField("penalty")}


def explain(mesh: EmulatedMesh, router: str) -> str:
    """What a router's verify holds and last logged (the mesh is gone after)."""
    log = (mesh.routers[router].layout.log_dir / "verify.log").read_text().splitlines()
    return "\n".join([str(verify_state(mesh, router).neighbors), *log[-40:]])


def paths(mesh: EmulatedMesh, a: str, b: str) -> str:
    """Each router's next hop to a and to b, by its route service and by its
    kernel, and the neighbors its verify penalizes."""
    rows = []
    for router in NAMES:
        kernel = [mesh.fabric.run(router, ["ip", "-6", "route", "get", address(mesh, to)],
                                  check=False).stdout.strip() for to in (a, b) if to != router]
        rows.append(f"{router}: to {a} via {via(mesh, router, a)}, to {b} via "
                    f"{via(mesh, router, b)}; penalizes {sorted(penalized(mesh, router))}; "
                    f"kernel: {' | '.join(kernel)}")
    return "\n".join(rows)


def windows(mesh: EmulatedMesh, router: str, verdict: str) -> int:
    return sum(r.verdicts[verdict] for r in verify_state(mesh, router).neighbors.values())


def test_a_neighbor_that_overclaims_is_penalized_and_routed_around(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # r2 advertises every route it forwards as metric 0: r1 reaches r6 "in one hop".
    liar = ring(config={"r2": {"route": {"overclaim": True}}})
    with running(tmp_path, liar) as mesh:
        healthy = time.monotonic()
        wait_for("r1's verify to penalize r2", lambda: "r2" in penalized(mesh, "r1"),
                 timeout=60, explain=lambda: explain(mesh, "r1"))
        caught = time.monotonic() - healthy
        record = verify_state(mesh, "r1").neighbors["r2"]
        assert record.penalty.mode == verify_pb2.PENALTY_MODE_EXCLUDE
        # r1 had believed r2: its routes through it were probed and found wanting.
        assert record.verdicts["VERDICT_OVERCLAIMED"] >= 2
        evidence = record.last_overclaim
        assert evidence.measured_metric > evidence.route_metric
        wait_for("r1 to route around r2", lambda: via(mesh, "r1", "r6") == "r4", timeout=30)
        around = time.monotonic() - healthy
        wait_for("traffic around the liar", lambda: reaches(mesh, "r1", "r6"), timeout=20,
                 explain=lambda: paths(mesh, "r1", "r6"))
        route = client.status(mesh.routers["r1"].layout.socket("route")).summary
        assert route["penalized"] == "r2"
        # The honest neighbor is not blamed.
        assert "r4" not in penalized(mesh, "r1")
    with capsys.disabled():
        print(f"\n  over-claiming neighbor: penalized {caught:.1f}s after the mesh was up, "
              f"routed around after {around:.1f}s")


def test_honest_routers_on_a_lossy_link_are_not_penalized(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with running(tmp_path, ring(loss={("r1", "r2"): 5, ("r3", "r6"): 5})) as mesh:
        wait_for("convergence", lambda: converged(mesh), timeout=90)
        wait_for("20 honest windows judged at every router",
                 lambda: all(windows(mesh, r, "VERDICT_HONEST") >= 20 for r in NAMES),
                 timeout=120)
        assert {r: penalized(mesh, r) for r in NAMES} == {r: set() for r in NAMES}
        # A lone window may look bad (a route changing under the probes); the
        # sliding evaluation is there so that it costs nothing.
        judged = {v: sum(windows(mesh, r, v) for r in NAMES)
                  for v in ("VERDICT_HONEST", "VERDICT_OVERCLAIMED")}
        assert judged["VERDICT_OVERCLAIMED"] <= judged["VERDICT_HONEST"] // 20
    with capsys.disabled():
        print(f"\n  honest ring with 5% loss on two links: {judged['VERDICT_HONEST']} honest "
              f"windows, {judged['VERDICT_OVERCLAIMED']} over-claimed, no penalty")
