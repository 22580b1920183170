"""The main job as the README's first command runs it: `meshctl demo
--duration 60` on the default topology, non-interactively, judged by what
it prints (progress, the final view and the settlement report)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from pyroute2 import netns

from tests.conftest import require_root

pytestmark = [pytest.mark.netns, pytest.mark.emulator]

REPO = Path(__file__).resolve().parents[2]
ROUTERS = [f"r{i}" for i in range(1, 8)]


def test_the_readme_demo_meters_routes_pays_and_reaches_the_internet(tmp_path: Path) -> None:
    require_root()
    prefix = f"d{os.getpid() % 10000}"
    env = {**os.environ, "MESH_EMU_ROOT": str(tmp_path)}
    done = subprocess.run(
        [sys.executable, "-m", "deploy.meshctl", "demo", "--prefix", prefix, "--duration", "60"],
        env=env, cwd=REPO, capture_output=True, text=True, timeout=900,
    )
    out = done.stdout
    assert done.returncode == 0, out + done.stderr
    assert "all 8 routers healthy" in out
    assert "chain: anvil on inet, channel contract at 0x" in out
    # Every router routes to every other; r3 tunnels to the exit.
    assert "routes converged: 42 of 42" in out
    assert "clients tunneled to an exit: 1 of 1" in out
    assert "traffic: r3 download from the internet host through their exit" in out
    final = out.split("final state")[1]
    assert final.count("SERVING") == 8
    # Babel's routes, with metric and price paid: r1 reaches r5 over the
    # chord and through r4, who charges its own price and r5's.
    r1 = next(line for line in final.splitlines() if line.startswith("r1 ") and ">" in line)
    assert "r5>r4(192,2e+06)" in r1, r1
    # r3 used the exit, carried bytes through it and paid it; both gateways
    # keep a link to the exit over the internet.
    exits = {line.split()[0]: line for line in final.splitlines()
             if " client " in line or " gateway " in line or " exit " in line}
    used = re.search(r"client ex \(in use, tunnel up, ([0-9.e+]+) B, billed ([0-9.e+]+), "
                     r"paid ([0-9.e+]+) wei\)", exits["r3"])
    assert used is not None, exits["r3"]
    assert float(used[1]) > 0 and float(used[3]) > 0, exits["r3"]
    for gateway in ("r6", "r7"):
        assert re.search(rf"^{gateway} .* ex:up\(", final, re.MULTILINE), final
    # The settlement: traffic crossed every link, every router was paid by
    # a neighbor, and bytes, prices and payments reconcile link by link.
    report = out.split("settlement: ")[1]
    metered = int(report.split(" bytes metered")[0].replace(",", ""))
    assert metered > 10_000_000, report
    received = {payee: 0 for payee in ROUTERS}
    for payer, payee, paid, got in re.findall(
            r"^  (r\d)->(r\d): .* paid ([\d,]+) / received ([\d,]+)$", out, re.MULTILINE):
        assert paid == got, f"{payer}->{payee}"
        received[payee] += int(got.replace(",", ""))
    assert all(received.values()), received
    # The exit was paid by r3 and paid its gateways for the response traffic.
    exit_paid = re.search(r"^  exit ex: ([\d,]+) wei received from its clients, ([\d,]+) wei "
                          r"paid to the mesh for response traffic$", out, re.MULTILINE)
    assert exit_paid is not None, report
    assert all(int(figure.replace(",", "")) > 0 for figure in exit_paid.groups()), report
    assert "settlement: reconciled" in out, out
    assert "namespaces removed" in out
    assert not [n for n in netns.listnetns() if n.startswith(f"{prefix}-")]
    assert not (tmp_path / prefix).exists()
