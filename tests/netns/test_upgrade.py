"""Over-the-air upgrade of one service while traffic crosses the router:
`meshctl upgrade` restarts only that service, the flow through the router
goes on, and the upgraded service loses no event."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from mesh.sharp.v1 import sharp_pb2

from deploy.emulator.mesh import EmulatedMesh, clean, service_pid
from deploy.meshctl import client
from deploy.node import REPO
from deploy.upgrade import UpgradeError, upgrade
from tests.conftest import require_root, wait_for
from tests.netns.test_links import line3
from tests.netns.test_route import reaches

pytestmark = [pytest.mark.netns, pytest.mark.emulator]

SERVICES = ("discovery", "link", "route", "sharp")
PINGS = 300
INTERVAL = 0.5  # iperf3's reporting interval: the bound on a gap in the flow
SECONDS = 14


def release(tmp_path: Path) -> Path:
    """A new release: this tree's services/, as `git archive` would ship it."""
    package = tmp_path / "release"
    shutil.copytree(REPO / "services", package / "services",
                    ignore=shutil.ignore_patterns("__pycache__"))
    return package


def routed(mesh: EmulatedMesh) -> bool:
    r3 = f"{mesh.fabric.nodes['r3'].ipv6}/128"
    node = client.Node.open(mesh.routers["r1"].layout.root)
    return any(row["prefix"] == r3 for row in client.route_rows(node))


def pings_seen(mesh: EmulatedMesh, router: str) -> int:
    state = sharp_pb2.SharpState()
    client.status(mesh.routers[router].layout.socket("sharp")).state.Unpack(state)
    return state.pings_seen


def test_upgrading_one_service_keeps_the_flow_and_every_event(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    require_root()
    prefix = f"up{os.getpid() % 10000}"
    mesh = EmulatedMesh(line3(), prefix=prefix, root=tmp_path, services=SERVICES,
                        sections={"route": {"hello_interval": 1.0}})
    processes: list[subprocess.Popen[str]] = []
    try:
        mesh.start()
        wait_for("r1's route to r3", lambda: routed(mesh), timeout=90)
        wait_for("r1 to reach r3 through r2", lambda: reaches(mesh, "r1", "r3"), timeout=30)
        layout = mesh.routers["r2"].layout
        r3 = mesh.fabric.nodes["r3"].ipv6
        server = subprocess.Popen(mesh.fabric.exec_argv("r3", ["iperf3", "-s", "-1", "-B", r3]),
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        processes.append(server)  # type: ignore[arg-type]
        wait_for("iperf3 listening in r3", lambda: mesh.fabric.run(
            "r3", ["ss", "-Hltn", "sport = :5201"]).stdout.strip())
        flow = subprocess.Popen(
            mesh.fabric.exec_argv("r1", ["iperf3", "-c", r3, "-t", str(SECONDS), "-i",
                                         str(INTERVAL), "-b", "20M", "-J"]),
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        processes.append(flow)
        pings = subprocess.Popen(
            mesh.fabric.exec_argv("r2", [sys.executable, "-m", "deploy.meshctl", "-n",
                                         str(layout.root), "inject", "ping", "--count",
                                         str(PINGS), "--rate", "40", "--origin", "upgrade"]),
            cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        processes.append(pings)
        others = {s: service_pid(layout, s) for s in ("discovery", "link", "route")}
        old_sharp = service_pid(layout, "sharp")
        time.sleep(3)  # the flow and the pings under way before the upgrade, by design
        done = upgrade(layout, "sharp", release(tmp_path))

        out, err = flow.communicate(timeout=SECONDS + 60)
        assert flow.returncode == 0, err
        pings.wait(timeout=60)
        assert pings.returncode == 0, pings.stderr.read() if pings.stderr else ""
        intervals = [i["sum"]["bytes"] for i in json.loads(out)["intervals"]]
        # Only sharp restarted, on the new code; the rest kept running.
        assert {s: service_pid(layout, s) for s in others} == others
        assert service_pid(layout, "sharp") not in (None, old_sharp)
        assert client.status(layout.socket("sharp")).code_path == str(done.release)
        # The flow through r2 never stopped for a whole interval.
        assert len(intervals) >= SECONDS / INTERVAL - 1, out[-800:]
        assert min(intervals) > 0, intervals
        # Every ping injected before, during and after the restart was handled once.
        wait_for("sharp to handle every ping", lambda: pings_seen(mesh, "r2") >= PINGS,
                 timeout=60)
        assert pings_seen(mesh, "r2") == PINGS
        with capsys.disabled():
            print(f"\n  upgrade of sharp: SERVING {done.seconds:.1f}s after the restart; "
                  f"flow through r2 at {min(intervals) * 8 / INTERVAL / 1e6:.1f} Mbit/s in its "
                  f"slowest {INTERVAL}s; {PINGS} pings, none lost")

        # A release whose service does not import is refused before anything restarts.
        broken = tmp_path / "broken"
        shutil.copytree(done.release, broken)
        (broken / "services" / "sharp" / "service.py").write_text("import no_such_module\n")
        with pytest.raises(UpgradeError, match="does not import"):
            upgrade(layout, "sharp", broken)
        assert client.status(layout.socket("sharp")).code_path == str(done.release)
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
                process.wait()
        mesh.stop()
        clean(prefix, tmp_path)
