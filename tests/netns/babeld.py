"""Interop tests' tools in a node of an emulated fabric: a stock babeld
(Debian's 1.12.1) with its own config, pidfile, state file and local socket,
read through that socket; and a tshark capture of Babel packets, decoded
afterwards. Both run in the node's namespace and are stopped by their pid."""

from __future__ import annotations

import contextlib
import ipaddress
import re
import signal
import socket
import subprocess
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from deploy.emulator.fabric import Fabric

_STOP_GRACE = 5.0
# "add neighbour 55d0 address fe80::1 if v-r1 reach ffff ureach 0000 rxcost 96 txcost 96 ..."
_NEIGHBOUR = re.compile(r"add neighbour \S+ address (\S+) if (\S+) (.*)")
# babeld 1.12's unconditional messages about what it received (message.c).
_COMPLAINT = re.compile(r"Received |Couldn't parse|Overlong")


@dataclass(frozen=True)
class BabeldNeighbour:
    address: str
    interface: str
    reach: int  # bit 15 is the latest Hello
    rxcost: int
    txcost: int
    cost: int


def host_router_id(fabric: Fabric, node: str) -> str:
    """An explicit router-id (FACTS: never let babeld derive one on veth),
    unique per node of the fabric: the node's IPv4 host number in it."""
    host = int(fabric.nodes[node].ipv4.rsplit(".", 1)[1])
    return f"02:00:00:ff:fe:00:00:{host:02x}"


def address_router_id(fabric: Fabric, node: str) -> str:
    """The interface id of the node's IPv6 address as its router-id: babeld
    then names the source of that route with the Update's router-id flag
    (0x40) rather than a Router-Id TLV. Unique only for one node of a
    fabric: every node's address ends in ::1."""
    low = ipaddress.IPv6Address(fabric.nodes[node].ipv6).packed[8:]
    return ":".join(f"{byte:02x}" for byte in low)


class Babeld:
    """One babeld on `interfaces` of `node`, `type wired` as FACTS asks,
    redistributing exactly the node's own loopback addresses."""

    def __init__(self, fabric: Fabric, node: str, interfaces: Sequence[str], workdir: Path,
                 hello_interval: float = 1.0, extra: Sequence[str] = (),
                 router_id: Callable[[Fabric, str], str] = host_router_id) -> None:
        self.fabric = fabric
        # Called at start: a fabric knows its addresses once it is created.
        self._router_id = router_id
        self.extra = tuple(extra)  # more global statements for its config
        self.node = node
        self.interfaces = tuple(interfaces)
        self.hello_interval = hello_interval
        workdir.mkdir(parents=True, exist_ok=True)
        self.config_file = workdir / f"{node}.conf"
        self.log_file = workdir / f"{node}.log"
        self.pid_file = workdir / f"{node}.pid"
        self.state_file = workdir / f"{node}.state"
        # A short path: a unix socket's name must fit 108 bytes.
        self.socket_path = workdir / f"{node}.sock"
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def router_id(self) -> str:
        return self._router_id(self.fabric, self.node)

    def config(self) -> str:
        info = self.fabric.nodes[self.node]
        lines = [f"router-id {self.router_id}",
                 f"local-path {self.socket_path}", *self.extra]
        lines += [f"interface {name} type wired hello-interval {self.hello_interval:g}"
                  for name in self.interfaces]
        lines += [f"redistribute local ip {info.ipv6}/128 allow",
                  f"redistribute local ip {info.ipv4}/32 allow",
                  # Not the veths' addresses: only what a router announces as its own.
                  "redistribute local deny"]
        return "\n".join(lines) + "\n"

    def start(self) -> None:
        self.config_file.write_text(self.config())
        self.state_file.unlink(missing_ok=True)
        argv = ["babeld", "-c", str(self.config_file), "-I", str(self.pid_file),
                "-S", str(self.state_file)]
        with self.log_file.open("ab") as log:
            # `ip netns exec` execs babeld: the child's pid is babeld's.
            self.process = subprocess.Popen(self.fabric.exec_argv(self.node, argv),
                                            stdout=log, stderr=subprocess.STDOUT)

    def stop(self) -> None:
        """SIGTERM (babeld retracts its routes and restores its sysctls), then
        SIGKILL if it lingers. Idempotent."""
        process, self.process = self.process, None
        _stop(process, signal.SIGTERM)

    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def log(self) -> str:
        try:
            return self.log_file.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def complaints(self) -> list[str]:
        """What babeld found wrong in packets it received: it logs malformed,
        truncated and unparsable ones whatever its debug level."""
        return [line for line in self.log().splitlines() if _COMPLAINT.match(line)]

    # -- its state, through the local configuration socket -------------------------

    def dump(self) -> str:
        """babeld's `dump`: its interfaces, neighbours, xroutes and routes;
        "" while its socket is not up yet."""
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
                conn.settimeout(5.0)
                conn.connect(str(self.socket_path))
                stream = conn.makefile("rw")
                _until_ok(stream)  # the banner
                stream.write("dump\n")
                stream.flush()
                return "\n".join(_until_ok(stream))
        except (FileNotFoundError, ConnectionRefusedError):
            return ""

    def neighbours(self) -> list[BabeldNeighbour]:
        found = []
        for line in self.dump().splitlines():
            match = _NEIGHBOUR.fullmatch(line)
            if match is None:
                continue
            words = match.group(3).split()
            fields = dict(zip(words[::2], words[1::2], strict=False))
            found.append(BabeldNeighbour(
                address=match.group(1), interface=match.group(2),
                reach=int(fields["reach"], 16), rxcost=int(fields["rxcost"]),
                txcost=int(fields["txcost"]), cost=int(fields["cost"])))
        return found


def _until_ok(stream: Iterable[str]) -> list[str]:
    lines = []
    for raw in stream:
        line = raw.rstrip("\n")
        if line in ("ok", "no", "bad"):
            return lines
        lines.append(line)
    raise ConnectionError("babeld closed its local socket mid-answer")


@contextlib.contextmanager
def running(babelds: Sequence[Babeld]) -> Iterator[Sequence[Babeld]]:
    """Start them all; stop them all whatever happens."""
    try:
        for babeld in babelds:
            babeld.start()
        yield babelds
    finally:
        for babeld in babelds:
            babeld.stop()


class Capture:
    """tshark capturing Babel (UDP 6696), or what `capture_filter` says, on all
    of a node's interfaces (`any`) into a file."""

    def __init__(self, fabric: Fabric, node: str, workdir: Path,
                 capture_filter: str = "udp port 6696") -> None:
        self.fabric = fabric
        self.node = node
        self.capture_filter = capture_filter
        workdir.mkdir(parents=True, exist_ok=True)
        self.file = workdir / f"{node}.pcapng"
        self.log_file = workdir / f"{node}.tshark.log"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        argv = ["tshark", "-q", "-i", "any", "-f", self.capture_filter, "-w", str(self.file)]
        with self.log_file.open("wb") as log:
            self.process = subprocess.Popen(self.fabric.exec_argv(self.node, argv),
                                            stdout=log, stderr=subprocess.STDOUT)

    def capturing(self) -> bool:
        """dumpcap is up: what is sent from now on is in the file."""
        return self.log_file.exists() and "Capturing on" in self.log_file.read_text(
            errors="replace")

    def stop(self) -> None:
        """SIGINT, as at a terminal: tshark stops dumpcap, which closes the
        file. Idempotent."""
        process, self.process = self.process, None
        _stop(process, signal.SIGINT)

    def decode(self, *argv: str) -> str:
        """`tshark -r <file> argv...`, in the host: reading needs no namespace."""
        done = subprocess.run(["tshark", "-r", str(self.file), *argv], capture_output=True,
                              text=True, check=True, timeout=120)
        return done.stdout


def _stop(process: subprocess.Popen[bytes] | None, sig: signal.Signals) -> None:
    """Signal a process we started, then SIGKILL it if it lingers."""
    if process is None or process.poll() is not None:
        return
    process.send_signal(sig)
    try:
        process.wait(_STOP_GRACE)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
