"""The emulated mesh: the fabric of namespaces plus a full router in each.

For every node of a topology whose role runs a router (router, gateway,
exit), this writes a node directory, starts that router's own supervisord
inside its namespace (which starts its nats-server and services), and waits
until every service answers SERVING on its inspection socket. `internet`
nodes are plain hosts. Tear-down stops each supervisord (services flush their
projections on SIGTERM), then removes the namespaces; a crashed earlier run is
cleaned up the same way from what it left on disk.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from deploy.meshctl import client
from deploy.node import NodeLayout, init_node, run_supervisorctl
from services.common.identity import Identity

from .chain import MeshChain, stop_stale
from .fabric import Fabric, cleanup_stale
from .preflight import preflight
from .topology import Topology

EMU_ROOT = Path(os.environ.get("MESH_EMU_ROOT", "/var/lib/mesh-emu"))
ROUTER_ROLES = ("router", "gateway", "exit")
DEFAULT_SERVICES = ("discovery", "link", "meter", "pay", "route", "verify", "sharp")

Progress = Callable[[str], None]


TOPOLOGY_FILE = "topology.json"


def topology_dict(topology: Topology) -> dict[str, object]:
    """The topology in the shape of its file, for Topology.from_dict."""
    nodes = []
    for spec in topology.nodes:
        node: dict[str, object] = {"name": spec.name, "role": spec.role}
        if spec.services is not None:
            node["services"] = list(spec.services)
        if spec.config:
            node["config"] = {k: dict(v) for k, v in spec.config.items()}
        nodes.append(node)
    links = []
    for link in topology.links:
        entry: dict[str, object] = {"a": link.a, "b": link.b, "loss": link.loss}
        if link.rate is not None:
            entry["rate"] = link.rate
        links.append(entry)
    return {"name": topology.name, "node": nodes, "link": links}


def running_topology(prefix: str, root: Path = EMU_ROOT) -> Topology:
    """The topology of the mesh started with this prefix; MeshError if there is none."""
    path = root / prefix / TOPOLOGY_FILE
    if not path.exists():
        raise MeshError(f"no emulated mesh {prefix!r} is up (no {path})")
    return Topology.from_dict(json.loads(path.read_text()), source=str(path))


class MeshError(RuntimeError):
    """The emulated mesh could not be brought up or down; the message says why."""


def _quiet(_line: str) -> None:
    return None


def supervisorctl(layout: NodeLayout, *argv: str, check: bool = False) -> str:
    done = run_supervisorctl(layout, *argv)
    if check and done.returncode != 0:
        raise MeshError(f"supervisorctl {' '.join(argv)}: {done.stdout}{done.stderr}".strip())
    return done.stdout


def program_states(layout: NodeLayout) -> dict[str, str]:
    """supervisord's view: program name -> RUNNING, STARTING, BACKOFF, ..."""
    states = {}
    for line in supervisorctl(layout, "status").splitlines():
        parts = line.split()
        if len(parts) >= 2:
            states[parts[0]] = parts[1]
    return states


def service_pid(layout: NodeLayout, program: str) -> int:
    out = supervisorctl(layout, "pid", program).strip()
    if not out.isdigit() or out == "0":
        raise MeshError(f"{program} has no pid under {layout.supervisor_file}: {out!r}")
    return int(out)


@dataclass
class RouterNode:
    name: str
    namespace: str
    layout: NodeLayout
    services: tuple[str, ...]
    # This router's own node-file sections, over the mesh-wide ones.
    config: Mapping[str, Mapping[str, object]] = field(default_factory=dict)

    def unhealthy(self) -> list[str]:
        """What keeps this router from being healthy (empty when it is)."""
        problems = []
        states = program_states(self.layout)
        for program in ("nats-server", *self.services):
            if states.get(program) != "RUNNING":
                problems.append(f"{program} {states.get(program, 'absent').lower()}")
        for service in self.services:
            answer = client.health(self.layout.socket(service))
            if answer != "SERVING":
                problems.append(f"{service} {answer.lower()}")
        return problems


class EmulatedMesh:
    def __init__(
        self,
        topology: Topology,
        prefix: str = "mesh",
        root: Path | None = None,
        services: Sequence[str] = DEFAULT_SERVICES,
        log_level: str = "info",
        sections: Mapping[str, Mapping[str, object]] | None = None,
    ) -> None:
        self.topology = topology
        self.sections = sections or {}
        self.prefix = prefix
        self.workdir = (root or EMU_ROOT) / prefix
        self.fabric = Fabric(prefix)
        self.log_level = log_level
        self.routers: dict[str, RouterNode] = {}
        self.chain: MeshChain | None = None
        for spec in topology.nodes:
            if spec.role in ROUTER_ROLES:
                chosen = tuple(spec.services if spec.services is not None else services)
                # Exits and routers told to use exits run exit where
                # routes are made (exits are reached by route).
                if "route" in chosen and "exit" not in chosen and (
                        spec.role == "exit" or "exit" in spec.config):
                    chosen += ("exit",)
                self.routers[spec.name] = RouterNode(
                    name=spec.name,
                    namespace=f"{prefix}-{spec.name}",
                    layout=NodeLayout(self.workdir / spec.name),
                    services=chosen,
                    config=spec.config,
                )

    def start(self, progress: Progress = _quiet, timeout: float = 120.0) -> None:
        """Bring the whole mesh up and wait until every router is healthy."""
        preflight()
        self.check_services()
        removed = clean(self.prefix, self.workdir.parent)
        if removed:
            progress(f"cleaned up {len(removed)} namespaces left by an earlier run")
        # A new mesh starts from nothing: an earlier run's logs, keys and
        # projections would describe neighbors that no longer exist.
        shutil.rmtree(self.workdir, ignore_errors=True)
        self.workdir.mkdir(parents=True)
        # Later commands (meshctl emu status, down) find the mesh from this file.
        (self.workdir / TOPOLOGY_FILE).write_text(json.dumps(topology_dict(self.topology)))
        started = time.monotonic()
        self.fabric.create(self.topology)
        progress(
            f"namespaces: {len(self.topology.nodes)} nodes, {len(self.topology.links)} links "
            f"({time.monotonic() - started:.1f}s)"
        )
        sections = dict(self.sections)
        internet = {n.name for n in self.topology.nodes if n.role == "internet"}
        if any("pay" in router.services for router in self.routers.values()):
            # The chain is a node on the internet, as a public chain's would be.
            home = min(internet, default=None)
            self.chain = MeshChain(self.workdir, self.prefix,
                                   self.fabric.netns(home) if home is not None else None)
            sections["pay"] = {"chain_url": self.chain.url,
                               "contract": self.chain.contract, **sections.get("pay", {})}
            progress(f"chain: anvil{f' on {home}' if home is not None else ''}, "
                     f"channel contract at {self.chain.contract}")
        for router in self.routers.values():
            facing = [link.a_ifname for link in self.fabric.links if link.a == router.name]
            facing += [link.b_ifname for link in self.fabric.links if link.b == router.name]
            uplinks = [link.a_ifname if link.a == router.name else link.b_ifname
                       for link in self.fabric.uplinks(router.name, internet)]
            own = {name: {**sections.get(name, {}), **router.config.get(name, {})}
                   for name in set(sections) | set(router.config)}
            if "exit" in router.services:
                own["exit"] = self.exit_section(router.name, own.get("exit", {}))
            own["discovery"] = self.discovery_section(router.name, own.get("discovery", {}),
                                                      internet)
            init_node(
                router.layout.root,
                router.name,
                services=router.services,
                netns=router.namespace,
                log_level=self.log_level,
                interfaces=sorted(set(facing) - set(uplinks)),
                uplinks=uplinks,
                sections=own,
            )
            if self.chain is not None:
                keys = Identity.load_or_create(router.layout.data_dir / "keys")
                self.chain.fund(keys.chain_address)
            self.fabric.run(
                router.name,
                [
                    str(Path(sys.executable).parent / "supervisord"),
                    "-c",
                    str(router.layout.supervisor_file),
                ],
            )
        progress(f"supervisord started on {len(self.routers)} routers")
        self.wait_healthy(progress, timeout)
        progress(f"all {len(self.routers)} routers healthy ({time.monotonic() - started:.1f}s)")

    def exit_address(self, name: str) -> str:
        """How routers name an exit in [exit]: NAME=[ADDRESS] (the default port)."""
        return f"{name}=[{self.fabric.nodes[name].ipv6}]"

    def role(self, node: str) -> str:
        return next(n.role for n in self.topology.nodes if n.name == node)

    def discovery_section(self, router: str, given: Mapping[str, object],
                          internet: set[str]) -> dict[str, object]:
        """A gateway links to every exit over the internet, at the exit's
        uplink address (its own address is the one the mesh routes to it);
        an exit links back to whichever gateway helloes it."""
        section = dict(given)
        role = self.role(router)
        if role == "gateway":
            section.setdefault("internet_peers", [
                link.a_ipv6 if link.a == name else link.b_ipv6
                for name in sorted(n.name for n in self.topology.nodes if n.role == "exit")
                for link in self.fabric.uplinks(name, internet)])
        if role == "exit":
            section.setdefault("answer_internet_peers", True)
        return section

    def exit_section(self, router: str, given: Mapping[str, object]) -> dict[str, object]:
        """[exit] by role: an exit serves; a client's `exits` may name exits
        of the topology by node name."""
        section = dict(given)
        exits = [n.name for n in self.topology.nodes if n.role == "exit"]
        if self.role(router) == "exit":
            section.setdefault("serve", True)
        listed = section.get("exits", [])
        if isinstance(listed, list):
            section["exits"] = [self.exit_address(e) if e in exits else e for e in listed]
        return section

    def check_services(self) -> None:
        repo = Path(__file__).resolve().parents[2]
        for router in self.routers.values():
            for service in router.services:
                if not (repo / "services" / service / "__main__.py").exists():
                    raise MeshError(f"router {router.name}: no service named {service!r}")

    def wait_healthy(self, progress: Progress = _quiet, timeout: float = 120.0) -> None:
        deadline = time.monotonic() + timeout
        reported: dict[str, int] = {}
        while True:
            waiting = {name: r.unhealthy() for name, r in self.routers.items()}
            waiting = {name: problems for name, problems in waiting.items() if problems}
            if not waiting:
                return
            healthy = len(self.routers) - len(waiting)
            if reported.get("healthy") != healthy:
                reported["healthy"] = healthy
                progress(f"healthy: {healthy}/{len(self.routers)} routers")
            if time.monotonic() > deadline:
                detail = "; ".join(f"{n}: {', '.join(p)}" for n, p in sorted(waiting.items()))
                raise MeshError(f"not healthy after {timeout:.0f}s: {detail}")
            time.sleep(0.2)

    def stop(self, progress: Progress = _quiet, keep_files: bool = True) -> None:
        """Stop every router (services flush their projections), then the fabric."""
        stop_supervisords([router.layout for router in self.routers.values()])
        progress("routers stopped")
        if self.chain is not None:
            self.chain.stop()
            progress("chain stopped")
        self.fabric.destroy()
        progress("namespaces removed")
        if not keep_files:
            shutil.rmtree(self.workdir, ignore_errors=True)

    @contextlib.contextmanager
    def running(
        self, progress: Progress = _quiet, timeout: float = 120.0
    ) -> Iterator[EmulatedMesh]:
        try:
            self.start(progress, timeout)
            yield self
        finally:
            self.stop(progress)


def stop_supervisords(layouts: Sequence[NodeLayout], timeout: float = 30.0) -> None:
    """Stop several routers at once: SIGTERM to each supervisord, which stops its
    services cleanly (they flush their projections); SIGKILL what outlives timeout."""
    pids = []
    for layout in layouts:
        try:
            pid = int(layout.supervisor_pidfile.read_text().strip())
        except (OSError, ValueError):
            continue
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
            pids.append(pid)
    deadline = time.monotonic() + timeout
    while any(_alive(pid) for pid in pids):
        if time.monotonic() > deadline:
            for pid in pids:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            break
        time.sleep(0.05)


def stop_supervisord(layout: NodeLayout, timeout: float = 30.0) -> None:
    stop_supervisords([layout], timeout)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie child (when we started it ourselves) counts as gone.
    with contextlib.suppress(OSError):
        if Path(f"/proc/{pid}/stat").read_text().split(") ", 1)[1].startswith("Z"):
            return False
    return True


def clean(prefix: str, root: Path = EMU_ROOT) -> list[str]:
    """Remove whatever an earlier run with this prefix left: routers, then namespaces."""
    workdir = root / prefix
    if workdir.is_dir():
        layouts = [NodeLayout(d) for d in sorted(workdir.iterdir()) if d.is_dir()]
        stop_supervisords([lay for lay in layouts if lay.supervisor_file.exists()], timeout=10.0)
        stop_stale(workdir)
    return cleanup_stale(prefix)
