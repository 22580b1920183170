"""Subjects, envelopes and strict decoding, without a server."""

from __future__ import annotations

import pytest
from google.protobuf import timestamp_pb2
from mesh.sharp.v1 import sharp_pb2

from services.common.envelope import (
    EVENT_TYPE_HEADER,
    MalformedEvent,
    derived_event_id,
    open_envelope,
    seal,
    subject,
    type_name,
)
from services.common.runtime import replay
from services.sharp.service import DEFINITION

KNOWN = {type_name(sharp_pb2.PingSent): sharp_pb2.PingSent}
HEADERS = {EVENT_TYPE_HEADER: type_name(sharp_pb2.PingSent)}


def sealed(event_id: str, origin: str = "a", value: int = 1) -> bytes:
    return seal(sharp_pb2.PingSent(sequence=1, value=value, origin=origin), event_id=event_id,
                node_id="n", source="test", aggregate_id=origin, version=1,
                occurred_at=timestamp_pb2.Timestamp(seconds=1)).SerializeToString()


def test_subjects_run_broad_to_narrow() -> None:
    assert subject("meter", "usage", "peer-1") == "evt.meter.usage.peer-1"
    with pytest.raises(ValueError, match="no dots"):
        subject("meter", "usage", "10.0.0.1")
    with pytest.raises(ValueError, match="lower case"):
        subject("Meter", "usage", "x")


def test_derived_ids_are_stable_and_distinct() -> None:
    assert derived_event_id("n", "s", "e", 0) == derived_event_id("n", "s", "e", 0)
    assert derived_event_id("n", "s", "e", 0) != derived_event_id("n", "s", "e", 1)
    assert derived_event_id("n", "s", "e", 0) != derived_event_id("m", "s", "e", 0)


def test_a_good_event_opens() -> None:
    event = open_envelope(sealed("e1"), HEADERS, "evt.sharp.ping.a", 4, KNOWN)
    assert event.event_id == "e1" and event.sequence == 4
    assert event.payload.origin == "a"


@pytest.mark.parametrize(
    ("data", "headers", "message"),
    [
        (b"\xff\xff\xff", HEADERS, "envelope does not decode"),
        (sealed("e1"), {}, "no Mesh-Event-Type header"),
        (sealed("e1"), {EVENT_TYPE_HEADER: "mesh.sharp.v1.PongSent"}, "but Mesh-Event-Type says"),
        (b"", HEADERS, "lacks event_id or payload"),
    ],
)
def test_malformed_events_say_what_is_wrong(
    data: bytes, headers: dict[str, str], message: str
) -> None:
    with pytest.raises(MalformedEvent, match=message):
        open_envelope(data, headers, "evt.sharp.ping.a", 1, KNOWN)


def test_an_unhandled_type_is_refused() -> None:
    with pytest.raises(MalformedEvent, match="no handler here"):
        open_envelope(sealed("e1"), HEADERS, "evt.sharp.ping.a", 1, {})


def test_replay_is_deterministic() -> None:
    events = [open_envelope(sealed(f"e{i}", origin=f"o{i % 3}", value=i), HEADERS, "s", i, KNOWN)
              for i in range(1, 200)]
    first, second = replay(DEFINITION, events), replay(DEFINITION, events)
    assert first.SerializeToString(deterministic=True) == second.SerializeToString(
        deterministic=True
    )
    assert first.pings_seen == 199 and dict(first.pings_by_origin) == {
        "o0": 66, "o1": 67, "o2": 66}
    reordered = replay(DEFINITION, [*events[1:], events[0]])
    assert reordered.digest != first.digest
