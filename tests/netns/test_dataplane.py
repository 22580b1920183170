"""The dataplane shim and the forwarding policy, in real namespaces.

Three namespaces in a line, a - r - b, with r forwarding IPv6 between two
veths. r's policy forwards only what arrives on an authenticated tunnel; here
r's veth towards a stands in for a tunnel (WireGuard itself comes from the
link service), which is enough to exercise the set that decides it.
"""

from __future__ import annotations

import json
import os
import select
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from pyroute2 import netns

from dataplane.policy import ForwardingPolicy, PolicySpec
from dataplane.shim import Nft, NftError
from tests.conftest import require_root, wait_for

REPO = Path(__file__).resolve().parents[2]

SPEC = PolicySpec(
    physical=("v-a", "v-b"), hello_port=6696, handshake_port=6697,
    wg_port_min=20000, wg_port_max=20099,
)
A, R_A, R_B, B = "2001:db8:a::1", "2001:db8:a::2", "2001:db8:b::2", "2001:db8:b::1"


def ip(*argv: str) -> None:
    subprocess.run(["ip", *argv], check=True, capture_output=True, text=True)


def in_ns(ns: str, *argv: str) -> str:
    return subprocess.run(["ip", "netns", "exec", ns, *argv], check=True,
                          capture_output=True, text=True).stdout


@dataclass
class Line:
    a: str
    r: str
    b: str
    policy: ForwardingPolicy

    def refused(self, counter: str) -> int:
        return self.policy.counters()[counter]


@dataclass
class Namespaces:
    a: str
    r: str
    b: str


def operstate(ns: str, dev: str) -> str:
    return json.loads(in_ns(ns, "ip", "-j", "link", "show", "dev", dev))[0]["operstate"]


@pytest.fixture(scope="module")
def namespaces() -> Iterator[Namespaces]:
    """a - r - b, shared by this module's tests; gone afterwards even on failure."""
    require_root()
    tag = f"dp{os.getpid()}"
    a, r, b = (f"{tag}{role}" for role in "arb")
    try:
        for ns in (a, r, b):
            ip("netns", "add", ns)
            # Before any veth exists, or its addresses stay tentative for a while.
            in_ns(ns, "sysctl", "-qw", "net.ipv6.conf.all.accept_dad=0",
                  "net.ipv6.conf.default.accept_dad=0")
            ip("-n", ns, "link", "set", "lo", "up")
        # Both ends are created inside their namespaces: no name clash in the root one.
        ip("-n", r, "link", "add", "v-a", "type", "veth", "peer", "name", "v-r", "netns", a)
        ip("-n", r, "link", "add", "v-b", "type", "veth", "peer", "name", "v-r", "netns", b)
        ends = ((a, "v-r", A), (r, "v-a", R_A), (r, "v-b", R_B), (b, "v-r", B))
        for ns, dev, address in ends:
            ip("-n", ns, "addr", "add", f"{address}/64", "dev", dev, "nodad")
            ip("-n", ns, "link", "set", dev, "up")
        in_ns(r, "sysctl", "-qw", "net.ipv6.conf.all.forwarding=1")
        ip("-n", a, "route", "add", "2001:db8:b::/64", "via", R_A)
        ip("-n", b, "route", "add", "2001:db8:a::/64", "via", R_B)
        # A veth drops what it is given until the kernel's link watcher has
        # activated it (operstate UP); a neighbour solicitation lost that way
        # costs a 1 s retransmit, so wait for it once here.
        for ns, dev, _ in ends:
            wait_for(f"{dev} up in {ns}", lambda ns=ns, dev=dev: operstate(ns, dev) == "UP")
        yield Namespaces(a, r, b)
    finally:
        for ns in (a, r, b):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)


@pytest.fixture
def line(namespaces: Namespaces) -> Iterator[Line]:
    """The namespaces with a fresh policy (no tunnels, zero counters) in r."""
    with Nft(netns=namespaces.r) as nft:
        nft.run("table inet mesh {}\ndelete table inet mesh")
        policy = ForwardingPolicy(nft)
        assert policy.install(SPEC) is True
        yield Line(namespaces.a, namespaces.r, namespaces.b, policy)


# -- traffic from inside the namespaces (the machine has no ping binary) -------


def udp_socket(ns: str) -> socket.socket:
    # flags=0: fail rather than create the namespace if it is missing.
    return netns.create_socket(ns, socket.AF_INET6, socket.SOCK_DGRAM, 0, flags=0)


def arrived(sock: socket.socket, within: float = 0.05) -> bytes | None:
    """A datagram if one is waiting (or arrives within `within` seconds)."""
    if select.select([sock], [], [], within)[0]:
        return sock.recv(2048)
    return None


def delivered(sender: str, receiver: str, dst: str, port: int) -> bool:
    """Send from `sender` to dst:port until it arrives in `receiver` (or time out)."""
    with udp_socket(receiver) as sink, udp_socket(sender) as source:
        sink.bind(("::", port))
        payload = os.urandom(8)

        def got_it() -> bool:
            source.sendto(payload, (dst, port))
            return arrived(sink) == payload

        try:
            wait_for(f"UDP {sender} -> [{dst}]:{port}", got_it, timeout=5)
        except AssertionError:
            return False
        return True


def refused(line: Line, counter: str, sender: str, receiver: str, dst: str,
            port: int) -> bool:
    """Send once; True when `counter` counted it and `receiver` never got it."""
    before = line.refused(counter)
    with udp_socket(receiver) as sink, udp_socket(sender) as source:
        sink.bind(("::", port))
        source.sendto(b"refused?", (dst, port))
        # The counter moves when r drops the packet, so after that it cannot arrive.
        wait_for(f"{counter} to count [{dst}]:{port}",
                 lambda: line.refused(counter) > before, timeout=5)
        return arrived(sink, within=0) is None


def echo_replies(ns: str, dst: str, count: int, grace: float = 0.5) -> int:
    """ICMPv6 echo requests from `ns`; how many got a reply within `grace`."""
    ident = os.getpid() & 0xFFFF
    replies: set[int] = set()
    with netns.create_socket(ns, socket.AF_INET6, socket.SOCK_RAW, socket.IPPROTO_ICMPV6,
                             flags=0) as sock:
        for seq in range(count):
            # The kernel fills in the checksum on raw ICMPv6 sockets.
            sock.sendto(struct.pack("!BBHHH", 128, 0, 0, ident, seq), (dst, 0))
        deadline = time.monotonic() + grace
        while len(replies) < count and (left := deadline - time.monotonic()) > 0:
            if not select.select([sock], [], [], left)[0]:
                break
            kind, _code, _sum, rid, seq = struct.unpack("!BBHHH", sock.recv(2048)[:8])
            if kind == 129 and rid == ident:
                replies.add(seq)
    return len(replies)


# -- tests -----------------------------------------------------------------------


@pytest.mark.netns
def test_nothing_is_forwarded_without_a_tunnel(line: Line) -> None:
    assert line.policy.tunnels() == set()
    assert refused(line, "forward_refused", line.a, line.b, B, 7000)
    before = line.refused("forward_refused")
    assert echo_replies(line.a, B, count=3) == 0
    assert line.refused("forward_refused") >= before + 3
    # r itself is still reachable through what the policy lets in (ND included).
    assert delivered(line.a, line.r, R_A, SPEC.hello_port)


@pytest.mark.netns
@pytest.mark.parametrize("port", [SPEC.hello_port, SPEC.handshake_port,
                                  SPEC.wg_port_min, SPEC.wg_port_max])
def test_physical_input_accepts_discovery_handshake_and_wireguard(line: Line,
                                                                  port: int) -> None:
    assert delivered(line.a, line.r, R_A, port)
    assert delivered(line.b, line.r, R_B, port)
    assert line.refused("input_refused") == 0


@pytest.mark.netns
def test_physical_input_refuses_everything_else(line: Line) -> None:
    for port in (7001, SPEC.wg_port_max + 1, SPEC.wg_port_min - 1):
        assert refused(line, "input_refused", line.a, line.r, R_A, port)
    before = line.refused("input_refused")
    assert echo_replies(line.a, R_A, count=2) == 0
    assert line.refused("input_refused") >= before + 2
    # Inside r (lo) nothing is filtered.
    assert echo_replies(line.r, R_A, count=2) == 2


@pytest.mark.netns
def test_tunnels_decide_what_is_forwarded(line: Line) -> None:
    line.policy.set_tunnels(["v-a"])
    assert line.policy.tunnels() == {"v-a"}
    assert delivered(line.a, line.b, B, 7000)
    # Only a's side is a "tunnel": b's traffic (and so echo replies) stay refused.
    assert refused(line, "forward_refused", line.b, line.a, A, 7000)
    assert echo_replies(line.a, B, count=2) == 0

    line.policy.set_tunnels(["v-a", "v-b"])
    assert echo_replies(line.a, B, count=3, grace=5) == 3

    line.policy.set_tunnels([])
    assert line.policy.tunnels() == set()
    assert refused(line, "forward_refused", line.a, line.b, B, 7000)


@pytest.mark.netns
def test_a_new_process_reads_back_the_same_state(line: Line) -> None:
    line.policy.set_tunnels(["v-a", "v-b"])
    assert refused(line, "input_refused", line.a, line.r, R_A, 7001)
    counters = line.policy.counters()

    # A restarted service: a new process inside r, its own context.
    script = (
        "import json, sys\n"
        "from dataplane.policy import ForwardingPolicy, PolicySpec\n"
        "from dataplane.shim import Nft\n"
        "policy = ForwardingPolicy(Nft())\n"
        "spec = PolicySpec(**json.loads(sys.argv[1]))\n"
        "print(json.dumps({'tunnels': sorted(policy.tunnels()),\n"
        "                  'changed': policy.install(spec),\n"
        "                  'counters': policy.counters()}))\n"
    )
    spec = {"physical": list(SPEC.physical), "hello_port": SPEC.hello_port,
            "handshake_port": SPEC.handshake_port, "wg_port_min": SPEC.wg_port_min,
            "wg_port_max": SPEC.wg_port_max}
    out = subprocess.run(
        ["ip", "netns", "exec", line.r, sys.executable, "-c", script, json.dumps(spec)],
        cwd=REPO, check=True, capture_output=True, text=True,
    ).stdout
    assert json.loads(out) == {"tunnels": ["v-a", "v-b"], "changed": False,
                               "counters": counters}
    # The kernel kept forwarding throughout, and the nft command sees the same set.
    assert echo_replies(line.a, B, count=2, grace=5) == 2
    listed = json.loads(in_ns(line.r, "nft", "-j", "list", "set", "inet", "mesh", "tunnels"))
    assert listed["nftables"][1]["set"]["elem"] == ["v-a", "v-b"]


@pytest.mark.netns
def test_a_changed_spec_replaces_rules_and_keeps_tunnels(line: Line) -> None:
    line.policy.set_tunnels(["v-a"])
    narrower = PolicySpec(physical=SPEC.physical, hello_port=SPEC.hello_port,
                          handshake_port=SPEC.handshake_port,
                          wg_port_min=SPEC.wg_port_min, wg_port_max=SPEC.wg_port_min)
    assert line.policy.install(narrower) is True
    assert line.policy.install(narrower) is False
    assert line.policy.tunnels() == {"v-a"}
    assert delivered(line.a, line.b, B, 7000)
    assert refused(line, "input_refused", line.a, line.r, R_A, SPEC.wg_port_max)


@pytest.mark.netns
def test_nft_errors_carry_nft_text_and_commands(line: Line) -> None:
    with Nft(netns=line.r) as nft:
        with pytest.raises(NftError) as failed:
            nft.run("add element inet mesh nosuchset { \"x\" }")
        assert "Error: No such file or directory" in failed.value.error
        assert 'add element inet mesh nosuchset { "x" }' in str(failed.value)
        # A batch is one transaction: its valid first command is not applied either.
        with pytest.raises(NftError, match="syntax error"):
            nft.run('add element inet mesh tunnels { "v-a" }\nthis is not nft\n')
        assert ForwardingPolicy(nft).tunnels() == set()
        with pytest.raises(ValueError, match="bad interface name"):
            ForwardingPolicy(nft).set_tunnels(['x" } ; flush ruleset'])
    with pytest.raises(ValueError, match="closed"):
        nft.run("list tables")
    with pytest.raises(OSError, match="cannot open an nftables context in network namespace"):
        Nft(netns=f"{line.r}-missing")
