"""WireGuard tunnels, one per neighbor: the only module of link that touches
them (through services.common.wireguard). Names are derived from both ends'
keys, so they never collide on wireguard-go's machine-wide sockets. A
reconciler: it compares the tunnels the projection wants with those that
exist, and changes only the difference, so a restarted link service leaves
healthy tunnels alone.
"""

from __future__ import annotations

import base64
import hashlib
import ipaddress
import logging
from dataclasses import dataclass
from pathlib import Path

from services.common.interfaces import TUNNEL_PREFIX
from services.common.logs import kv
from services.common.wireguard import PROBE_INTERFACE, WireGuard, WireGuardError, run

log = logging.getLogger("link")

KEEPALIVE_SECONDS = 1



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


class Tunnels:
    def __init__(self, private_key_b64: str) -> None:
        self.private_key_b64 = private_key_b64
        self.wireguard = WireGuard()

    @property
    def backend(self) -> str:
        return self.wireguard.backend

    def existing(self) -> set[str]:
        return {p.name for p in Path("/sys/class/net").iterdir()
                if p.name.startswith(TUNNEL_PREFIX) and p.name != PROBE_INTERFACE}

    def configured(self, name: str) -> tuple[int, str, str] | None:
        """(listen port, peer key, endpoint) as the tunnel has them, or None."""
        dump = self.wireguard.dump(name)
        if dump is None or len(dump) < 2:
            return None
        return int(dump[0][2]), dump[1][0], dump[1][2]

    def ensure(self, spec: TunnelSpec) -> bool:
        """Make the tunnel match spec; True if anything had to change."""
        peer_b64 = base64.b64encode(spec.peer_key).decode()
        current = self.configured(spec.name)
        if current is not None and current[:2] == (spec.listen_port, peer_b64):
            return False
        self.wireguard.create(spec.name)
        if current is not None:
            # A changed peer key replaces the peer (the port may have changed too).
            self.wireguard.set(spec.name, ["peer", current[1], "remove"])
        self.wireguard.set(spec.name, [
            "listen-port", str(spec.listen_port), "peer", peer_b64, "endpoint", spec.endpoint,
            "allowed-ips", "::/0,0.0.0.0/0", "persistent-keepalive", str(KEEPALIVE_SECONDS)],
            self.private_key_b64)
        run(["ip", "-6", "addr", "replace", f"{spec.local_address}/64", "dev", spec.name])
        run(["ip", "link", "set", spec.name, "up"])
        log.info(kv("tunnel.configured", tunnel=spec.name, port=spec.listen_port,
                    endpoint=spec.endpoint, backend=self.backend))
        return True

    def remove(self, name: str) -> None:
        self.wireguard.remove(name)
        log.info(kv("tunnel.removed", tunnel=name))

    def received_bytes(self) -> dict[str, int]:
        """Bytes received per tunnel: keepalives make it grow while the peer lives."""
        try:
            out = run(["wg", "show", "all", "transfer"])
        except WireGuardError:
            return {}
        totals: dict[str, int] = {}
        for line in out.splitlines():
            parts = line.split("\t")
            if len(parts) == 4:
                totals[parts[0]] = totals.get(parts[0], 0) + int(parts[2])
        return totals
