"""meshctl's emulated-mesh commands: emu up|down|status and demo."""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from deploy.emulator import mesh as mesh_mod
from deploy.emulator.preflight import PreflightError
from deploy.emulator.settlement import ExitBill, Ledger, ledger_from, reconcile
from deploy.emulator.topology import TOPOLOGIES_DIR, Topology, TopologyError
from deploy.emulator.traffic import InternetTraffic, MeshTraffic

from . import client
from .tables import table


class EmuError(RuntimeError):
    """An emulated-mesh command failed; the message says why."""


def current_prefix() -> str:
    return os.environ.get("MESH_EMU_PREFIX", "mesh")


def node_dir(prefix: str, name: str) -> Path:
    return mesh_mod.EMU_ROOT / prefix / name


def load_topology(spec: str) -> Topology:
    path = Path(spec)
    if not path.exists() and not spec.endswith(".toml"):
        path = TOPOLOGIES_DIR / f"{spec}.toml"
    if not path.exists():
        shipped = ", ".join(sorted(p.stem for p in TOPOLOGIES_DIR.glob("*.toml")))
        raise EmuError(f"no topology {spec!r} (a file, or one of: {shipped})")
    try:
        return Topology.load(path)
    except TopologyError as err:
        raise EmuError(str(err)) from None


def _progress(line: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {line}", flush=True)


def _mesh(args: argparse.Namespace, topology: Topology) -> mesh_mod.EmulatedMesh:
    services = tuple(s for s in args.services.split(",") if s)
    return mesh_mod.EmulatedMesh(topology, prefix=args.prefix, services=services,
                                 log_level=args.log_level, sections=DEMO_SECTIONS)


def _start(args: argparse.Namespace) -> mesh_mod.EmulatedMesh:
    topology = load_topology(args.topology)
    emulated = _mesh(args, topology)
    _progress(f"bringing up topology {topology.name!r}: {len(topology.nodes)} nodes, "
              f"prefix {args.prefix!r}, files in {emulated.workdir}")
    try:
        emulated.start(_progress, timeout=args.timeout)
    except (mesh_mod.MeshError, PreflightError) as err:
        _progress(f"failed: {err}; tearing down")
        emulated.stop(_progress)
        raise EmuError(str(err)) from None
    return emulated


def cmd_up(args: argparse.Namespace) -> int:
    _start(args)
    print(f"mesh {args.prefix!r} is up; `meshctl -n r1 status`, `meshctl emu down` to stop")
    return 0


def _running_mesh(args: argparse.Namespace) -> mesh_mod.EmulatedMesh:
    try:
        return _mesh(args, mesh_mod.running_topology(args.prefix))
    except mesh_mod.MeshError as err:
        raise EmuError(str(err)) from None


def cmd_down(args: argparse.Namespace) -> int:
    removed = mesh_mod.clean(args.prefix)
    shutil.rmtree(mesh_mod.EMU_ROOT / args.prefix, ignore_errors=True)
    print(f"mesh {args.prefix!r} down ({len(removed)} namespaces removed)")
    return 0


def status_rows(emulated: mesh_mod.EmulatedMesh) -> list[list[object]]:
    """Per router: its services' health, its links, and how many events it handled."""
    rows: list[list[object]] = []
    for name, router in emulated.routers.items():
        try:
            rows.append(_status_row(name, router))
        except client.NodeError as err:
            # A service restarting, or too busy to answer in time.
            rows.append([name, f"unreachable: {err}"[:40], "-", "-", "-", 0])
    return rows


def _status_row(name: str, router: mesh_mod.RouterNode) -> list[object]:
    """One router's row: its services' health, price, links, payments, events."""
    healths = {s: client.health(router.layout.socket(s)) for s in router.services}
    sick = [f"{s}:{h.lower()}" for s, h in healths.items() if h != "SERVING"]
    handled = 0
    for service, health in healths.items():
        if health == "SERVING":
            handled += client.status(router.layout.socket(service)).events_handled
    links, price, paid = "-", "-", "-"
    node = client.Node.open(router.layout.root)
    if healths.get("link") == "SERVING":
        links = " ".join(_link_cell(r) for r in client.neighbor_rows(node)) or "-"
    if healths.get("meter") == "SERVING":
        price = client.status(node.socket("meter")).summary["price"]
        price = f"{int(price)}/B"
    if healths.get("pay") == "SERVING":
        sent, received, channels, left = _payments(router)
        paid = f"{_short(-sent)}/{_short(received)} in {channels} ch ({_short(left)} left)"
    return [name, "SERVING" if not sick else " ".join(sick), price, links, paid, handled]


ROUTE_HEADERS = ["router", "routes: destination>next hop (metric, price paid wei/B)",
                 "penalized"]


def route_rows(emulated: mesh_mod.EmulatedMesh) -> list[list[object]]:
    """Per router: its selected route to each other router, and the
    neighbors verify has penalized."""
    names = {f"{node.ipv6}/128": name for name, node in emulated.fabric.nodes.items()}
    rows: list[list[object]] = []
    for name, router in emulated.routers.items():
        if "route" not in router.services or \
                client.health(router.layout.socket("route")) != "SERVING":
            continue
        node = client.Node.open(router.layout.root)
        try:
            routes = client.route_rows(node)
            penalized = client.status(node.socket("route")).summary["penalized"]
        except client.NodeError:
            continue
        cells = [f"{names[r['prefix']]}>{r['via']}"
                 f"({r['metric']},{_short(int(r['path_price'])).lstrip('+')})"
                 for r in routes if r["prefix"] in names]
        rows.append([name, " ".join(sorted(cells)) or "-", penalized])
    return rows


EXIT_HEADERS = ["router", "exits: role peer (state, bytes both ways, billed, paid)"]


def _exit_views(emulated: mesh_mod.EmulatedMesh) -> Iterator[tuple[str, list[dict[str, object]]]]:
    """Each router running exit, with its exit service's rows (a router
    restarting just now is left out this time)."""
    for name, router in emulated.routers.items():
        if not _serving(router, "exit"):
            continue
        try:
            yield name, client.exit_rows(client.Node.open(router.layout.root))
        except client.NodeError:
            continue


def exit_rows(emulated: mesh_mod.EmulatedMesh) -> list[list[object]]:
    """Per router running exit: the exit a client uses, an exit's clients."""
    rows: list[list[object]] = []
    for name, listed in _exit_views(emulated):
        cells = [f"{r['role']} {r['peer']} ({r['state']}, "
                 f"{_short(int(r['bytes_up']) + int(r['bytes_down'])).lstrip('+')} B, "
                 f"billed {_short(int(r['owed_wei'])).lstrip('+')}, "
                 f"paid {_short(int(r['paid_wei'])).lstrip('+')} wei)"
                 for r in listed]
        rows.append([name, "; ".join(cells) or "-"])
    return rows


def _exit_tunnels_up(emulated: mesh_mod.EmulatedMesh) -> tuple[int, int]:
    """Clients whose exit tunnel carries traffic, of the routers told to use exits."""
    clients = [r for r in emulated.routers.values()
               if "exit" in r.services and r.config.get("exit", {}).get("exits")]
    done = 0
    for router in clients:
        if not _serving(router, "exit"):
            continue
        try:
            rows = client.exit_rows(client.Node.open(router.layout.root))
        except client.NodeError:
            continue  # restarting just now
        done += any(row["role"] == "client" and "tunnel up" in str(row["state"]) for row in rows)
    return done, len(clients)


def _payments(router: mesh_mod.RouterNode) -> tuple[int, int, int, int]:
    """Wei the router paid and received, its open channels, and what they
    still hold to pay with (pay's summary)."""
    summary = client.status(router.layout.socket("pay")).summary
    return (int(summary["paid"]), int(summary["received"]), int(summary["channels_open"]),
            int(summary["deposit_left"]))


def payment_totals(emulated: mesh_mod.EmulatedMesh) -> tuple[int, int]:
    """Wei paid and received over every router's channels."""
    serving = [_payments(router) for router in emulated.routers.values()
               if "pay" in router.services
               and client.health(router.layout.socket("pay")) == "SERVING"]
    return sum(p[0] for p in serving), sum(p[1] for p in serving)


def _link_cell(row: dict[str, object]) -> str:
    """r2:up, plus what the neighbor owes (+) or is owed (-) and any enforcement."""
    cell = f"{row['neighbor']}:{row['link']}"
    if "balance_wei" in row:
        cell += f"({_short(int(row['balance_wei']))}"  # type: ignore[call-overload]
        if row["enforcement"] != "open":
            cell += f",{row['enforcement']}"
        cell += ")"
    return cell


def _short(wei: int) -> str:
    """A compact signed amount: 1.2e12 rather than thirteen digits."""
    return f"{wei:+.2g}" if abs(wei) >= 10_000 else f"{wei:+d}"


STATUS_HEADERS = ["router", "health", "price", "links (balance, enforcement)",
                  "paid/received (wei) in channels (deposits left)", "events"]
# The demo's economy: a payment for every 100 kB owed, so they are seen flowing.
DEMO_PAY_THRESHOLD = 10**11
DEMO_SECTIONS = {"meter": {"pay_threshold": DEMO_PAY_THRESHOLD}}
DEMO_NEIGHBOR_RATE = 50_000  # bytes/s each router sends each neighbor
DEMO_FAR_RATE = 25_000  # bytes/s each router sends each router beyond its neighbors


def cmd_status(args: argparse.Namespace) -> int:
    rows = status_rows(_running_mesh(args))
    print(table(STATUS_HEADERS, rows))
    return 0 if all(r[1] == "SERVING" for r in rows) else 1


def _wait_stage(what: str, check: Callable[[], tuple[int, int]], timeout: float) -> bool:
    """Poll check() -> (done, wanted) until done == wanted; progress once a
    second while it moves, and the time it took."""
    started = time.monotonic()
    shown = None
    while True:
        done, wanted = check()
        if done >= wanted:
            _progress(f"{what}: {done} of {wanted} ({time.monotonic() - started:.1f}s)")
            return True
        if time.monotonic() - started > timeout:
            _progress(f"{what}: only {done} of {wanted} after {timeout:.0f}s; going on")
            return False
        if done != shown:
            _progress(f"{what}: {done} of {wanted}...")
            shown = done
        time.sleep(0.5)


def _serving(router: mesh_mod.RouterNode, service: str) -> bool:
    return service in router.services and \
        client.health(router.layout.socket(service)) == "SERVING"


def _links_up(emulated: mesh_mod.EmulatedMesh) -> tuple[int, int]:
    wanted = sum(2 for link in emulated.topology.links
                 if link.a in emulated.routers and link.b in emulated.routers)
    done = 0
    for router in emulated.routers.values():
        if _serving(router, "link"):
            done += sum(1 for row in client.link_rows(client.Node.open(router.layout.root)))
    return done, wanted


def _reachable(emulated: mesh_mod.EmulatedMesh) -> dict[str, set[str]]:
    """The other routers each router can reach over links between routers
    (an exit behind the internet is not reachable until it has tunnels)."""
    adjacent: dict[str, set[str]] = {name: set() for name in emulated.routers}
    for link in emulated.topology.links:
        if link.a in adjacent and link.b in adjacent:
            adjacent[link.a].add(link.b)
            adjacent[link.b].add(link.a)
    reachable = {}
    for name in adjacent:
        seen, frontier = {name}, [name]
        while frontier:
            for other in adjacent[frontier.pop()] - seen:
                seen.add(other)
                frontier.append(other)
        reachable[name] = seen - {name}
    return reachable


def _routes_converged(emulated: mesh_mod.EmulatedMesh) -> tuple[int, int]:
    """Routes from each router to the own address of every router it can reach."""
    address = {name: f"{emulated.fabric.nodes[name].ipv6}/128" for name in emulated.routers}
    done = wanted = 0
    for name, others in _reachable(emulated).items():
        router = emulated.routers[name]
        if not _serving(router, "route"):
            continue
        selected = {row["prefix"] for row in client.route_rows(client.Node.open(
            router.layout.root))}
        wanted += len(others)
        done += len({address[o] for o in others} & selected)
    return done, wanted


def _channels_open(emulated: mesh_mod.EmulatedMesh) -> tuple[int, int]:
    """Every router's outgoing channel to each linked neighbor."""
    paying = [r for r in emulated.routers.values() if _serving(r, "pay")]
    links = _links_up(emulated)[0]
    opened = sum(_payments(router)[2] for router in paying)
    return opened // 2, links if paying else 0


def meter_ledgers(emulated: mesh_mod.EmulatedMesh) -> dict[str, dict[str, Ledger]]:
    from mesh.meter.v1 import meter_pb2

    ledgers: dict[str, dict[str, Ledger]] = {}
    for name, router in emulated.routers.items():
        if _serving(router, "meter"):
            state = meter_pb2.MeterState()
            try:
                client.status(router.layout.socket("meter")).state.Unpack(state)
            except client.NodeError:
                continue  # restarting just now: no ledger this time
            ledgers[name] = {n: ledger_from(lg) for n, lg in state.ledgers.items()}
    return ledgers


ExitBills = dict[tuple[str, str], tuple[ExitBill, ExitBill]]


def exit_bills(emulated: mesh_mod.EmulatedMesh) -> ExitBills:
    """(client, exit): the client's bill with the exit and the exit's with it,
    for every pair whose both ends answer."""
    on_client: dict[tuple[str, str], ExitBill] = {}
    on_exit: dict[tuple[str, str], ExitBill] = {}
    for name, rows in _exit_views(emulated):
        for row in rows:
            peer = str(row["peer"])
            bill = ExitBill(int(str(row["bytes_up"])) + int(str(row["bytes_down"])),
                            int(str(row["owed_wei"])), int(str(row["paid_wei"])))
            if row["role"] == "client":
                on_client[(name, peer)] = bill
            else:
                on_exit[(peer, name)] = bill
    return {pair: (bill, on_exit[pair]) for pair, bill in on_client.items()
            if pair in on_exit and bill.bytes}


def settled(emulated: mesh_mod.EmulatedMesh, timeout: float,
             pay_threshold: int = DEMO_PAY_THRESHOLD,
             ) -> tuple[dict[str, dict[str, Ledger]], ExitBills]:
    """After the traffic: the ledgers and exit bills once meters have counted
    the last bytes and the payments in flight have arrived (two readings a
    second apart that reconcile), or as they are at the timeout."""
    deadline = time.monotonic() + timeout
    agreed = 0
    ledgers, bills = meter_ledgers(emulated), exit_bills(emulated)
    while time.monotonic() < deadline and agreed < 2:
        time.sleep(1.0)
        ledgers, bills = meter_ledgers(emulated), exit_bills(emulated)
        agreed = agreed + 1 if reconcile(ledgers, pay_threshold, bills).ok else 0
    return ledgers, bills


def cmd_demo(args: argparse.Namespace) -> int:
    emulated = _start(args)
    try:
        return _demo(emulated, args)
    finally:
        # Also when the demo fails: a mesh left behind would load the machine.
        if args.keep:
            print(f"left running: `meshctl emu down --prefix {args.prefix}` removes it")
        else:
            emulated.stop(_progress, keep_files=False)


def _demo(emulated: mesh_mod.EmulatedMesh, args: argparse.Namespace) -> int:
    _wait_stage("links up (each end)", lambda: _links_up(emulated), timeout=120)
    _wait_stage("routes converged", lambda: _routes_converged(emulated), timeout=120)
    _wait_stage("payment channels open", lambda: _channels_open(emulated), timeout=120)
    if _exit_tunnels_up(emulated)[1]:
        _wait_stage("clients tunneled to an exit", lambda: _exit_tunnels_up(emulated),
                    timeout=120)
    traffic = [_ping_forever(router, args.ping_rate) for router in emulated.routers.values()
               if "sharp" in router.services]
    _progress(f"traffic: {args.ping_rate:g} pings/s into sharp on {len(traffic)} routers")
    _progress(f"traffic: {args.neighbor_rate / 1000:g} kB/s from every router to each "
              "neighbor, through their tunnel (metered, billed, paid)")
    _progress(f"traffic: {args.far_rate / 1000:g} kB/s from every router to each router "
              "beyond its neighbors, routed by Babel through relays who earn their price")
    clients = [name for name, router in emulated.routers.items()
               if router.config.get("exit", {}).get("exits")]
    if clients:
        _progress(f"traffic: {', '.join(clients)} download from the internet host through "
                  "their exit, and pay it")
    tty = sys.stdout.isatty()
    deadline = time.monotonic() + args.duration if args.duration else None
    try:
        with MeshTraffic(emulated, args.neighbor_rate, args.far_rate), \
                InternetTraffic(emulated, emulated.workdir / "internet"):
            while deadline is None or time.monotonic() < deadline:
                rows = status_rows(emulated)
                routes = route_rows(emulated)
                if tty:
                    print("\033[2J\033[H", end="")
                print(f"[{time.strftime('%H:%M:%S')}] mesh {args.prefix!r} "
                      f"(Ctrl-C to stop)\n{table(STATUS_HEADERS, rows)}", flush=True)
                if routes:
                    print(table(ROUTE_HEADERS, routes), flush=True)
                exits = exit_rows(emulated)
                if exits:
                    print(table(EXIT_HEADERS, exits), flush=True)
                time.sleep(1.0)
    except KeyboardInterrupt:
        print()
    finally:
        for process in traffic:
            process.terminate()
        for process in traffic:
            process.wait(timeout=30)
    _progress("traffic stopped; waiting for the last bytes to be metered and paid")
    ledgers, bills = settled(emulated, timeout=30)
    rows = status_rows(emulated)
    healthy = all(r[1] == "SERVING" for r in rows)
    handled = sum(int(r[-1]) for r in rows)
    print(f"final state ({handled} events handled across the mesh):\n"
          f"{table(STATUS_HEADERS, rows)}")
    routes = route_rows(emulated)
    if routes:
        print(table(ROUTE_HEADERS, routes))
    exits = exit_rows(emulated)
    if exits:
        print(table(EXIT_HEADERS, exits))
    paid, received = payment_totals(emulated)
    print(f"payments: {paid} wei paid and {received} wei received across the mesh "
          f"({paid - received} wei in flight)")
    report = reconcile(ledgers, DEMO_PAY_THRESHOLD, bills)
    print("\n".join(report.lines()))
    return 0 if healthy and handled > 0 and report.ok else 1


def _ping_forever(router: mesh_mod.RouterNode, rate: float) -> subprocess.Popen[bytes]:
    """Test traffic into sharp on one router, from inside its namespace."""
    return subprocess.Popen(
        ["ip", "netns", "exec", router.namespace, sys.executable, "-m", "deploy.meshctl",
         "-n", str(router.layout.root), "inject", "ping", "--count", "0",
         "--rate", str(rate), "--origin", "demo"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )


def add_commands(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument("--prefix", default=current_prefix(),
                       help="names the mesh's namespaces <prefix>-<node> (default: "
                       "$MESH_EMU_PREFIX or mesh)")
        p.add_argument("--services", default=",".join(mesh_mod.DEFAULT_SERVICES),
                       help="services each router runs (comma-separated)")
        p.add_argument("--log-level", default="info", help="services' log level")

    def startable(p: argparse.ArgumentParser) -> None:
        common(p)
        p.add_argument("--topology", default="default",
                       help=f"topology file or shipped name in {TOPOLOGIES_DIR} (default: default)")
        p.add_argument("--timeout", type=float, default=180.0,
                       help="seconds to wait for every router to be healthy")

    emu = sub.add_parser("emu", help="the emulated mesh on this machine (needs root)")
    emu_sub = emu.add_subparsers(dest="emu_command", required=True, metavar="ACTION")
    up = emu_sub.add_parser("up", help="bring the mesh up and leave it running")
    startable(up)
    up.set_defaults(func=cmd_up)
    down = emu_sub.add_parser("down", help="stop it and remove its namespaces and files")
    common(down)
    down.set_defaults(func=cmd_down)
    status = emu_sub.add_parser("status", help="every router's services")
    common(status)
    status.set_defaults(func=cmd_status)

    demo = sub.add_parser("demo", help="bring the mesh up, drive traffic, show it live")
    startable(demo)
    demo.add_argument("--duration", type=float, default=0.0,
                      help="seconds to run before tearing down (default: until Ctrl-C)")
    demo.add_argument("--keep", action="store_true", help="leave the mesh running at the end")
    demo.add_argument("--neighbor-rate", type=int, default=DEMO_NEIGHBOR_RATE,
                      help="bytes/s each router sends each neighbor through their tunnel "
                      f"(default {DEMO_NEIGHBOR_RATE})")
    demo.add_argument("--far-rate", type=int, default=DEMO_FAR_RATE,
                      help="bytes/s each router sends each router beyond its neighbors, "
                      f"routed through relays (default {DEMO_FAR_RATE}; at most --neighbor-rate)")
    demo.add_argument("--ping-rate", type=float, default=20.0,
                      help="test pings per second into each router's sharp (default 20)")
    demo.set_defaults(func=cmd_demo)
