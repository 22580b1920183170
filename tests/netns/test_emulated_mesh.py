"""The emulated mesh: real namespaces, a real supervisord, nats-server and
services in every router; meshctl against it; nothing left behind."""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from pyroute2 import IPRoute, netns

from deploy.emulator.fabric import cleanup_stale
from deploy.emulator.mesh import EmulatedMesh, clean
from deploy.emulator.preflight import PreflightError, preflight
from deploy.emulator.topology import TOPOLOGIES_DIR, Topology
from deploy.meshctl import client
from tests.conftest import require_root, wait_for

pytestmark = [pytest.mark.netns, pytest.mark.emulator]

_prefixes = itertools.count()


@pytest.fixture
def prefix(tmp_path: Path) -> Iterator[str]:
    require_root()
    name = f"m{os.getpid() % 10000}x{next(_prefixes)}"
    yield name
    clean(name, tmp_path)
    cleanup_stale(name)


def leftovers(prefix: str, workdir: Path) -> dict[str, list[str]]:
    """Namespaces, root-namespace veths and processes a mesh could leave behind."""
    with IPRoute() as ipr:
        veths = [link.get("ifname") for link in ipr.get_links()
                 if str(link.get("ifname")).startswith("v-")]
    processes = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            text = cmdline.read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if str(workdir) in text:
            processes.append(text)
    return {
        "namespaces": sorted(n for n in netns.listnetns() if n.startswith(f"{prefix}-")),
        "veths": veths,
        "processes": processes,
    }


def meshctl(prefix: str, root: Path, *argv: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "MESH_EMU_PREFIX": prefix, "MESH_EMU_ROOT": str(root)}
    return subprocess.run([sys.executable, "-m", "deploy.meshctl", *argv], env=env,
                          capture_output=True, text=True, timeout=120)


def test_five_routers_come_up_healthy_and_leave_nothing(prefix: str, tmp_path: Path) -> None:
    topology = Topology.load(TOPOLOGIES_DIR / "five.toml")
    mesh = EmulatedMesh(topology, prefix=prefix, root=tmp_path)
    progress: list[str] = []
    with mesh.running(progress.append):
        assert len(mesh.routers) == 5
        for router in mesh.routers.values():
            assert router.unhealthy() == []
            status = client.status(router.layout.socket("sharp"))
            assert status.node_id == router.name
        # each router has its own bus: a ping on r2 is seen by r2's sharp only
        done = meshctl(prefix, tmp_path, "-n", "r2", "inject", "ping", "--count", "3")
        assert done.returncode == 0, done.stderr
        wait_for("r2 to fold 3 pings", lambda: client.status(
            mesh.routers["r2"].layout.socket("sharp")).events_handled == 3)
        assert client.status(mesh.routers["r1"].layout.socket("sharp")).events_handled == 0
        # each router's processes really run inside its own namespace
        r1_pid = int(mesh.routers["r1"].layout.supervisor_pidfile.read_text())
        assert os.stat(f"/proc/{r1_pid}/ns/net").st_ino == os.stat(
            f"/var/run/netns/{prefix}-r1").st_ino
    assert any("all 5 routers healthy" in line for line in progress)
    assert leftovers(prefix, mesh.workdir) == {"namespaces": [], "veths": [], "processes": []}


def test_meshctl_against_a_running_mesh(prefix: str, tmp_path: Path) -> None:
    topology = Topology.load(TOPOLOGIES_DIR / "line3.toml")
    with EmulatedMesh(topology, prefix=prefix, root=tmp_path).running():
        done = meshctl(prefix, tmp_path, "-n", "r1", "inject", "ping", "--count", "2",
                       "--origin", "ctl")
        assert done.returncode == 0, done.stderr
        wait_for("r1 to answer", lambda: json.loads(
            meshctl(prefix, tmp_path, "-n", "r1", "status", "sharp", "--json").stdout
        )[0]["state"].get("pings_seen") == "2")
        table = meshctl(prefix, tmp_path, "-n", "r1", "status")
        assert table.returncode == 0
        assert "sharp" in table.stdout and "SERVING" in table.stdout
        events = meshctl(prefix, tmp_path, "-n", "r1", "events", "--json",
                         "--subject", "evt.sharp.>")
        rows = [json.loads(line) for line in events.stdout.splitlines()]
        assert [r["type"] for r in rows].count("mesh.sharp.v1.PongSent") == 2
        assert {r["payload"]["origin"] for r in rows} == {"ctl"}
        listing = meshctl(prefix, tmp_path, "emu", "status")
        assert listing.returncode == 0 and listing.stdout.count("SERVING") == 3
        assert "r1:up" in listing.stdout.split("r2", 1)[1]  # r2's links column
        # bad input: a clear message and a non-zero exit
        unknown = meshctl(prefix, tmp_path, "-n", "r9", "status")
        assert unknown.returncode == 2
        assert "no router of that name" in unknown.stderr
        wrong = meshctl(prefix, tmp_path, "-n", "r1", "status", "exit")
        assert wrong.returncode == 2 and "not a service of node r1" in wrong.stderr
        usage = meshctl(prefix, tmp_path, "-n", "r1", "inject", "ping", "--count", "-1")
        assert usage.returncode == 2 and "--count and --rate must not be negative" in usage.stderr


def test_a_crashed_run_is_cleaned_up_by_the_next(prefix: str, tmp_path: Path) -> None:
    topology = Topology.load(TOPOLOGIES_DIR / "line3.toml")
    crashed = EmulatedMesh(topology, prefix=prefix, root=tmp_path)
    crashed.start()
    r2_pid = int(crashed.routers["r2"].layout.supervisor_pidfile.read_text())
    # the process that ran it dies without stopping anything: start again
    again = EmulatedMesh(topology, prefix=prefix, root=tmp_path)
    lines: list[str] = []
    with again.running(lines.append):
        assert any("cleaned up 3 namespaces" in line for line in lines)
        assert not Path(f"/proc/{r2_pid}").exists() or "Z" in Path(
            f"/proc/{r2_pid}/stat").read_text().split(") ", 1)[1][:1]
        assert all(not r.unhealthy() for r in again.routers.values())
    assert leftovers(prefix, again.workdir) == {"namespaces": [], "veths": [], "processes": []}


def test_preflight_refuses_clearly(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    with pytest.raises(PreflightError, match="run as root"):
        preflight()
    monkeypatch.undo()
    monkeypatch.setenv("PATH", str(tmp_path))  # no ip, tc or nft anywhere
    with pytest.raises(PreflightError, match=r"install the Debian package (iproute2|nftables)"):
        preflight()
