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


def test_demo_brings_a_mesh_up_drives_traffic_and_tears_down(tmp_path: Path) -> None:
    require_root()
    prefix = f"d{os.getpid() % 10000}"
    env = {**os.environ, "MESH_EMU_ROOT": str(tmp_path)}
    done = subprocess.run(
        [sys.executable, "-m", "deploy.meshctl", "demo", "--topology", "line3",
         "--prefix", prefix, "--duration", "15"],
        env=env, cwd=REPO, capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    out = done.stdout
    assert "all 3 routers healthy" in out
    assert "traffic: 20 pings/s into sharp on 3 routers" in out
    assert "through their tunnel (metered, billed, paid)" in out
    assert "chain: anvil, channel contract at 0x" in out
    paid = int(out.split("payments: ")[1].split(" wei paid")[0])
    assert paid > 0, out
    final = out.split("final state")[1]
    assert final.count("SERVING") == 3
    # Babel's routes, with metric and price: r1 reaches r3 through r2.
    assert "routes: destination>next hop" in final
    r1 = next(line for line in final.splitlines() if line.startswith("r1 ") and ">" in line)
    assert "r3>r2(192," in r1
    # Bytes, prices and payments reconciled across the mesh; r2 relayed r1's
    # traffic to r3 and earned its margin.
    assert "routes converged: 6 of 6" in out
    assert "settlement: reconciled" in out, out
    assert "r1->r2:" in out and "r2->r3:" in out
    assert "namespaces removed" in out
    assert not [n for n in netns.listnetns() if n.startswith(f"{prefix}-")]
    assert not (tmp_path / prefix).exists()
