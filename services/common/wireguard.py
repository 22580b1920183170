"""WireGuard interfaces through `ip` and `wg`: kernel WireGuard when the
module exists, else wireguard-go. Shared by link (a tunnel per neighbor) and
exit (tunnels between clients and exits).

wireguard-go's control socket, /var/run/wireguard/<ifname>.sock, is shared by
every namespace of the machine, so callers derive interface names from keys
that no other router holds.
"""

from __future__ import annotations

import logging
import shutil
import subprocess
from pathlib import Path

from dataplane.counters import count_new_interfaces
from dataplane.shim import Nft
from services.common.logs import kv

PROBE_INTERFACE = "mwprobe0"
# What WireGuard adds to each packet it carries over IPv6: the outer IPv6 (40)
# and UDP (8) headers, and its own header and authentication tag (32).
OVERHEAD = 80
# A link's tunnel keeps WireGuard's default MTU, right for a 1500-byte link.
LINK_MTU = 1420
# A tunnel that rides inside the mesh's link tunnels (a client's to its exit)
# must leave room for their overhead: a bigger packet would leave its sender
# in two IPv6 fragments, twice the packets for the same bytes.
NESTED_MTU = LINK_MTU - OVERHEAD


class WireGuardError(RuntimeError):
    """A WireGuard interface could not be made or changed; the message has the tool's words."""


def run(argv: list[str], stdin: str | None = None) -> str:
    done = subprocess.run(argv, input=stdin, capture_output=True, text=True, timeout=30)
    if done.returncode != 0:
        raise WireGuardError(f"{' '.join(argv)}: {done.stderr.strip() or done.stdout.strip()}")
    return done.stdout


def kernel_has_wireguard() -> bool:
    done = subprocess.run(["ip", "link", "add", PROBE_INTERFACE, "type", "wireguard"],
                          capture_output=True, text=True)
    if done.returncode == 0:
        subprocess.run(["ip", "link", "del", PROBE_INTERFACE], capture_output=True)
        return True
    return False


class WireGuard:
    def __init__(self) -> None:
        self.kernel = kernel_has_wireguard()
        if not self.kernel and shutil.which("wireguard-go") is None:
            raise WireGuardError("no WireGuard: the kernel has no module and wireguard-go is "
                                 "missing (apt-get install wireguard-go)")
        if shutil.which("wg") is None:
            raise WireGuardError("wg not found: apt-get install wireguard-tools")

    @property
    def backend(self) -> str:
        return "kernel" if self.kernel else "wireguard-go"

    @staticmethod
    def exists(name: str) -> bool:
        return Path("/sys/class/net", name).exists()

    def create(self, name: str) -> None:
        """Make the interface (down) and have its forwarded bytes counted from
        its first packet on."""
        if self.exists(name):
            return
        if self.kernel:
            run(["ip", "link", "add", name, "type", "wireguard"])
        else:
            run(["wireguard-go", name])
        try:
            with Nft() as nft:
                count_new_interfaces(nft)
        except OSError as error:  # the meter's next sample attaches it
            logging.getLogger(__name__).warning(
                kv("tunnel.uncounted", tunnel=name, error=str(error)))

    @staticmethod
    def remove(name: str) -> None:
        subprocess.run(["ip", "link", "del", name], capture_output=True)
        Path(f"/var/run/wireguard/{name}.sock").unlink(missing_ok=True)

    @staticmethod
    def set(name: str, args: list[str], private_key_b64: str | None = None) -> None:
        """`wg set name args...`; the private key, if given, goes through stdin."""
        if private_key_b64 is None:
            run(["wg", "set", name, *args])
        else:
            run(["wg", "set", name, "private-key", "/dev/stdin", *args],
                stdin=private_key_b64 + "\n")

    @staticmethod
    def dump(name: str) -> list[list[str]] | None:
        """`wg show name dump` split into fields: the interface's line, then one
        per peer (key, psk, endpoint, allowed ips, latest handshake, rx, tx,
        keepalive); None if there is no such interface."""
        try:
            out = run(["wg", "show", name, "dump"])
        except WireGuardError:
            return None
        return [line.split("\t") for line in out.splitlines()]
