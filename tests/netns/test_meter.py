"""meter on a live mesh: real tunnels, real forwarded traffic, kernel counters,
prices, the ledger, enforcement, and a kill -9 in the middle."""

from __future__ import annotations

import contextlib
import itertools
import os
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from mesh.meter.v1 import meter_pb2
from pyroute2 import netns

from dataplane.counters import Counters
from dataplane.shim import Nft
from deploy.emulator.mesh import EmulatedMesh, clean, service_pid
from deploy.emulator.topology import Topology
from deploy.meshctl import client
from services.common.money import amount
from services.meter.ledger import balance
from services.route.babel.codec import PORT as BABEL_PORT
from tests.conftest import require_root, wait_for
from tests.netns.probes import ping6
from tests.netns.test_links import (
    LINE3_PEERS,
    line3,
    route_over_tunnels,
    wait_all_linked,
    wait_for_traffic,
)
from tests.netns.test_route import reaches, via

pytestmark = [pytest.mark.netns, pytest.mark.emulator]

SERVICES = ("discovery", "link", "meter")
PAYLOAD = 1000
IP_BYTES = PAYLOAD + 8 + 40  # UDP and IPv6 headers: what the kernel counts
R2_PRICE, DEFAULT_PRICE = 10, 3
_prefixes = itertools.count()
SO_RCVBUFFORCE = 33  # Linux; not exported by the socket module


@contextlib.contextmanager
def metered_line(tmp_path: Path, **meter: object) -> Iterator[EmulatedMesh]:
    """r1 - r2 - r3 with discovery, link and meter, routed statically over the tunnels."""
    require_root()
    prefix = f"mt{os.getpid() % 10000}x{next(_prefixes)}"
    settings = {"price": R2_PRICE, "default_neighbor_price": DEFAULT_PRICE,
                "sample_interval": 0.5, **meter}
    emulated = EmulatedMesh(line3(), prefix=prefix, root=tmp_path, services=SERVICES,
                            sections={"meter": settings})
    try:
        emulated.start()
        wait_all_linked(emulated)
        wait_for("every meter to open a ledger per link", lambda: meters_ready(emulated),
                 timeout=30)
        route_over_tunnels(emulated)
        wait_for_traffic(emulated)
        yield emulated
    finally:
        emulated.stop()
        clean(prefix, tmp_path)


@pytest.fixture
def mesh(tmp_path: Path) -> Iterator[EmulatedMesh]:
    with metered_line(tmp_path) as emulated:
        yield emulated


def ledgers(mesh: EmulatedMesh, router: str) -> dict[str, meter_pb2.MeterState.Ledger]:
    state = meter_pb2.MeterState()
    client.status(mesh.routers[router].layout.socket("meter")).state.Unpack(state)
    return dict(state.ledgers)


def meters_ready(mesh: EmulatedMesh) -> bool:
    """The link service saw each LinkUp; the meter has its own pace of reading them."""
    return all(set(ledgers(mesh, router)) >= peers for router, peers in LINE3_PEERS.items())


class Receiver:
    """A UDP sink in r3 that counts what arrives."""

    def __init__(self, mesh: EmulatedMesh) -> None:
        self.address = mesh.fabric.nodes["r3"].ipv6
        self.sock = netns.create_socket(mesh.fabric.netns("r3"), socket.AF_INET6,
                                        socket.SOCK_DGRAM, 0, flags=0)
        # Room for every datagram of a test: they are counted after sending.
        self.sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, 32 << 20)
        self.sock.bind((self.address, 9000))
        self.sock.setblocking(False)
        self.count = 0

    def drain(self) -> int:
        while True:
            try:
                self.sock.recv(4096)
            except BlockingIOError:
                return self.count
            self.count += 1


class Stream:
    """While inside: r1 sends a datagram of PAYLOAD bytes to address every gap
    seconds, counting those refused for want of a route."""

    def __init__(self, mesh: EmulatedMesh, address: str, gap: float) -> None:
        self.mesh, self.address, self.gap = mesh, address, gap
        self.refused = 0
        self.stop = threading.Event()
        self.sender = threading.Thread(target=self.send, daemon=True)

    def send(self) -> None:
        sock = netns.create_socket(self.mesh.fabric.netns("r1"), socket.AF_INET6,
                                   socket.SOCK_DGRAM, 0, flags=0)
        with sock:
            while not self.stop.is_set():
                try:
                    sock.sendto(b"m" * PAYLOAD, (self.address, 9000))
                except OSError:  # no route to it for the moment
                    self.refused += 1
                time.sleep(self.gap)

    def __enter__(self) -> Stream:
        self.sender.start()
        return self

    def __exit__(self, *_: object) -> None:
        self.stop.set()
        self.sender.join(timeout=10)


def send(mesh: EmulatedMesh, address: str, count: int) -> None:
    """count datagrams of PAYLOAD bytes r1 -> r3, paced so no queue overflows."""
    sock = netns.create_socket(mesh.fabric.netns("r1"), socket.AF_INET6, socket.SOCK_DGRAM, 0,
                               flags=0)
    with sock:
        for i in range(count):
            sock.sendto(b"m" * PAYLOAD, (address, 9000))
            if i % 10 == 9:
                # Pacing (about 5 MB/s), not waiting on a condition: wireguard-go
                # drops from faster bursts when the machine is busy.
                time.sleep(0.002)


def billed(mesh: EmulatedMesh, received: int) -> bool:
    ledger = ledgers(mesh, "r2")
    return ledger["r1"].rx_bytes >= received * IP_BYTES and \
        ledger["r3"].tx_bytes >= received * IP_BYTES


def test_relay_bills_forwarded_bytes_at_its_prices(mesh: EmulatedMesh) -> None:
    sink = Receiver(mesh)
    before = ledgers(mesh, "r2")
    base_rx, base_tx = before["r1"].rx_bytes, before["r3"].tx_bytes
    send(mesh, sink.address, 2000)
    wait_for("the datagrams to arrive", lambda: sink.drain() >= 1900, timeout=30)
    received = sink.drain()
    wait_for("r2 to bill them", lambda: ledgers(mesh, "r2")["r1"].rx_bytes - base_rx
             >= received * IP_BYTES, timeout=30)
    ledger = ledgers(mesh, "r2")
    rx = ledger["r1"].rx_bytes - base_rx  # r1 sent these through r2
    tx = ledger["r3"].tx_bytes - base_tx  # r2 sent them on to r3
    # The relay counts what reached it and what it passed on: no less than what
    # arrived, no more than what was sent (wireguard-go may drop a few under load),
    # within 1% (routers' own few packets on the tunnels count too).
    arrived, sent = received * IP_BYTES, 2000 * IP_BYTES
    for counted in (rx, tx):
        assert 0.99 * arrived <= counted <= 1.01 * sent, (arrived, counted, sent)
    # r1 owes r2 its price for every byte; r2 owes r3 the default (no routing yet)
    assert amount(ledger["r1"].debt.usage_charged) == ledger["r1"].rx_bytes * R2_PRICE
    assert amount(ledger["r3"].debt.usage_owed) == ledger["r3"].tx_bytes * DEFAULT_PRICE
    assert balance(ledger["r1"].debt) > 0 > balance(ledger["r3"].debt)
    assert ledger["r1"].enforcement == meter_pb2.ENFORCEMENT_OPEN


def test_operator_sets_the_price_and_absurd_ones_are_refused(mesh: EmulatedMesh) -> None:
    import json
    import sys

    env = {**os.environ, "MESH_EMU_PREFIX": mesh.prefix, "MESH_EMU_ROOT": str(mesh.workdir.parent)}

    def meshctl(*argv: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "deploy.meshctl", "-n", "r2", *argv],
                              env=env, capture_output=True, text=True, timeout=60)

    shown = meshctl("price", "--json")
    assert json.loads(shown.stdout) == {"price_wei_per_byte": R2_PRICE,
                                        "price_wei_per_megabyte": R2_PRICE * 10**6,
                                        "mode": "manual"}
    assert meshctl("price", "25").returncode == 0
    wait_for("the new price", lambda: json.loads(meshctl("price", "--json").stdout)[
        "price_wei_per_byte"] == 25)
    absurd = meshctl("price", str(10**18))
    assert absurd.returncode == 2 and "absurd" in absurd.stderr
    negative = meshctl("price", "-5")
    assert negative.returncode != 0
    assert meshctl("price", "auto").returncode == 0
    wait_for("automatic pricing", lambda: json.loads(meshctl("price", "--json").stdout)[
        "mode"] == "automatic")


def test_kill_9_of_meter_bills_every_byte_once(mesh: EmulatedMesh) -> None:
    sink = Receiver(mesh)
    layout = mesh.routers["r2"].layout
    send(mesh, sink.address, 1000)
    victim = service_pid(layout, "meter")
    os.kill(victim, signal.SIGKILL)
    send(mesh, sink.address, 1000)  # forwarded and counted while meter is down
    wait_for("meter restarted", lambda: service_pid(layout, "meter") != victim, timeout=30)
    wait_for("meter SERVING", lambda: client.health(layout.socket("meter")) == "SERVING")
    send(mesh, sink.address, 1000)
    wait_for("the datagrams to arrive", lambda: sink.drain() >= 2900, timeout=30)
    received = sink.drain()
    # The kernel's counters are the reference: the ledger must equal them exactly.
    with Nft(mesh.fabric.netns("r2")) as nft:
        snap = Counters(nft).snapshot()
    kernel = {n: (snap.total(n).rx_bytes, snap.total(n).tx_bytes) for n in snap.neighbors}
    tunnels = {name: led.tunnel_interface for name, led in ledgers(mesh, "r2").items()}
    wait_for("the ledger to catch up with the kernel", lambda: (
        ledgers(mesh, "r2")["r1"].rx_bytes >= kernel[tunnels["r1"]][0]), timeout=30)
    ledger = ledgers(mesh, "r2")
    assert ledger["r1"].rx_bytes == kernel[tunnels["r1"]][0]
    assert ledger["r3"].tx_bytes == kernel[tunnels["r3"]][1]
    assert ledger["r1"].rx_bytes >= received * IP_BYTES
    assert amount(ledger["r1"].debt.usage_charged) == ledger["r1"].rx_bytes * R2_PRICE


THROTTLE_BPS = 2_000_000
MB = 1_000_000


@pytest.fixture
def strict_mesh(tmp_path: Path) -> Iterator[EmulatedMesh]:
    """r2 throttles a neighbor owing 2 MB worth and cuts it off at 8 MB worth."""
    with metered_line(tmp_path, throttle_threshold=2 * MB * R2_PRICE,
                      cutoff_threshold=8 * MB * R2_PRICE,
                      throttle_rate_bps=THROTTLE_BPS) as emulated:
        yield emulated


def iperf(mesh: EmulatedMesh, *argv: str, timeout: float = 120) -> dict:
    """iperf3 from r1 to r3 (a one-shot server in r3); its JSON report."""
    import json

    address = mesh.fabric.nodes["r3"].ipv6
    server = subprocess.Popen(mesh.fabric.exec_argv("r3", ["iperf3", "-s", "-1", "-B", address]),
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for("iperf3 server", lambda: "iperf3" in mesh.fabric.run(
            "r3", ["ss", "-ltnp"], check=False).stdout, timeout=10)
        done = mesh.fabric.run("r1", ["iperf3", "-c", address, "-J", *argv], check=False,
                               timeout=timeout)
        return json.loads(done.stdout)
    finally:
        server.kill()
        server.wait()


def enforcement(mesh: EmulatedMesh) -> int:
    return ledgers(mesh, "r2")["r1"].enforcement


def pay(mesh: EmulatedMesh, wei: int) -> None:
    """A PaymentReceived on r2's bus, as pay will publish it."""
    script = (
        "import asyncio\n"
        "from mesh.pay.v1 import pay_pb2\n"
        "from services.common.bus import Bus\n"
        "from services.common.money import money\n"
        "async def main():\n"
        "    bus = await Bus.connect('nats://127.0.0.1:4222', 'test')\n"
        f"    await bus.publish_event(pay_pb2.PaymentReceived(counterparty_id='r1', "
        f"amount=money({wei}), purpose=pay_pb2.PAYMENT_PURPOSE_FORWARDING), "
        "service='pay', kind='received', aggregate_id='r1', "
        "node_id='r2')\n"
        "    await bus.close()\n"
        "asyncio.run(main())\n"
    )
    import sys

    mesh.fabric.run("r2", [sys.executable, "-c", script],
                    cwd=str(Path(__file__).resolve().parents[2]))


def test_a_neighbor_that_does_not_pay_is_throttled_then_cut_off(
    strict_mesh: EmulatedMesh, capsys: pytest.CaptureFixture[str]
) -> None:
    mesh = strict_mesh
    # 20 Mbit/s for up to 4 s: past the throttle threshold in about a second
    iperf(mesh, "-b", "20M", "-t", "4")
    wait_for("r1 throttled", lambda: enforcement(mesh) == meter_pb2.ENFORCEMENT_THROTTLED,
             timeout=30)
    assert ledgers(mesh, "r2")["r1"].rate_limit_bps == THROTTLE_BPS
    # UDP offered at twice the limit, the limit's one-second bucket left out:
    # what arrives is the throttle itself (TCP stalls now and then against it)
    report = iperf(mesh, "-u", "-b", str(2 * THROTTLE_BPS), "-t", "6", "-O", "2")
    rate = report["end"]["sum_received"]["bits_per_second"]
    with capsys.disabled():
        print(f"\n  throttled to {THROTTLE_BPS / 1e6:g} Mbit/s: measured {rate / 1e6:.2f} Mbit/s")
    assert abs(rate - THROTTLE_BPS) <= 0.10 * THROTTLE_BPS, rate
    # keep sending at the throttled rate until the debt reaches the cut-off
    deadline = time.monotonic() + 90
    while enforcement(mesh) != meter_pb2.ENFORCEMENT_BLOCKED and time.monotonic() < deadline:
        # Cut off mid-run, iperf3 would wait for r3's report until its own
        # two-minute timeout: the cut-off is what this loop waits for.
        with contextlib.suppress(subprocess.TimeoutExpired):
            iperf(mesh, "-u", "-b", "10M", "-t", "3", timeout=20)
    assert enforcement(mesh) == meter_pb2.ENFORCEMENT_BLOCKED
    r1, r3 = mesh.fabric.netns("r1"), mesh.fabric.nodes["r3"].ipv6
    wait_for("nothing from r1 forwarded", lambda: ping6(r1, r3, count=5, grace=0.5) == 0,
             timeout=10)
    # paying what it owes opens it again
    pay(mesh, balance(ledgers(mesh, "r2")["r1"].debt))
    wait_for("r1 open again", lambda: enforcement(mesh) == meter_pb2.ENFORCEMENT_OPEN,
             timeout=30)
    wait_for("r1's traffic forwarded again", lambda: ping6(r1, r3, count=3, grace=0.5) == 3,
             timeout=10)


@contextlib.contextmanager
def routed_line(tmp_path: Path, r2_meter: dict[str, object]) -> Iterator[EmulatedMesh]:
    """r1 - r2 - r3 with route too (prices r1 1, r3 3, r2 as r2_meter says):
    once r1 reaches r3 and every hop counts r3's prefix."""
    require_root()
    prefix = f"mr{os.getpid() % 10000}x{next(_prefixes)}"
    meters = {"r1": {"price": 1}, "r2": r2_meter, "r3": {"price": 3}}
    topology = Topology.from_dict({
        "name": "routed", "node": [{"name": n, "config": {"meter": m}} for n, m in meters.items()],
        "link": [{"a": "r1", "b": "r2"}, {"a": "r2", "b": "r3"}]})
    emulated = EmulatedMesh(topology, prefix=prefix, root=tmp_path,
                            services=("discovery", "link", "meter", "route"),
                            sections={"meter": {"sample_interval": 0.5},
                                      "route": {"hello_interval": 1.0}})
    try:
        emulated.start()
        r3 = f"{emulated.fabric.nodes['r3'].ipv6}/128"
        wait_for("r1 to reach r3 over Babel's routes", lambda: reaches(emulated, "r1", "r3"),
                 timeout=90)
        # The kernel counts per destination once meter has put the new
        # route's prefix in its sets: bytes before that are `other`.
        wait_for("r3's prefix counted on every hop", lambda: reaches(emulated, "r1", "r3") and all(
            r3 in ledgers(emulated, router)[neighbor].counters
            for router, neighbor in (("r1", "r2"), ("r2", "r1"), ("r2", "r3"))), timeout=30,
            explain=lambda: str({(r, n): sorted(ledgers(emulated, r)[n].counters) for r, n in (
                ("r1", "r2"), ("r2", "r1"), ("r2", "r3"))}))
        yield emulated
    finally:
        emulated.stop()
        clean(prefix, tmp_path)


def route_price(mesh: EmulatedMesh, router: str) -> int | None:
    """What router's meter pays per byte to r3, by its route."""
    state = meter_pb2.MeterState()
    client.status(mesh.routers[router].layout.socket("meter")).state.Unpack(state)
    route = state.routes.get(f"{mesh.fabric.nodes['r3'].ipv6}/128")
    return amount(route.tx_price) if route is not None else None


def own_price(mesh: EmulatedMesh, router: str) -> int:
    state = meter_pb2.MeterState()
    client.status(mesh.routers[router].layout.socket("meter")).state.Unpack(state)
    return amount(state.price.price)


def test_babel_routes_price_the_bytes_along_the_path(tmp_path: Path) -> None:
    """With route running, what r1 pays r2 for bytes to r3 is r2's price plus
    r3's (r2's advertised path price), and what r2 pays r3 is r3's."""
    with routed_line(tmp_path, {"price": R2_PRICE}) as emulated:
        wait_for("r1's and r2's meters to price r3 by their routes",
                 lambda: (route_price(emulated, "r1"), route_price(emulated, "r2"))
                 == (R2_PRICE + 3, 3), timeout=30)
        sink = Receiver(emulated)
        before = {r: ledgers(emulated, r) for r in ("r1", "r2")}
        send(emulated, sink.address, 2000)
        wait_for("the datagrams to arrive", lambda: sink.drain() >= 1900, timeout=30)
        received = sink.drain() * IP_BYTES

        def delta(router: str, neighbor: str, field: str) -> int:
            now = ledgers(emulated, router)[neighbor].debt
            then = before[router][neighbor].debt
            return amount(getattr(now, field)) - amount(getattr(then, field))

        bills = (("r1", "r2", "usage_owed", R2_PRICE + 3),
                 ("r2", "r1", "usage_charged", R2_PRICE + 3),
                 ("r2", "r3", "usage_owed", 3))
        # Each meter bills on its own next sample: wait for all three.
        wait_for("the meters to bill the datagrams", lambda: all(
            delta(router, neighbor, field) >= received * price
            for router, neighbor, field, price in bills), timeout=30,
            explain=lambda: str({(r, n): delta(r, n, f) for r, n, f, _ in bills}))
        # Within 2%: the routers' own Hellos on the tunnels count too.
        for router, neighbor, field, price in bills:
            billed = delta(router, neighbor, field)
            assert received * price <= billed <= 1.02 * 2000 * IP_BYTES * price, (
                router, neighbor, billed)


def test_automatic_pricing_rises_with_load_and_routes_carry_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """r2 prices automatically, 100 to 10,100 wei/B over 0 to 4 Mbit/s on its
    busiest tunnel. About 2 Mbit/s through it raises its price to about the
    middle, Babel carries the new price to r1, whose meter then pays it; idle
    again, the price falls back to the floor, and r1's route follows."""
    low, high, capacity = 100, 10_100, 4_000_000
    rising, falling = low + 0.3 * (high - low), low + 0.1 * (high - low)
    r2 = {"pricing": "automatic", "min_price": low, "max_price": high,
          "link_capacity_bps": capacity}
    with routed_line(tmp_path, r2) as mesh:
        assert own_price(mesh, "r2") < falling  # pings and Hellos only so far
        wait_for("r1's route to r3 to carry r2's price",
                 lambda: route_price(mesh, "r1") == own_price(mesh, "r2") + 3, timeout=30)
        sink = Receiver(mesh)
        began = time.monotonic()
        # About 250 datagrams of 1,048 IP bytes a second: 2.1 Mbit/s.
        with Stream(mesh, sink.address, gap=0.004):
            wait_for("r2's price to rise with the load",
                     lambda: own_price(mesh, "r2") >= rising, timeout=30)
            risen = time.monotonic() - began
            wait_for("r1's route to carry the new price",
                     lambda: route_price(mesh, "r1") - 3 >= rising, timeout=15)
            carried = time.monotonic() - began
            loaded = own_price(mesh, "r2")
            assert loaded <= high
        quiet = time.monotonic()
        wait_for("r2's price to fall back once idle",
                 lambda: own_price(mesh, "r2") < falling, timeout=30)
        fell = time.monotonic() - quiet
        wait_for("r1's route to follow it down",
                 lambda: route_price(mesh, "r1") - 3 < falling, timeout=15)
        sink.drain()
    with capsys.disabled():
        print(f"\n  automatic pricing: 2.1 Mbit/s through r2 (capacity 4) raised its price "
              f"past {rising:.0f} after {risen:.1f}s (to {loaded} wei/B), r1's route carried "
              f"it after {carried:.1f}s; idle, back under {falling:.0f} after {fell:.1f}s")


@contextlib.contextmanager
def deaf_to_babel(mesh: EmulatedMesh, router: str) -> Iterator[None]:
    """router hears no Babel packet while inside: its neighbors' Hellos stop,
    and the routes through them are retracted."""
    table = "inet meter_test_deaf"
    mesh.fabric.run(router, ["nft", f"add table {table} ; add chain {table} in {{ type filter "
                                     f"hook input priority -300 ; }} ; add rule {table} in "
                                     f"udp dport {BABEL_PORT} drop"])
    try:
        yield
    finally:
        mesh.fabric.run(router, ["nft", f"delete table {table}"])


def test_a_route_that_flaps_under_traffic_is_billed_alike_at_both_ends(tmp_path: Path) -> None:
    """r1 sends to r3 throughout while its route to r3 goes away (r1 stops
    hearing r2's Hellos) and comes back. The bytes r1 sends as the route
    returns, and any still sent to it as it goes, cost r2's price plus r3's
    at both ends of the tunnel: none counts as `other` (at the default price)
    at r1 while r2 bills it to r3."""
    with routed_line(tmp_path, {"price": R2_PRICE}) as mesh:
        wait_for("r1's route to r3 to carry r2's price",
                 lambda: route_price(mesh, "r1") == R2_PRICE + 3, timeout=30)
        sink = Receiver(mesh)
        before = (ledgers(mesh, "r1")["r2"], ledgers(mesh, "r2")["r1"])
        # Paced: the tunnel drops nothing, the meters see it all.
        with Stream(mesh, sink.address, gap=0.002) as stream:
            with deaf_to_babel(mesh, "r1"):
                wait_for("r1's route to r3 to be retracted", lambda: via(mesh, "r1", "r3") is None,
                         timeout=30)
            wait_for("r1's route to r3 to come back", lambda: via(mesh, "r1", "r3") == "r2",
                     timeout=30)
            back = sink.drain()
            # A few of meter's samples (every 0.5 s) over the route come back.
            wait_for("datagrams to reach r3 again", lambda: sink.drain() > back + 1000,
                     timeout=30)
        assert stream.refused, "r1 always had a route to r3: nothing flapped"

        def billed() -> tuple[tuple[int, int], tuple[int, int]]:
            """(bytes, wei) r1 owes r2 and r2 charged r1 since `before`."""
            now = (ledgers(mesh, "r1")["r2"], ledgers(mesh, "r2")["r1"])
            return ((now[0].tx_bytes - before[0].tx_bytes, amount(now[0].debt.usage_owed)
                     - amount(before[0].debt.usage_owed)),
                    (now[1].rx_bytes - before[1].rx_bytes, amount(now[1].debt.usage_charged)
                     - amount(before[1].debt.usage_charged)))

        received = sink.drain() * IP_BYTES
        wait_for("both meters to bill what reached r3", lambda: billed()[0][0] >= billed()[1][0]
                 >= received, timeout=15, explain=lambda: f"{billed()}, {received} B received")
        (sent, owed), (arrived, charged) = billed()
        assert owed == sent * (R2_PRICE + 3) and charged == arrived * (R2_PRICE + 3), billed()
        assert arrived >= 0.99 * sent, billed()
