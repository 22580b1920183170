"""sharp's handlers: pure functions of (state, event)."""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping
from typing import Any, Final

from google.protobuf.message import Message
from mesh.sharp.v1 import sharp_pb2

from services.common.envelope import Event, MalformedEvent
from services.common.runtime import Handler, Outgoing

_ORIGIN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_:-]{0,63}$")


def on_ping(state: sharp_pb2.SharpState, event: Event[sharp_pb2.PingSent]) -> list[Outgoing]:
    ping = event.payload
    if not _ORIGIN.match(ping.origin):
        raise MalformedEvent(f"ping origin {ping.origin!r} is not a name")
    state.pings_seen += 1
    state.value_sum += ping.value
    state.digest = hashlib.sha256(state.digest + event.event_id.encode()).digest()
    state.pings_by_origin[ping.origin] += 1
    pong = sharp_pb2.PongSent(
        ping_event_id=event.event_id, sequence=ping.sequence, value=ping.value, origin=ping.origin
    )
    return [Outgoing("pong", ping.origin, pong)]


def summarize(state: sharp_pb2.SharpState) -> Mapping[str, Any]:
    return {
        "pings_seen": state.pings_seen,
        "value_sum": state.value_sum,
        "origins": len(state.pings_by_origin),
        "digest": state.digest.hex()[:16],
    }


HANDLERS: Final[Mapping[type[Message], Handler[Any]]] = {
    sharp_pb2.PingSent: on_ping,
}
