"""Probes through a chosen neighbor, whatever the routing table says: a
firewall mark per neighbor, a policy rule sending that mark to a table of its
own, and in it one default route through the neighbor's tunnel.

(A socket bound to the tunnel cannot do it: the kernel then wants a route
through that device, and the route to the destination may go elsewhere.)
The only module of verify that talks netlink; run it on a NetlinkThread.
"""

from __future__ import annotations

import contextlib
import socket
from dataclasses import dataclass

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

MARK_BASE = 0x6D760000  # "mv": mesh verify
TABLE_BASE = 0x6D760000
RULE_PRIORITY = 900  # before the main table (32766)
MAX_SLOTS = 1024


@dataclass(frozen=True)
class Path:
    tunnel: str
    next_hop: str  # the neighbor's link-local address in the tunnel


def mark_of(slot: int) -> int:
    return MARK_BASE + slot


class Steering:
    def __init__(self) -> None:
        self._ipr: IPRoute | None = None

    @property
    def ipr(self) -> IPRoute:
        if self._ipr is None:
            self._ipr = IPRoute()
        return self._ipr

    def _our_rules(self) -> dict[int, int]:
        """Our rules now in the kernel: slot -> table."""
        found = {}
        for rule in self.ipr.get_rules(family=socket.AF_INET6):
            if rule.get("FRA_PRIORITY") != RULE_PRIORITY:
                continue
            mark = rule.get("FRA_FWMARK")
            if mark is not None and MARK_BASE <= mark < MARK_BASE + MAX_SLOTS:
                found[mark - MARK_BASE] = rule.get("FRA_TABLE")
        return found

    def reconcile(self, wanted: dict[int, Path]) -> list[int]:
        """Make the steering exactly `wanted` (slot -> path); the slots that
        failed (a tunnel gone meanwhile)."""
        failed = []
        for slot in set(self._our_rules()) - set(wanted):
            with contextlib.suppress(NetlinkError):
                self.ipr.rule("del", family=socket.AF_INET6, fwmark=mark_of(slot),
                              table=TABLE_BASE + slot, priority=RULE_PRIORITY)
            with contextlib.suppress(NetlinkError):
                self.ipr.route("del", family=socket.AF_INET6, dst="::/0",
                               table=TABLE_BASE + slot)
        present = self._our_rules()
        for slot, path in wanted.items():
            try:
                self.ipr.route("replace", family=socket.AF_INET6, dst="::/0",
                               gateway=path.next_hop, oif=socket.if_nametoindex(path.tunnel),
                               table=TABLE_BASE + slot)
                if slot not in present:
                    self.ipr.rule("add", family=socket.AF_INET6, fwmark=mark_of(slot),
                                  table=TABLE_BASE + slot, priority=RULE_PRIORITY)
            except (NetlinkError, OSError):
                failed.append(slot)
        return failed
