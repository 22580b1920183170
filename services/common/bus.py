"""The node's bus and event log: a nats-server with one JetStream stream.

Every `evt.>` subject is stored in the stream EVENTS on the node's disk; a
service reads it through a durable consumer (its name), so after a restart it
resumes where it stopped. Publishing carries a deterministic Nats-Msg-Id, so a
republish after a crash is dropped by the server as a duplicate.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass

import nats
from google.protobuf import timestamp_pb2
from google.protobuf.message import Message
from mesh.common.v1 import envelope_pb2
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.errors import TimeoutError as NatsTimeout
from nats.js import JetStreamContext
from nats.js.api import (
    AckPolicy,
    ConsumerConfig,
    DeliverPolicy,
    StorageType,
    StreamConfig,
)
from nats.js.errors import NotFoundError

from .envelope import EVENT_TYPE_HEADER, MSG_ID_HEADER, new_event_id, seal, subject, type_name
from .logs import kv
from .telemetry import inject_headers

STREAM = "EVENTS"
STREAM_SUBJECTS = ["evt.>"]

log = logging.getLogger("bus")


@dataclass(frozen=True)
class Published:
    sequence: int
    duplicate: bool


class Bus:
    """A connection to the node's nats-server and its event stream."""

    def __init__(self, nc: Client, js: JetStreamContext) -> None:
        self.nc = nc
        self.js = js

    @classmethod
    async def connect(
        cls,
        url: str,
        name: str,
        *,
        stream_max_bytes: int = 1 << 30,
        duplicate_window: float = 600.0,
        connect_timeout: float = 30.0,
    ) -> Bus:
        """Connect (retrying until nats-server answers) and make sure the stream exists."""
        deadline = asyncio.get_running_loop().time() + connect_timeout
        while True:
            try:
                nc = await nats.connect(
                    url, name=name, max_reconnect_attempts=-1, reconnect_time_wait=0.5,
                    connect_timeout=2, allow_reconnect=True,
                )
                break
            except (OSError, NatsTimeout, nats.errors.NoServersError) as err:
                if asyncio.get_running_loop().time() > deadline:
                    raise ConnectionError(f"nats-server at {url} did not answer: {err}") from err
                await asyncio.sleep(0.2)
        bus = cls(nc, nc.jetstream())
        await bus.ensure_stream(stream_max_bytes, duplicate_window)
        return bus

    async def ensure_stream(self, max_bytes: int, duplicate_window: float) -> None:
        config = StreamConfig(
            name=STREAM,
            subjects=STREAM_SUBJECTS,
            storage=StorageType.FILE,
            max_bytes=max_bytes,
            duplicate_window=duplicate_window,
        )
        try:
            await self.js.stream_info(STREAM)
        except NotFoundError:
            with contextlib.suppress(nats.js.errors.BadRequestError):
                # Another service may have created it in the meantime.
                await self.js.add_stream(config)
                log.info(kv("stream.created", stream=STREAM, max_bytes=max_bytes))

    async def publish(
        self, subject: str, data: bytes, event_type: str, event_id: str,
    ) -> Published:
        """Publish raw bytes as an event (tools and tests; services use publish_event)."""
        hdrs = {EVENT_TYPE_HEADER: event_type, MSG_ID_HEADER: event_id}
        ack = await self.js.publish(subject, data, headers=hdrs, stream=STREAM)
        return Published(sequence=ack.seq, duplicate=bool(ack.duplicate))

    def _sealed(
        self,
        payload: Message,
        service: str,
        kind: str,
        aggregate_id: str,
        node_id: str,
        event_id: str | None,
        version: int,
        cause: envelope_pb2.Envelope | None,
        source: str | None,
    ) -> tuple[str, bytes, dict[str, str]]:
        event_id = event_id or new_event_id()
        occurred = timestamp_pb2.Timestamp()
        if cause is not None:
            occurred.CopyFrom(cause.occurred_at)
        else:
            occurred.GetCurrentTime()
        envelope = seal(
            payload, event_id=event_id, node_id=node_id, source=source or service,
            aggregate_id=aggregate_id, version=version, occurred_at=occurred,
            causation_id=cause.event_id if cause else "",
            correlation_id=cause.correlation_id if cause else "",
        )
        headers = inject_headers({
            EVENT_TYPE_HEADER: type_name(type(payload)), MSG_ID_HEADER: event_id,
        })
        return subject(service, kind, aggregate_id), envelope.SerializeToString(), headers

    async def publish_event(
        self,
        payload: Message,
        *,
        service: str,
        kind: str,
        aggregate_id: str,
        node_id: str,
        event_id: str | None = None,
        version: int = 0,
        cause: envelope_pb2.Envelope | None = None,
        source: str | None = None,
    ) -> Published:
        """Seal payload in an Envelope, publish it on evt.<service>.<kind>.<aggregate_id>
        and wait for the log to store it.

        The current trace context goes into the headers. An event decided in
        response to `cause` takes its time from it, so the decision is
        reproducible; any other event is stamped with the clock.
        """
        subj, data, headers = self._sealed(
            payload, service, kind, aggregate_id, node_id, event_id, version, cause, source
        )
        ack = await self.js.publish(subj, data, headers=headers, stream=STREAM)
        return Published(sequence=ack.seq, duplicate=bool(ack.duplicate))

    async def durable(
        self, name: str, filter_subjects: Sequence[str], ack_wait: float
    ) -> JetStreamContext.PullSubscription:
        """Bind to (creating if needed) the service's durable pull consumer."""
        config = ConsumerConfig(
            durable_name=name,
            filter_subjects=list(filter_subjects),
            ack_policy=AckPolicy.EXPLICIT,
            deliver_policy=DeliverPolicy.ALL,
            ack_wait=ack_wait,
            max_ack_pending=1024,
        )
        await self.js.add_consumer(STREAM, config)
        return await self.js.pull_subscribe_bind(durable=name, stream=STREAM)

    async def ack_floor(self, durable: str) -> int:
        """Stream sequence up to which the durable consumer has acknowledged everything."""
        try:
            info = await self.js.consumer_info(STREAM, durable)
        except NotFoundError:
            return 0
        return info.ack_floor.stream_seq if info.ack_floor else 0

    async def last_sequence(self) -> int:
        info = await self.js.stream_info(STREAM)
        return info.state.last_seq

    async def read_from(
        self, filter_subjects: Sequence[str], start_sequence: int, batch: int = 256
    ) -> AsyncIterator[Msg]:
        """Every stored message on filter_subjects from start_sequence to the current end.

        Used to replay the log after a snapshot; reads through a short-lived
        consumer that acknowledges nothing.
        """
        end = await self.last_sequence()
        if start_sequence > end:
            return
        config = ConsumerConfig(
            filter_subjects=list(filter_subjects),
            ack_policy=AckPolicy.NONE,
            deliver_policy=DeliverPolicy.BY_START_SEQUENCE,
            opt_start_seq=max(start_sequence, 1),
            inactive_threshold=30.0,
            mem_storage=True,
        )
        info = await self.js.add_consumer(STREAM, config)
        sub = await self.js.pull_subscribe_bind(consumer=info.name, stream=STREAM)
        try:
            if info.num_pending == 0:
                return
            while True:
                try:
                    msgs = await sub.fetch(batch, timeout=2)
                except (TimeoutError, NatsTimeout):
                    return
                for msg in msgs:
                    if msg.metadata.sequence.stream > end:
                        return
                    yield msg
                    if msg.metadata.num_pending == 0 or msg.metadata.sequence.stream == end:
                        return
        finally:
            await sub.unsubscribe()
            with contextlib.suppress(Exception):
                await self.js.delete_consumer(STREAM, info.name)

    async def close(self) -> None:
        # Everything that must be stored was awaited already; flush what is
        # buffered (acks) and close, rather than drain, which waits on
        # subscriptions' pending fetches.
        with contextlib.suppress(Exception):
            await self.nc.flush(timeout=2)
        with contextlib.suppress(Exception):
            await self.nc.close()
