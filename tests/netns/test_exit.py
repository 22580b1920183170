"""Exits and gateways in namespaces: a client three relays from the internet
registers with the exit, tunnels to it and downloads over HTTP through it;
the internet sees the exit, relays see only ciphertext; the exit pays its
gateways for the response traffic and every bill reconciles; a relay's new
price reaches what the client pays for responses; a gateway
losing its uplink moves the traffic to the other one; a bad registration is
refused.

    c - r1 - r2 - g1 - inet - ex      (g1 and g2 each keep a tunnel to ex
              \\- g2 -/                 over inet: links like any other)
"""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from mesh.exit.v1 import exit_pb2, registration_pb2
from mesh.route.v1 import route_pb2

from deploy.emulator.mesh import EmulatedMesh, clean
from deploy.emulator.settlement import reconcile
from deploy.emulator.topology import Topology
from deploy.emulator.traffic import WebServer
from deploy.meshctl import client
from deploy.meshctl.emu import settled
from deploy.node import run_supervisorctl
from services.common.identity import Identity
from services.common.money import amount
from services.exit.registration import registration_message
from services.exit.service import ExitSettings
from tests.conftest import require_root, wait_for
from tests.netns.babeld import Capture
from tests.netns.test_route import reaches, run_meshctl

pytestmark = [pytest.mark.netns, pytest.mark.emulator]

SERVICES = ("discovery", "link", "meter", "route", "pay")
# A payment for every 100 kB owed. c pays ex 5*10^6 wei per byte of response
# traffic: ex's fee (10^6) on what the mesh charges ex to carry it to c
# (g, r2, r1 and c, 10^6 each). ex throttles c to 4 Mbit/s beyond 5*10^12
# wei (1 MB of it) and cuts it off beyond 3*10^13 (6 MB).
PAY_THRESHOLD = 10**11
FAST = {"route": {"hello_interval": 1.0}, "meter": {"pay_threshold": PAY_THRESHOLD}}
THROTTLE_DEBT, THROTTLE_BPS = 5 * 10**12, 4_000_000
CUT_OFF_DEBT = 30 * 10**12
LIVENESS_SECONDS = ExitSettings().liveness_seconds
REQUOTE_SECONDS = 2.0
MARKER = b"plaintext-marker-7f3a"
FILE_BYTES = 4_000_000

TOPOLOGY = {
    "name": "exits",
    "node": [
        {"name": "c", "config": {"exit": {"exits": ["ex"], "requote_seconds": REQUOTE_SECONDS}}},
        {"name": "r1"}, {"name": "r2"},
        {"name": "g1", "role": "gateway"}, {"name": "g2", "role": "gateway"},
        {"name": "inet", "role": "internet"},
        # What ex sends and c never gets (TCP resends it) is on ex's bill only:
        # under load, up to a tenth of it.
        {"name": "ex", "role": "exit", "config": {"exit": {"cut_off_debt": CUT_OFF_DEBT,
                                                            "throttle_debt": THROTTLE_DEBT,
                                                            "throttle_rate_bps": THROTTLE_BPS,
                                                            "debt_tolerance": 0.2}}},
    ],
    "link": [{"a": "c", "b": "r1"}, {"a": "r1", "b": "r2"}, {"a": "r2", "b": "g1"},
             {"a": "r2", "b": "g2"}, {"a": "g1", "b": "inet"}, {"a": "g2", "b": "inet"},
             {"a": "ex", "b": "inet"}],
}


HEALTHY: dict[str, float] = {}


@contextmanager
def running(topology: dict[str, object], prefix: str, root: Path) -> Iterator[EmulatedMesh]:
    """The mesh up and healthy; stopped and removed however the test ends."""
    require_root()
    emulated = EmulatedMesh(Topology.from_dict(topology), prefix=prefix, root=root,
                            services=SERVICES, sections=FAST)
    try:
        emulated.start()
        yield emulated
    finally:
        emulated.stop()
        clean(prefix, root)


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmulatedMesh]:
    with running(TOPOLOGY, f"ex{os.getpid() % 10000}",
                 tmp_path_factory.mktemp("exits")) as emulated:
        HEALTHY["at"] = time.monotonic()
        yield emulated


@pytest.fixture(scope="module")
def web(mesh: EmulatedMesh, tmp_path_factory: pytest.TempPathFactory) -> Iterator[WebServer]:
    server = WebServer(mesh, "inet", tmp_path_factory.mktemp("web"), FILE_BYTES, MARKER)
    try:
        yield server
    finally:
        server.stop()


def exit_state(mesh: EmulatedMesh, node: str) -> exit_pb2.ExitState:
    state = exit_pb2.ExitState()
    client.status(mesh.routers[node].layout.socket("exit")).state.Unpack(state)
    return state


def download(mesh: EmulatedMesh, url: str, timeout: float = 60,
             limit: str = "") -> subprocess.CompletedProcess[str]:
    """c fetches url (at most `limit` bytes/s, curl's --limit-rate); stdout:
    the bytes and the seconds it took."""
    return mesh.fabric.run("c", ["curl", "-sS", "-g", "-o", "/dev/null", "--max-time",
                                 str(timeout), *(["--limit-rate", limit] if limit else []),
                                 "-w", "%{size_download} %{time_total}", url], check=False)


def access(mesh: EmulatedMesh) -> int:
    return exit_state(mesh, "ex").clients["c"].access


def exit_uplink_address(mesh: EmulatedMesh) -> str:
    [link] = mesh.fabric.uplinks("ex", {"inet"})
    return link.a_ipv6 if link.a == "ex" else link.b_ipv6


def route_to_exit(mesh: EmulatedMesh, at: str) -> route_pb2.RouteState.Route | None:
    state = route_pb2.RouteState()
    client.status(mesh.routers[at].layout.socket("route")).state.Unpack(state)
    return state.routes.get(f"{mesh.fabric.nodes['ex'].ipv6}/128")


def gateway_in_use(mesh: EmulatedMesh) -> str:
    """The neighbor r2's route to the exit's address goes through."""
    route = route_to_exit(mesh, "r2")
    return route.next_hop_id if route is not None else ""


def tunneled(mesh: EmulatedMesh) -> bool:
    state = exit_state(mesh, "c")
    return bool(state.selected_exit_id) and state.exits[state.selected_exit_id].tunnel_up


def test_a_client_three_relays_away_downloads_through_the_exit(
    mesh: EmulatedMesh, web: WebServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    wait_for("c to register with ex and its tunnel to carry traffic", lambda: tunneled(mesh),
             timeout=120, explain=lambda: str(exit_state(mesh, "c")))
    up_after = time.monotonic() - HEALTHY["at"]
    registration = exit_state(mesh, "c").exits["ex"].registration
    assert registration.client_addresses
    on_exit = exit_state(mesh, "ex").clients["c"]
    assert on_exit.registration.client_addresses == registration.client_addresses
    # c's default route goes through the tunnel; the mesh's own routes stay.
    routes = mesh.fabric.run("c", ["ip", "-6", "route", "show", "default"]).stdout
    assert "proto 78" in routes
    wait_for("c to reach r2 over the mesh, beside the exit", lambda: reaches(mesh, "c", "r2"))
    assert " dev mw" in mesh.fabric.run("c", ["ip", "-6", "route", "get",
                                              mesh.fabric.nodes["r2"].ipv6]).stdout

    capture = Capture(mesh.fabric, "r2", tmp_path, capture_filter="ip6")
    capture.start()
    try:
        wait_for("the capture on r2 to run", capture.capturing, timeout=30)
        began = time.monotonic()
        done = download(mesh, web.url)
        took = time.monotonic() - began
    finally:
        capture.stop()
    assert done.returncode == 0, done.stderr
    assert int(done.stdout.split()[0]) >= FILE_BYTES - 200
    # The internet saw the exit, not the client.
    requests = web.log.read_text()
    assert f"{exit_uplink_address(mesh)} - -" in requests, requests
    # The relay carried the download, and none of it in the clear.
    captured = capture.file.read_bytes()
    assert len(captured) > FILE_BYTES
    assert MARKER not in captured
    # Both ends meter the tunnel and bill it at the exit's prices. What the
    # exit sent and the client never received (lost on the way, then sent
    # again by TCP: under load, up to a tenth of it) is on the exit's bill
    # only: the client's is within 20% below.
    def metered() -> tuple[exit_pb2.ExitState.Client, exit_pb2.ExitState.Exit]:
        return exit_state(mesh, "ex").clients["c"], exit_state(mesh, "c").exits["ex"]

    def agree() -> bool:
        on_exit, on_client = metered()
        return (on_client.bytes_down >= FILE_BYTES and
                0.8 * amount(on_exit.balance.usage_charged)
                <= amount(on_client.balance.usage_charged)
                <= 1.01 * amount(on_exit.balance.usage_charged))

    wait_for("the exit's and the client's bills to agree", agree, timeout=30,
             explain=lambda: str(metered()))
    on_exit, on_client = metered()
    prices = on_exit.registration
    # The exit quoted c its fee on top of its own route's price to c.
    routes = route_pb2.RouteState()
    client.status(mesh.routers["ex"].layout.socket("route")).state.Unpack(routes)
    carried = amount(routes.routes[f"{mesh.fabric.nodes['c'].ipv6}/128"].path_price)
    assert carried == 4 * 10**6
    assert amount(prices.price_down) == ExitSettings().fee_down + carried
    assert amount(on_exit.balance.usage_charged) == (
        on_exit.bytes_up * amount(prices.price_up) + on_exit.bytes_down * amount(prices.price_down))

    # c pays ex on a payment channel, inside the tunnel, what its own meter
    # says; what ex received is what c paid.
    def paid_up() -> bool:
        on_exit, on_client = metered()
        paid = amount(on_client.balance.payments)
        return (paid == amount(on_exit.balance.payments) and paid >= amount(
            on_client.balance.usage_charged) - 10**11)

    wait_for("c to pay ex what it used", paid_up, timeout=90, explain=lambda: str(metered()))
    on_exit, on_client = metered()
    # Every link's two meters and the client's and exit's bills agree, and
    # every payment arrived: the client paid its first hop and the exit, the
    # relays kept their margins, and the exit paid its gateways for the
    # response traffic it sent into the mesh.
    ledgers, bills = settled(mesh, timeout=60, pay_threshold=PAY_THRESHOLD)
    report = reconcile(ledgers, PAY_THRESHOLD, bills)
    assert report.ok, "\n".join(report.lines())
    into_mesh = [d for d in report.directions if d.payer == "ex"]
    assert {d.payee for d in into_mesh} <= {"g1", "g2"}
    assert sum(d.bytes for d in into_mesh) >= FILE_BYTES
    assert sum(d.paid for d in into_mesh) >= sum(d.owed for d in into_mesh) - 2 * PAY_THRESHOLD
    # The relays kept a margin, and so did the exit: its fee.
    assert report.margins["r1"] > 0 and report.margins["r2"] > 0 and report.margins["ex"] > 0
    [to_exit] = report.exit_directions
    assert (to_exit.payer, to_exit.payee) == ("c", "ex")
    # What the operator sees.
    code, shown, _ = run_meshctl(capsys, "-n", str(mesh.routers["c"].layout.root), "exits",
                                 "--json")
    [row] = json.loads(shown)
    assert code == 0 and (row["role"], row["peer"], row["state"]) == (
        "client", "ex", "in use, tunnel up")
    assert row["paid_wei"] >= amount(on_client.balance.payments)
    with capsys.disabled():
        print(f"\n  exit tunnel up {up_after:.1f}s after every service was healthy; "
              f"{FILE_BYTES / 1e6:.0f} MB "
              f"through 3 relays and the exit in {took:.1f}s; capture on r2 "
              f"{len(captured) / 1e6:.1f} MB, no plaintext; billed {on_exit.bytes_down} B down, "
              f"{on_exit.bytes_up} B up, exit and client "
              f"{amount(on_exit.balance.usage_charged)} and "
              f"{amount(on_client.balance.usage_charged)} wei, paid "
              f"{amount(on_client.balance.payments)} wei")
        print("\n".join(f"  {line}" for line in report.lines()))


def test_a_relay_raising_its_price_raises_what_the_client_pays_for_responses(
    mesh: EmulatedMesh, capsys: pytest.CaptureFixture[str]
) -> None:
    """r1 triples its price: ex's route to c costs ex 2*10^6 more per byte,
    its offer follows, and c registers again at the new price (its tunnel
    and addresses unchanged); back when r1 lowers it again."""
    wait_for("c's exit tunnel", lambda: tunneled(mesh), timeout=120)
    addresses = list(exit_state(mesh, "c").exits["ex"].registration.client_addresses)
    r1 = str(mesh.routers["r1"].layout.root)

    def quoted() -> tuple[int, int]:
        """price_down as c and as ex have it registered."""
        return (amount(exit_state(mesh, "c").exits["ex"].registration.price_down),
                amount(exit_state(mesh, "ex").clients["c"].registration.price_down))

    before = quoted()
    assert before == (5 * 10**6, 5 * 10**6)
    try:
        assert run_meshctl(capsys, "-n", r1, "price", "3000000")[0] == 0
        changed = time.monotonic()
        wait_for("c to register at ex's new price", lambda: quoted() == (7 * 10**6,) * 2,
                 timeout=60, explain=lambda: str(quoted()))
        followed = time.monotonic() - changed
        assert tunneled(mesh)
        assert list(exit_state(mesh, "c").exits["ex"].registration.client_addresses) == addresses
        assert "exit.requote" in (mesh.routers["c"].layout.log_dir / "exit.log").read_text()
    finally:
        run_meshctl(capsys, "-n", r1, "price", "1000000")
    wait_for("c to register at the old price again", lambda: quoted() == before, timeout=60,
             explain=lambda: str(quoted()))
    with capsys.disabled():
        print(f"\n  r1 tripled its price: c pays ex 7e6 wei/B down (was 5e6) "
              f"{followed:.1f}s later, same tunnel")


def test_a_gateway_losing_its_uplink_moves_traffic_to_the_other(
    mesh: EmulatedMesh, web: WebServer, capsys: pytest.CaptureFixture[str]
) -> None:
    wait_for("c's exit tunnel", lambda: tunneled(mesh), timeout=120)
    used = wait_for("r2 to route to the exit through a gateway", lambda: gateway_in_use(mesh))
    # The gateway's tunnel to the exit is a link like any other: the exit
    # is two links from r2.
    route = route_to_exit(mesh, "r2")
    assert route is not None and route.metric == 2 * 96
    other = "g2" if used == "g1" else "g1"
    # The internet drops all it exchanges with the gateway, as when the ISP
    # fails: the gateway keeps its interface and routes, and hears nothing.
    [uplink] = mesh.fabric.uplinks(used, {"inet"})
    ifname = uplink.b_ifname if uplink.a == used else uplink.a_ifname
    mesh.fabric.run("inet", ["nft", "-f", "-"], input=(
        "table inet isp_down {\n"
        f'  chain in {{ type filter hook prerouting priority -300; iifname "{ifname}" drop; }}\n'
        f'  chain out {{ type filter hook postrouting priority 300; oifname "{ifname}" drop; }}\n'
        "}\n"))
    cut = time.monotonic()
    try:
        wait_for(f"r2 to route the exit through {other}", lambda: gateway_in_use(mesh) == other,
                 timeout=30)
        moved = time.monotonic() - cut
        wait_for("a download to succeed again", lambda: download(mesh, web.url, 20).returncode == 0,
                 timeout=60)
        resumed = time.monotonic() - cut
    finally:
        mesh.fabric.run("inet", ["nft", "delete", "table", "inet", "isp_down"])
    wait_for(f"{used} to reach the exit over its own tunnel again",
             lambda: getattr(route_to_exit(mesh, used), "next_hop_id", "") == "ex", timeout=60)
    with capsys.disabled():
        print(f"\n  gateway {used} lost its uplink: routes through {other} after {moved:.1f}s, "
              f"downloads again after {resumed:.1f}s")


def register_from_the_internet(mesh: EmulatedMesh,
                               requests: list[registration_pb2.RegisterRequest]) -> list[str]:
    """Each request sent to ex's Register from the internet host (anyone may
    try): ACCEPTED, or the gRPC code and message of the refusal."""
    script = (
        "import base64, grpc, sys\n"
        "from mesh.exit.v1 import registration_pb2, registration_pb2_grpc\n"
        f"stub = registration_pb2_grpc.ExitRegistrationStub("
        f"grpc.insecure_channel('[{mesh.fabric.nodes['ex'].ipv6}]:50080'))\n"
        "for line in sys.stdin.read().split():\n"
        "    try:\n"
        "        stub.Register(registration_pb2.RegisterRequest.FromString("
        "base64.b64decode(line)), timeout=10)\n"
        "        print('ACCEPTED')\n"
        "    except grpc.RpcError as err:\n"
        "        print(err.code().name, err.details())\n")
    done = subprocess.run(
        mesh.fabric.exec_argv("inet", [sys.executable, "-c", script]),
        input="\n".join(base64.b64encode(r.SerializeToString()).decode() for r in requests),
        capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return done.stdout.splitlines()


def test_a_registration_with_a_bad_signature_is_refused(mesh: EmulatedMesh) -> None:
    impostor = Identity.load_or_create(mesh.workdir / "impostor-keys")
    request = registration_pb2.RegisterRequest(
        exit_id="ex", client_id="c", identity_key=impostor.identity_key,
        wireguard_key=impostor.wireguard_public, timestamp_ms=time.time_ns() // 1_000_000)
    request.signature = impostor.sign(registration_message(request) + b"tampered")
    stale = registration_pb2.RegisterRequest()
    stale.CopyFrom(request)
    stale.timestamp_ms -= 3_600_000
    stale.signature = impostor.sign(registration_message(stale))
    answers = register_from_the_internet(mesh, [request, stale])
    assert answers[0].startswith("UNAUTHENTICATED REFUSAL_REASON_BAD_SIGNATURE"), answers
    assert answers[1].startswith("UNAUTHENTICATED REFUSAL_REASON_STALE"), answers
    # The real c keeps its registration; the impostor got nothing.
    clients = exit_state(mesh, "ex").clients
    assert clients["c"].registration.client_identity_key != impostor.identity_key
    log = (mesh.routers["ex"].layout.log_dir / "exit.log").read_text()
    assert "exit.refused" in log and "REFUSAL_REASON_BAD_SIGNATURE" in log


def test_grpc_refusal_of_a_malformed_registration_names_the_field(mesh: EmulatedMesh) -> None:
    [answer] = register_from_the_internet(mesh, [registration_pb2.RegisterRequest(
        exit_id="ex", client_id="z", identity_key=b"short")])
    assert answer.startswith(
        "INVALID_ARGUMENT REFUSAL_REASON_MALFORMED: identity_key is 5 bytes"), answer


def test_a_client_that_stops_paying_is_cut_off_until_it_pays(
    mesh: EmulatedMesh, web: WebServer, capsys: pytest.CaptureFixture[str]
) -> None:
    wait_for("c's exit tunnel", lambda: tunneled(mesh), timeout=120)
    c = mesh.routers["c"].layout
    run_supervisorctl(c, "stop", "pay")
    try:
        began = time.monotonic()
        # Downloads (at 8 Mbit/s: the exit samples every 2 s, and c must not
        # pass both thresholds in one sample, even a late one) until ex
        # throttles c.
        wait_for("ex to throttle c", lambda: download(mesh, web.url, 2, "1M") is not None
                 and access(mesh) not in (exit_pb2.CLIENT_ACCESS_UNSPECIFIED,
                                          exit_pb2.CLIENT_ACCESS_OPEN), timeout=120)
        assert access(mesh) == exit_pb2.CLIENT_ACCESS_THROTTLED
        throttled = time.monotonic() - began
        size, seconds = map(float, download(mesh, web.url, 3).stdout.split())
        rate = 8 * size / seconds
        # A policer: TCP gets at most the rate (and the bucket's first second).
        assert 0.25 * THROTTLE_BPS < rate < 1.5 * THROTTLE_BPS, rate
        # Downloads until ex cuts c off: the debt passes CUT_OFF_DEBT.
        wait_for("ex to cut c off", lambda: download(mesh, web.url, 10) is not None
                 and access(mesh) == exit_pb2.CLIENT_ACCESS_BLOCKED, timeout=120)
        cut = time.monotonic() - began
        debt = amount(exit_state(mesh, "ex").clients["c"].balance.debt)
        assert debt > CUT_OFF_DEBT
        # Nothing of c's goes through ex now, but its tunnel stays: its
        # payments still reach ex.
        assert download(mesh, web.url, 5).returncode != 0
        assert "exit.cut_off" in (mesh.routers["ex"].layout.log_dir / "exit.log").read_text()
        # Registering again does not help: refused, with why.
        keys = Identity.load_or_create(c.data_dir / "keys")
        request = registration_pb2.RegisterRequest(
            exit_id="ex", client_id="c", identity_key=keys.identity_key,
            wireguard_key=keys.wireguard_public, timestamp_ms=time.time_ns() // 1_000_000)
        request.signature = keys.sign(registration_message(request))
        [answer] = register_from_the_internet(mesh, [request])
        assert answer.startswith("PERMISSION_DENIED REFUSAL_REASON_BLOCKED: cut off for"), answer
        # c keeps sending into the tunnel for longer than its liveness window
        # and hears nothing from the internet, yet keeps the tunnel: ex still
        # answers it, and it is the only way c can pay.
        quiet_until = time.monotonic() + LIVENESS_SECONDS + 2
        while time.monotonic() < quiet_until:
            assert download(mesh, web.url, 2).returncode != 0
        assert tunneled(mesh), exit_state(mesh, "c")
    finally:
        run_supervisorctl(c, "start", "pay")
    wait_for("c to pay and be let back", lambda: exit_state(
        mesh, "ex").clients["c"].access == exit_pb2.CLIENT_ACCESS_OPEN, timeout=120,
        explain=lambda: f"ex: {exit_state(mesh, 'ex').clients['c']}\n"
                        f"c: {exit_state(mesh, 'c')}")
    wait_for("c's tunnel back", lambda: tunneled(mesh), timeout=60)
    wait_for("a download to succeed again", lambda: download(mesh, web.url, 20).returncode == 0,
             timeout=60)
    with capsys.disabled():
        print(f"\n  client stopped paying: throttled after {throttled:.1f}s (downloads at "
              f"{rate / 1e6:.2f} Mbit/s, limit {THROTTLE_BPS / 1e6:g}), cut off after {cut:.1f}s "
              f"owing {debt} wei; let back once it paid")


TWO_EXITS = {
    "name": "two-exits",
    "node": [
        {"name": "c", "config": {"exit": {"exits": ["ex", "ex2"]}}},
        {"name": "r1"}, {"name": "g1", "role": "gateway"},
        {"name": "inet", "role": "internet"},
        {"name": "ex", "role": "exit"}, {"name": "ex2", "role": "exit"},
    ],
    "link": [{"a": "c", "b": "r1"}, {"a": "r1", "b": "g1"}, {"a": "g1", "b": "inet"},
             {"a": "ex", "b": "inet"}, {"a": "ex2", "b": "inet"}],
}


def test_a_client_fails_over_to_another_exit_when_its_exit_goes_silent(
    tmp_path_factory: pytest.TempPathFactory, capsys: pytest.CaptureFixture[str]
) -> None:
    """c - r1 - g1 - inet - {ex, ex2}: the exit c uses loses its uplink; c
    takes it for dead, registers with the other, and downloads again."""
    with running(TWO_EXITS, f"e2{os.getpid() % 10000}",
                 tmp_path_factory.mktemp("two-exits")) as mesh:
        web = WebServer(mesh, "inet", tmp_path_factory.mktemp("web2"), 1_000_000)
        try:
            wait_for("c's exit tunnel", lambda: tunneled(mesh), timeout=120,
                     explain=lambda: str(exit_state(mesh, "c")))
            first = exit_state(mesh, "c").selected_exit_id
            other = "ex2" if first == "ex" else "ex"
            wait_for(f"c's route to {other} too",
                     lambda: exit_state(mesh, "c").exits[other].HasField("route"), timeout=60)
            [uplink] = mesh.fabric.uplinks(first, {"inet"})
            ifname = uplink.a_ifname if uplink.a == first else uplink.b_ifname
            mesh.fabric.run(first, ["ip", "link", "set", ifname, "down"])
            cut = time.monotonic()
            wait_for(f"c to tunnel to {other}", lambda: exit_state(
                mesh, "c").selected_exit_id == other and tunneled(mesh), timeout=90,
                explain=lambda: str(exit_state(mesh, "c")))
            moved = time.monotonic() - cut
            wait_for("a download through it", lambda: download(mesh, web.url, 20).returncode == 0,
                     timeout=60)
            resumed = time.monotonic() - cut
            # The exit reads its peers' handshakes every sample_interval.
            wait_for(f"{other} to see c's tunnel up",
                     lambda: exit_state(mesh, other).clients["c"].tunnel_up, timeout=10)
            log = (mesh.routers["c"].layout.log_dir / "exit.log").read_text()
            assert f"exit.unresponsive exit={first}" in log or \
                f"exit.selected exit={other}" in log
        finally:
            web.stop()
    with capsys.disabled():
        print(f"\n  exit {first} lost its uplink: c tunneled to {other} after {moved:.1f}s, "
              f"downloaded through it after {resumed:.1f}s")
