"""The main job as the README runs it, on a small topology."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from pyroute2 import netns

from tests.conftest import require_root

pytestmark = [pytest.mark.netns, pytest.mark.emulator]

REPO = Path(__file__).resolve().parents[2]


def test_the_readme_demo_meters_routes_pays_and_reaches_the_internet(tmp_path: Path) -> None:
    """`meshctl demo --duration 60` on the default topology, as the README's
    first command runs it."""
    require_root()
    prefix = f"d{os.getpid() % 10000}"
    env = {**os.environ, "MESH_EMU_ROOT": str(tmp_path)}
    done = subprocess.run(
        [sys.executable, "-m", "deploy.meshctl", "demo", "--prefix", prefix, "--duration", "60"],
        env=env, cwd=REPO, capture_output=True, text=True, timeout=600,
    )
    out = done.stdout
    assert done.returncode == 0, out + done.stderr
    assert "all 8 routers healthy" in out
    assert "chain: anvil, channel contract at 0x" in out
    # Every router routes to every router it can reach; r3 tunnels to the exit.
    assert "routes converged: 42 of 42" in out
    assert "clients tunneled to an exit: 1 of 1" in out
    assert "through their tunnel (metered, billed, paid)" in out
    assert "traffic: r3 download from the internet host through their exit" in out
    final = out.split("final state")[1]
    assert final.count("SERVING") == 8
    # Babel's routes, with metric and price: r1 reaches r3 through r4 (the chord).
    r1 = next(line for line in final.splitlines() if line.startswith("r1 ") and ">" in line)
    assert "r3>r4(192," in r1
    # r3 used the exit and paid it; both gateways announce it.
    exits = {line.split()[0]: line for line in final.splitlines()
             if " client " in line or " gateway " in line or " exit " in line}
    assert "client ex (in use, tunnel up" in exits["r3"]
    paid = exits["r3"].split("paid ")[1].split(" wei")[0]
    assert float(paid) > 0, exits["r3"]
    assert "gateway ex (announced)" in exits["r6"] and "gateway ex (announced)" in exits["r7"]
    # Bytes, prices and payments reconciled across the mesh, link by link.
    paid_total = int(out.split("payments: ")[1].split(" wei paid")[0])
    assert paid_total > 0, out
    assert "settlement: reconciled" in out, out
    assert "namespaces removed" in out
    assert not [n for n in netns.listnetns() if n.startswith(f"{prefix}-")]
    assert not (tmp_path / prefix).exists()
