"""Usage counters: bytes and packets forwarded per neighbor and destination.

A neighbor is an interface (a tunnel); a destination is one of a configured
list of prefixes (IPv6 and IPv4), or `other`. For each neighbor and
destination the kernel counts what the neighbor sent us (rx: the packet came
in on its interface) and what we sent through it (tx: the packet went out on
its interface). Forwarded packets count, after the forwarding policy and
enforcement let them through (an eBPF program on every interface's tc egress
hook, which runs after netfilter's `forward`: dataplane/meshbpf.c); so does
our own traffic with a neighbor, but only on its tunnel (the
chains `delivered` and `originated` hook `input` and `output` for interfaces
matching LOCAL_INTERFACES): a neighbor pays for what it sends us, whether we
forward it, it is for us, or it dies here at hop limit 1 (the chain
`expiring`, on `prerouting`: the kernel drops those before `forward`), and
we pay for what we send through it, whether we forward it or it is ours.
Each side of a tunnel thus counts the same bytes.
A local packet's other interface is empty in its key. Local packets to
link-local and multicast addresses (the neighbors' Babel, proofs and
handshakes) are not counted: see LINK_SCOPED.

Everything lives in the kernel, so a restart of any service loses no count.
Forwarded traffic is counted by the eBPF program, per (in, out, destination)
that saw traffic, interfaces keyed by name (a tunnel that comes back under
its name keeps counting; one that is gone keeps its name); it reads the
configured prefixes from LPM tries this class keeps equal to the labels
below. It attaches to every interface of the namespace (Counters.install,
then each snapshot attaches to interfaces new since the last: a tunnel's
first forwarded packets out of it before that would not be counted, so
whoever makes a tunnel calls `count_new_interfaces` right after). A snapshot of 50,050 counters
takes ~9 ms (a read of memory, and the small nft sets below); as nft set
elements it took 50-57 ms.

The router's own traffic lives in `table inet mesh_meter`. Each such packet
updates one element of a
dynamic set keyed `iifname . oifname . network . prefix length`, whose
counter the kernel creates on the packet's first arrival. The destination
is found by longest match: one rule per configured prefix length, longest
first, masks the destination address and looks it up in the hash set of
that length's networks (`n6_64`, `n4_24`, ...); a packet none matches counts
under length 255 ("other"). Rejected alternatives, measured with 1,000
prefixes: an interval map (the natural longest-match structure) makes
libnftables fetch its elements for every later element command on any
table, so link's `set_tunnels` and enforcement went from 0.3 ms to 4-7 ms;
a chain per destination to carry an id costs 1.3 ms per command the same
way; the packet mark as a scratch register would clobber marks.

The elements are spread over SHARDS sets per family by a hash of the two
interfaces (chains `m0`.. each count into their own sets), because the
kernel dumps a set in O(n^2). Elements keyed `":label" . ":label" . ...`
(":" is not allowed in interface names, so they never match a packet) name
each configured destination in their comment; the one of "other" holds the
table's epoch, which changes only when the table is created anew.

A snapshot is one read of every shard as of one ruleset generation, and of
the forwarded counters (`Nft.usage_dump`, in C: libnftables takes ~14 us
per element to print, the kernel ~0.8 us to dump); counters are monotonic
and never reset here, so consumers take differences between snapshots of
the same epoch. The epoch's table and the eBPF state are made together: a
new table, or eBPF state gone missing, makes both anew.

Kept apart from `table inet mesh`: ForwardingPolicy replaces that table
whole when its spec changes, which would reset every count.
"""

from __future__ import annotations

import functools
import hashlib
import ipaddress
import os
import re
import struct
import threading
from collections.abc import Callable, Iterable, Iterator
from typing import NamedTuple

from dataplane.policy import check_ifnames
from dataplane.shim import Nft, chain_fingerprint

FAMILY, NAME = "inet", "mesh_meter"
TABLE = f"{FAMILY} {NAME}"
OTHER = "other"  # the destination of packets no configured prefix covers
OTHER_LEN = 255  # the prefix length their elements carry
LABEL = ":label"  # the interface name of label elements: never a real one
# Sets per family. When the sets held forwarded traffic too, a snapshot of
# 50,050 counters (tests/bench) took 150 ms with 1, 66 ms with 4, 60 ms with
# 16, 49 ms with 32 and 50 ms with 64: past a few thousand elements per set
# the kernel's walk restarts dominate, below that its ~0.9 us per element.
# With only the router's own traffic left here (forwarded traffic is
# counted in eBPF), one would do; reading the 64 near-empty sets costs
# ~0.4 ms of a snapshot.
SHARDS = 32
SHARD_SIZE = 65536  # elements per set; beyond it the kernel refuses (ENFILE)
LOCAL_INTERFACES = "mw*"  # tunnels (services/link names them mw<hash>)
SETS = tuple(f"u{version}_{k}" for version in (6, 4) for k in range(SHARDS))
LABEL_SETS = ("u6_0", "u4_0")  # where the labels (and the epoch) live
FORWARDED = "forwarded"  # the set name of the eBPF counters' keys in a snapshot

Network = ipaddress.IPv4Network | ipaddress.IPv6Network

_FINGERPRINT = re.compile(r'^\s*comment "meshdp counters ([0-9a-f]+)"$', re.MULTILINE)
_HEADER = struct.Struct("=8I")  # struct usage_header in meshdp.c
_LABEL = struct.Struct("=2I")
_KEY = struct.Struct("=6I16s")  # struct usage_key
_NAME_LEN = 16
_STALE = 0xFFFFFFFF


def _addr_type(version: int) -> str:
    return "ipv6_addr" if version == 6 else "ipv4_addr"


def _daddr(version: int) -> str:
    return "ip6 daddr" if version == 6 else "ip daddr"


def _unspecified(version: int) -> str:
    return "::" if version == 6 else "0.0.0.0"


# -- the pure part: destinations, rendering, the dump layout --------------------


def parse_destinations(prefixes: Iterable[str]) -> list[Network]:
    """The prefixes as networks, deduplicated and sorted; ValueError naming a bad one.

    Host bits must be clear ("2001:db8::1/64" is refused): such a prefix is
    more likely a mistake than a wish to count a /64.
    """
    if isinstance(prefixes, str):
        raise ValueError(f"destinations must be a list of prefixes, not the string {prefixes!r}")
    networks: set[Network] = set()
    for prefix in prefixes:
        if not isinstance(prefix, str):
            raise ValueError(f"bad destination prefix {prefix!r}: not a string")
        try:
            networks.add(_network(prefix.strip()))
        except ValueError as error:
            raise ValueError(f"bad destination prefix {prefix!r}: {error}") from None
    return sorted(networks, key=lambda n: (n.version, n.network_address, n.prefixlen))


@functools.lru_cache(maxsize=65536)
def _network(prefix: str) -> Network:
    # Cached: the meter hands over the same thousand prefixes every few seconds.
    return ipaddress.ip_network(prefix, strict=True)


def lengths_of(networks: Iterable[Network]) -> list[tuple[int, int]]:
    """(IP version, prefix length) of the networks, in matching order: longest first."""
    return sorted({(n.version, n.prefixlen) for n in networks}, key=lambda v: (-v[0], -v[1]))


def lookup_set(version: int, length: int) -> str:
    return f"n{version}_{length}"


def _mask(version: int, length: int) -> str:
    return str(ipaddress.ip_network(f"{_unspecified(version)}/{length}").netmask)


def shard_rules(shard: int, lengths: Iterable[tuple[int, int]]) -> list[str]:
    """Chain m<shard>: count a packet under the longest configured prefix, else other."""
    rules = []
    for version, length in lengths:
        masked = f"{_daddr(version)} & {_mask(version, length)}"
        rules.append(f"{masked} @{lookup_set(version, length)} "
                     f"update @u{version}_{shard} {{ iifname . oifname . {masked} . {length} }} "
                     "return")
    for version, proto in ((6, "ipv6"), (4, "ipv4")):
        rules.append(f"meta nfproto {proto} update @u{version}_{shard} "
                     f"{{ iifname . oifname . {_unspecified(version)} . {OTHER_LEN} }}")
    return rules


def _label_key(version: int, address: str, length: int) -> str:
    return f'"{LABEL}" . "{LABEL}" . {address} . {length}'


# Neighbors' own protocol traffic (Babel, balance proofs, handshakes) goes to
# link-local and multicast addresses: it is the links' upkeep, not traffic
# anyone pays for, and both ends would price it differently (no route says
# what it costs).
LINK_SCOPED = "ip6 daddr { fe80::/10, ff00::/8 } return"


def usage_sets() -> str:
    """The declarations of the usage sets (SETS), for inside a table."""
    return "".join(
        f"\tset u{version}_{k} {{\n\t\ttype ifname . ifname . {_addr_type(version)} . mark\n"
        f"\t\tsize {SHARD_SIZE}\n\t\tflags dynamic\n\t\tcounter\n\t}}\n"
        for version in (6, 4) for k in range(SHARDS)
    )


def _skeleton(fingerprint: str, local: str) -> str:
    sets = usage_sets()
    chains = "".join(
        f"\tchain m{k} {{\n" + "".join(f"\t\t{rule}\n" for rule in shard_rules(k, [])) + "\t}\n"
        for k in range(SHARDS)
    )
    spread = ", ".join(f"{k} : goto m{k}" for k in range(SHARDS))
    shard = f"jhash iifname . oifname mod {SHARDS} vmap {{ {spread} }}"
    return (
        f"table {TABLE} {{\n{sets}{chains}"
        "\tchain delivered {\n"
        f'\t\tcomment "meshdp counters {fingerprint}"\n'
        "\t\ttype filter hook input priority filter + 10; policy accept;\n"
        f"\t\t{LINK_SCOPED}\n"
        f'\t\tiifname "{local}" {shard}\n'
        "\t}\n"
        "\tchain originated {\n"
        "\t\ttype filter hook output priority filter + 10; policy accept;\n"
        f"\t\t{LINK_SCOPED}\n"
        f'\t\toifname "{local}" {shard}\n'
        "\t}\n"
        # What arrives with a hop limit of 1 for someone else dies here,
        # before `forward` (the kernel checks it first), yet the neighbor
        # counted it going out: counted as delivered to us, as it was.
        "\tchain expiring {\n"
        "\t\ttype filter hook prerouting priority filter + 10; policy accept;\n"
        f"\t\t{LINK_SCOPED}\n"
        f'\t\tiifname "{local}" ip6 hoplimit 1 fib daddr type != local {shard}\n'
        f'\t\tiifname "{local}" ip ttl 1 fib daddr type != local {shard}\n'
        "\t}\n"
        "}\n"
    )


def skeleton_fingerprint(local: str = LOCAL_INTERFACES) -> str:
    """Identifies the table's structure (not its destinations or counts)."""
    return hashlib.sha256(_skeleton("", local).encode()).hexdigest()[:16]


def render_skeleton(epoch: str, local: str = LOCAL_INTERFACES) -> str:
    """The script that creates the table afresh (replacing any other version)."""
    return (
        f"table {TABLE} {{}}\ndelete table {TABLE}\n"
        + _skeleton(skeleton_fingerprint(local), local)
        + f"add element {TABLE} u6_0 {{ {_label_key(6, '::', OTHER_LEN)} comment \"{epoch}\" }}\n"
    )


def render_destinations(have: Iterable[Network], wanted: Iterable[Network]) -> str:
    """The batch that takes the kernel from counting `have` to counting `wanted`.

    One transaction: a packet is counted by the old rules or the new ones.
    """
    have, wanted = set(have), set(wanted)
    old, new = lengths_of(have), lengths_of(wanted)
    lines = [f"add set {TABLE} {lookup_set(v, n)} {{ type {_addr_type(v)}; }}"
             for v, n in new if (v, n) not in old]
    for network in sorted(have - wanted, key=str):
        version, length = network.version, network.prefixlen
        lines.append(f"delete element {TABLE} u{version}_0 "
                     f"{{ {_label_key(version, str(network.network_address), length)} }}")
        if (version, length) in new:  # otherwise its whole set goes below
            lines.append(f"delete element {TABLE} {lookup_set(version, length)} "
                         f"{{ {network.network_address} }}")
    added = sorted(wanted - have, key=lambda n: (n.version, n.prefixlen))
    for network in added:
        version, length = network.version, network.prefixlen
        lines.append(f"add element {TABLE} u{version}_0 "
                     f"{{ {_label_key(version, str(network.network_address), length)} "
                     f'comment "{network}" }}')
    # One command per lookup set, in pieces: a netlink message must stay small.
    for (version, length), group in _by_length(added).items():
        for start in range(0, len(group), 500):
            addresses = ", ".join(str(n.network_address) for n in group[start:start + 500])
            lines.append(f"add element {TABLE} {lookup_set(version, length)} {{ {addresses} }}")
    if old != new:
        for k in range(SHARDS):
            lines.append(f"flush chain {TABLE} m{k}")
            lines.extend(f"add rule {TABLE} m{k} {rule}" for rule in shard_rules(k, new))
        lines.extend(f"delete set {TABLE} {lookup_set(v, n)}" for v, n in old if (v, n) not in new)
    return "\n".join(lines) + "\n"


def _by_length(networks: Iterable[Network]) -> dict[tuple[int, int], list[Network]]:
    groups: dict[tuple[int, int], list[Network]] = {}
    for network in networks:
        groups.setdefault((network.version, network.prefixlen), []).append(network)
    return groups


class UsageKey(NamedTuple):
    """One counter element as the kernel keys it."""

    inside: str  # the interface the packets came in on
    outside: str  # the one they went out on
    set_name: str
    version: int
    address: str  # the destination's network address (unspecified for other)
    length: int  # its prefix length; OTHER_LEN for other
    destination: str | None  # configured prefix or OTHER; None if removed (stale)


class Usage(NamedTuple):
    """Forwarded traffic of one neighbor (to one destination, or in total)."""

    rx_packets: int = 0  # received from the neighbor, forwarded by us
    rx_bytes: int = 0  # IP bytes (headers included) as the kernel forwarded them
    tx_packets: int = 0  # forwarded by us, sent out to the neighbor
    tx_bytes: int = 0

    def __sub__(self, earlier: tuple[int, ...]) -> Usage:  # type: ignore[override]
        """The traffic since `earlier` (a snapshot of the same epoch)."""
        return Usage(*(now - then for now, then in zip(self, earlier, strict=True)))


ZERO = Usage()


class Snapshot:
    """Every counter, read at one moment; cheap to build, read on demand."""

    def __init__(self, epoch: str, neighbors: tuple[str, ...], dests: dict[str, int],
                 counters: memoryview, keys: bytes, n_stale: int,
                 sets: tuple[str, ...]) -> None:
        self.epoch = epoch  # changes only when the table was created anew
        self.neighbors = neighbors  # every interface that forwarded or was forwarded to
        self._dests = dests  # destination -> column; OTHER -> 0
        self._rows = {name: i for i, name in enumerate(neighbors)}
        self._n_dests = len(dests)
        self._counters = counters  # [neighbor][column][rx packets, rx bytes, tx packets, tx bytes]
        self._keys = keys  # struct usage_key, one per element
        self._n_stale = n_stale
        self._sets = sets  # the sets read, in the order their indexes refer to

    @property
    def destinations(self) -> tuple[str, ...]:
        """The configured prefixes (canonical text), then OTHER."""
        return (*sorted(d for d in self._dests if d != OTHER), OTHER)

    def usage(self, neighbor: str, destination: str) -> Usage:
        """Traffic of `neighbor` for `destination`; zero if it had none.

        KeyError for a destination that is not configured.
        """
        column = self._dests[destination]
        row = self._rows.get(neighbor)
        if row is None:
            return ZERO
        at = (row * self._n_dests + column) * 4
        return Usage(*self._counters[at:at + 4])

    def total(self, neighbor: str) -> Usage:
        """Traffic of `neighbor` for every destination, `other` included."""
        row = self._rows.get(neighbor)
        if row is None:
            return ZERO
        block = self._counters[row * self._n_dests * 4:(row + 1) * self._n_dests * 4]
        return Usage(sum(block[0::4]), sum(block[1::4]), sum(block[2::4]), sum(block[3::4]))

    def items(self) -> Iterator[tuple[str, str, Usage]]:
        """(neighbor, destination, usage) for every pair that had traffic."""
        names = [""] * self._n_dests
        for destination, column in self._dests.items():
            names[column] = destination
        for row, neighbor in enumerate(self.neighbors):
            block = self._counters[row * self._n_dests * 4:(row + 1) * self._n_dests * 4]
            for column, usage in enumerate(zip(block[0::4], block[1::4], block[2::4],
                                               block[3::4], strict=True)):
                if any(usage):
                    yield neighbor, names[column], Usage(*usage)

    def elements(self, neighbor: str | None = None) -> list[UsageKey]:
        """The key of every counter element (of `neighbor`, in or out), to delete some."""
        if neighbor is None:
            return self._elements(lambda inside, outside, column: True)
        row = self._rows.get(neighbor)
        return self._elements(lambda inside, outside, column: row in (inside, outside))

    def stale(self) -> list[UsageKey]:
        """Keys of elements whose destination was removed (not counted here)."""
        if not self._n_stale:
            return []
        return self._elements(lambda inside, outside, column: column == _STALE)

    def _elements(self, wanted: Callable[[int, int, int], bool]) -> list[UsageKey]:
        names = [""] * self._n_dests
        for destination, column in self._dests.items():
            names[column] = destination
        keys = []
        # Filter on the raw fields first: a key object costs microseconds.
        for inside, outside, set_index, column, version, length, raw in _KEY.iter_unpack(
                self._keys):
            if not wanted(inside, outside, column):
                continue
            address = (ipaddress.IPv6Address(raw) if version == 6
                       else ipaddress.IPv4Address(raw[:4]))
            keys.append(UsageKey(self.neighbors[inside], self.neighbors[outside],
                                 self._sets[set_index], version, str(address), length,
                                 None if column == _STALE else names[column]))
        return keys


def parse_usage(buf: bytes, sets: tuple[str, ...] = SETS) -> Snapshot:
    """A Snapshot from meshdp_usage_dump's layout (see meshdp.c) of these sets."""
    _version, n_names, n_dests, n_keys, n_stale, labels_len, *_ = _HEADER.unpack_from(buf)
    at = _HEADER.size
    names = tuple(buf[at + i * _NAME_LEN:at + (i + 1) * _NAME_LEN].rstrip(b"\0").decode()
                  for i in range(n_names))
    at += n_names * _NAME_LEN
    size = n_names * n_dests * 4 * 8
    counters = memoryview(buf)[at:at + size].cast("Q")
    at += size
    epoch, dests = "", {OTHER: 0}
    end = at + labels_len
    while at < end:
        column, length = _LABEL.unpack_from(buf, at)
        text = buf[at + 8:at + 8 + length].decode()
        at += 8 + (length + 3) // 4 * 4
        if column == 0:
            epoch = text
        else:
            dests[text] = column
    if len(dests) != n_dests or at != end:
        raise ValueError("malformed usage dump: its labels do not add up")
    return Snapshot(epoch, names, dests, counters, buf[at:at + n_keys * _KEY.size], n_stale,
                    sets)


# -- the kernel side --------------------------------------------------------------


class Counters:
    """The usage counters of this router's kernel (one Nft context's namespace).

    Creating one makes sure the table exists and leaves an existing one (and
    its counts) alone, so a restarted service just carries on.
    """

    def __init__(self, nft: Nft, local: str = LOCAL_INTERFACES) -> None:
        self._nft = nft
        self._local = local  # interfaces whose own traffic with us counts too
        self._lock = threading.Lock()  # set_destinations reads, then writes
        self.install()

    def installed_fingerprint(self) -> str | None:
        """The structure version of the table in the kernel; None if there is none."""
        return chain_fingerprint(self._nft, FAMILY, NAME, _FINGERPRINT)

    def install(self) -> bool:
        """Create the table and the eBPF state unless this version of both
        exists; True if they were created. Either way the counting program
        is attached to every interface.

        A table of another version is replaced, which restarts every counter
        under a new epoch: only an upgrade that changes the structure does that
        (or eBPF state gone missing, since its counts went with it).
        OSError if the kernel refuses the eBPF program (with the verifier's log).
        """
        with self._lock:
            if (self.installed_fingerprint() == skeleton_fingerprint(self._local)
                    and self._nft.bpf_open(create=False)):
                return False
            self._nft.run(render_skeleton(f"epoch {os.urandom(8).hex()}", self._local))
            self._nft.bpf_open(create=True)
            # The prefixes go with the table's labels, which are new: none.
            return True

    def snapshot(self) -> Snapshot:
        """Every counter, as of one ruleset generation (one read of every
        shard, and of the forwarded counters).

        OSError if the table or the eBPF state is gone (someone flushed the
        ruleset), or (ENOSPC) the eBPF state is spent: a new key found no
        free element (meshbpf.c); either way make a new Counters, which
        starts a new epoch.
        """
        return parse_usage(self._nft.usage_dump(NAME, SETS, LABEL, forwarded=True),
                           (*SETS, FORWARDED))

    def destinations(self) -> list[str]:
        """The configured prefixes, read back from the kernel."""
        # The labels' sets alone: a fraction of a full snapshot.
        labels = parse_usage(self._nft.usage_dump(NAME, LABEL_SETS, LABEL), LABEL_SETS)
        return [d for d in labels.destinations if d != OTHER]

    def set_destinations(self, prefixes: Iterable[str]) -> None:
        """Count by exactly these prefixes from now on (longest match wins).

        ValueError naming the first invalid prefix, before anything changes.
        A prefix that stays keeps its counts; a removed one's counts are
        deleted (added again later, it starts from zero). The same list
        again costs one small read.
        """
        wanted = set(parse_destinations(prefixes))
        with self._lock:
            labelled = set(self.destinations())
            if labelled == {str(n) for n in wanted}:  # labels hold the canonical text
                return
            # Left by a call that was interrupted: a prefix added back must
            # not find its old counts.
            self._nft.bpf_delete(None)
            # The eBPF tries before the labels: interrupted in between, the
            # labels differ from what was wanted, so the next call redoes it.
            self._nft.bpf_prefixes([(n.version, n.network_address.packed, n.prefixlen)
                                    for n in sorted(wanted, key=str)])
            self._nft.run(render_destinations({_network(d) for d in labelled}, wanted))
            # No packet reaches a removed destination any more, so this
            # read sees every counter it will ever have.
            self._nft.bpf_delete(None)

    def forget(self, neighbor: str) -> int:
        """Delete a gone neighbor's forwarded counters (after its last usage
        was taken).

        Counters live until deleted, also for an interface that is gone: the
        same tunnel name coming back keeps counting. Returns how many
        counters were deleted. ValueError for a bad interface name. The
        router's own traffic with it stays (nft cannot name those elements:
        their other interface is empty), no longer counting once it is gone.
        """
        (neighbor,) = check_ifnames([neighbor])
        with self._lock:
            return self._nft.bpf_delete(neighbor)


def count_new_interfaces(nft: Nft) -> bool:
    """Attach the counting program, from any process, to every interface of
    nft's namespace: link and exit call it as they make a tunnel, before it
    forwards (the meter's own sweep runs once a sample, and not at all while
    it restarts). False if there are no forwarded counters yet: the meter
    makes them, and attaches everywhere, when it starts."""
    return nft.bpf_open(create=False)
