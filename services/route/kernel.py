"""The kernel side of route: its routes, under its own protocol id, and the
addresses it originates. The only module here that talks netlink.

The protocol id keeps our routes apart from babeld's (42), static ones and
the kernel's own, so reconciling never touches a route we did not make, and a
restarted service finds the routes it installed still forwarding.
"""

from __future__ import annotations

import contextlib
import socket
from dataclasses import dataclass
from ipaddress import IPv4Network, ip_address, ip_network

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

ROUTE_PROTOCOL = 77  # "M"; unused by iproute2's rt_protos
ROUTE_METRIC = 1024


@dataclass(frozen=True)
class KernelRoute:
    prefix: str
    gateway: str  # IPv6 link-local of the next hop
    interface: str


class KernelRoutes:
    """Call it on a NetlinkThread (services/common/netlink.py), never on the
    asyncio loop."""

    def __init__(self) -> None:
        self._ipr: IPRoute | None = None

    @property
    def ipr(self) -> IPRoute:
        if self._ipr is None:
            self._ipr = IPRoute()
        return self._ipr

    def installed(self) -> dict[str, KernelRoute]:
        found = {}
        for family in (socket.AF_INET6, socket.AF_INET):
            for msg in self.ipr.route("dump", family=family, proto=ROUTE_PROTOCOL):
                dst = msg.get("RTA_DST")
                if dst is None:
                    continue
                prefix = str(ip_network(f"{dst}/{msg['dst_len']}", strict=False))
                gateway = msg.get("RTA_GATEWAY") or (msg.get("RTA_VIA") or {}).get("addr", "")
                name = self._name(msg.get("RTA_OIF"))
                found[prefix] = KernelRoute(prefix, str(gateway), name)
        return found

    def _name(self, index: int | None) -> str:
        if index is None:
            return ""
        links = self.ipr.get_links(index)
        return links[0].get("IFLA_IFNAME") if links else ""

    def reconcile(self, wanted: dict[str, KernelRoute]) -> list[str]:
        """Make our routes exactly `wanted`; the prefixes that failed (an
        interface gone meanwhile), to try again."""
        failed = []
        installed = self.installed()
        for prefix in set(installed) - set(wanted):
            self._delete(prefix)
        for prefix, route in wanted.items():
            if installed.get(prefix) == route:
                continue
            try:
                self._replace(route)
            except (NetlinkError, OSError):  # OSError: no interface of that name
                failed.append(prefix)
        return failed

    def _replace(self, route: KernelRoute) -> None:
        index = socket.if_nametoindex(route.interface)
        network = ip_network(route.prefix)
        args: dict[str, object] = {"dst": route.prefix, "oif": index, "proto": ROUTE_PROTOCOL,
                                   "priority": ROUTE_METRIC}
        if isinstance(network, IPv4Network) and ip_address(route.gateway).version == 6:
            # An IPv4 route through an IPv6 next hop (RFC 9229, RTA_VIA).
            args["via"] = {"family": socket.AF_INET6, "addr": route.gateway}
            args["family"] = socket.AF_INET
        else:
            args["gateway"] = route.gateway
            args["family"] = socket.AF_INET6 if network.version == 6 else socket.AF_INET
        self.ipr.route("replace", **args)

    def _delete(self, prefix: str) -> None:
        family = socket.AF_INET if isinstance(ip_network(prefix), IPv4Network) else socket.AF_INET6
        with contextlib.suppress(NetlinkError):  # gone already
            self.ipr.route("del", dst=prefix, family=family, proto=ROUTE_PROTOCOL,
                           priority=ROUTE_METRIC)

    def loopback_prefixes(self) -> list[str]:
        """The router's own addresses: global ones on lo, as host routes."""
        prefixes = []
        for msg in self.ipr.get_addr(index=self.ipr.link_lookup(ifname="lo")[0]):
            address = ip_address(msg.get("IFA_ADDRESS"))
            if address.is_loopback or address.is_link_local:
                continue
            prefixes.append(str(ip_network(f"{address}/{msg['prefixlen']}", strict=False)))
        return sorted(prefixes)
