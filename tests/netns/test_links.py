"""Discovery and authenticated links in real namespaces with real WireGuard
(wireguard-go here: this kernel has no module) and the real forwarding policy."""

from __future__ import annotations

import itertools
import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from mesh.discovery.v1 import discovery_pb2, hello_pb2
from mesh.link.v1 import link_pb2
from pyroute2 import netns

from dataplane.policy import ForwardingPolicy
from dataplane.shim import Nft
from deploy.emulator.mesh import EmulatedMesh, clean, service_pid
from deploy.emulator.topology import Topology
from deploy.meshctl import client
from services.common.identity import Identity
from services.discovery.hello import HELLO_GROUP, HELLO_PORT, HELLO_TAG, encode_hello
from services.link.handshake import HANDSHAKE_PORT, Initiator
from tests.conftest import require_root, wait_for
from tests.netns.probes import ping6

pytestmark = [pytest.mark.netns, pytest.mark.emulator]

SERVICES = ("discovery", "link")
_prefixes = itertools.count()


def line3(extra_host: bool = False) -> Topology:
    nodes = [{"name": "r1"}, {"name": "r2"}, {"name": "r3"}]
    links = [{"a": "r1", "b": "r2"}, {"a": "r2", "b": "r3"}]
    if extra_host:
        nodes.append({"name": "ix", "role": "host"})
        links.append({"a": "ix", "b": "r2"})
    return Topology.from_dict({"name": "links", "node": nodes, "link": links})


@pytest.fixture
def mesh_factory(tmp_path: Path) -> Iterator[object]:
    require_root()
    started: list[EmulatedMesh] = []

    def make(topology: Topology) -> EmulatedMesh:
        prefix = f"l{os.getpid() % 10000}x{next(_prefixes)}"
        mesh = EmulatedMesh(topology, prefix=prefix, root=tmp_path, services=SERVICES)
        started.append(mesh)
        mesh.start()
        return mesh

    yield make
    for mesh in started:
        mesh.stop()
        clean(mesh.prefix, tmp_path)


def link_state(mesh: EmulatedMesh, router: str) -> link_pb2.LinkState:
    state = link_pb2.LinkState()
    client.status(mesh.routers[router].layout.socket("link")).state.Unpack(state)
    return state


def up_links(mesh: EmulatedMesh, router: str) -> dict[str, link_pb2.LinkUp]:
    return {n: link.up for n, link in link_state(mesh, router).links.items()
            if link.status == link_pb2.LINK_STATUS_UP}


LINE3_PEERS = {"r1": {"r2"}, "r2": {"r1", "r3"}, "r3": {"r2"}}


def all_linked(mesh: EmulatedMesh) -> bool:
    """Every link up in every projection, and its tunnel forwarding in the kernel."""
    for router, peers in LINE3_PEERS.items():
        ups = up_links(mesh, router)
        if set(ups) != peers:
            return False
        with Nft(mesh.fabric.netns(router)) as nft:
            if ForwardingPolicy(nft).tunnels() != {up.tunnel_interface for up in ups.values()}:
                return False
    return True


LOG_TAIL = 15


def describe_links(mesh: EmulatedMesh) -> str:
    """Why all_linked is false, router by router, for a timeout's message: the links
    missing, what link's projection holds, the forwarding set if it differs from
    the links up, each router's own key, and the tail of its link and discovery logs."""
    lines = []
    for router, peers in LINE3_PEERS.items():
        layout = mesh.routers[router].layout
        own = Identity.load_or_create(layout.data_dir / "keys").identity_key.hex()[:12]
        try:
            status = client.status(layout.socket("link"))
            state = link_pb2.LinkState()
            status.state.Unpack(state)
            ups = {n: link.up for n, link in state.links.items()
                   if link.status == link_pb2.LINK_STATUS_UP}
            heard = {n: f"{seen.interface_name}/{seen.identity_key.hex()[:12]}"
                     for n, seen in state.neighbors.items()}
            lines.append(f"{router} (key {own}): missing {sorted(peers - set(ups)) or '-'}; "
                         f"link {dict(status.summary)}; heard {heard}; "
                         f"rejections {dict(state.rejections)}")
            with Nft(mesh.fabric.netns(router)) as nft:
                forwarding = ForwardingPolicy(nft).tunnels()
            tunnels = {up.tunnel_interface for up in ups.values()}
            if forwarding != tunnels:
                lines.append(f"  forwarding set {sorted(forwarding)}, links up {sorted(tunnels)}")
        except Exception as err:  # a dead service is part of the answer
            lines.append(f"{router} (key {own}): link unreadable: {err!r}")
        for service in ("link", "discovery"):
            log = layout.log_dir / f"{service}.log"
            tail = log.read_text(errors="replace").splitlines()[-LOG_TAIL:] if log.exists() else []
            lines += [f"  {service}.log| {line[:300]}" for line in tail or ["(none)"]]
    return "\n".join(lines)


def wait_all_linked(mesh: EmulatedMesh, what: str = "all links up") -> None:
    wait_for(what, lambda: all_linked(mesh), timeout=60, explain=lambda: describe_links(mesh))


def ns_run(mesh: EmulatedMesh, node: str, *argv: str) -> str:
    return mesh.fabric.run(node, list(argv)).stdout


def route_over_tunnels(mesh: EmulatedMesh) -> None:
    """Static routes between the routers' own addresses over the tunnels (Babel's
    job in a later issue): r1 <-> r2 <-> r3."""
    for router in ("r1", "r2", "r3"):
        for neighbor, up in up_links(mesh, router).items():
            far = {"r1": ["r1"], "r3": ["r3"], "r2": ["r2"]}[neighbor]
            if router != "r2":
                far = ["r2", "r3" if router == "r1" else "r1"]
            for target in far:
                ns_run(mesh, router, "ip", "-6", "route", "replace",
                       f"{mesh.fabric.nodes[target].ipv6}/128",
                       "via", up.tunnel_peer_address, "dev", up.tunnel_interface)


def wait_for_traffic(mesh: EmulatedMesh) -> None:
    """The first packets wait for WireGuard's own handshake (under a second,
    keepalives being 1 s): poll until one crosses r1 -> r2 -> r3."""
    r1, r3 = mesh.fabric.netns("r1"), mesh.fabric.nodes["r3"].ipv6
    wait_for("traffic over the tunnels", lambda: ping6(r1, r3, count=1, grace=0.3) == 1,
             timeout=20)


def refused(mesh: EmulatedMesh, router: str) -> dict[str, int]:
    with Nft(mesh.fabric.netns(router)) as nft:
        return ForwardingPolicy(nft).counters()


def test_three_routers_link_up_and_forward_only_tunnel_traffic(
    mesh_factory: object, capsys: pytest.CaptureFixture[str]
) -> None:
    started = time.monotonic()
    mesh = mesh_factory(line3())  # type: ignore[operator]
    wait_all_linked(mesh)
    elapsed = time.monotonic() - started
    with capsys.disabled():
        print(f"\n  3 routers in a line: start to all links up {elapsed:.1f}s")
    r2 = up_links(mesh, "r2")
    assert r2["r1"].backend == link_pb2.TUNNEL_BACKEND_WIREGUARD_GO
    assert r2["r1"].physical_interface == "v-r1"
    # the kernel gets exactly the tunnels the projection says, and forwards for them
    with Nft(mesh.fabric.netns("r2")) as nft:
        wait_for("r2's tunnels in its forwarding policy", lambda: ForwardingPolicy(nft).tunnels()
                 == {up.tunnel_interface for up in r2.values()})
    route_over_tunnels(mesh)
    wait_for_traffic(mesh)
    r1, r3 = mesh.fabric.netns("r1"), mesh.fabric.nodes["r3"].ipv6
    assert ping6(r1, r3, count=20) == 20  # r1 -> r2 -> r3, tunnels all the way
    # what an operator sees
    env = {**os.environ, "MESH_EMU_PREFIX": mesh.prefix, "MESH_EMU_ROOT": str(mesh.workdir.parent)}
    shown = subprocess.run([sys.executable, "-m", "deploy.meshctl", "-n", "r2", "neighbors",
                            "--json"], env=env, capture_output=True, text=True, check=True)
    rows = {row["neighbor"]: row for row in json.loads(shown.stdout)}
    assert {n: (r["link"], r["heard_on"]) for n, r in rows.items()} == {
        "r1": ("up", "v-r1"), "r3": ("up", "v-r3")}
    ident = subprocess.run([sys.executable, "-m", "deploy.meshctl", "-n", "r1", "identity",
                            "--json"], env=env, capture_output=True, text=True, check=True)
    assert json.loads(ident.stdout)["chain_address"] == rows.get("r1", {}).get("chain_address")
    # the same packets on the raw veth are not forwarded by r2
    before = refused(mesh, "r2")["forward_refused"]
    ns_run(mesh, "r1", "ip", "-6", "route", "replace", f"{r3}/128",
           "via", mesh.fabric.link_address("r2", "r1"), "dev", "v-r2")
    assert ping6(r1, r3, count=10, grace=0.5) == 0
    assert refused(mesh, "r2")["forward_refused"] >= before + 10


def ifindex(namespace: str, interface: str) -> int:
    out = subprocess.run(["ip", "netns", "exec", namespace, "cat",
                          f"/sys/class/net/{interface}/ifindex"],
                         capture_output=True, text=True, check=True).stdout
    return int(out)


def udp_to(namespace: str, data: bytes, address: str, port: int, interface: str,
           source: str | None = None) -> None:
    sock = netns.create_socket(namespace, socket.AF_INET6, socket.SOCK_DGRAM, 0, flags=0)
    with sock:
        if source:
            sock.bind((source, 0))
        sock.sendto(data, (address, port, 0, ifindex(namespace, interface)))


def forged_hello(impostor: Identity, victim: Identity, now_ms: int) -> bytes:
    """A hello claiming the victim's identity, signed by someone else."""
    hello = hello_pb2.Hello(node_id="r1", identity_key=victim.identity_key,
                            wireguard_key=impostor.wireguard_public, endpoint_port=HANDSHAKE_PORT,
                            hello_interval_ms=1000, sent_at_ms=now_ms)
    hello.signature = impostor.sign(HELLO_TAG + hello.SerializeToString(deterministic=True))
    return hello.SerializeToString(deterministic=True)


def test_an_intruder_gets_no_tunnel_and_nothing_forwarded(
    mesh_factory: object, tmp_path: Path
) -> None:
    mesh = mesh_factory(line3(extra_host=True))  # type: ignore[operator]
    wait_all_linked(mesh)
    route_over_tunnels(mesh)
    ix, r2_link = mesh.fabric.netns("ix"), mesh.fabric.link_address("r2", "ix")
    pids = {s: service_pid(mesh.routers["r2"].layout, s) for s in SERVICES}
    r1 = Identity.load_or_create(mesh.routers["r1"].layout.data_dir / "keys")
    intruder = Identity.load_or_create(tmp_path / "intruder-keys")
    now = time.time_ns() // 1_000_000

    def hello_to_r2(data: bytes) -> None:
        udp_to(ix, data, HELLO_GROUP, HELLO_PORT, "v-r2")

    hello_to_r2(b"\x0a\x03garbage")                          # does not decode
    hello_to_r2(forged_hello(intruder, r1, now))              # r1's key, not r1's signature
    hello_to_r2(encode_hello(r1, "r1", HANDSHAKE_PORT, 1000, now - 60_000))  # captured, stale
    hello_to_r2(encode_hello(r1, "r1", HANDSHAKE_PORT, 1000, now - 3_000))   # captured, replayed
    # a handshake from a stranger that sent no valid hello
    r2 = Identity.load_or_create(mesh.routers["r2"].layout.data_dir / "keys")
    init = Initiator(intruder, "ix", 20000, r2.identity_key, now).message
    udp_to(ix, b"\x01" + init, r2_link, HANDSHAKE_PORT, "v-r2")
    # fuzz: random datagrams at both ports
    rng = random.Random(7)
    for _ in range(200):
        junk = rng.randbytes(rng.randrange(0, 600))
        udp_to(ix, junk, r2_link, rng.choice([HELLO_PORT, HANDSHAKE_PORT]), "v-r2")
    # packets with a real neighbor's source address, towards r3: not forwarded
    r1_addr, r3_addr = mesh.fabric.nodes["r1"].ipv6, mesh.fabric.nodes["r3"].ipv6
    ns_run(mesh, "ix", "ip", "-6", "addr", "add", f"{r1_addr}/128", "dev", "lo")
    ns_run(mesh, "ix", "ip", "-6", "route", "add", f"{r3_addr}/128", "via", r2_link,
           "dev", "v-r2")
    listener = netns.create_socket(mesh.fabric.netns("r3"), socket.AF_INET6,
                                   socket.SOCK_DGRAM, 0, flags=0)
    listener.bind((r3_addr, 9999))
    listener.settimeout(1.0)
    before = refused(mesh, "r2")["forward_refused"]
    for _ in range(5):
        udp_to(ix, b"spoofed", r3_addr, 9999, "v-r2", source=r1_addr)
    with pytest.raises(TimeoutError):
        listener.recvfrom(100)
    listener.close()
    assert refused(mesh, "r2")["forward_refused"] >= before + 5

    log = mesh.routers["r2"].layout.log_dir
    wait_for("the rejections to be logged", lambda: all(
        f"reason={reason}" in (log / "discovery.log").read_text()
        for reason in ("decode", "signature", "stale", "replay")))
    assert "reason=unknown-neighbor" in (log / "link.log").read_text()
    state = link_state(mesh, "r2")
    assert state.rejections["LINK_REJECT_REASON_UNKNOWN_NEIGHBOR"] >= 1
    assert set(up_links(mesh, "r2")) == {"r1", "r3"}
    discovery = discovery_pb2.DiscoveryState()
    client.status(mesh.routers["r2"].layout.socket("discovery")).state.Unpack(discovery)
    assert set(discovery.neighbors) == {"r1/v-r1", "r3/v-r3"}
    # nothing crashed
    assert {s: service_pid(mesh.routers["r2"].layout, s) for s in SERVICES} == pids


def test_cutting_a_veth_takes_the_link_down_and_back_up(
    mesh_factory: object, capsys: pytest.CaptureFixture[str]
) -> None:
    mesh = mesh_factory(line3())  # type: ignore[operator]
    wait_all_linked(mesh)
    cut = time.monotonic()
    ns_run(mesh, "r2", "ip", "link", "set", "v-r3", "down")
    wait_for("r2's link to r3 down", lambda: "r3" not in up_links(mesh, "r2"), timeout=30)
    down_after = time.monotonic() - cut
    link = link_state(mesh, "r2").links["r3"]
    assert link.status == link_pb2.LINK_STATUS_DOWN
    assert link.last_down_reason in (link_pb2.LINK_DOWN_REASON_NEIGHBOR_LOST,
                                     link_pb2.LINK_DOWN_REASON_LIVENESS_LOST)
    wait_for("r3's side down too", lambda: "r2" not in up_links(mesh, "r3"), timeout=30)
    restored = time.monotonic()
    ns_run(mesh, "r2", "ip", "link", "set", "v-r3", "up")
    wait_all_linked(mesh, "the link back up")
    up_after = time.monotonic() - restored
    with capsys.disabled():
        print(f"\n  veth cut: LinkDown after {down_after:.1f}s; restored: LinkUp after "
              f"{up_after:.1f}s")
    assert link_state(mesh, "r2").links["r3"].downs == 1


def test_kill_9_of_link_keeps_traffic_and_reconciles(mesh_factory: object) -> None:
    mesh = mesh_factory(line3())  # type: ignore[operator]
    wait_all_linked(mesh)
    route_over_tunnels(mesh)
    wait_for_traffic(mesh)
    r1, r3 = mesh.fabric.netns("r1"), mesh.fabric.nodes["r3"].ipv6
    assert ping6(r1, r3, count=10) == 10
    before = up_links(mesh, "r2")
    layout = mesh.routers["r2"].layout
    victim = service_pid(layout, "link")
    os.kill(victim, signal.SIGKILL)
    # forwarding never depended on the service: the tunnels carry on meanwhile
    assert ping6(r1, r3, count=50, interval=0.01) == 50
    wait_for("link restarted", lambda: service_pid(layout, "link") != victim, timeout=30)
    wait_for("link SERVING", lambda: client.health(layout.socket("link")) == "SERVING")
    assert up_links(mesh, "r2") == before
    # (wg show lists every wireguard-go socket of the machine: ask the namespace)
    tunnels = {n for n in ns_run(mesh, "r2", "ls", "/sys/class/net").split()
               if n.startswith("mw")}
    assert tunnels == {up.tunnel_interface for up in before.values()}
    assert all(link.downs == 0 for link in link_state(mesh, "r2").links.values())
    assert ping6(r1, r3, count=10) == 10
    # discovery too: its restored table keeps every neighbor; no link flaps
    victim = service_pid(layout, "discovery")
    os.kill(victim, signal.SIGKILL)
    wait_for("discovery restarted", lambda: service_pid(layout, "discovery") != victim)
    wait_for("discovery SERVING", lambda: client.health(layout.socket("discovery")) == "SERVING")
    holds_for(6.0, lambda: up_links(mesh, "r2") == before)  # > the 3.5 s dead interval
    assert all(link.downs == 0 for link in link_state(mesh, "r2").links.values())


def holds_for(seconds: float, check: object) -> None:
    """Assert check() stays true for a while (the negative of wait_for)."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        assert check(), "stopped holding"  # type: ignore[operator]
        time.sleep(0.2)
