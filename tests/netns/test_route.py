"""route on a live mesh of six routers in a ring: Babel over the links'
WireGuard tunnels, kernel routes, the price knob, a cut, a kill -9.

    r1 -- r2 -- r3        r2 is dear (price 50), r4, r5, r6 cheap (1):
    |            |        r1 reaches r3 through r2 (2 hops, dear) or
    r4 -- r5 -- r6        r4-r5-r6 (4 hops, cheap).
"""

from __future__ import annotations

import itertools
import os
import random
import signal
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from mesh.route.v1 import route_pb2
from pyroute2 import netns

from deploy.emulator.mesh import EmulatedMesh, clean, service_pid
from deploy.emulator.topology import Topology
from deploy.meshctl import client
from deploy.meshctl.__main__ import main as meshctl
from services.common.money import amount
from services.route.babel.codec import PORT, Hello, Update, encode, network
from tests.conftest import require_root, wait_for
from tests.netns.probes import ping6
from tests.netns.test_links import up_links

pytestmark = [pytest.mark.netns, pytest.mark.emulator]

SERVICES = ("discovery", "link", "route")
RING = [("r1", "r2"), ("r2", "r3"), ("r3", "r6"), ("r6", "r5"), ("r5", "r4"), ("r4", "r1")]
PRICES = {"r1": 1, "r2": 50, "r3": 1, "r4": 1, "r5": 1, "r6": 1}
NAMES = sorted(PRICES)
_prefixes = itertools.count()


def ring(config: dict[str, dict[str, dict[str, object]]] | None = None,
         loss: dict[tuple[str, str], int] | None = None) -> Topology:
    """The ring, with extra node-file sections per router and loss per link."""
    nodes = []
    for name in NAMES:
        sections: dict[str, dict[str, object]] = {"meter": {"price": PRICES[name]}}
        sections.update((config or {}).get(name, {}))
        nodes.append({"name": name, "config": sections})
    return Topology.from_dict({
        "name": "ring6", "node": nodes,
        "link": [{"a": a, "b": b, "loss": (loss or {}).get((a, b), 0)} for a, b in RING],
    })


def routes(mesh: EmulatedMesh, router: str) -> dict[str, route_pb2.RouteChanged]:
    state = route_pb2.RouteState()
    client.status(mesh.routers[router].layout.socket("route")).state.Unpack(state)
    return dict(state.routes)


def address(mesh: EmulatedMesh, router: str) -> str:
    return mesh.fabric.nodes[router].ipv6


def via(mesh: EmulatedMesh, router: str, to: str) -> str | None:
    route = routes(mesh, router).get(f"{address(mesh, to)}/128")
    return route.next_hop_id if route is not None else None


def converged(mesh: EmulatedMesh) -> bool:
    """Every router has a route to every other one's v6 and v4 address."""
    wanted = {n: {f"{mesh.fabric.nodes[n].ipv6}/128", f"{mesh.fabric.nodes[n].ipv4}/32"}
              for n in NAMES}
    return all(set(routes(mesh, r)) >= set().union(*(wanted[n] for n in NAMES if n != r))
               for r in NAMES)


def kernel_routes(mesh: EmulatedMesh, router: str) -> str:
    return mesh.fabric.run(router, ["ip", "-6", "route", "show", "proto", "77"]).stdout


def kernel_prefixes(mesh: EmulatedMesh, router: str) -> set[str]:
    return {line.split()[0] + "/128" for line in kernel_routes(mesh, router).splitlines()}


def reaches(mesh: EmulatedMesh, source: str, target: str) -> bool:
    """One ping answered; False also while the kernel has no route yet (the
    route reaches the kernel just after its RouteChanged is stored)."""
    try:
        return ping6(mesh.fabric.netns(source), address(mesh, target), count=1, grace=0.5) == 1
    except OSError:
        return False


STARTED: dict[str, float] = {}


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmulatedMesh]:
    require_root()
    root: Path = tmp_path_factory.mktemp("route")
    prefix = f"rt{os.getpid() % 10000}x{next(_prefixes)}"
    emulated = EmulatedMesh(ring(), prefix=prefix, root=root, services=SERVICES,
                            sections={"route": {"hello_interval": 1.0,
                                                "price_weight_permille": 0}})
    try:
        emulated.start()
        STARTED["healthy"] = time.monotonic()
        yield emulated
    finally:
        emulated.stop()
        clean(prefix, root)


def run_meshctl(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    capsys.readouterr()
    with pytest.raises(SystemExit) as exited:
        meshctl(list(argv))
    out, err = capsys.readouterr()
    return int(exited.value.code or 0), out, err


def test_six_routers_converge_and_forward_over_babel_routes(
    mesh: EmulatedMesh, capsys: pytest.CaptureFixture[str]
) -> None:
    wait_for("every router to route to every other", lambda: converged(mesh), timeout=90)
    elapsed = time.monotonic() - STARTED["healthy"]
    # The knob is at 0: the shorter path, once r2's route (its link to r3 may
    # come up after r1 heard of r3 the long way) has reached r1.
    wait_for("r1 to route to r3 through r2", lambda: via(mesh, "r1", "r3") == "r2", timeout=30)
    # r1 pays r2 what r2 advertises: its own price plus r3's.
    route = routes(mesh, "r1")[f"{address(mesh, 'r3')}/128"]
    assert amount(route.path_price) == PRICES["r2"] + PRICES["r3"]
    assert amount(route.advertised_price) == PRICES["r1"] + PRICES["r2"] + PRICES["r3"]
    assert not route.price_defaulted
    assert f"{address(mesh, 'r3')} via fe80:" in kernel_routes(mesh, "r1")
    wait_for("r1 to reach r6 (3 hops)", lambda: reaches(mesh, "r1", "r6"), timeout=20)
    wait_for("r1 to reach r3's IPv4 address too", lambda: "192.0.2." in mesh.fabric.run(
        "r1", ["ip", "-4", "route", "show", "proto", "77"]).stdout, timeout=10)
    with capsys.disabled():
        print(f"\n  6-router ring: routers healthy to all routes selected {elapsed:.1f}s")


def test_the_knob_flips_the_route_between_the_good_and_the_cheap_path(
    mesh: EmulatedMesh, capsys: pytest.CaptureFixture[str]
) -> None:
    wait_for("convergence", lambda: converged(mesh), timeout=90)
    node = client.Node.open(mesh.routers["r1"].layout.root)
    assert client.set_tradeoff(node, 1000) == 1000
    moved = time.monotonic()
    wait_for("r1 to take the cheap path to r3", lambda: via(mesh, "r1", "r3") == "r4",
             timeout=30)
    cheap_after = time.monotonic() - moved
    route = routes(mesh, "r1")[f"{address(mesh, 'r3')}/128"]
    assert amount(route.path_price) == PRICES["r4"] + PRICES["r5"] + PRICES["r6"] + PRICES["r3"]
    assert route.metric > routes(mesh, "r1")[f"{address(mesh, 'r2')}/128"].metric
    wait_for("traffic on the cheap path", lambda: reaches(mesh, "r1", "r3"), timeout=20)
    client.set_tradeoff(node, 0)
    moved = time.monotonic()
    wait_for("r1 back on the good path", lambda: via(mesh, "r1", "r3") == "r2", timeout=30)
    good_after = time.monotonic() - moved
    with capsys.disabled():
        print(f"\n  knob 0 -> 1000: cheap path after {cheap_after:.1f}s; 1000 -> 0: good path "
              f"after {good_after:.1f}s")


def test_a_cut_link_is_routed_around_and_comes_back(
    mesh: EmulatedMesh, capsys: pytest.CaptureFixture[str]
) -> None:
    wait_for("convergence", lambda: converged(mesh) and via(mesh, "r1", "r3") == "r2",
             timeout=90)
    cut = time.monotonic()
    mesh.fabric.run("r2", ["ip", "link", "set", "v-r3", "down"])
    try:
        wait_for("r1 to route around the cut", lambda: via(mesh, "r1", "r3") == "r4",
                 timeout=30)
        rerouted = time.monotonic() - cut
        wait_for("traffic around the cut", lambda: reaches(mesh, "r1", "r3"), timeout=20)
    finally:
        mesh.fabric.run("r2", ["ip", "link", "set", "v-r3", "up"])
    healed = time.monotonic()
    wait_for("r1 back through r2", lambda: via(mesh, "r1", "r3") == "r2", timeout=90)
    back = time.monotonic() - healed
    with capsys.disabled():
        print(f"\n  link cut: rerouted after {rerouted:.1f}s; restored: back after {back:.1f}s")


def test_kill_9_of_route_keeps_the_kernel_routes_and_relearns(mesh: EmulatedMesh) -> None:
    wait_for("convergence", lambda: converged(mesh), timeout=90)
    layout = mesh.routers["r2"].layout
    before = kernel_prefixes(mesh, "r2")
    seqno = route_pb2.RouteState()
    client.status(layout.socket("route")).state.Unpack(seqno)
    pid = service_pid(layout, "route")
    os.kill(pid, signal.SIGKILL)
    # Forwarding does not wait for the service: the routes stay in the kernel.
    assert kernel_prefixes(mesh, "r2") == before
    assert reaches(mesh, "r1", "r3")
    wait_for("route restarted", lambda: service_pid(layout, "route") not in (None, pid),
             timeout=30)
    wait_for("route serving again", lambda: client.health(layout.socket("route")) == "SERVING",
             timeout=30)
    after = route_pb2.RouteState()
    client.status(layout.socket("route")).state.Unpack(after)
    assert after.seqno > seqno.seqno  # never a seqno the neighbors may have seen
    wait_for("convergence again", lambda: converged(mesh), timeout=60)
    assert kernel_prefixes(mesh, "r2") == before


def test_meshctl_shows_routes_babel_neighbors_and_refuses_a_bad_knob(
    mesh: EmulatedMesh, capsys: pytest.CaptureFixture[str]
) -> None:
    wait_for("convergence", lambda: converged(mesh), timeout=90)
    root = str(mesh.routers["r1"].layout.root)
    listed: dict[str, str] = {}

    def routes_shown() -> bool:
        code, listed["shown"], _ = run_meshctl(capsys, "-n", root, "routes")
        assert code == 0
        return f"{address(mesh, 'r3')}/128" in listed["shown"]

    # The tests before this one cut links and flip the knob: routes may move still.
    wait_for("meshctl routes to list r3", routes_shown, timeout=30,
             explain=lambda: listed.get("shown", ""))
    assert "path_price" in listed["shown"]
    code, shown, _ = run_meshctl(capsys, "-n", root, "route", "babel")
    assert code == 0
    assert "malformed: none" in shown and "r2" in shown and "r4" in shown
    code, _, err = run_meshctl(capsys, "-n", root, "route", "tradeoff", "1001")
    assert code != 0
    assert "0 (quality only) to 1000" in err


def garbage(seed: int, count: int) -> list[bytes]:
    """Datagrams a Babel speaker must survive: bad headers, truncated and
    oversized TLVs, bad address encodings, and random mutations of a real
    packet."""
    rng = random.Random(seed)
    [real] = encode([Hello(1, 100), Update(network("2001:db8:99::/64"), bytes(range(8)), 1,
                                           96, 400, None, 5)])
    crafted = [
        b"", b"\x2a", b"\x2b\x02\x00\x00", b"\x2a\x07\x00\x00",  # short, magic, version
        b"\x2a\x02\xff\xff" + bytes(10),  # body longer than the datagram
        b"\x2a\x02\x00\x03\x08\xff\x00",  # a TLV longer than the body
        b"\x2a\x02\x00\x0c\x08\x0a\x09\x00\x40\x00\x01\x90\x00\x01\x00\x60",  # AE 9
        b"\x2a\x02\x00\x04\x05\x02\x07\x00",  # a truncated IHU
    ]
    mutated = []
    for _ in range(count):
        data = bytearray(real)
        for _ in range(rng.randint(1, 6)):
            data[rng.randrange(len(data))] = rng.randrange(256)
        mutated.append(bytes(data[: rng.randint(4, len(data))]))
    return crafted + mutated


def test_malformed_babel_packets_are_counted_and_never_crash_the_service(
    mesh: EmulatedMesh,
) -> None:
    wait_for("convergence", lambda: converged(mesh), timeout=90)
    link = up_links(mesh, "r2")["r1"]
    index = int(mesh.fabric.run("r2", ["cat", f"/sys/class/net/{link.tunnel_interface}/ifindex"])
                .stdout)
    layout = mesh.routers["r1"].layout
    pid = service_pid(layout, "route")
    node = client.Node.open(layout.root)
    before = client.babel_status(node)
    sock = netns.create_socket(mesh.fabric.netns("r2"), socket.AF_INET6, socket.SOCK_DGRAM, 0,
                               flags=0)
    with sock:
        sock.bind((link.tunnel_local_address, 0, 0, index))
        for data in garbage(seed=5, count=300):
            sock.sendto(data, (link.tunnel_peer_address, PORT, 0, index))

    def counted() -> bool:
        status = client.babel_status(node)
        return status.packets_received - before.packets_received >= 300
    wait_for("r1's route to count the garbage", counted, timeout=30)
    after = client.babel_status(node)
    assert sum(after.packets_rejected.values()) > sum(before.packets_rejected.values())
    assert sum(after.tlvs_dropped.values()) > sum(before.tlvs_dropped.values())
    assert service_pid(layout, "route") == pid  # no crash, no restart
    # Mangled Hellos look like r2 restarting: the link's cost recovers in a
    # few Hellos, and the routes with it.
    wait_for("convergence after the garbage", lambda: converged(mesh), timeout=30)
