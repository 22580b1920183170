"""The service runtime: everything a service is, except its handlers.

A service declares what it consumes, how each event type changes its
projection, and what new events each one decides (`ServiceDefinition`). The
runtime does the rest, in one asyncio task that owns the state:

    msg -> decode (strict) -> handler(state, event) -> publish decided events
        -> ack -> snapshot now and then

Handlers are pure functions of (state, event): time comes from the event,
never the clock. So replaying the log gives the same state, and the events a
handler decides get ids derived from the event that caused them, which the
server drops as duplicates if a restarted service decides them again.

Start-up: load the snapshot (sequence S), replay S+1.. up to the durable
consumer's ack floor without publishing (their decisions are already in the
log), handle the rest live, then follow the durable consumer.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import signal
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Generic, TypeVar

from google.protobuf import any_pb2, struct_pb2
from google.protobuf.message import Message
from mesh.common.v1 import inspect_pb2
from nats.aio.msg import Msg
from nats.errors import TimeoutError as NatsTimeout
from opentelemetry import trace

from . import config as config_mod
from . import logs
from .bus import Bus, Published
from .envelope import (
    Event,
    MalformedEvent,
    derived_event_id,
    open_envelope,
    type_name,
)
from .inspect import Changes, Control, InspectServer
from .logs import kv
from .store import ProjectionStore, Snapshot
from .telemetry import Telemetry, extract_context

S = TypeVar("S", bound=Message)
# The tree the services were imported from (a release after `meshctl upgrade`).
CODE_PATH = str(Path(__file__).resolve().parents[2])


@dataclass(frozen=True)
class Outgoing:
    """An event a handler decided: published on evt.<service>.<kind>.<aggregate_id>."""

    kind: str
    aggregate_id: str
    payload: Message


Handler = Callable[[S, Event[Any]], Sequence[Outgoing]]


@dataclass(frozen=True)
class ServiceDefinition(Generic[S]):
    name: str
    state_type: type[S]
    # Filter subjects of the service's durable consumer.
    subjects: Sequence[str]
    # One handler per consumed event type: a table, not an if-chain.
    handlers: Mapping[type[Message], Handler[S]]
    summarize: Callable[[S], Mapping[str, Any]] = field(default=lambda _state: {})
    # Side-effect loops (timers, sockets, netlink) that publish events through
    # the runtime; they never touch the state.
    tasks: Sequence[Callable[[ServiceRuntime[S]], Awaitable[None]]] = ()
    # The service's own gRPC services, served beside Inspect.
    controls: Sequence[Callable[[ServiceRuntime[S]], Control]] = ()
    # Builds the object its tasks and controls share (sockets, kernel handles),
    # kept as runtime.context.
    context: Callable[[ServiceRuntime[S]], Any] | None = None


class ServiceRuntime(Generic[S]):
    def __init__(self, definition: ServiceDefinition[S], cfg: config_mod.NodeConfig) -> None:
        self.definition = definition
        self.cfg = cfg
        self.name = definition.name
        self.node_id = cfg.node.id
        self.log = logging.getLogger(self.name)
        self.state: S = definition.state_type()
        self.last_sequence = 0
        self.snapshot_sequence = 0
        self.events_handled = 0
        self.events_rejected = 0
        self.events_published = 0
        self.events_replayed = 0
        self.changes = Changes()
        self.started_at = time.monotonic()
        self.stopping = asyncio.Event()
        self.known_types = {type_name(t): t for t in definition.handlers}
        self.telemetry = Telemetry(self.name, self.node_id, cfg.telemetry.exporter)
        self.store = ProjectionStore(cfg.node.data_dir / "projections" / f"{self.name}.sqlite")
        self.inspect = InspectServer(cfg.node.socket_path(self.name), self.status, self.changes)
        self.bus: Bus | None = None
        self.context: Any = None
        self._emitted = 0
        self._inflight: list[asyncio.Future[Published]] = []
        self._flushed_sequence = 0
        self._since_snapshot = 0
        self._last_snapshot_at = time.monotonic()

    # -- lifecycle -------------------------------------------------------

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.stopping.set)
        if self.definition.context is not None:
            self.context = self.definition.context(self)
        self.inspect.controls = [make(self) for make in self.definition.controls]
        await self.inspect.start()
        rt = self.cfg.runtime
        self.bus = await Bus.connect(
            self.cfg.node.nats_url, f"{self.node_id}/{self.name}",
            stream_max_bytes=rt.stream_max_bytes, duplicate_window=rt.duplicate_window,
        )
        self._load_snapshot()
        try:
            await self._recover()
            await self.inspect.set_serving(True)
            self.log.info(kv(
                "service.ready", sequence=self.last_sequence, replayed=self.events_replayed,
                socket=self.inspect.socket_path, code=CODE_PATH,
            ))
            consume = asyncio.create_task(self._consume(), name="consume")
            tasks = [asyncio.create_task(t(self), name=t.__name__) for t in self.definition.tasks]
            stop = asyncio.create_task(self.stopping.wait())
            done, _ = await asyncio.wait(
                [stop, consume, *tasks], return_when=asyncio.FIRST_COMPLETED
            )
            for task in tasks:
                task.cancel()
            for task in tasks:
                with contextlib.suppress(asyncio.CancelledError):
                    await task
            # The consumer stops by itself between two batches, so no event is
            # left half handled.
            await consume
            for task in done:
                if task is not stop:
                    task.result()  # a crashed loop is a broken invariant: let it raise
        finally:
            self.save_snapshot()
            await self.inspect.stop()
            await self.bus.close()
            self.store.close()
            self.telemetry.shutdown()
            self.log.info(kv("service.stopped", sequence=self.last_sequence))

    def _load_snapshot(self) -> None:
        snap = self.store.load(self.name)
        if snap is None:
            return
        expected = self.definition.state_type.DESCRIPTOR.full_name
        if snap.state_type != expected:
            raise RuntimeError(
                f"snapshot in {self.store.path} holds {snap.state_type}, not {expected}"
            )
        self.state.ParseFromString(snap.state)
        self.last_sequence = self.snapshot_sequence = self._flushed_sequence = snap.sequence
        self.events_handled = snap.events_handled
        self.log.info(kv("snapshot.loaded", sequence=snap.sequence))

    async def _recover(self) -> None:
        assert self.bus is not None
        floor = await self.bus.ack_floor(self.name)
        async for msg in self.bus.read_from(self.definition.subjects, self.last_sequence + 1):
            replaying = msg.metadata.sequence.stream <= floor
            await self._handle(msg, publish=not replaying)
            if replaying:
                self.events_replayed += 1
        await self._flush()

    async def _consume(self) -> None:
        assert self.bus is not None
        rt = self.cfg.runtime
        sub = await self.bus.durable(self.name, self.definition.subjects, rt.ack_wait)
        while not self.stopping.is_set():
            try:
                msgs = await sub.fetch(rt.fetch_batch, timeout=1.0)
            except (TimeoutError, NatsTimeout):
                msgs = []
            for msg in msgs:
                if msg.metadata.sequence.stream > self.last_sequence:
                    await self._handle(msg, publish=True)
            # Acknowledge only once the log holds every decision of the batch:
            # a crash before this redelivers them, and the ids make it harmless.
            await self._flush()
            for msg in msgs:
                await msg.ack()
            self._maybe_snapshot()

    # -- events ----------------------------------------------------------

    async def _handle(self, msg: Msg, publish: bool) -> None:
        self._apply(msg, publish)
        # Also after a rejected event: it moved last_sequence too.
        await self.changes.bump()

    async def wait_handled(self, sequence: int) -> None:
        """Until the projection includes the event at this stream sequence (one
        this service published, say, whose effect its next decision must see)."""
        while True:
            version = self.changes.version
            if self.last_sequence >= sequence:
                return
            await self.changes.wait_past(version)

    def _apply(self, msg: Msg, publish: bool) -> None:
        sequence = msg.metadata.sequence.stream
        started = time.perf_counter()
        try:
            event = open_envelope(msg.data, msg.headers, msg.subject, sequence, self.known_types)
        except MalformedEvent as err:
            self.events_rejected += 1
            self.last_sequence = sequence
            self.telemetry.events_rejected.add(1)
            self.log.warning(kv("event.rejected", subject=msg.subject, seq=sequence, why=err))
            return
        handler = self.definition.handlers[type(event.payload)]
        kind = type(event.payload).__name__
        with self.telemetry.tracer.start_as_current_span(
            f"{self.name} handle {kind}",
            context=extract_context(msg.headers),
            kind=trace.SpanKind.CONSUMER,
            attributes={"mesh.event_id": event.event_id, "mesh.sequence": sequence},
        ):
            try:
                decided = handler(self.state, event)
            except MalformedEvent as err:
                self.events_rejected += 1
                self.last_sequence = sequence
                self.log.warning(kv("event.refused", subject=msg.subject, seq=sequence, why=err))
                return
            self.last_sequence = sequence
            self.events_handled += 1
            self._since_snapshot += 1
            if publish:
                for index, out in enumerate(decided):
                    event_id = derived_event_id(self.node_id, self.name, event.event_id, index)
                    self._publish_decision(out, event_id, event)
        self.telemetry.events_handled.add(1, {"type": kind})
        self.telemetry.handle_latency.record((time.perf_counter() - started) * 1e3, {"type": kind})
        self.log.debug(kv("event.handled", type=kind, seq=sequence, decided=len(decided)))

    async def publish(self, out: Outgoing, event_id: str | None = None) -> int:
        """Publish an event from the outside world (tasks: timers, sockets, netlink).
        An event_id named after the fact (a chain log, a proof's nonce) makes a
        second publication of the same fact, after a crash, a duplicate the log drops."""
        assert self.bus is not None
        self._emitted += 1
        published = await self.bus.publish_event(
            out.payload, service=self.name, kind=out.kind, aggregate_id=out.aggregate_id,
            node_id=self.node_id, version=self._emitted,
            event_id=f"{self.node_id}.{self.name}.{event_id}" if event_id else None,
        )
        if not published.duplicate:
            self.events_published += 1
        return published.sequence

    def _publish_decision(self, out: Outgoing, event_id: str, cause: Event[Any]) -> None:
        """Start publishing a decision; _flush waits for the log's answers, so a
        batch of decisions costs one round trip rather than one each."""
        assert self.bus is not None
        self._emitted += 1
        self._inflight.append(asyncio.ensure_future(self.bus.publish_event(
            out.payload, service=self.name, kind=out.kind, aggregate_id=out.aggregate_id,
            node_id=self.node_id, event_id=event_id, version=self._emitted,
            cause=cause.envelope,
        )))

    async def _flush(self) -> None:
        """Wait until the log has stored every decision published so far."""
        inflight, self._inflight = self._inflight, []
        covered = self.last_sequence
        for future in inflight:
            published = await future
            if not published.duplicate:
                self.events_published += 1
        self._flushed_sequence = covered

    # -- projection --------------------------------------------------------

    def _maybe_snapshot(self) -> None:
        rt = self.cfg.runtime
        elapsed = time.monotonic() - self._last_snapshot_at
        due = self._since_snapshot >= rt.snapshot_every or (
            self._since_snapshot > 0 and elapsed >= rt.snapshot_interval
        )
        if due:
            self.save_snapshot()

    def save_snapshot(self) -> None:
        # A snapshot may only cover events whose decisions the log already
        # holds: otherwise a restart would skip them and lose those decisions.
        if self.last_sequence == self.snapshot_sequence or (
            self.last_sequence != self._flushed_sequence
        ):
            return
        self.store.save(self.name, Snapshot(
            sequence=self.last_sequence,
            state_type=self.definition.state_type.DESCRIPTOR.full_name,
            state=self.state.SerializeToString(deterministic=True),
            events_handled=self.events_handled,
        ))
        self.snapshot_sequence = self.last_sequence
        self._since_snapshot = 0
        self._last_snapshot_at = time.monotonic()
        self.log.debug(kv("snapshot.saved", sequence=self.last_sequence))

    def status(self) -> inspect_pb2.StatusResponse:
        packed = any_pb2.Any()
        packed.Pack(self.state)
        summary = struct_pb2.Struct()
        summary.update(dict(self.definition.summarize(self.state)))
        return inspect_pb2.StatusResponse(
            service=self.name, node_id=self.node_id, last_sequence=self.last_sequence,
            events_handled=self.events_handled, events_rejected=self.events_rejected,
            events_published=self.events_published, snapshot_sequence=self.snapshot_sequence,
            uptime_seconds=time.monotonic() - self.started_at, state=packed, summary=summary,
            events_replayed=self.events_replayed, code_path=CODE_PATH,
        )


def replay(definition: ServiceDefinition[S], events: Sequence[Event[Any]]) -> S:
    """Fold events into a fresh projection, as a restart does: for tests and audits."""
    state = definition.state_type()
    for event in events:
        with contextlib.suppress(MalformedEvent):
            definition.handlers[type(event.payload)](state, event)
    return state


def main(
    definition: ServiceDefinition[Any],
    argv: Sequence[str] | None = None,
    configure: Callable[[ServiceDefinition[Any], config_mod.NodeConfig], ServiceDefinition[Any]]
    | None = None,
) -> None:
    """Entry point shared by every service's __main__; `configure` adapts the
    definition to the node file (handlers closed over configured numbers)."""
    parser = argparse.ArgumentParser(
        prog=f"python -m services.{definition.name}",
        description=f"The {definition.name} service of a mesh router: consumes "
        f"{', '.join(definition.subjects) or 'nothing'} from the node's bus and serves its "
        "inspection API on <run_dir>/{definition.name}.sock.".replace(
            "{definition.name}", definition.name
        ),
        epilog="Every [node]/[runtime] key can be overridden as MESH_<SECTION>_<KEY>.",
    )
    parser.add_argument(
        "--config", type=Path, default=None,
        help="node file (default: $MESH_CONFIG or /etc/mesh/node.toml)",
    )
    args = parser.parse_args(argv)
    try:
        cfg = config_mod.load(args.config)
    except config_mod.ConfigError as err:
        parser.exit(2, f"{parser.prog}: config: {err}\n")
    logs.setup(definition.name, cfg.node.id, cfg.node.log_level)
    if configure is not None:
        try:
            definition = configure(definition, cfg)
        except (config_mod.ConfigError, ValueError) as err:
            parser.exit(2, f"{parser.prog}: config: {err}\n")
    asyncio.run(ServiceRuntime(definition, cfg).run())
