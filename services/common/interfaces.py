"""Which interfaces are a router's physical links (the ones facing neighbors).

Read from /proc rather than netlink: services call this from inside their
asyncio loop, where pyroute2's synchronous IPRoute cannot run."""

from __future__ import annotations

import ipaddress
import socket
from dataclasses import dataclass
from pathlib import Path

TUNNEL_PREFIX = "mw"
# Tunnels between clients and exits (services/exit): not links to neighbors.
EXIT_TUNNEL_PREFIX = "mx"
IF_INET6 = Path("/proc/net/if_inet6")


@dataclass(frozen=True)
class Interface:
    name: str
    index: int


def _with_link_local() -> set[str]:
    names = set()
    for line in IF_INET6.read_text().splitlines():
        fields = line.split()
        if len(fields) == 6 and fields[0].startswith("fe80"):
            names.add(fields[5])
    return names


def physical_interfaces(
    configured: tuple[str, ...], uplinks: tuple[str, ...] = ()
) -> list[Interface]:
    """The configured interfaces, or every one with an IPv6 link-local address
    except loopback, tunnels and uplinks; missing configured ones are skipped."""
    links = {name: index for index, name in socket.if_nameindex()}
    if configured:
        return [Interface(n, links[n]) for n in configured if n in links and n not in uplinks]
    return sorted(
        (Interface(name, links[name]) for name in _with_link_local() & set(links)
         if name != "lo" and name not in uplinks
         and not name.startswith((TUNNEL_PREFIX, EXIT_TUNNEL_PREFIX))),
        key=lambda i: i.name,
    )


def link_local_address(name: str) -> str:
    """The interface's IPv6 link-local address, or "" while it has none."""
    for line in IF_INET6.read_text().splitlines():
        fields = line.split()
        if len(fields) == 6 and fields[5] == name and fields[0].startswith("fe80"):
            return str(ipaddress.IPv6Address(bytes.fromhex(fields[0])))
    return ""
