"""Topology files: which emulated nodes exist and how they are linked.

A topology is a small TOML file::

    name = "line3"

    [[node]]
    name = "r1"              # [a-z][a-z0-9]{0,7}; names the namespace and interfaces
    role = "router"          # optional: router (default), gateway, exit, internet, host
                             # (internet: the uplinks' far end; host: a plain
                             # machine on a mesh link, no services)
    services = ["babel"]     # optional: carried as data for the node launcher

    [node.config.meter]      # optional: node-file sections for this node only,
    price = 10               # over the mesh-wide ones

    [[link]]
    a = "r1"
    b = "r2"
    loss = 5                 # optional: percent 0-100 dropped, in each direction
    rate = "10mbit"          # optional: bit, kbit, mbit or gbit, in each direction

`delay` is refused: this kernel has no netem qdisc to emulate it.
"""

from __future__ import annotations

import re
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

TOPOLOGIES_DIR = Path(__file__).with_name("topologies")

ROLES = ("router", "gateway", "exit", "internet", "host")

# Short enough that "<prefix>-<name>" stays a tidy namespace name and
# "v-<name>" (the interface facing that node) fits IFNAMSIZ (15).
NODE_NAME = re.compile(r"[a-z][a-z0-9]{0,7}")

_RATE = re.compile(r"([1-9][0-9]*)(bit|kbit|mbit|gbit)")
_RATE_UNITS = {"bit": 1, "kbit": 10**3, "mbit": 10**6, "gbit": 10**9}
# tbf takes the rate as a u32 of bytes/s (pyroute2 has no 64-bit rate), so
# 32 gbit is the top; below 1 kbit a single frame takes many seconds.
_RATE_MIN = 10**3
_RATE_MAX = 32 * 10**9

# Addressing (see fabric.py) gives each node one IPv4 address in
# 192.0.2.0/24 and each link one IPv6 group: these cap the sizes.
MAX_NODES = 254
MAX_LINKS = 0xFFFF

_TOP_KEYS = frozenset({"name", "node", "link"})
_NODE_KEYS = frozenset({"name", "role", "services", "config"})
_LINK_KEYS = frozenset({"a", "b", "loss", "rate"})


class TopologyError(ValueError):
    """A topology file or dict is invalid; the message says what and where."""


_Fail = Callable[[str], TopologyError]


def parse_rate(rate: str) -> int:
    """Bits per second for a rate string like "10mbit"."""
    m = _RATE.fullmatch(rate)
    if m is None:
        raise ValueError(f"bad rate {rate!r}: want an integer and bit, kbit, mbit or gbit")
    bps = int(m.group(1)) * _RATE_UNITS[m.group(2)]
    if not _RATE_MIN <= bps <= _RATE_MAX:
        raise ValueError(f"rate {rate!r} out of range: 1kbit to 32gbit")
    return bps


@dataclass(frozen=True)
class NodeSpec:
    name: str
    role: str = "router"
    services: tuple[str, ...] | None = None
    # Node-file sections for this node, over the mesh-wide ones: {"meter": {"price": 10}}.
    config: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)


@dataclass(frozen=True)
class LinkSpec:
    a: str
    b: str
    loss: int = 0
    rate: str | None = None

    @property
    def label(self) -> str:
        return f"{self.a}-{self.b}"

    @property
    def rate_bps(self) -> int | None:
        return None if self.rate is None else parse_rate(self.rate)


@dataclass(frozen=True)
class Topology:
    name: str
    nodes: tuple[NodeSpec, ...]
    links: tuple[LinkSpec, ...]
    # The file it was loaded from, if any (so a running mesh can keep a copy).
    path: Path | None = field(default=None, compare=False)

    @classmethod
    def load(cls, path: str | Path) -> Topology:
        path = Path(path)
        try:
            data = tomllib.loads(path.read_text())
        except OSError as e:
            raise TopologyError(f"{path}: cannot read: {e.strerror}") from e
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
            raise TopologyError(f"{path}: not valid TOML: {e}") from e
        return replace(cls.from_dict(data, source=str(path)), path=path)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], source: str = "topology") -> Topology:
        """Validate and build; `source` prefixes every error message."""

        def fail(msg: str) -> TopologyError:
            return TopologyError(f"{source}: {msg}")

        if not isinstance(data, Mapping):
            raise fail("must be a table")
        _no_unknown_keys(data, _TOP_KEYS, "", fail)
        name = data.get("name")
        if not isinstance(name, str) or not name:
            raise fail('"name" is required and must be a non-empty string')

        nodes = tuple(
            _node(i, raw, fail) for i, raw in enumerate(_tables(data, "node", fail), start=1)
        )
        if not nodes:
            raise fail("no [[node]] tables: a topology needs at least one node")
        if len(nodes) > MAX_NODES:
            raise fail(f"{len(nodes)} nodes: at most {MAX_NODES} are supported")
        seen_nodes: dict[str, int] = {}
        for i, node in enumerate(nodes, start=1):
            if node.name in seen_nodes:
                raise fail(
                    f"node #{i}: duplicate node name {node.name!r} "
                    f"(first defined as node #{seen_nodes[node.name]})"
                )
            seen_nodes[node.name] = i

        links = tuple(
            _link(k, raw, seen_nodes, fail)
            for k, raw in enumerate(_tables(data, "link", fail), start=1)
        )
        if len(links) > MAX_LINKS:
            raise fail(f"{len(links)} links: at most {MAX_LINKS} are supported")
        seen_links: dict[frozenset[str], int] = {}
        for k, link in enumerate(links, start=1):
            pair = frozenset((link.a, link.b))
            if pair in seen_links:
                raise fail(
                    f"link #{k} ({link.label}): duplicate link between {link.a} and {link.b} "
                    f"(already link #{seen_links[pair]})"
                )
            seen_links[pair] = k
        return cls(name=name, nodes=nodes, links=links)


def _tables(data: Mapping[str, Any], key: str, fail: _Fail) -> list[Mapping[str, Any]]:
    raw = data.get(key, [])
    if not isinstance(raw, list) or not all(isinstance(t, Mapping) for t in raw):
        raise fail(f'"{key}" must be an array of tables ([[{key}]])')
    return raw


def _no_unknown_keys(
    table: Mapping[str, Any], allowed: frozenset[str], where: str, fail: _Fail
) -> None:
    unknown = sorted(set(table) - allowed)
    if unknown:
        raise fail(
            f"{where}unknown key{'s' if len(unknown) > 1 else ''} "
            f"{', '.join(map(repr, unknown))} (allowed: {', '.join(sorted(allowed))})"
        )


def _node(i: int, raw: Mapping[str, Any], fail: _Fail) -> NodeSpec:
    where = f"node #{i}"
    name = raw.get("name")
    if not isinstance(name, str):
        raise fail(f'{where}: "name" is required and must be a string')
    if NODE_NAME.fullmatch(name) is None:
        raise fail(
            f"{where}: bad node name {name!r}: want a lowercase letter then up to 7 "
            "lowercase letters or digits ([a-z][a-z0-9]{0,7})"
        )
    where = f"node #{i} ({name})"
    _no_unknown_keys(raw, _NODE_KEYS, f"{where}: ", fail)
    role = raw.get("role", "router")
    if role not in ROLES:
        raise fail(f"{where}: bad role {role!r}: want one of {', '.join(ROLES)}")
    services = raw.get("services")
    if services is not None:
        if not isinstance(services, list) or not all(isinstance(s, str) for s in services):
            raise fail(f'{where}: "services" must be a list of strings')
        services = tuple(services)
    config = raw.get("config", {})
    if not isinstance(config, Mapping) or not all(
            isinstance(k, str) and isinstance(v, Mapping) for k, v in config.items()):
        raise fail(f'{where}: "config" must be a table of sections, e.g. [node.config.meter]')
    return NodeSpec(name=name, role=role, services=services,
                    config={k: dict(v) for k, v in config.items()})


def _link(k: int, raw: Mapping[str, Any], nodes: Mapping[str, int], fail: _Fail) -> LinkSpec:
    a, b = raw.get("a"), raw.get("b")
    where = f"link #{k}" + (f" ({a}-{b})" if isinstance(a, str) and isinstance(b, str) else "")
    if "delay" in raw:
        raise fail(
            f"{where}: delay is not supported: this kernel has no netem qdisc; "
            "use loss and rate only"
        )
    _no_unknown_keys(raw, _LINK_KEYS, f"{where}: ", fail)
    for end, value in (("a", a), ("b", b)):
        if not isinstance(value, str):
            raise fail(f'{where}: "{end}" is required and must be a node name')
        if value not in nodes:
            raise fail(f"{where}: unknown node {value!r} (nodes: {', '.join(nodes)})")
    if a == b:
        raise fail(f"{where}: a link cannot join node {a!r} to itself")
    loss = raw.get("loss", 0)
    # bool is an int subclass; "loss = true" is a mistake, not 1 %.
    if isinstance(loss, bool) or not isinstance(loss, int) or not 0 <= loss <= 100:
        raise fail(f"{where}: loss must be an integer percent 0-100, got {loss!r}")
    rate = raw.get("rate")
    if rate is not None:
        if not isinstance(rate, str):
            raise fail(f'{where}: rate must be a string like "10mbit", got {rate!r}')
        try:
            parse_rate(rate)
        except ValueError as e:
            raise fail(f"{where}: {e}") from None
    return LinkSpec(a=a, b=b, loss=loss, rate=rate)
