"""The chassis on a live node: real nats-server with JetStream, real
supervisord, the sharp service as the service under test."""

from __future__ import annotations

import asyncio
import hashlib
import os
import signal
import sqlite3
from collections.abc import Callable

import grpc
import pytest
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)
from mesh.common.v1 import envelope_pb2, inspect_pb2, inspect_pb2_grpc
from mesh.sharp.v1 import sharp_pb2
from opentelemetry.sdk.trace import TracerProvider

from deploy.emulator.mesh import service_pid
from deploy.meshctl import client
from services.common.bus import Bus
from services.common.envelope import EVENT_TYPE_HEADER, MSG_ID_HEADER, open_envelope, type_name
from services.common.runtime import replay
from services.sharp.service import DEFINITION
from tests.conftest import RunningNode, wait_for

pytestmark = [pytest.mark.chassis]


def sharp_status(node: RunningNode) -> inspect_pb2.StatusResponse:
    return client.status(node.layout.socket("sharp"))


def sharp_state(node: RunningNode) -> sharp_pb2.SharpState:
    state = sharp_pb2.SharpState()
    sharp_status(node).state.Unpack(state)
    return state


async def publish_pings(bus: Bus, count: int, origin: str = "test", start: int = 1) -> None:
    for seq in range(start, start + count):
        await bus.publish_event(
            sharp_pb2.PingSent(sequence=seq, value=seq * 3, origin=origin),
            service="sharp", kind="ping", aggregate_id=origin, node_id="test", source="test",
        )


async def stored(bus: Bus, subject: str) -> list:
    return [msg async for msg in bus.read_from([subject], 1)]


def test_event_round_trip_keeps_trace_context(make_node: Callable[..., RunningNode]) -> None:
    node = make_node()
    tracer = TracerProvider().get_tracer("test")

    async def scenario() -> None:
        bus = await Bus.connect(node.nats_url, "test")
        pongs: asyncio.Queue = asyncio.Queue()
        await bus.nc.subscribe("evt.sharp.pong.>", cb=pongs.put)
        with tracer.start_as_current_span("user action") as root:
            sent = await bus.publish_event(
                sharp_pb2.PingSent(sequence=1, value=7, origin="tracer"),
                service="sharp", kind="ping", aggregate_id="tracer", node_id="test",
                source="test",
            )
        pong_msg = await asyncio.wait_for(pongs.get(), timeout=20)
        trace_id = format(root.get_span_context().trace_id, "032x")
        parent_span = format(root.get_span_context().span_id, "016x")
        traceparent = pong_msg.headers["traceparent"]
        # version-traceid-spanid-flags: same trace, a new span (sharp's handler)
        _, pong_trace, pong_span, _ = traceparent.split("-")
        assert pong_trace == trace_id
        assert pong_span != parent_span
        assert pong_msg.headers[EVENT_TYPE_HEADER] == type_name(sharp_pb2.PongSent)
        envelope = envelope_pb2.Envelope.FromString(pong_msg.data)
        pong = sharp_pb2.PongSent()
        envelope.payload.Unpack(pong)
        pings = await stored(bus, "evt.sharp.ping.>")
        ping_envelope = envelope_pb2.Envelope.FromString(pings[0].data)
        assert sent.sequence == pings[0].metadata.sequence.stream
        assert pong.ping_event_id == ping_envelope.event_id
        assert envelope.causation_id == ping_envelope.event_id
        assert envelope.correlation_id == ping_envelope.correlation_id
        assert envelope.source == "sharp" and envelope.node_id == "t0"
        await bus.close()

    asyncio.run(scenario())


def test_kill_9_mid_stream_ends_with_same_projection(
    make_node: Callable[..., RunningNode],
) -> None:
    total = 3000
    node = make_node(snapshot_every=200)

    async def scenario() -> None:
        bus = await Bus.connect(node.nats_url, "test")
        publisher = asyncio.create_task(publish_pings(bus, total))
        await asyncio.to_thread(
            wait_for, "sharp to be mid-stream", lambda: sharp_state(node).pings_seen > 600
        )
        victim = service_pid(node.layout, "sharp")
        os.kill(victim, signal.SIGKILL)
        await publisher
        await asyncio.to_thread(
            wait_for, "supervisord to restart sharp",
            lambda: service_pid(node.layout, "sharp") != victim, 60,
        )
        await asyncio.to_thread(
            wait_for, f"sharp to fold all {total} pings",
            lambda: client.health(node.layout.socket("sharp")) == "SERVING"
            and sharp_state(node).pings_seen == total, 120,
        )
        # The uninterrupted run: fold the same log from scratch in one go.
        pings = await stored(bus, "evt.sharp.ping.>")
        events = [
            open_envelope(m.data, m.headers, m.subject, m.metadata.sequence.stream,
                          {type_name(sharp_pb2.PingSent): sharp_pb2.PingSent})
            for m in pings
        ]
        reference = replay(DEFINITION, events)
        live = sharp_state(node)
        assert live.SerializeToString(deterministic=True) == reference.SerializeToString(
            deterministic=True
        )
        assert live.value_sum == 3 * total * (total + 1) // 2
        # Every ping answered exactly once: none lost, none doubled by the restart.
        pongs = await stored(bus, "evt.sharp.pong.>")
        answered = [sharp_pb2.PongSent() for _ in pongs]
        for pong, msg in zip(answered, pongs, strict=True):
            envelope_pb2.Envelope.FromString(msg.data).payload.Unpack(pong)
        assert sorted(p.sequence for p in answered) == list(range(1, total + 1))
        await bus.close()

    asyncio.run(scenario())
    status = sharp_status(node)
    assert status.events_handled == total
    assert status.snapshot_sequence > 0  # it restarted from a snapshot, not from zero


def test_reflection_lists_every_service_method(make_node: Callable[..., RunningNode]) -> None:
    node = make_node()
    for service in ("sharp",):
        with grpc.insecure_channel(f"unix:{node.layout.socket(service)}") as channel:
            db = ProtoReflectionDescriptorDatabase(channel)
            names = set(db.get_services())
            assert {"mesh.common.v1.Inspect", "grpc.health.v1.Health",
                    "grpc.reflection.v1alpha.ServerReflection"} <= names
            inspect = db.FindFileContainingSymbol("mesh.common.v1.Inspect")
            methods = {m.name for s in inspect.service for m in s.method}
            assert methods == {"Status", "Watch"}


def test_malformed_events_are_logged_and_skipped(make_node: Callable[..., RunningNode]) -> None:
    node = make_node()
    pid_before = service_pid(node.layout, "sharp")

    async def scenario() -> None:
        bus = await Bus.connect(node.nats_url, "test")
        ping_type = type_name(sharp_pb2.PingSent)
        # 1. garbage bytes, with a plausible type header
        await bus.publish("evt.sharp.ping.x", b"\xff\xfe garbage \x00", ping_type, "bad-1")
        # 2. no type header at all
        await bus.js.publish("evt.sharp.ping.x", b"\x01\x02", headers={MSG_ID_HEADER: "bad-2"})
        # 3. a well-formed event of the wrong type on sharp's subject
        await bus.publish_event(
            sharp_pb2.PongSent(sequence=1), service="sharp", kind="ping", aggregate_id="x",
            node_id="test",
        )
        # 4. header and payload disagree about the type
        envelope = envelope_pb2.Envelope(event_id="bad-4")
        envelope.payload.Pack(sharp_pb2.PongSent(sequence=2))
        await bus.publish("evt.sharp.ping.x", envelope.SerializeToString(), ping_type, "bad-4")
        # 5. the right type, but a value the handler refuses
        await bus.publish_event(
            sharp_pb2.PingSent(sequence=1, origin="has space"), service="sharp", kind="ping",
            aggregate_id="x", node_id="test",
        )
        # then a good one, which must still be handled
        await publish_pings(bus, 1, origin="good")
        await bus.close()

    asyncio.run(scenario())
    wait_for("the good ping", lambda: sharp_state(node).pings_seen == 1)
    status = sharp_status(node)
    assert status.events_rejected == 5
    assert dict(sharp_state(node).pings_by_origin) == {"good": 1}
    assert service_pid(node.layout, "sharp") == pid_before
    log = (node.layout.log_dir / "sharp.log").read_text()
    assert "event.rejected" in log and "does not decode" in log
    assert "no Mesh-Event-Type header" in log
    assert "payload is mesh.sharp.v1.PongSent but Mesh-Event-Type says" in log
    assert "event.refused" in log and "is not a name" in log


def test_clean_stop_flushes_projection_and_restart_resumes(
    make_node: Callable[..., RunningNode],
) -> None:
    node = make_node(snapshot_every=100000, snapshot_interval=3600.0)

    async def send(count: int, start: int) -> None:
        bus = await Bus.connect(node.nats_url, "test")
        await publish_pings(bus, count, start=start)
        await bus.close()

    asyncio.run(send(50, 1))
    wait_for("50 pings", lambda: sharp_state(node).pings_seen == 50)
    before = sharp_state(node)
    node.ctl("stop", "sharp")
    db = node.layout.data_dir / "projections" / "sharp.sqlite"
    with sqlite3.connect(db) as conn:
        (blob,) = conn.execute("select state from snapshots where service='sharp'").fetchone()
    assert sharp_pb2.SharpState.FromString(blob) == before  # SIGTERM flushed the projection
    asyncio.run(send(25, 51))  # published while sharp is down: the durable consumer keeps them
    node.ctl("start", "sharp")
    node.wait_serving()
    wait_for("75 pings", lambda: sharp_state(node).pings_seen == 75)
    status = sharp_status(node)
    assert status.events_replayed == 0  # nothing to replay: the snapshot was current
    assert sharp_state(node).value_sum == 3 * 75 * 76 // 2


def test_watch_sends_snapshot_then_changes(make_node: Callable[..., RunningNode]) -> None:
    node = make_node()
    with grpc.insecure_channel(f"unix:{node.layout.socket('sharp')}") as channel:
        stream = inspect_pb2_grpc.InspectStub(channel).Watch(inspect_pb2.WatchRequest())
        first = next(stream)
        assert first.status.events_handled == 0

        async def send() -> None:
            bus = await Bus.connect(node.nats_url, "test")
            await publish_pings(bus, 3)
            await bus.close()

        asyncio.run(send())
        seen = first.status.events_handled
        for update in stream:
            assert update.status.events_handled >= seen
            seen = update.status.events_handled
            if seen == 3:
                break
        stream.cancel()
    assert seen == 3


def test_digest_is_order_sensitive() -> None:
    # The projection's digest is what the kill -9 test compares: make sure it
    # really depends on which events were folded and in what order.
    def digest(ids: list[str]) -> bytes:
        d = b""
        for i in ids:
            d = hashlib.sha256(d + i.encode()).digest()
        return d

    assert digest(["a", "b"]) != digest(["b", "a"])
