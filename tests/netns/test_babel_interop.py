"""Interop with a stock babeld (Debian's 1.12.1) on raw veths in namespaces.

    b1 ---- r1        b1, b2: babeld (`type wired`, explicit router-id,
    |        |        announcing its loopback addresses);
    r2 ---- b2        r1, r2: ours, the route service alone, Babel on the veths.

Every path between the two babelds crosses one of ours and every path
between ours a babeld, so transit is exercised both ways; cutting a link
makes both implementations detect it, reroute (the detour is unfeasible
until a seqno request crosses the other implementation) and recover.
tshark, capturing on r1 throughout, must decode all r1 sends as Babel.
"""

from __future__ import annotations

import itertools
import json
import os
import re
import socket
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
from mesh.route.v1 import control_pb2, route_pb2
from pyroute2 import netns

from deploy.emulator.mesh import EmulatedMesh, clean
from deploy.emulator.topology import Topology
from deploy.meshctl import client
from services.route.babel.codec import INFINITY, PRICE_SUBTLV
from tests.conftest import require_root, wait_for
from tests.netns.babeld import Babeld, Capture, address_router_id, host_router_id
from tests.netns.probes import ping6

pytestmark = [pytest.mark.netns, pytest.mark.emulator]

RING = [("b1", "r1"), ("r1", "b2"), ("b2", "r2"), ("r2", "b1")]
BABELDS = ("b1", "b2")
OURS = ("r1", "r2")
NODES = ("b1", "r1", "b2", "r2")
HELLO_INTERVAL = 1.0
WIRED_COST = 96
# b1 takes its address's interface id as router-id, so babeld names that
# route's source by the Updates' router-id flag rather than a Router-Id TLV.
ROUTER_IDS = {"b1": address_router_id, "b2": host_router_id}
# babeld smooths metrics (half-life 4 s): a route whose neighbour came back
# starts from infinity and takes ~30 s to look better than a 3-hop detour.
# Off, so a recovery shows when the protocol recovers, not when smoothing does.
BABELD_EXTRA = ("smoothing-half-life 0",)
TLV_NAMES = {4: "Hello", 5: "IHU", 6: "Router-Id", 7: "Next Hop", 8: "Update",
             9: "Route Request", 10: "Seqno Request"}
_prefixes = itertools.count()


def facing(node: str) -> list[str]:
    return sorted(f"v-{b if a == node else a}" for a, b in RING if node in (a, b))


def ring() -> Topology:
    nodes: list[dict[str, object]] = []
    for name in NODES:
        if name in BABELDS:
            nodes.append({"name": name, "role": "host"})  # no router of ours there
        else:
            nodes.append({"name": name, "config": {"route": {
                "tunnels": False, "interfaces": facing(name)}}})
    return Topology.from_dict({"name": "babel-interop", "node": nodes,
                               "link": [{"a": a, "b": b} for a, b in RING]})


@dataclass
class Interop:
    mesh: EmulatedMesh
    babelds: dict[str, Babeld]
    capture: Capture
    started: float  # when the babelds were started

    def address(self, node: str, family: int = 6) -> str:
        info = self.mesh.fabric.nodes[node]
        return info.ipv6 if family == 6 else info.ipv4

    def usable_routes(self, node: str, family: int = 6) -> dict[str, str]:
        """Destination -> interface of the kernel routes the node's Babel
        speaker installed that forward (babeld keeps an unreachable one for a
        while after a retraction)."""
        proto = "babel" if node in BABELDS else "77"
        shown = self.mesh.fabric.run(node, ["ip", "-j", f"-{family}", "route", "show",
                                            "proto", proto]).stdout
        return {route["dst"]: route["dev"] for route in json.loads(shown or "[]")
                if route.get("gateway") or route.get("via")}

    def route_dev(self, node: str, to: str, family: int = 6) -> str | None:
        return self.usable_routes(node, family).get(self.address(to, family))

    def converged(self) -> bool:
        """Every node forwards to every other one's IPv6 and IPv4 address."""
        return all(self.route_dev(node, to, family) is not None
                   for node in NODES for to in NODES if to != node for family in (6, 4))

    def direct(self) -> bool:
        """Neighbors route to each other over their link."""
        return all(self.route_dev(node, to, family) == f"v-{to}"
                   for a, b in RING for node, to in ((a, b), (b, a)) for family in (6, 4))

    def settled(self) -> bool:
        return self.converged() and self.direct()

    def reaches(self, source: str, target: str) -> bool:
        """An echo answered, between the nodes' own addresses (from a veth's,
        the kernel's pick, no route would lead back)."""
        try:
            return ping6(self.mesh.fabric.netns(source), self.address(target), count=1,
                         grace=0.5, source=self.address(source)) == 1
        except OSError:  # no route yet
            return False

    def all_reach(self) -> bool:
        return all(self.reaches(a, b) for a in NODES for b in NODES if a != b)

    def babel_status(self, router: str) -> control_pb2.GetBabelResponse:
        return client.babel_status(client.Node.open(self.mesh.routers[router].layout.root))

    def our_route(self, router: str, to: str) -> route_pb2.RouteChanged:
        state = route_pb2.RouteState()
        client.status(self.mesh.routers[router].layout.socket("route")).state.Unpack(state)
        return state.routes[f"{self.address(to)}/128"]

    def wait(self, what: str, check: Callable[[], object], timeout: float = 60.0) -> None:
        """wait_for, telling on a timeout what every node routes and hears."""
        try:
            wait_for(what, check, timeout=timeout)
        except AssertionError as err:
            raise AssertionError(f"{err}\n{self.describe()}") from None

    def describe(self) -> str:
        lines = [f"{node} routes: v6 {self.usable_routes(node)} v4 {self.usable_routes(node, 4)}"
                 for node in NODES]
        lines += [f"{name} ({'running' if babeld.running() else 'exited'}) neighbours: "
                  f"{babeld.neighbours()}" for name, babeld in self.babelds.items()]
        for router in OURS:
            status = self.babel_status(router)
            lines.append(f"{router} neighbors: " + ", ".join(
                f"{n.interface} {n.address} cost {n.cost}" for n in status.neighbors))
        return "\n".join(lines)

    def assert_nothing_malformed(self) -> None:
        """Each side parsed all the other sent: nothing rejected or dropped by
        ours, no complaint from babeld."""
        for router in OURS:
            status = self.babel_status(router)
            assert status.packets_received > 0
            assert not status.packets_rejected and not status.tlvs_dropped, status
        for name, babeld in self.babelds.items():
            assert not babeld.complaints(), (name, babeld.complaints())


@pytest.fixture(scope="module")
def interop(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Interop]:
    require_root()
    root: Path = tmp_path_factory.mktemp("babel")
    prefix = f"bi{os.getpid() % 10000}x{next(_prefixes)}"
    mesh = EmulatedMesh(ring(), prefix=prefix, root=root, services=("route",),
                        # By metric alone: a route through a babeld has no price
                        # (it drops the sub-TLV), so a defaulted, dear one.
                        sections={"route": {"hello_interval": HELLO_INTERVAL,
                                            "price_weight_permille": 0}})
    babelds = {name: Babeld(mesh.fabric, name, facing(name), root / "babeld",
                            hello_interval=HELLO_INTERVAL, extra=BABELD_EXTRA,
                            router_id=ROUTER_IDS[name]) for name in BABELDS}
    capture = Capture(mesh.fabric, "r1", root / "capture")
    try:
        mesh.start()
        # Before the babelds: the capture holds r1's side of every exchange with them.
        capture.start()
        wait_for("tshark capturing on r1", capture.capturing, timeout=60)
        started = time.monotonic()
        for babeld in babelds.values():
            babeld.start()
        yield Interop(mesh, babelds, capture, started)
    finally:
        for babeld in babelds.values():
            babeld.stop()
        capture.stop()
        mesh.stop()
        clean(prefix, root)


def test_adjacency_both_ways_and_routes_to_each_other(
        interop: Interop, capsys: pytest.CaptureFixture[str]) -> None:
    def babelds_see_ours() -> bool:
        # Cost from both directions: babeld hears our Hellos, and its rxcost
        # came back to it in our IHUs.
        return all(sorted(n.interface for n in babeld.neighbours() if n.cost == WIRED_COST)
                   == facing(name) for name, babeld in interop.babelds.items())

    def ours_see_babelds() -> bool:
        return all(sorted(n.interface for n in interop.babel_status(r).neighbors
                          if n.cost == WIRED_COST) == facing(r) for r in OURS)

    interop.wait("the babelds and ours adjacent on every link",
                 lambda: babelds_see_ours() and ours_see_babelds())
    adjacent = time.monotonic() - interop.started
    # babeld ignores our price sub-TLV and installs our routes, IPv4 ones via IPv6.
    interop.wait("every node to route to every other, to neighbors over their link",
                 interop.settled)
    converged = time.monotonic() - interop.started
    for router in OURS:
        for name, babeld in interop.babelds.items():
            # Named by a Router-Id TLV (b2) or by the Update's router-id flag (b1).
            assert interop.our_route(router, name).router_id == bytes.fromhex(
                babeld.router_id.replace(":", ""))
    interop.assert_nothing_malformed()
    for a, b in [(r, n) for r in OURS for n in BABELDS]:
        interop.wait(f"{a} and {b} to ping each other",
                     lambda a=a, b=b: interop.reaches(a, b) and interop.reaches(b, a),
                     timeout=20)
    with capsys.disabled():
        print(f"\n  babeld interop: adjacent {adjacent:.1f}s, all routes {converged:.1f}s "
              "after babeld started")


def test_ours_carry_traffic_between_two_babelds(interop: Interop) -> None:
    interop.wait("convergence", interop.settled)
    # A babeld's neighbors are r1 and r2 alone: its route to the other is through ours.
    assert interop.route_dev("b1", "b2") in {"v-r1", "v-r2"}
    assert interop.route_dev("b2", "b1") in {"v-r1", "v-r2"}
    interop.wait("b1 and b2 to ping each other through ours",
                 lambda: interop.reaches("b1", "b2") and interop.reaches("b2", "b1"), timeout=20)
    interop.wait("b1 to reach b2's IPv4 address (v4-via-v6 through ours)",
                 lambda: udp4_reaches(interop, "b1", "b2"), timeout=20)


def test_babeld_carries_traffic_between_two_of_ours(interop: Interop) -> None:
    interop.wait("convergence", interop.settled)
    assert interop.route_dev("r1", "r2") in {"v-b1", "v-b2"}
    assert interop.route_dev("r2", "r1") in {"v-b1", "v-b2"}
    # babeld re-advertised r2's route without our price sub-TLV (FACTS).
    assert interop.our_route("r1", "r2").price_defaulted
    interop.wait("r1 and r2 to ping each other through a babeld",
                 lambda: interop.reaches("r1", "r2") and interop.reaches("r2", "r1"), timeout=20)
    interop.wait("r1 to reach r2's IPv4 address (v4-via-v6 through babeld)",
                 lambda: udp4_reaches(interop, "r1", "r2"), timeout=20)


def udp4_reaches(interop: Interop, source: str, target: str) -> bool:
    """One UDP datagram between the nodes' IPv4 addresses, which only Babel's
    v4-via-v6 routes lead to (the veths have no IPv4 address)."""
    fabric = interop.mesh.fabric
    receiver = netns.create_socket(fabric.netns(target), socket.AF_INET, socket.SOCK_DGRAM,
                                   0, flags=0)
    sender = netns.create_socket(fabric.netns(source), socket.AF_INET, socket.SOCK_DGRAM,
                                 0, flags=0)
    with receiver, sender:
        receiver.bind((interop.address(target, 4), 0))
        receiver.settimeout(0.5)
        sender.bind((interop.address(source, 4), 0))
        try:
            sender.sendto(b"v4-via-v6", receiver.getsockname())
            data, peer = receiver.recvfrom(64)
        except OSError:  # no route yet, or nothing arrived
            return False
        return data == b"v4-via-v6" and peer == sender.getsockname()


@contextmanager
def silent_cut(interop: Interop, node: str, interface: str) -> Iterator[None]:
    """Drop everything on a link at one end: no carrier change, so both ends
    only learn of it from the Hellos they stop hearing."""
    table = ("table inet meshcut {\n"
             "  chain in {\n"
             "    type filter hook prerouting priority -10; policy accept;\n"
             f'    iifname "{interface}" drop\n'
             "  }\n"
             "  chain out {\n"
             "    type filter hook postrouting priority 10; policy accept;\n"
             f'    oifname "{interface}" drop\n'
             "  }\n"
             "}\n")
    interop.mesh.fabric.run(node, ["nft", "-f", "-"], input=table)
    try:
        yield
    finally:
        interop.mesh.fabric.run(node, ["nft", "delete", "table", "inet", "meshcut"])


@contextmanager
def interface_down(interop: Interop, node: str, interface: str) -> Iterator[None]:
    """The interface down at one end: its addresses and routes go with it."""
    interop.mesh.fabric.run(node, ["ip", "link", "set", "dev", interface, "down"])
    try:
        yield
    finally:
        interop.mesh.fabric.run(node, ["ip", "link", "set", "dev", interface, "up"])


CUTS = {
    # case: (babeld, ours, the end that cuts, how)
    "silent-at-babeld": ("b2", "r1", "b2", silent_cut),
    "down-at-ours": ("b1", "r1", "r1", interface_down),
}


@pytest.mark.parametrize("case", CUTS)
def test_a_cut_link_is_routed_around_on_both_sides_and_recovers(
        interop: Interop, case: str, capsys: pytest.CaptureFixture[str]) -> None:
    babeld, ours, end, cut = CUTS[case]
    direct = {babeld: f"v-{ours}", ours: f"v-{babeld}"}  # each end's side of the link
    # Around the ring the other way: through the other babeld and the other of ours.
    around = {node: next(i for i in facing(node) if i != direct[node]) for node in direct}

    def routed(via: dict[str, str]) -> bool:
        return all(interop.route_dev(node, to, family) == via[node]
                   for node, to in ((babeld, ours), (ours, babeld)) for family in (6, 4))

    def adjacent() -> bool:
        babeld_side = any(n.interface == direct[babeld] and n.cost < INFINITY
                          for n in interop.babelds[babeld].neighbours())
        ours_side = any(n.interface == direct[ours] and n.cost < INFINITY
                        for n in interop.babel_status(ours).neighbors)
        return babeld_side and ours_side

    interop.wait("convergence", interop.settled)
    with cut(interop, end, direct[end]):
        cut_at = time.monotonic()
        interop.wait(f"{babeld} and {ours} to route around the cut", lambda: routed(around))
        rerouted = time.monotonic() - cut_at
        assert not adjacent()
        interop.wait("every node to reach every other around the cut", interop.all_reach,
                     timeout=30)
    restored_at = time.monotonic()
    interop.wait(f"{babeld} and {ours} back on their link",
                 lambda: adjacent() and routed(direct))
    back = time.monotonic() - restored_at
    interop.wait("every node to reach every other again", interop.all_reach, timeout=30)
    with capsys.disabled():
        print(f"\n  {case} ({babeld}-{ours} cut at {end}): rerouted after {rerouted:.1f}s, "
              f"back after {back:.1f}s")


def test_tshark_decodes_everything_ours_sent_as_babel(
        interop: Interop, capsys: pytest.CaptureFixture[str]) -> None:
    interop.wait("convergence", interop.settled)
    interop.capture.stop()
    from_ours = " || ".join(f"ipv6.src == {a}" for a in link_local_addresses(interop, "r1"))
    rows = [row.split("\t") for row in interop.capture.decode(
        "-Y", from_ours, "-T", "fields", "-E", "occurrence=a", "-E", "aggregator=,",
        "-e", "frame.number", "-e", "frame.protocols", "-e", "babel.message.type",
        "-e", "babel.subtlv.type").splitlines()]
    assert rows, "no packet from r1 in the capture"
    not_babel = [frame for frame, protocols, _, _ in rows if "babel" not in protocols.split(":")]
    assert not not_babel, f"frames from r1 not decoded as Babel: {not_babel}"
    types = {int(t) for _, _, kinds, _ in rows for t in kinds.split(",") if t}
    subtlvs = {int(t) for _, _, _, kinds in rows for t in kinds.split(",") if t}
    assert {4, 5, 6, 8} <= types, types  # Hello, IHU, Router-Id, Update at least
    assert PRICE_SUBTLV in subtlvs, subtlvs  # in the IPv6 Updates

    verbose = interop.capture.decode("-Y", from_ours, "-V")
    problems = sorted({line.strip() for line in verbose.splitlines()
                       if re.search(r"Malformed|Expert Info \(Error", line)})
    assert not problems, problems
    # tshark 4.0 does not know AE 4 (v4-via-v6, RFC 9229): it shows those
    # prefixes as "corrupt" (babeld's too) and no more. Nothing else may be.
    messages = re.split(r"\n(?=    Message )", verbose)
    ae4 = [m for m in messages if "Address Encoding: Unknown (4)" in m]
    undecoded = [m for m in messages if "corrupt" in m and m not in ae4]
    assert not undecoded, undecoded[:3]
    interop.assert_nothing_malformed()
    with capsys.disabled():
        print(f"\n  tshark: {len(rows)} packets from r1, all Babel, none malformed; TLVs "
              + ", ".join(TLV_NAMES.get(t, str(t)) for t in sorted(types))
              + f"; sub-TLVs {sorted(subtlvs)}; {len(ae4)} v4-via-v6 Updates opaque to it")


def link_local_addresses(interop: Interop, node: str) -> list[str]:
    shown = interop.mesh.fabric.run(node, ["ip", "-j", "-6", "addr", "show", "scope",
                                           "link"]).stdout
    return [info["local"] for link in json.loads(shown) for info in link.get("addr_info", [])
            if "local" in info]
