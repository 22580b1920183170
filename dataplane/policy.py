"""A router's forwarding policy, kept in the kernel as `table inet mesh`.

Only packets that arrived on an authenticated tunnel are forwarded (besides an
exit's clients to the internet, and the replies the internet sends to flows
NATed out of an uplink); on a raw
physical interface the router accepts only neighbour discovery and MLD, the
discovery hello, the link handshake and WireGuard's own UDP. Refused packets
are counted in the named counters `forward_refused` and `input_refused`.

`render_policy` is the pure part (spec in, nft script out); `ForwardingPolicy`
reconciles the kernel with it. The kernel holds all the state (rules, the set
of tunnels, counters), so a service that restarts reads it back and loses
nothing.
"""

from __future__ import annotations

import hashlib
import re
import threading
from collections.abc import Iterable
from dataclasses import dataclass

from dataplane.shim import Nft
from services.common.interfaces import EXIT_TUNNEL_PREFIX

FAMILY, NAME = "inet", "mesh"
TABLE = f"{FAMILY} {NAME}"
COUNTERS = ("forward_refused", "input_refused")

# Linux allows nearly any byte in an interface name; the names this router
# manages stay within these, which also keeps them safe inside nft strings.
_IFNAME = re.compile(r"[A-Za-z0-9_.@+-]{1,15}")

# RFC 4861 neighbour discovery (without redirects: a router ignores them) and
# MLD, which link-local multicast (the discovery hellos) depends on.
_ICMPV6_LINK_TYPES = (
    "nd-router-solicit",
    "nd-router-advert",
    "nd-neighbor-solicit",
    "nd-neighbor-advert",
    "mld-listener-query",
    "mld-listener-report",
    "mld-listener-done",
    "mld2-listener-report",
)

_FINGERPRINT = re.compile(r'^\s*comment "meshdp policy ([0-9a-f]+)"$', re.MULTILINE)


def check_ifnames(names: Iterable[str]) -> list[str]:
    """The names sorted and deduplicated; ValueError naming the first bad one."""
    names = set(names)
    for name in sorted(names):
        if not _IFNAME.fullmatch(name):
            raise ValueError(
                f"bad interface name {name!r}: want 1-15 of A-Z a-z 0-9 _ . @ + -"
            )
    return sorted(names)


def _check_port(field: str, port: int) -> None:
    if isinstance(port, bool) or not isinstance(port, int) or not 1 <= port <= 65535:
        raise ValueError(f"{field} must be a port number 1-65535, got {port!r}")


@dataclass(frozen=True)
class PolicySpec:
    """What the policy needs from the node's configuration."""

    physical: tuple[str, ...]  # raw links to neighbours (veths, ethernet, wifi)
    hello_port: int  # discovery hellos (UDP)
    handshake_port: int  # link handshakes (UDP)
    wg_port_min: int  # WireGuard listen ports (UDP), inclusive range
    wg_port_max: int
    # Interfaces to the internet (gateways, exits): only replies come in there.
    uplinks: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        # Accept any iterable of names, keep a canonical tuple (same spec, same script).
        object.__setattr__(self, "physical", tuple(check_ifnames(self.physical)))
        object.__setattr__(self, "uplinks", tuple(check_ifnames(self.uplinks)))
        for field in ("hello_port", "handshake_port", "wg_port_min", "wg_port_max"):
            _check_port(field, getattr(self, field))
        if self.wg_port_min > self.wg_port_max:
            raise ValueError(
                f"wg_port_min ({self.wg_port_min}) is above wg_port_max ({self.wg_port_max})"
            )


def _elements(names: list[str]) -> str:
    if not names:
        return ""
    return "\t\telements = { " + ", ".join(f'"{n}"' for n in names) + " }\n"


def _definition(spec: PolicySpec, tunnels: list[str], fingerprint: str) -> str:
    wg_ports = (
        str(spec.wg_port_min)
        if spec.wg_port_min == spec.wg_port_max
        else f"{spec.wg_port_min}-{spec.wg_port_max}"
    )
    return (
        f"table {TABLE} {{\n"
        f'\tcomment "meshdp policy {fingerprint}"\n'
        "\tset tunnels {\n"
        "\t\ttype ifname\n"
        f"{_elements(tunnels)}"
        "\t}\n"
        "\tset physical {\n"
        "\t\ttype ifname\n"
        f"{_elements(list(spec.physical))}"
        "\t}\n"
        "\tset uplinks {\n"
        "\t\ttype ifname\n"
        f"{_elements(list(spec.uplinks))}"
        "\t}\n"
        "\tcounter forward_refused {\n\t}\n"
        "\tcounter input_refused {\n\t}\n"
        # No conntrack shortcut: an "established" packet on a physical link
        # may carry a spoofed source, so the arrival interface alone decides.
        "\tchain forward {\n"
        "\t\ttype filter hook forward priority filter; policy drop;\n"
        "\t\tiifname @tunnels accept\n"
        # An exit forwards its registered clients (WireGuard-authenticated) to
        # the internet, and the internet's replies to NATed flows come back.
        f'\t\tiifname "{EXIT_TUNNEL_PREFIX}*" oifname @uplinks accept comment "exit clients"\n'
        '\t\tiifname @uplinks ct state established,related accept comment "replies"\n'
        '\t\tcounter name "forward_refused" drop\n'
        "\t}\n"
        "\tchain physical_in {\n"
        f"\t\ticmpv6 type {{ {', '.join(_ICMPV6_LINK_TYPES)} }} accept\n"
        f'\t\tudp dport {spec.hello_port} accept comment "discovery hello"\n'
        f'\t\tudp dport {spec.handshake_port} accept comment "link handshake"\n'
        f'\t\tudp dport {wg_ports} accept comment "wireguard"\n'
        '\t\tcounter name "input_refused" drop\n'
        "\t}\n"
        "\tchain input {\n"
        "\t\ttype filter hook input priority filter; policy accept;\n"
        "\t\tiifname @physical jump physical_in\n"
        "\t}\n"
        "}\n"
    )


def policy_fingerprint(spec: PolicySpec) -> str:
    """Identifies the rules a spec renders to (tunnels and counters aside)."""
    return hashlib.sha256(_definition(spec, [], "").encode()).hexdigest()[:16]


def render_policy(spec: PolicySpec, tunnels: Iterable[str] = ()) -> str:
    """The nft script that replaces `table inet mesh` in one transaction.

    Adding the table first makes the delete valid when it does not exist yet;
    all three commands are one batch, so no packet ever sees a missing table.
    """
    return (
        f"table {TABLE} {{}}\n"
        f"delete table {TABLE}\n"
        + _definition(spec, check_ifnames(tunnels), policy_fingerprint(spec))
    )


class ForwardingPolicy:
    """Reconciles the kernel's `table inet mesh` with a PolicySpec and a tunnel list."""

    def __init__(self, nft: Nft) -> None:
        self._nft = nft
        # install() reads the tunnels then rewrites the table: keep set_tunnels out.
        self._lock = threading.Lock()

    def installed_fingerprint(self) -> str | None:
        """The fingerprint of the policy in the kernel; None if there is no table."""
        if not any(obj["table"]["name"] == NAME for obj in self._nft.json(f"list tables {FAMILY}")):
            return None
        # nft 1.0.6 leaves table comments out of its JSON, hence the text listing.
        match = _FINGERPRINT.search(self._nft.run(f"list table {TABLE}"))
        return match.group(1) if match else ""

    def install(self, spec: PolicySpec) -> bool:
        """Make the kernel run this policy; True if that changed anything.

        Idempotent: the same spec again leaves the table, its counters and
        its tunnels alone. A different spec replaces the table atomically and
        carries the current tunnels over, so forwarding never stops (the
        refusal counters start again from zero).
        """
        with self._lock:
            installed = self.installed_fingerprint()
            if installed == policy_fingerprint(spec):
                return False
            tunnels = self.tunnels() if installed else set()
            self._nft.run(render_policy(spec, tunnels))
            return True

    def set_tunnels(self, names: Iterable[str]) -> None:
        """Make the set of authenticated tunnels exactly `names`, atomically."""
        wanted = check_ifnames(names)
        batch = f"flush set {TABLE} tunnels\n"
        if wanted:
            batch += f"add element {TABLE} tunnels {{ " + ", ".join(
                f'"{n}"' for n in wanted
            ) + " }\n"
        with self._lock:
            self._nft.run(batch)

    def tunnels(self) -> set[str]:
        """The tunnels the kernel forwards for, read back from the set."""
        (listing,) = self._nft.json(f"list set {TABLE} tunnels")
        return set(listing["set"].get("elem", []))

    def counters(self) -> dict[str, int]:
        """Packets refused so far: {"forward_refused": n, "input_refused": m}."""
        return {
            obj["counter"]["name"]: obj["counter"]["packets"]
            for obj in self._nft.json(f"list counters table {TABLE}")
        }
