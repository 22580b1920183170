"""Shared fixtures: real nodes (nats-server + services under supervisord)."""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from deploy.emulator.mesh import program_states, stop_supervisord, supervisorctl
from deploy.meshctl.client import health
from deploy.node import NodeLayout, init_node


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(what: str, check: Callable[[], object], timeout: float = 30.0,
             interval: float = 0.05, explain: Callable[[], str] | None = None) -> object:
    """Poll check() until it returns something truthy (run_and_expect); no bare sleeps.
    On a timeout, explain() (if given) tells what the system looked like then."""
    deadline = time.monotonic() + timeout
    last: object = None
    while time.monotonic() < deadline:
        last = check()
        if last:
            return last
        time.sleep(interval)
    message = f"timed out after {timeout}s waiting for {what} (last: {last!r})"
    if explain is not None:
        try:
            message += "\n" + explain()
        except Exception as err:  # the timeout is the news, not a broken explanation
            message += f"\n(no explanation: {err!r})"
    raise AssertionError(message)


def require_root() -> None:
    if os.geteuid() != 0:
        if os.environ.get("CI"):
            raise AssertionError("namespace tests must run as root in CI")
        pytest.skip("needs root (network namespaces)")


class RunningNode:
    """A node started under real supervisord in the host's network namespace."""

    def __init__(self, layout: NodeLayout, nats_port: int, services: tuple[str, ...]) -> None:
        self.layout = layout
        self.services = services
        self.nats_url = f"nats://127.0.0.1:{nats_port}"

    def start(self) -> None:
        import subprocess
        import sys

        supervisord = Path(sys.executable).parent / "supervisord"
        subprocess.run([str(supervisord), "-c", str(self.layout.supervisor_file)], check=True)
        wait_for("all programs RUNNING", lambda: set(program_states(self.layout).values())
                 == {"RUNNING"})
        self.wait_serving()

    def wait_serving(self) -> None:
        for service in self.services:
            wait_for(f"{service} SERVING",
                     lambda s=service: health(self.layout.socket(s)) == "SERVING")

    def stop(self) -> None:
        stop_supervisord(self.layout)

    def ctl(self, *argv: str) -> str:
        return supervisorctl(self.layout, *argv)


@pytest.fixture
def make_node(tmp_path: Path) -> Iterator[Callable[..., RunningNode]]:
    nodes: list[RunningNode] = []

    def make(services: tuple[str, ...] = ("sharp",), **runtime: object) -> RunningNode:
        port = free_port()
        layout = init_node(tmp_path / f"node{len(nodes)}", f"t{len(nodes)}",
                           services=services, nats_port=port, runtime=runtime)
        node = RunningNode(layout, port, services)
        nodes.append(node)
        node.start()
        return node

    yield make
    for node in nodes:
        node.stop()
