"""Enforcement per neighbor: open, throttled to a rate, or blocked.

Kept in the kernel as `table inet mesh_enforce`, so a restart of any service
changes nothing:

  - set `blocked`: forwarded packets that came in on these interfaces are
    dropped;
  - map `throttled`: interface -> a named `limit` object (`rate over R
    bytes/second`); forwarded packets from the interface beyond that rate
    are dropped;
  - both drops are counted per interface in the dynamic set `dropped`.

The chain hooks `forward` before the forwarding policy (priority filter - 10),
so dropped packets are never counted as usage, and it touches forwarded
packets only: a throttled or blocked neighbor still reaches the router itself
(routing, and the payments that would open it again).

nft `limit` rather than tc on an ifb device. Measured with iperf3 TCP through
a relay throttled to 2 Mbit/s: the limit held 1.95-2.10 Mbit/s (8 runs of
5 s, after 2 s left out), ifb + tbf 1.88-1.92 Mbit/s; applying one takes
0.25 ms here (0.7 ms beside 50,000 usage counters), an ifb 1.2 ms through
pyroute2 (FACTS.md); reading the state first, to leave an unchanged one
alone, adds 0.25-0.8 ms. Both are accurate enough; tc on the tunnel's ingress
would also throttle the router's own traffic with the neighbor, needs an ifb
device per neighbor, and lives outside this table. The limit's cost: the
kernel sizes a byte limit's bucket to one second of the rate (plus burst),
so after idling a neighbor may send a second's worth at full speed before
the rate holds.

Kept apart from `table inet mesh`: ForwardingPolicy replaces that table
whole when its spec changes, which would lift every throttle and block.
"""

from __future__ import annotations

import enum
import hashlib
import re

from dataplane.policy import check_ifnames
from dataplane.shim import Nft, chain_fingerprint

FAMILY, NAME = "inet", "mesh_enforce"
TABLE = f"{FAMILY} {NAME}"
# The kernel computes the bucket as 1e9 ns * (rate + burst) in 64 bits.
MAX_RATE_BPS = 100_000_000_000
_UNITS = {"bytes": 1, "kbytes": 1024, "mbytes": 1024 * 1024}  # nft's JSON rate units
_FINGERPRINT = re.compile(r'^\s*comment "meshdp enforcement ([0-9a-f]+)"$', re.MULTILINE)


class Mode(enum.StrEnum):
    OPEN = "open"
    THROTTLED = "throttled"
    BLOCKED = "blocked"


def check_mode(mode: Mode | str, rate_bps: int) -> tuple[Mode, int]:
    """The mode and rate, validated; ValueError saying what is wrong.

    A throttle's rate is in bits/s, at least 8, and kept by the kernel in
    whole bytes/s (so it is rounded down to a multiple of 8); open and
    blocked take no rate.
    """
    try:
        mode = Mode(mode)
    except ValueError:
        raise ValueError(
            f"unknown enforcement mode {mode!r}: want one of {', '.join(m.value for m in Mode)}"
        ) from None
    if isinstance(rate_bps, bool) or not isinstance(rate_bps, int):
        raise ValueError(f"rate_bps must be an integer number of bits/s, got {rate_bps!r}")
    if mode is Mode.THROTTLED:
        if not 8 <= rate_bps <= MAX_RATE_BPS:
            raise ValueError(
                f"a throttle needs a rate of 8 to {MAX_RATE_BPS} bits/s, got {rate_bps}"
            )
        return mode, rate_bps // 8 * 8
    if rate_bps != 0:
        raise ValueError(f"rate_bps applies to throttled only, got {rate_bps} for {mode.value}")
    return mode, 0


def limit_name(neighbor: str) -> str:
    """The limit object of a neighbor: hex keeps any interface name a valid nft name."""
    return "t_" + neighbor.encode().hex()


def _skeleton(fingerprint: str) -> str:
    return (
        f"table {TABLE} {{\n"
        "\tset blocked {\n\t\ttype ifname\n\t}\n"
        "\tmap throttled {\n\t\ttype ifname : limit\n\t}\n"
        "\tset dropped {\n\t\ttype ifname\n\t\tsize 65536\n\t\tflags dynamic\n\t\tcounter\n\t}\n"
        "\tchain gate {\n"
        f'\t\tcomment "meshdp enforcement {fingerprint}"\n'
        "\t\ttype filter hook forward priority filter - 10; policy accept;\n"
        "\t\tiifname @blocked update @dropped { iifname } drop\n"
        "\t\tlimit name iifname map @throttled update @dropped { iifname } drop\n"
        "\t}\n"
        "}\n"
    )


def skeleton_fingerprint() -> str:
    return hashlib.sha256(_skeleton("").encode()).hexdigest()[:16]


def render_skeleton() -> str:
    """The script that creates the table afresh (replacing any other version)."""
    return f"table {TABLE} {{}}\ndelete table {TABLE}\n" + _skeleton(skeleton_fingerprint())


def render_apply(neighbor: str, mode: Mode, rate_bps: int) -> str:
    """One transaction putting `neighbor` in `mode`, whatever it was in before.

    nft 1.0.6 has no `destroy`, and `delete` fails on what is missing, so
    each removal first adds what it deletes: the batch needs no read of the
    current state. A limit object cannot change its rate, so a throttle is
    always a fresh object (with a full bucket).
    """
    element = f'"{neighbor}"'
    limit = limit_name(neighbor)
    lines = [
        f"add element {TABLE} blocked {{ {element} }}",
        f"add limit {TABLE} {limit} {{ rate over 1 bytes/second }}",
        f"add element {TABLE} throttled {{ {element} : \"{limit}\" }}",
        f"delete element {TABLE} throttled {{ {element} }}",
        f"delete limit {TABLE} {limit}",
    ]
    if mode is not Mode.BLOCKED:
        lines.append(f"delete element {TABLE} blocked {{ {element} }}")
    if mode is Mode.THROTTLED:
        lines.append(f"add limit {TABLE} {limit} {{ rate over {rate_bps // 8} bytes/second }}")
        lines.append(f"add element {TABLE} throttled {{ {element} : \"{limit}\" }}")
    return "\n".join(lines) + "\n"


class Enforcer:
    """Open, throttle or block neighbors in this router's kernel.

    Creating one makes sure the table exists and leaves an existing one (and
    its throttles and blocks) alone.
    """

    def __init__(self, nft: Nft) -> None:
        self._nft = nft
        self.install()

    def installed_fingerprint(self) -> str | None:
        """The structure version of the table in the kernel; None if there is none."""
        return chain_fingerprint(self._nft, FAMILY, NAME, _FINGERPRINT)

    def install(self) -> bool:
        """Create the table unless this version of it exists; True if it was created.

        A table of another version is replaced, which opens every neighbor:
        the service that decides enforcement applies its state again.
        """
        if self.installed_fingerprint() == skeleton_fingerprint():
            return False
        self._nft.run(render_skeleton())
        return True

    def apply(self, neighbor: str, mode: Mode | str, rate_bps: int = 0) -> bool:
        """Put a neighbor's interface in `mode` (atomically); True if that changed it.

        The same mode and rate again change nothing: above all a throttle
        keeps its bucket, which a new limit object would fill (one second's
        worth of burst). ValueError for a bad interface name, an unknown
        mode, or a rate that does not fit the mode.
        """
        (neighbor,) = check_ifnames([neighbor])
        mode, rate_bps = check_mode(mode, rate_bps)
        if self.current().get(neighbor, (Mode.OPEN, 0)) == (mode, rate_bps):
            return False
        self._nft.run(render_apply(neighbor, mode, rate_bps))
        return True

    def remove(self, neighbor: str) -> bool:
        """Lift any throttle or block: the neighbor is open again. True if it was not."""
        return self.apply(neighbor, Mode.OPEN)

    def current(self) -> dict[str, tuple[Mode, int]]:
        """Every neighbor that is not open: (mode, rate in bits/s), read from the kernel."""
        rates: dict[str, int] = {}
        state: dict[str, tuple[Mode, int]] = {}
        throttled: list[tuple[str, str]] = []
        for obj in self._nft.json(f"list table {TABLE}"):
            if "limit" in obj:
                limit = obj["limit"]
                rates[limit["name"]] = limit["rate"] * _UNITS[limit.get("rate_unit", "bytes")] * 8
            elif obj.get("set", {}).get("name") == "blocked":
                state.update((name, (Mode.BLOCKED, 0)) for name in obj["set"].get("elem", []))
            elif obj.get("map", {}).get("name") == "throttled":
                throttled = [tuple(pair) for pair in obj["map"].get("elem", [])]
        for name, limit in throttled:
            state[name] = (Mode.THROTTLED, rates[limit])
        return state

    def dropped(self) -> dict[str, tuple[int, int]]:
        """Packets and bytes dropped so far per interface (blocked or over its rate)."""
        (listing,) = (obj for obj in self._nft.json(f"list set {TABLE} dropped") if "set" in obj)
        return {
            elem["elem"]["val"]: (elem["elem"]["counter"]["packets"],
                                  elem["elem"]["counter"]["bytes"])
            for elem in listing["set"].get("elem", [])
        }
