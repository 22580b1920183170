"""The inspection API every service serves on <run_dir>/<service>.sock:
mesh.common.v1.Inspect (Status, Watch), grpc.health.v1 and server reflection.
It reads the projection and never writes it.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from mesh.common.v1 import inspect_pb2, inspect_pb2_grpc

WATCH_MIN_INTERVAL = 0.1  # at most ten updates a second per watcher


class Changes:
    """Wakes watchers when the projection changes."""

    def __init__(self) -> None:
        self.version = 0
        self._cond = asyncio.Condition()

    async def bump(self) -> None:
        async with self._cond:
            self.version += 1
            self._cond.notify_all()

    async def wait_past(self, version: int) -> int:
        async with self._cond:
            await self._cond.wait_for(lambda: self.version > version)
            return self.version


class InspectServicer(inspect_pb2_grpc.InspectServicer):
    def __init__(self, status: Callable[[], inspect_pb2.StatusResponse], changes: Changes) -> None:
        self._status = status
        self._changes = changes

    async def Status(
        self, request: inspect_pb2.StatusRequest, context: grpc.aio.ServicerContext
    ) -> inspect_pb2.StatusResponse:
        return self._status()

    async def Watch(
        self, request: inspect_pb2.WatchRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[inspect_pb2.WatchResponse]:
        seen = self._changes.version
        yield inspect_pb2.WatchResponse(status=self._status())
        while True:
            seen = await self._changes.wait_past(seen)
            yield inspect_pb2.WatchResponse(status=self._status())
            await asyncio.sleep(WATCH_MIN_INTERVAL)


@dataclass(frozen=True)
class Control:
    """A service's own gRPC service (commands such as meter's SetPrice), served
    on its inspection socket beside Inspect."""

    register: Callable[[grpc.aio.Server], None]
    name: str


class InspectServer:
    def __init__(
        self,
        socket_path: Path,
        status: Callable[[], inspect_pb2.StatusResponse],
        changes: Changes,
    ) -> None:
        self.controls: list[Control] = []
        self.socket_path = socket_path
        self._status = status
        self._changes = changes
        self.health = health.aio.HealthServicer()
        self.server: grpc.aio.Server | None = None

    async def start(self) -> None:
        """Serve on the socket (health NOT_SERVING until set_serving(True))."""
        # grpc.aio binds the server to the running loop, so it is built here.
        self.server = grpc.aio.server()
        inspect_pb2_grpc.add_InspectServicer_to_server(
            InspectServicer(self._status, self._changes), self.server
        )
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        for control in self.controls:
            control.register(self.server)
        names = (
            inspect_pb2.DESCRIPTOR.services_by_name["Inspect"].full_name,
            health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
            reflection.SERVICE_NAME,
            *(control.name for control in self.controls),
        )
        reflection.enable_server_reflection(names, self.server)
        self.socket_path.parent.mkdir(parents=True, exist_ok=True)
        # A socket left by a killed process would make the bind fail.
        self.socket_path.unlink(missing_ok=True)
        self.server.add_insecure_port(f"unix:{self.socket_path}")
        await self.server.start()
        await self.set_serving(False)

    async def set_serving(self, serving: bool) -> None:
        status = (
            health_pb2.HealthCheckResponse.SERVING
            if serving
            else health_pb2.HealthCheckResponse.NOT_SERVING
        )
        await self.health.set("", status)

    async def stop(self) -> None:
        if self.server is None:
            return
        await self.set_serving(False)
        await self.server.stop(grace=1.0)
        self.socket_path.unlink(missing_ok=True)
