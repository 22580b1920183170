"""The emulated mesh's network layer: namespaces, veth links, loss, rate, cleanup.

Namespace tests need root (CI runs them as root; they never skip). Each one
uses its own prefix and a fixture that removes its namespaces even on failure.
"""

from __future__ import annotations

import errno
import itertools
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from pyroute2 import IPRoute, netns

from deploy.emulator.fabric import Fabric, FabricError, cleanup_stale
from deploy.emulator.preflight import MIN_INOTIFY_INSTANCES, preflight
from deploy.emulator.topology import TOPOLOGIES_DIR, Topology, TopologyError
from tests.netns.probes import echo_request, icmp6_socket, ping6

REPO = Path(__file__).resolve().parents[2]
LINE3 = TOPOLOGIES_DIR / "line3.toml"

_prefixes = itertools.count()


def wait_for(what: str, check: Callable[[], Any], timeout: float = 10.0) -> Any:
    """Poll check() until truthy; the only place these tests wait on time."""
    deadline = time.monotonic() + timeout
    while not (result := check()):
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.01)
    return result


def prefix_namespaces(prefix: str) -> list[str]:
    return sorted(ns for ns in netns.listnetns() if ns.startswith(f"{prefix}-"))


def topology(links: list[dict[str, Any]]) -> Topology:
    names = sorted({node for link in links for node in (link["a"], link["b"])})
    return Topology.from_dict(
        {"name": "test", "node": [{"name": n} for n in names], "link": links}
    )


@pytest.fixture(scope="module")
def machine_ready() -> None:
    preflight()


@pytest.fixture
def fabric(machine_ready: None, tmp_path: Path) -> Iterator[Fabric]:
    """An unbuilt Fabric with a prefix of its own; its namespaces go away afterwards."""
    prefix = f"t{os.getpid() % 10000}x{next(_prefixes)}"
    fab = Fabric(prefix, state_dir=tmp_path)
    try:
        yield fab
    finally:
        try:
            fab.destroy()
        finally:
            cleanup_stale(prefix, state_dir=tmp_path)


# -- namespaces and links ------------------------------------------------------


@pytest.mark.netns
def test_line3_comes_up_and_goes_away(fabric: Fabric) -> None:
    fabric.create(Topology.load(LINE3))
    expected = [f"{fabric.prefix}-r{i}" for i in (1, 2, 3)]
    assert prefix_namespaces(fabric.prefix) == expected
    assert fabric.state_path.exists()

    assert fabric.link_address("r2", "r1") == "2001:db8:ff:1::2"
    assert ping6(fabric.netns("r1"), "2001:db8:ff:1::2", count=3) == 3
    assert ping6(fabric.netns("r3"), fabric.link_address("r2", "r3"), count=3) == 3
    # No routing yet: r1 has no route to r3's link, so the kernel refuses at once.
    with icmp6_socket(fabric.netns("r1")) as sock, pytest.raises(OSError) as refused:
        sock.sendto(echo_request(1, 1), (fabric.link_address("r3", "r2"), 0))
    assert refused.value.errno == errno.ENETUNREACH

    fabric.destroy()
    assert prefix_namespaces(fabric.prefix) == []
    listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True)
    assert f"{fabric.prefix}-" not in listed.stdout
    with IPRoute() as ipr:
        root_veths = [name for link in ipr.get_links() if (name := link.get("ifname"))]
    assert not [name for name in root_veths if name.startswith("v-")]
    assert not fabric.state_path.exists()
    fabric.destroy()  # idempotent


@pytest.mark.netns
def test_process_in_namespace_sees_only_its_interfaces(fabric: Fabric) -> None:
    fabric.create(Topology.load(LINE3))
    script = "import socket; print(sorted(name for _, name in socket.if_nameindex()))"
    seen = fabric.run("r2", [sys.executable, "-c", script]).stdout
    assert seen.strip() == str(["lo", "v-r1", "v-r3"])

    lo = json.loads(fabric.run("r2", ["ip", "-j", "addr", "show", "dev", "lo"]).stdout)[0]
    addresses = {(a["local"], a["prefixlen"]) for a in lo["addr_info"]}
    assert {("2001:db8:0:2::1", 128), ("192.0.2.2", 32)} <= addresses
    assert fabric.nodes["r2"].ipv6 == "2001:db8:0:2::1"

    forwarding = fabric.run("r2", ["sysctl", "-n", "net.ipv6.conf.all.forwarding"]).stdout
    assert forwarding.strip() == "1"
    with pytest.raises(FabricError, match=r"^r2: false exited with 1$"):
        fabric.run("r2", ["false"])
    with pytest.raises(FabricError, match=r"^r2: ls /nonexistent exited with 2: ls: cannot"):
        fabric.run("r2", ["ls", "/nonexistent"])


@pytest.mark.netns
def test_destroy_from_state_file_of_another_process(fabric: Fabric) -> None:
    fabric.create(Topology.load(LINE3))
    later = Fabric(fabric.prefix, state_dir=fabric.state_path.parent)
    later.destroy()
    assert prefix_namespaces(fabric.prefix) == []
    assert not fabric.state_path.exists()


@pytest.mark.netns
def test_create_refuses_to_reuse_existing_namespaces(fabric: Fabric, tmp_path: Path) -> None:
    fabric.create(Topology.load(LINE3))
    rival = Fabric(fabric.prefix, state_dir=tmp_path / "rival")
    with pytest.raises(FabricError, match=r"already exist.*cleanup_stale"):
        rival.create(Topology.load(LINE3))
    # The refusal left the existing fabric alone.
    assert len(prefix_namespaces(fabric.prefix)) == 3
    assert ping6(fabric.netns("r1"), fabric.link_address("r2", "r1"), count=1) == 1


# -- loss and rate -------------------------------------------------------------


@pytest.mark.netns
def test_loss(fabric: Fabric) -> None:
    fabric.create(
        topology([{"a": "r1", "b": "r2", "loss": 30}, {"a": "r2", "b": "r3", "loss": 0}])
    )
    count = 200
    lossy = ping6(fabric.netns("r2"), fabric.link_address("r1", "r2"), count)
    clean = ping6(fabric.netns("r2"), fabric.link_address("r3", "r2"), count)
    # 30 % each way: a round trip survives with 0.7 * 0.7 = 0.49, so ~51 % loss
    # (sd ~3.5 % over 200 pings); the bounds are more than 5 sd away.
    loss = 1 - lossy / count
    assert 0.30 <= loss <= 0.70, f"loss {loss:.0%}"
    assert clean == count


def iperf3_mbps(fabric: Fabric, server: str, client: str, seconds: int) -> float:
    """TCP throughput client -> server as the receiver measured it, in Mbit/s."""
    address = fabric.link_address(server, client)
    daemon = subprocess.Popen(
        fabric.exec_argv(server, ["iperf3", "-s", "-1", "-B", address]),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_for(
            f"iperf3 listening in {server}",
            lambda: fabric.run(server, ["ss", "-Hltn", "sport = :5201"]).stdout.strip(),
        )
        out = fabric.run(
            client, ["iperf3", "-c", address, "-t", str(seconds), "-J"], timeout=seconds + 30
        ).stdout
        daemon.wait(timeout=10)
    finally:
        if daemon.poll() is None:
            daemon.kill()
            daemon.wait()
    return json.loads(out)["end"]["sum_received"]["bits_per_second"] / 1e6


@pytest.mark.netns
def test_rate(fabric: Fabric) -> None:
    fabric.create(topology([{"a": "r1", "b": "r2", "rate": "2mbit"}, {"a": "r2", "b": "r3"}]))
    limited = iperf3_mbps(fabric, server="r1", client="r2", seconds=2)
    assert 1.5 <= limited <= 2.5, f"{limited:.2f} Mbit/s"
    unlimited = iperf3_mbps(fabric, server="r3", client="r2", seconds=1)
    assert unlimited > 10 * limited, f"{unlimited:.1f} vs {limited:.2f} Mbit/s"


# -- crash recovery --------------------------------------------------------------


@pytest.mark.netns
def test_cleanup_stale_after_a_crash(fabric: Fabric) -> None:
    state_dir = fabric.state_path.parent
    # Another process builds the fabric and dies without tearing it down.
    crash = textwrap.dedent(f"""
        import os
        from pathlib import Path
        from deploy.emulator.fabric import Fabric
        from deploy.emulator.topology import Topology
        Fabric({fabric.prefix!r}, state_dir=Path({str(state_dir)!r})).create(
            Topology.load({str(LINE3)!r}))
        os._exit(1)
    """)
    crashed = subprocess.run(
        [sys.executable, "-c", crash], cwd=REPO, capture_output=True, text=True, timeout=60
    )
    assert crashed.returncode == 1, crashed.stderr
    assert len(prefix_namespaces(fabric.prefix)) == 3

    sleeper = subprocess.Popen(fabric.exec_argv("r2", ["sleep", "1000"]))
    try:
        wait_for(
            "sleep inside r2",
            lambda: sleeper.pid in netns.ns_pids().get(fabric.netns("r2"), []),
        )
        removed = cleanup_stale(fabric.prefix, state_dir=state_dir)
        assert removed == [f"{fabric.prefix}-r{i}" for i in (1, 2, 3)]
        assert sleeper.wait(timeout=10) == -signal.SIGTERM
        assert prefix_namespaces(fabric.prefix) == []
        assert not fabric.state_path.exists()
        assert cleanup_stale(fabric.prefix, state_dir=state_dir) == []
    finally:
        if sleeper.poll() is None:
            sleeper.kill()
            sleeper.wait()


@pytest.mark.netns
def test_preflight_raises_inotify_instances(machine_ready: None) -> None:
    assert preflight() is None
    limit = Path("/proc/sys/fs/inotify/max_user_instances").read_text()
    assert int(limit) >= MIN_INOTIFY_INSTANCES


# -- topology files (no root needed) ---------------------------------------------


def test_shipped_topologies() -> None:
    line3 = Topology.load(LINE3)
    assert [n.name for n in line3.nodes] == ["r1", "r2", "r3"]
    assert [(link.a, link.b) for link in line3.links] == [("r1", "r2"), ("r2", "r3")]

    five = Topology.load(TOPOLOGIES_DIR / "five.toml")
    assert len(five.nodes) == 5
    assert {frozenset((link.a, link.b)) for link in five.links} == {
        frozenset(p) for p in [("r1", "r2"), ("r2", "r3"), ("r3", "r4"), ("r4", "r5"),
                               ("r5", "r1"), ("r1", "r3")]
    }

    default = Topology.load(TOPOLOGIES_DIR / "default.toml")
    roles = {n.name: n.role for n in default.nodes}
    assert roles == {**{f"r{i}": "router" for i in range(1, 6)}, "r6": "gateway",
                     "r7": "gateway", "ex": "exit", "inet": "internet"}
    pairs = {frozenset((link.a, link.b)) for link in default.links}
    ring = {frozenset((f"r{i}", f"r{i % 7 + 1}")) for i in range(1, 8)}
    uplinks = {frozenset(p) for p in [("r1", "r4"), ("ex", "inet"), ("r6", "inet"),
                                      ("r7", "inet")]}
    assert pairs == ring | uplinks


def test_topology_fields() -> None:
    topo = Topology.from_dict({
        "name": "t",
        "node": [{"name": "a"}, {"name": "gw", "role": "gateway", "services": ["sharp"]}],
        "link": [{"a": "a", "b": "gw", "loss": 5, "rate": "10mbit"}],
    })
    assert topo.nodes[0].role == "router" and topo.nodes[0].services is None
    assert topo.nodes[1].role == "gateway" and topo.nodes[1].services == ("sharp",)
    assert topo.links[0].loss == 5 and topo.links[0].rate_bps == 10_000_000
    assert topo.path is None


R12 = [{"name": "r1"}, {"name": "r2"}]


def topo_dict(node: Any = R12, link: Any = (), **top: Any) -> dict[str, Any]:
    return {"name": "t", "node": node, "link": list(link), **top}


def one_link(**fields: Any) -> dict[str, Any]:
    return topo_dict(link=[{"a": "r1", "b": "r2", **fields}])


BAD_TOPOLOGIES = [
    ("unknown node in link",
     topo_dict(link=[{"a": "r1", "b": "r9"}]),
     "topology: link #1 (r1-r9): unknown node 'r9' (nodes: r1, r2)"),
    ("duplicate node",
     topo_dict(node=[{"name": "r1"}, {"name": "r2"}, {"name": "r1"}]),
     "topology: node #3: duplicate node name 'r1' (first defined as node #1)"),
    ("self link",
     topo_dict(link=[{"a": "r1", "b": "r1"}]),
     "topology: link #1 (r1-r1): a link cannot join node 'r1' to itself"),
    ("duplicate link, reversed",
     topo_dict(link=[{"a": "r1", "b": "r2"}, {"a": "r2", "b": "r1"}]),
     "topology: link #2 (r2-r1): duplicate link between r2 and r1 (already link #1)"),
    ("node name uppercase",
     topo_dict(node=[{"name": "R1"}]),
     "topology: node #1: bad node name 'R1': want a lowercase letter then up to 7 "
     "lowercase letters or digits ([a-z][a-z0-9]{0,7})"),
    ("node name too long",
     topo_dict(node=[{"name": "router123"}]),
     "topology: node #1: bad node name 'router123': want a lowercase letter then up to 7 "
     "lowercase letters or digits ([a-z][a-z0-9]{0,7})"),
    ("node name with hyphen",
     topo_dict(node=[{"name": "r-1"}]),
     "topology: node #1: bad node name 'r-1': want a lowercase letter then up to 7 "
     "lowercase letters or digits ([a-z][a-z0-9]{0,7})"),
    ("node without name",
     topo_dict(node=[{"role": "router"}]),
     'topology: node #1: "name" is required and must be a string'),
    ("loss above 100",
     one_link(loss=101),
     "topology: link #1 (r1-r2): loss must be an integer percent 0-100, got 101"),
    ("loss negative",
     one_link(loss=-1),
     "topology: link #1 (r1-r2): loss must be an integer percent 0-100, got -1"),
    ("loss fractional",
     one_link(loss=2.5),
     "topology: link #1 (r1-r2): loss must be an integer percent 0-100, got 2.5"),
    ("loss boolean",
     one_link(loss=True),
     "topology: link #1 (r1-r2): loss must be an integer percent 0-100, got True"),
    ("rate with a space",
     one_link(rate="10 mbit"),
     "topology: link #1 (r1-r2): bad rate '10 mbit': want an integer and bit, kbit, mbit "
     "or gbit"),
    ("rate in bytes",
     one_link(rate="10mbps"),
     "topology: link #1 (r1-r2): bad rate '10mbps': want an integer and bit, kbit, mbit "
     "or gbit"),
    ("rate as a number",
     one_link(rate=10),
     'topology: link #1 (r1-r2): rate must be a string like "10mbit", got 10'),
    ("rate too high",
     one_link(rate="40gbit"),
     "topology: link #1 (r1-r2): rate '40gbit' out of range: 1kbit to 32gbit"),
    ("delay",
     one_link(delay="10ms"),
     "topology: link #1 (r1-r2): delay is not supported: this kernel has no netem qdisc; "
     "use loss and rate only"),
    ("unknown top-level key",
     topo_dict(nodes=[]),
     "topology: unknown key 'nodes' (allowed: link, name, node)"),
    ("unknown node key",
     topo_dict(node=[{"name": "r1", "rol": "exit"}]),
     "topology: node #1 (r1): unknown key 'rol' (allowed: config, name, role, services)"),
    ("unknown link keys",
     one_link(los=5, jitter=1),
     "topology: link #1 (r1-r2): unknown keys 'jitter', 'los' (allowed: a, b, loss, rate)"),
    ("link end missing",
     topo_dict(link=[{"a": "r1"}]),
     'topology: link #1: "b" is required and must be a node name'),
    ("bad role",
     topo_dict(node=[{"name": "r1", "role": "relay"}]),
     "topology: node #1 (r1): bad role 'relay': want one of router, gateway, exit, internet, "
     "host"),
    ("services not a list",
     topo_dict(node=[{"name": "r1", "services": "sharp"}]),
     'topology: node #1 (r1): "services" must be a list of strings'),
    ("no name",
     {"node": R12},
     'topology: "name" is required and must be a non-empty string'),
    ("no nodes",
     {"name": "t"},
     "topology: no [[node]] tables: a topology needs at least one node"),
    ("node not a table array",
     {"name": "t", "node": "r1"},
     'topology: "node" must be an array of tables ([[node]])'),
]


@pytest.mark.parametrize(
    ("data", "message"),
    [pytest.param(data, message, id=case) for case, data, message in BAD_TOPOLOGIES],
)
def test_topology_errors(data: dict[str, Any], message: str) -> None:
    with pytest.raises(TopologyError) as err:
        Topology.from_dict(data)
    assert str(err.value) == message


def test_topology_file_errors(tmp_path: Path) -> None:
    broken = tmp_path / "broken.toml"
    broken.write_text('name = "x"\n[[node]\n')
    with pytest.raises(TopologyError, match=rf"^{broken}: not valid TOML: "):
        Topology.load(broken)

    with pytest.raises(TopologyError, match=rf"^{tmp_path}/missing.toml: cannot read: "):
        Topology.load(tmp_path / "missing.toml")

    delayed = tmp_path / "delayed.toml"
    delayed.write_text(
        'name = "d"\n[[node]]\nname = "r1"\n[[node]]\nname = "r2"\n'
        '[[link]]\na = "r1"\nb = "r2"\ndelay = "10ms"\n'
    )
    with pytest.raises(TopologyError, match=rf"^{delayed}: link #1 \(r1-r2\): delay is not"):
        Topology.load(delayed)
