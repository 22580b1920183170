"""Events on the wire: subjects, the Envelope, and strict decoding.

A subject runs from broad to narrow, `evt.<service>.<kind>.<aggregate_id>`,
one kind per subject so consumers subscribe narrowly. The payload's type rides
in the `Mesh-Event-Type` header (the `Nats-` prefix is the server's).
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Generic, TypeVar

from google.protobuf import any_pb2, timestamp_pb2
from google.protobuf.message import DecodeError, Message
from mesh.common.v1 import envelope_pb2

EVENT_TYPE_HEADER = "Mesh-Event-Type"
MSG_ID_HEADER = "Nats-Msg-Id"
TYPE_URL_PREFIX = "type.googleapis.com/"
# Deterministic event ids: the same decision always gets the same id.
EVENT_ID_NAMESPACE = uuid.UUID("4f9e3c52-6a1d-4d8e-9a57-2b8f0d6e4c11")

_TOKEN = re.compile(r"^[a-z0-9][a-z0-9_-]*$")
_AGGREGATE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_:-]*$")

M = TypeVar("M", bound=Message)


class MalformedEvent(ValueError):
    """An event that cannot be used: logged, counted and skipped, never fatal."""


def subject(service: str, kind: str, aggregate_id: str) -> str:
    for name, value in (("service", service), ("kind", kind)):
        if not _TOKEN.match(value):
            raise ValueError(f"subject {name} {value!r} must be lower case [a-z0-9_-]")
    if not _AGGREGATE.match(aggregate_id):
        raise ValueError(f"aggregate id {aggregate_id!r} must be [A-Za-z0-9_:-] (no dots)")
    return f"evt.{service}.{kind}.{aggregate_id}"


def type_name(message_type: type[Message]) -> str:
    return message_type.DESCRIPTOR.full_name


def derived_event_id(node_id: str, service: str, cause_id: str, index: int) -> str:
    return str(uuid.uuid5(EVENT_ID_NAMESPACE, f"{node_id}/{service}/{cause_id}/{index}"))


def new_event_id() -> str:
    return str(uuid.uuid4())


@dataclass(frozen=True)
class Event(Generic[M]):
    """A decoded event as handlers see it."""

    envelope: envelope_pb2.Envelope
    payload: M
    subject: str
    sequence: int

    @property
    def event_id(self) -> str:
        return self.envelope.event_id

    @property
    def aggregate_id(self) -> str:
        return self.envelope.aggregate_id

    @property
    def occurred_at(self) -> timestamp_pb2.Timestamp:
        return self.envelope.occurred_at


def seal(
    payload: Message,
    *,
    event_id: str,
    node_id: str,
    source: str,
    aggregate_id: str,
    version: int,
    occurred_at: timestamp_pb2.Timestamp,
    causation_id: str = "",
    correlation_id: str = "",
) -> envelope_pb2.Envelope:
    packed = any_pb2.Any()
    packed.Pack(payload)
    return envelope_pb2.Envelope(
        event_id=event_id,
        node_id=node_id,
        source=source,
        aggregate_id=aggregate_id,
        version=version,
        occurred_at=occurred_at,
        causation_id=causation_id,
        correlation_id=correlation_id or event_id,
        payload=packed,
    )


def open_envelope(
    data: bytes,
    headers: Mapping[str, str] | None,
    subject_: str,
    sequence: int,
    known: Mapping[str, type[Message]],
) -> Event[Message]:
    """Decode and check one message; raise MalformedEvent saying what is wrong."""
    header_type = (headers or {}).get(EVENT_TYPE_HEADER, "")
    if not header_type:
        raise MalformedEvent(f"no {EVENT_TYPE_HEADER} header")
    envelope = envelope_pb2.Envelope()
    try:
        envelope.ParseFromString(data)
    except DecodeError as err:
        raise MalformedEvent(f"envelope does not decode: {err}") from None
    if not envelope.event_id or not envelope.HasField("payload"):
        raise MalformedEvent("envelope lacks event_id or payload")
    type_url = envelope.payload.type_url
    if not type_url.startswith(TYPE_URL_PREFIX):
        raise MalformedEvent(f"payload type_url {type_url!r} is not a protobuf type")
    payload_type = type_url.removeprefix(TYPE_URL_PREFIX)
    if payload_type != header_type:
        raise MalformedEvent(
            f"payload is {payload_type} but {EVENT_TYPE_HEADER} says {header_type}"
        )
    cls = known.get(payload_type)
    if cls is None:
        raise MalformedEvent(f"no handler here for event type {payload_type}")
    payload = cls()
    try:
        payload.ParseFromString(envelope.payload.value)
    except DecodeError as err:
        raise MalformedEvent(f"{payload_type} payload does not decode: {err}") from None
    return Event(envelope=envelope, payload=payload, subject=subject_, sequence=sequence)
