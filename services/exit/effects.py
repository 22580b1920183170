"""exit's only I/O with the kernel: its WireGuard tunnels, the NAT out of
the uplinks, and a client's default route. Each call makes the kernel match
what it is given and is safe to repeat, so a restarted service reconciles.
Blocking (subprocesses, nft): the service calls these from a thread.
"""

from __future__ import annotations

import base64
import hashlib
import logging
import socket
import struct

from dataplane.policy import check_ifnames
from dataplane.shim import Nft
from services.common.interfaces import EXIT_TUNNEL_PREFIX
from services.common.logs import kv
from services.common.wireguard import NESTED_MTU, WireGuard, run

log = logging.getLogger("exit")

NAT_TABLE = "inet mesh_nat"
# Routes this service installs (the default route through the exit).
ROUTE_PROTOCOL = "78"
KEEPALIVE_SECONDS = 1
ICMPV6_ECHO_REQUEST = 128


def exit_interface(own_wireguard_key: bytes) -> str:
    """The exit's one tunnel interface, shared by its clients."""
    return EXIT_TUNNEL_PREFIX + "e" + hashlib.sha256(own_wireguard_key).hexdigest()[:8]


def client_interface(own_wireguard_key: bytes, exit_wireguard_key: bytes) -> str:
    digest = hashlib.sha256(own_wireguard_key + exit_wireguard_key).hexdigest()
    return EXIT_TUNNEL_PREFIX + digest[:8]


def probe(address: str, interface: str, sequence: int) -> None:
    """An ICMPv6 echo request to the exit's own tunnel address, through the
    tunnel. WireGuard's keepalives stop while we keep sending (a client the
    exit has cut off hears nothing back), but the exit answers this even
    then: the answer comes from the exit itself, not forwarded. WireGuard
    counts the answer; nothing here reads it."""
    with socket.socket(socket.AF_INET6, socket.SOCK_RAW, socket.IPPROTO_ICMPV6) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, interface.encode())
        # The kernel fills in an ICMPv6 checksum (RFC 3542).
        sock.sendto(struct.pack("!BBHHH", ICMPV6_ECHO_REQUEST, 0, 0, 0x6d78, sequence & 0xFFFF),
                    (address, 0))


def b64(key: bytes) -> str:
    return base64.b64encode(key).decode()


def install_nat(uplinks: tuple[str, ...]) -> None:
    """What an exit's clients send out of an uplink leaves with the uplink's
    address (replies come back through conntrack, which the forwarding
    policy lets in)."""
    names = ", ".join(f'"{n}"' for n in check_ifnames(uplinks))
    Nft().run(
        f"table {NAT_TABLE} {{}}\n"
        f"delete table {NAT_TABLE}\n"
        f"table {NAT_TABLE} {{\n"
        "\tchain postrouting {\n"
        "\t\ttype nat hook postrouting priority srcnat; policy accept;\n"
        f"\t\toifname {{ {names} }} masquerade\n"
        "\t}\n"
        "}\n")
    log.info(kv("nat.installed", uplinks=",".join(uplinks)))


BLOCK_TABLE = "inet mesh_exit"


def render_enforcement(throttle_bytes_per_second: int) -> str:
    """The exit's enforcement, made afresh (the service fills the sets from
    its projection): nothing its clients in set `blocked` send is forwarded,
    nor anything sent to them; those in `throttled` get throttle_bytes_per_second
    each way, each client on its own. Both still reach the exit itself (their
    balance proofs), so paying lets them back."""
    rates = "".join(
        f"\tset {name} {{\n\t\ttype ipv6_addr\n\t\tsize 65535\n"
        "\t\tflags dynamic,timeout\n\t\ttimeout 1m\n\t}\n" for name in ("up_rates", "down_rates"))
    limit = f"limit rate over {throttle_bytes_per_second} bytes/second"
    return (
        f"table {BLOCK_TABLE} {{}}\n"
        f"delete table {BLOCK_TABLE}\n"
        f"table {BLOCK_TABLE} {{\n"
        "\tset blocked {\n\t\ttype ipv6_addr\n\t}\n"
        "\tset throttled {\n\t\ttype ipv6_addr\n\t}\n"
        f"{rates}"
        "\tchain forward {\n"
        "\t\ttype filter hook forward priority filter - 5; policy accept;\n"
        "\t\tip6 saddr @blocked drop\n"
        "\t\tip6 daddr @blocked drop\n"
        f"\t\tip6 saddr @throttled update @up_rates {{ ip6 saddr {limit} }} drop\n"
        f"\t\tip6 daddr @throttled update @down_rates {{ ip6 daddr {limit} }} drop\n"
        "\t}\n"
        "}\n")


def install_enforcement(throttle_bytes_per_second: int) -> None:
    Nft().run(render_enforcement(throttle_bytes_per_second))


def set_access(blocked: list[str], throttled: list[str]) -> None:
    """Make the sets exactly these client addresses (CIDR /128s)."""
    script = ""
    for name, addresses in (("blocked", blocked), ("throttled", throttled)):
        hosts = ", ".join(a.split("/")[0] for a in addresses)
        script += f"flush set {BLOCK_TABLE} {name}\n"
        script += f"add element {BLOCK_TABLE} {name} {{ {hosts} }}\n" if hosts else ""
    Nft().run(script)


class ExitTunnels:
    def __init__(self, private_key_b64: str) -> None:
        self.private_key_b64 = private_key_b64
        self.wireguard = WireGuard()

    def ensure_exit(self, name: str, port: int, address: str) -> None:
        """The exit's interface: listening on port, with address (its pool)."""
        self.wireguard.create(name)
        self.wireguard.set(name, ["listen-port", str(port)], self.private_key_b64)
        run(["ip", "-6", "addr", "replace", address, "dev", name])
        run(["ip", "link", "set", name, "mtu", str(NESTED_MTU), "up"])

    def ensure_client_peer(self, name: str, peer_key: bytes, addresses: list[str]) -> None:
        """A client on the exit's tunnel. No keepalives from this end: the
        client's keep its path open, and it probes when it wants an answer."""
        self.wireguard.set(name, ["peer", b64(peer_key), "allowed-ips", ",".join(addresses)])

    def ensure_client(self, name: str, exit_key: bytes, endpoint: str,
                      addresses: list[str]) -> None:
        """A client's tunnel to its exit, and the default route through it
        (the mesh's own routes are more specific, so they stay)."""
        self.wireguard.create(name)
        dump = self.wireguard.dump(name) or []
        for peer in dump[1:]:
            if peer[0] != b64(exit_key):
                self.wireguard.set(name, ["peer", peer[0], "remove"])
        self.wireguard.set(name, ["peer", b64(exit_key), "endpoint", endpoint,
                                  "allowed-ips", "::/0",
                                  "persistent-keepalive", str(KEEPALIVE_SECONDS)],
                           self.private_key_b64)
        for address in addresses:
            run(["ip", "-6", "addr", "replace", address, "dev", name])
        run(["ip", "link", "set", name, "mtu", str(NESTED_MTU), "up"])
        source = addresses[0].split("/")[0]
        run(["ip", "-6", "route", "replace", "default", "dev", name, "proto", ROUTE_PROTOCOL,
             "src", source])

    def remove(self, name: str) -> None:
        """The tunnel and, with it, the default route through it."""
        self.wireguard.remove(name)

    def received(self, name: str) -> tuple[int, int] | None:
        """(bytes received, bytes sent) on the tunnel, or None if it is gone."""
        dump = self.wireguard.dump(name)
        if dump is None:
            return None
        return sum(int(p[5]) for p in dump[1:]), sum(int(p[6]) for p in dump[1:])

    def peer_transfer(self, name: str) -> dict[str, tuple[int, int, int]]:
        """Per peer key (base64): (latest handshake, bytes received, bytes sent)."""
        dump = self.wireguard.dump(name) or []
        return {p[0]: (int(p[4]), int(p[5]), int(p[6])) for p in dump[1:]}
