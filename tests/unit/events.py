"""Events for handler tests: a payload in an envelope with a fresh id and time."""

from __future__ import annotations

import itertools

from google.protobuf import timestamp_pb2
from mesh.common.v1 import envelope_pb2

from services.common.envelope import Event

_seq = itertools.count(1)


def event(payload: object, at: int | None = None) -> Event:
    seq = next(_seq)
    env = envelope_pb2.Envelope(event_id=f"e{seq}",
                                occurred_at=timestamp_pb2.Timestamp(seconds=at or seq))
    return Event(envelope=env, payload=payload, subject="s", sequence=seq)  # type: ignore[arg-type]
