"""The emulated mesh's network: one namespace per node, one veth pair per link.

Everything is named from a prefix, so several fabrics can coexist and a later
process can find and remove what a crashed one left behind:

- node n lives in namespace "<prefix>-<n>";
- in node a, the interface facing node b is "v-<b>";
- node i (1-based, file order) has 2001:db8:0:<i>::1/128 and 192.0.2.<i>/32 on lo;
- link k (1-based) is 2001:db8:ff:<k>::/64, ::1 on the a side, ::2 on the b side
  (i and k are written in hex, as IPv6 groups are).

Loss is an nftables rule where each direction arrives; rate is a tbf qdisc
on each end's egress. Both apply per direction, as on a real radio link.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shlex
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import ExitStack, contextmanager, suppress
from dataclasses import asdict, dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any

from pyroute2 import IPRoute, netns

from deploy.emulator.topology import NODE_NAME, Topology

log = logging.getLogger(__name__)

DEFAULT_STATE_DIR = Path("/run/mesh-emu")

_PREFIX = re.compile(r"[a-z][a-z0-9]*(-[a-z0-9]+)*")
_PREFIX_MAX = 32

# How long processes get to exit after SIGTERM, then after SIGKILL.
_TERM_GRACE = 3.0
_KILL_GRACE = 3.0
_POLL = 0.02
_LINK_READY_TIMEOUT = 5.0

# tbf: the queue holds this much time at the link rate before dropping.
_TBF_LATENCY = "50ms"

_SYSCTLS = (
    # First, so the veths created later start without tentative addresses.
    "net.ipv6.conf.all.accept_dad=0",
    "net.ipv6.conf.default.accept_dad=0",
    "net.ipv6.conf.all.forwarding=1",
    "net.ipv4.ip_forward=1",
)


class FabricError(RuntimeError):
    """Building, using or tearing down the fabric failed."""


@dataclass(frozen=True)
class NodeInfo:
    name: str
    netns: str
    ipv6: str  # the router's own address, a /128 on lo
    ipv4: str  # a /32 on lo


@dataclass(frozen=True)
class LinkInfo:
    a: str
    b: str
    a_ifname: str  # in a's namespace, facing b
    b_ifname: str
    a_ipv6: str  # /64
    b_ipv6: str
    loss: int
    rate_bps: int | None


def _check_prefix(prefix: str) -> None:
    if len(prefix) > _PREFIX_MAX or _PREFIX.fullmatch(prefix) is None:
        raise FabricError(
            f"bad fabric prefix {prefix!r}: want lowercase letters, digits and single "
            f"hyphens, starting with a letter, at most {_PREFIX_MAX} characters"
        )


def _ns_pattern(prefix: str) -> re.Pattern[str]:
    # Node names have no hyphen, so prefix "mesh" never matches "mesh-a-r1".
    return re.compile(re.escape(prefix) + "-" + NODE_NAME.pattern)


def _state_path(state_dir: Path, prefix: str) -> Path:
    return state_dir / f"{prefix}.json"


def _wait_until(done: Callable[[], bool], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while not done():
        if time.monotonic() >= deadline:
            return False
        time.sleep(_POLL)
    return True


def _pids_in(namespaces: Iterable[str]) -> set[int]:
    # One /proc scan for all namespaces (what `ip netns pids` does per name).
    wanted = set(namespaces)
    found = {pid for ns, pids in netns.ns_pids().items() if ns in wanted for pid in pids}
    found.discard(os.getpid())
    return found


def _destroy_namespaces(names: Iterable[str]) -> None:
    """Kill every process in the namespaces, then remove them; missing ones are fine."""
    names = sorted(set(names))
    for sig, grace in ((signal.SIGTERM, _TERM_GRACE), (signal.SIGKILL, _KILL_GRACE)):
        signalled: set[int] = set()

        def gone(sig: signal.Signals = sig, signalled: set[int] = signalled) -> bool:
            pids = _pids_in(names)
            # Signal newcomers too: a supervisor may fork replacements meanwhile.
            for pid in pids - signalled:
                with suppress(ProcessLookupError):
                    os.kill(pid, sig)
            signalled |= pids
            return not pids

        if _wait_until(gone, grace):
            break
    else:
        # Unkillable (D state): the namespace outlives its name until they exit.
        log.warning("pids %s survived SIGKILL; removing namespaces anyway", _pids_in(names))
    for ns in names:
        with suppress(FileNotFoundError):
            netns.remove(ns)


def cleanup_stale(prefix: str, state_dir: Path = DEFAULT_STATE_DIR) -> list[str]:
    """Destroy namespaces "<prefix>-<node>" left by an earlier run; return their names."""
    _check_prefix(prefix)
    pattern = _ns_pattern(prefix)
    stale = sorted(ns for ns in netns.listnetns() if pattern.fullmatch(ns))
    _destroy_namespaces(stale)
    _state_path(state_dir, prefix).unlink(missing_ok=True)
    return stale


class Fabric:
    def __init__(self, prefix: str, state_dir: Path = DEFAULT_STATE_DIR) -> None:
        _check_prefix(prefix)
        self.prefix = prefix
        self.state_path = _state_path(state_dir, prefix)
        self._nodes: dict[str, NodeInfo] = {}
        self._links: tuple[LinkInfo, ...] = ()

    # -- naming and addresses --------------------------------------------------

    def netns(self, node: str) -> str:
        if NODE_NAME.fullmatch(node) is None:
            raise FabricError(f"bad node name {node!r}")
        return f"{self.prefix}-{node}"

    @property
    def nodes(self) -> Mapping[str, NodeInfo]:
        return MappingProxyType(self._nodes)

    @property
    def links(self) -> tuple[LinkInfo, ...]:
        return self._links

    def link_address(self, node: str, peer: str) -> str:
        """The IPv6 address `node` has on its interface facing `peer`."""
        for link in self._links:
            if (link.a, link.b) == (node, peer):
                return link.a_ipv6
            if (link.b, link.a) == (node, peer):
                return link.b_ipv6
        raise FabricError(f"no link between {node!r} and {peer!r}")

    # -- running things inside nodes -------------------------------------------

    def exec_argv(self, node: str, argv: Iterable[str]) -> list[str]:
        return ["ip", "netns", "exec", self.netns(node), *argv]

    def run(
        self, node: str, argv: Iterable[str], *, check: bool = True, **kw: Any
    ) -> subprocess.CompletedProcess[str]:
        """subprocess.run inside `node`, output captured as text; `kw` goes to subprocess.run."""
        argv = list(argv)
        proc = subprocess.run(self.exec_argv(node, argv), capture_output=True, text=True, **kw)
        if check and proc.returncode != 0:
            output = proc.stderr.strip() or proc.stdout.strip()
            raise FabricError(
                f"{node}: {shlex.join(argv)} exited with {proc.returncode}"
                + (f": {output}" if output else "")
            )
        return proc

    # -- lifecycle -------------------------------------------------------------

    @contextmanager
    def up(self, topology: Topology) -> Iterator[Fabric]:
        """Create the fabric for the block and always destroy it afterwards."""
        self.create(topology)
        try:
            yield self
        finally:
            self.destroy()

    def create(self, topology: Topology) -> None:
        """Build namespaces and links; on failure, remove what was built and re-raise."""
        if self._nodes:
            raise FabricError(f"fabric {self.prefix!r} is already created")
        nodes, links = self._plan(topology)
        pattern = _ns_pattern(self.prefix)
        existing = sorted(ns for ns in netns.listnetns() if pattern.fullmatch(ns))
        if existing:
            raise FabricError(
                f"namespaces {', '.join(existing)} already exist (an earlier run?): "
                f"remove them with cleanup_stale({self.prefix!r})"
            )
        self._nodes = {n.name: n for n in nodes}
        self._links = links
        try:
            # Recorded before building, so a crash halfway still leaves a full record.
            self._write_state(topology.name)
            self._build()
            self._route_internet({n.name for n in topology.nodes if n.role == "internet"},
                                 {n.name for n in topology.nodes if n.role == "exit"})
        except BaseException:
            self.destroy()
            raise

    def destroy(self) -> None:
        """Kill processes in and remove every namespace of this fabric, even one
        recorded only in the state file by another process. Idempotent."""
        names = {n.netns for n in self._nodes.values()}
        try:
            names.update(json.loads(self.state_path.read_text())["namespaces"])
        except FileNotFoundError:
            pass
        except (ValueError, KeyError, TypeError) as e:
            log.warning("ignoring unreadable state file %s: %s", self.state_path, e)
        _destroy_namespaces(names)
        self.state_path.unlink(missing_ok=True)
        self._nodes = {}
        self._links = ()

    # -- internals -------------------------------------------------------------

    def _plan(self, topology: Topology) -> tuple[tuple[NodeInfo, ...], tuple[LinkInfo, ...]]:
        nodes = tuple(
            NodeInfo(
                name=spec.name,
                netns=self.netns(spec.name),
                ipv6=f"2001:db8:0:{i:x}::1",
                ipv4=f"192.0.2.{i}",
            )
            for i, spec in enumerate(topology.nodes, start=1)
        )
        links = tuple(
            LinkInfo(
                a=spec.a,
                b=spec.b,
                a_ifname=f"v-{spec.b}",
                b_ifname=f"v-{spec.a}",
                a_ipv6=f"2001:db8:ff:{k:x}::1",
                b_ipv6=f"2001:db8:ff:{k:x}::2",
                loss=spec.loss,
                rate_bps=spec.rate_bps,
            )
            for k, spec in enumerate(topology.links, start=1)
        )
        return nodes, links

    def _write_state(self, topology_name: str) -> None:
        state = {
            "prefix": self.prefix,
            "topology": topology_name,
            "namespaces": [n.netns for n in self._nodes.values()],
            "nodes": [asdict(n) for n in self._nodes.values()],
            "links": [asdict(link) for link in self._links],
        }
        self.state_path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.state_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(state, indent=2) + "\n")
        tmp.replace(self.state_path)

    def _build(self) -> None:
        with ExitStack() as stack:
            ipr: dict[str, IPRoute] = {}
            for node in self._nodes.values():
                netns.create(node.netns)
                self.run(node.name, ["sysctl", "-q", "-w", *_SYSCTLS])
                # flags=0: never let pyroute2 create a namespace we did not plan.
                ipr[node.name] = stack.enter_context(IPRoute(netns=node.netns, flags=0))
                self._setup_lo(ipr[node.name], node)
            for link in self._links:
                self._add_link(ipr[link.a], ipr[link.b], link)
            for node in self._nodes.values():
                self._add_loss(node.name)
            self._wait_links_ready(ipr)

    def uplinks(self, node: str, internet: set[str]) -> list[LinkInfo]:
        """node's links to internet nodes."""
        return [link for link in self._links if (link.a, link.b) in (
            *((node, i) for i in internet), *((i, node) for i in internet))]

    def _route_internet(self, internet: set[str], exits: set[str]) -> None:
        """Static routes as an ISP would have them: a node with an uplink sends
        what the mesh does not route to the internet (its default route), and
        the internet reaches an exit's own address through the exit's uplink."""
        for node in self._nodes:
            if node in internet:
                continue
            for link in self.uplinks(node, internet)[:1]:
                there = link.b_ipv6 if link.a == node else link.a_ipv6
                self.run(node, ["ip", "-6", "route", "replace", "default", "via", there])
                if node in exits:
                    here = link.a_ipv6 if link.a == node else link.b_ipv6
                    host = link.b if link.a == node else link.a
                    self.run(host, ["ip", "-6", "route", "replace",
                                    f"{self._nodes[node].ipv6}/128", "via", here])

    def _wait_links_ready(self, ipr: Mapping[str, IPRoute]) -> None:
        # The kernel's linkwatch batches carrier changes and may hold one back
        # for a second; IPv6 link-local addresses appear only after it. Return
        # a fabric that carries traffic now, not one that will in a moment.
        want = {(link.a, link.a_ifname) for link in self._links}
        want |= {(link.b, link.b_ifname) for link in self._links}

        def not_ready() -> set[tuple[str, str]]:
            ready: set[tuple[str, str]] = set()
            for node, conn in ipr.items():
                up = {
                    msg["index"]: msg.get("ifname")
                    for msg in conn.get_links()
                    if msg.get("operstate") == "UP"
                }
                for addr in conn.get_addr(family=socket.AF_INET6):
                    if addr.get("address", "").startswith("fe80:") and addr["index"] in up:
                        ready.add((node, up[addr["index"]]))
            return want - ready

        if not _wait_until(lambda: not not_ready(), _LINK_READY_TIMEOUT):
            late = ", ".join(f"{node}:{ifname}" for node, ifname in sorted(not_ready()))
            raise FabricError(
                f"interfaces not up with a link-local address after "
                f"{_LINK_READY_TIMEOUT:.0f}s: {late}"
            )

    @staticmethod
    def _setup_lo(ipr: IPRoute, node: NodeInfo) -> None:
        # No dummy link type on this kernel: the router's own address lives on lo.
        lo = ipr.link_lookup(ifname="lo")[0]
        ipr.link("set", index=lo, state="up")
        ipr.addr("add", index=lo, address=node.ipv6, prefixlen=128)
        ipr.addr("add", index=lo, address=node.ipv4, prefixlen=32)

    def _add_link(self, ipr_a: IPRoute, ipr_b: IPRoute, link: LinkInfo) -> None:
        # Created inside a's namespace with the peer placed straight into b's, so
        # the names never pass through the root namespace (where fabrics collide).
        ipr_a.link(
            "add",
            ifname=link.a_ifname,
            kind="veth",
            peer={"ifname": link.b_ifname, "net_ns_fd": self._nodes[link.b].netns},
        )
        for ipr, ifname, address in (
            (ipr_a, link.a_ifname, link.a_ipv6),
            (ipr_b, link.b_ifname, link.b_ipv6),
        ):
            index = ipr.link_lookup(ifname=ifname)[0]
            ipr.addr("add", index=index, address=address, prefixlen=64)
            ipr.link("set", index=index, state="up")
            if link.rate_bps is not None:
                rate = link.rate_bps // 8  # tbf wants bytes/s
                ipr.tc(
                    "add",
                    "tbf",
                    index,
                    rate=rate,
                    # 10 ms of traffic, but always room for a few full-size frames.
                    burst=max(rate // 100, 8 * 1024),
                    latency=_TBF_LATENCY,
                )

    def _add_loss(self, node: str) -> None:
        """Drop each link's share of what `node` receives over it.

        Dropped on arrival rather than on departure: a packet dropped in the
        sender's own output path fails its send() with EPERM, which no radio
        does. The arriving side of each direction sees the same loss rate.
        """
        lossy = [
            (ifname, link.loss)
            for link in self._links
            if link.loss
            for end, ifname in ((link.a, link.a_ifname), (link.b, link.b_ifname))
            if end == node
        ]
        if not lossy:
            return
        # Neighbor discovery is exempt, as ARP is by nature (not in the inet
        # family): lost ND turns a lossy link into seconds-long blackouts
        # instead of the per-packet loss asked for.
        rules = "\n".join(
            f'        iifname "{ifname}" numgen random mod 100 < {loss} drop'
            for ifname, loss in lossy
        )
        script = (
            "table inet meshemu {\n"
            "    chain loss {\n"
            "        type filter hook prerouting priority 0; policy accept;\n"
            "        icmpv6 type { nd-neighbor-solicit, nd-neighbor-advert } accept\n"
            f"{rules}\n"
            "    }\n"
            "}\n"
        )
        self.run(node, ["nft", "-f", "-"], input=script)
