"""WireGuard tunnels, one per neighbor: the only module that touches them.

Kernel WireGuard when the module exists, else wireguard-go (whose control
socket, /var/run/wireguard/<ifname>.sock, is shared by every namespace of the
machine: names are derived from both ends' keys so they never collide). Both
are configured with `wg`. A reconciler: it compares the tunnels the projection
wants with those that exist, and changes only the difference, so a restarted
link service leaves healthy tunnels alone.
"""

from __future__ import annotations

import base64
import hashlib
import ipaddress
import logging
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from services.common.interfaces import TUNNEL_PREFIX
from services.common.logs import kv

log = logging.getLogger("link")

KEEPALIVE_SECONDS = 1


class TunnelError(RuntimeError):
    """A tunnel could not be made or changed; the message has the tool's words."""


def tunnel_name(own_key: bytes, peer_key: bytes) -> str:
    return TUNNEL_PREFIX + hashlib.sha256(own_key + peer_key).hexdigest()[:8]


def link_local_for(identity_key: bytes) -> str:
    """A tunnel's fe80:: address, derived from the identity that owns it."""
    suffix = hashlib.sha256(b"mesh-tunnel-address" + identity_key).digest()[:8]
    return str(ipaddress.IPv6Address(b"\xfe\x80" + b"\x00" * 6 + suffix))


@dataclass(frozen=True)
class TunnelSpec:
    name: str
    listen_port: int
    peer_key: bytes  # WireGuard public key
    endpoint: str  # "[fe80::1%v-r2]:20001"
    local_address: str


def _run(argv: list[str], stdin: str | None = None) -> str:
    done = subprocess.run(argv, input=stdin, capture_output=True, text=True, timeout=30)
    if done.returncode != 0:
        raise TunnelError(f"{' '.join(argv)}: {done.stderr.strip() or done.stdout.strip()}")
    return done.stdout


def kernel_has_wireguard() -> bool:
    probe = "mwprobe0"
    done = subprocess.run(["ip", "link", "add", probe, "type", "wireguard"],
                          capture_output=True, text=True)
    if done.returncode == 0:
        subprocess.run(["ip", "link", "del", probe], capture_output=True)
        return True
    return False


class Tunnels:
    def __init__(self, private_key_b64: str) -> None:
        self.private_key_b64 = private_key_b64
        self.kernel = kernel_has_wireguard()
        if not self.kernel and shutil.which("wireguard-go") is None:
            raise TunnelError("no WireGuard: the kernel has no module and wireguard-go is "
                              "missing (apt-get install wireguard-go)")
        if shutil.which("wg") is None:
            raise TunnelError("wg not found: apt-get install wireguard-tools")

    @property
    def backend(self) -> str:
        return "kernel" if self.kernel else "wireguard-go"

    def existing(self) -> set[str]:
        return {p.name for p in Path("/sys/class/net").iterdir()
                if p.name.startswith(TUNNEL_PREFIX) and p.name != "mwprobe0"}

    def configured(self, name: str) -> tuple[int, str, str] | None:
        """(listen port, peer key, endpoint) as the tunnel has them, or None."""
        try:
            dump = _run(["wg", "show", name, "dump"]).splitlines()
        except TunnelError:
            return None
        if len(dump) < 2:
            return None
        listen_port = int(dump[0].split("\t")[2])
        peer = dump[1].split("\t")
        return listen_port, peer[0], peer[2]

    def ensure(self, spec: TunnelSpec) -> bool:
        """Make the tunnel match spec; True if anything had to change."""
        peer_b64 = base64.b64encode(spec.peer_key).decode()
        current = self.configured(spec.name)
        if current is not None and current[:2] == (spec.listen_port, peer_b64):
            return False
        if spec.name not in self.existing():
            if self.kernel:
                _run(["ip", "link", "add", spec.name, "type", "wireguard"])
            else:
                _run(["wireguard-go", spec.name])
        if current is not None:
            # A changed peer key replaces the peer (the port may have changed too).
            _run(["wg", "set", spec.name, "peer", current[1], "remove"])
        _run(["wg", "set", spec.name, "private-key", "/dev/stdin", "listen-port",
              str(spec.listen_port), "peer", peer_b64, "endpoint", spec.endpoint,
              "allowed-ips", "::/0,0.0.0.0/0", "persistent-keepalive", str(KEEPALIVE_SECONDS)],
             stdin=self.private_key_b64 + "\n")
        _run(["ip", "-6", "addr", "replace", f"{spec.local_address}/64", "dev", spec.name])
        _run(["ip", "link", "set", spec.name, "up"])
        log.info(kv("tunnel.configured", tunnel=spec.name, port=spec.listen_port,
                    endpoint=spec.endpoint, backend=self.backend))
        return True

    def remove(self, name: str) -> None:
        subprocess.run(["ip", "link", "del", name], capture_output=True)
        Path(f"/var/run/wireguard/{name}.sock").unlink(missing_ok=True)
        log.info(kv("tunnel.removed", tunnel=name))

    def received_bytes(self) -> dict[str, int]:
        """Bytes received per tunnel: keepalives make it grow while the peer lives."""
        try:
            out = _run(["wg", "show", "all", "transfer"])
        except TunnelError:
            return {}
        totals: dict[str, int] = {}
        for line in out.splitlines():
            parts = line.split("\t")
            if len(parts) == 4:
                totals[parts[0]] = totals.get(parts[0], 0) + int(parts[2])
        return totals
