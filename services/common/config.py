"""One node file (TOML), a section per service, overridable by environment.

`MESH_<SECTION>_<KEY>=value` overrides `[section] key` (e.g. MESH_NODE_LOG_LEVEL
=debug, MESH_SHARP_SNAPSHOT_EVERY=50); the value is parsed as the type of the
field's default, so a typo is an error at start-up, not a surprise later.
"""

from __future__ import annotations

import dataclasses
import os
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, TypeVar

DEFAULT_NODE_FILE = Path("/etc/mesh/node.toml")

T = TypeVar("T")


class ConfigError(ValueError):
    """The node file or an override is wrong; the message says where."""


@dataclass(frozen=True)
class NodeSettings:
    id: str = field(default="router", metadata={"help": "this router's name on its bus"})
    data_dir: Path = field(
        default=Path("/var/lib/mesh"),
        metadata={"help": "event log, projections and keys (survives restarts)"},
    )
    run_dir: Path = field(
        default=Path("/run/mesh"),
        metadata={"help": "unix sockets of the inspection APIs and supervisord"},
    )
    nats_port: int = field(default=4222, metadata={"help": "nats-server port on 127.0.0.1"})
    log_level: str = field(default="info", metadata={"help": "debug, info, warning or error"})
    netns: str = field(
        default="",
        metadata={"help": "network namespace the node runs in (emulated mesh), empty on hardware"},
    )
    interfaces: tuple[str, ...] = field(
        default=(),
        metadata={"help": "physical interfaces facing neighbors (empty: every interface "
                  "with an IPv6 link-local address but lo and the tunnels)"},
    )
    uplinks: tuple[str, ...] = field(
        default=(),
        metadata={"help": "interfaces to the internet (a gateway's or an exit's): not mesh "
                  "links; traffic leaves them NATed and only replies come back in"},
    )
    services: tuple[str, ...] = field(
        default=("sharp",), metadata={"help": "services supervisord runs on this node"}
    )

    @property
    def nats_url(self) -> str:
        return f"nats://127.0.0.1:{self.nats_port}"

    def socket_path(self, service: str) -> Path:
        return self.run_dir / f"{service}.sock"


@dataclass(frozen=True)
class TelemetrySettings:
    exporter: str = field(
        default="none", metadata={"help": "none, or console (spans and metrics to stderr)"}
    )


@dataclass(frozen=True)
class RuntimeSettings:
    """How every service drives its log and projection."""

    snapshot_every: int = field(
        default=500, metadata={"help": "store the projection after this many events"}
    )
    snapshot_interval: float = field(
        default=5.0, metadata={"help": "seconds between snapshots while events arrive"}
    )
    ack_wait: float = field(
        default=30.0, metadata={"help": "seconds before an unacknowledged event is redelivered"}
    )
    fetch_batch: int = field(default=64, metadata={"help": "events fetched per pull request"})
    stream_max_bytes: int = field(
        default=1 << 30, metadata={"help": "event log size on disk before the oldest are dropped"}
    )
    duplicate_window: float = field(
        default=600.0,
        metadata={"help": "seconds within which a republished event id is dropped as a duplicate"},
    )


@dataclass(frozen=True)
class NodeConfig:
    node: NodeSettings
    telemetry: TelemetrySettings
    runtime: RuntimeSettings
    # Raw sections of the services, parsed by each service with `section()`.
    sections: Mapping[str, Mapping[str, Any]]
    path: Path | None = None

    def section(self, name: str, cls: type[T]) -> T:
        """The [name] section as dataclass cls, with MESH_<NAME>_* overrides."""
        return _build(cls, name, self.sections.get(name, {}), os.environ)


def _coerce(raw: Any, default: Any, where: str) -> Any:
    if isinstance(default, bool):
        if isinstance(raw, bool):
            return raw
        truthy, falsy = {"1", "true", "yes", "on"}, {"0", "false", "no", "off"}
        if isinstance(raw, str) and raw.lower() in truthy | falsy:
            return raw.lower() in truthy
        raise ConfigError(f"{where}: expected true or false, got {raw!r}")
    if isinstance(default, tuple):
        if isinstance(raw, str):
            raw = [part.strip() for part in raw.split(",") if part.strip()]
        if not isinstance(raw, list | tuple) or not all(isinstance(x, str) for x in raw):
            raise ConfigError(f"{where}: expected a list of strings, got {raw!r}")
        return tuple(raw)
    kind = type(default)
    if isinstance(default, Path):
        kind = Path
    try:
        if kind is int and isinstance(raw, float):
            raise ValueError
        return kind(raw)
    except (TypeError, ValueError):
        raise ConfigError(f"{where}: expected {kind.__name__}, got {raw!r}") from None


def _build(cls: type[T], section: str, values: Mapping[str, Any], env: Mapping[str, str]) -> T:
    known = {f.name: f for f in fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(values) - set(known))
    if unknown:
        raise ConfigError(
            f"[{section}]: unknown key(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}"
        )
    kwargs: dict[str, Any] = {}
    for name, f in known.items():
        default = f.default if f.default is not dataclasses.MISSING else None
        env_key = f"MESH_{section.upper()}_{name.upper()}"
        if env_key in env:
            kwargs[name] = _coerce(env[env_key], default, env_key)
        elif name in values:
            kwargs[name] = _coerce(values[name], default, f"[{section}] {name}")
    return cls(**kwargs)


def load(path: Path | None = None, env: Mapping[str, str] | None = None) -> NodeConfig:
    """Read the node file (MESH_CONFIG or /etc/mesh/node.toml); a missing file means defaults."""
    env = os.environ if env is None else env
    if path is None:
        path = Path(env.get("MESH_CONFIG", DEFAULT_NODE_FILE))
    raw: dict[str, Any] = {}
    if path.exists():
        try:
            raw = tomllib.loads(path.read_text())
        except tomllib.TOMLDecodeError as err:
            raise ConfigError(f"{path}: not valid TOML: {err}") from None
    elif "MESH_CONFIG" in env:
        raise ConfigError(f"{path}: no such node file (named by MESH_CONFIG)")
    for name, value in raw.items():
        if not isinstance(value, dict):
            raise ConfigError(f"{path}: top-level key {name!r} must be a [section]")
    return NodeConfig(
        node=_build(NodeSettings, "node", raw.get("node", {}), env),
        telemetry=_build(TelemetrySettings, "telemetry", raw.get("telemetry", {}), env),
        runtime=_build(RuntimeSettings, "runtime", raw.get("runtime", {}), env),
        sections={k: v for k, v in raw.items() if k not in {"node", "telemetry", "runtime"}},
        path=path,
    )


def describe(cls: type[Any]) -> list[tuple[str, Any, str]]:
    """(key, default, help) per field, for --help and generated node files."""
    return [(f.name, f.default, f.metadata.get("help", "")) for f in fields(cls)]
