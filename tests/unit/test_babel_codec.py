"""The Babel codec: what babeld sends decodes, what we send round-trips, and
what a receiver must tolerate is tolerated and counted, never raised."""

from __future__ import annotations

import contextlib
import struct
from ipaddress import IPv4Address, IPv6Address

import pytest
from hypothesis import given
from hypothesis import strategies as st

from services.route.babel.codec import (
    INFINITY,
    Ack,
    AckRequest,
    BabelRejected,
    Hello,
    Ihu,
    RouteRequest,
    SeqnoRequest,
    Update,
    WildcardRetraction,
    decode,
    encode,
    network,
)
from tests.unit.fuzzing import FUZZ, mutations

RID = bytes.fromhex("0102030405060708")
SOURCE = IPv6Address("fe80::5")


def packet(*tlvs: bytes) -> bytes:
    body = b"".join(tlvs)
    return struct.pack("!BBH", 42, 2, len(body)) + body


def tlv(kind: int, body: bytes) -> bytes:
    return bytes((kind, len(body))) + body


def test_every_message_round_trips_in_one_packet() -> None:
    messages = [
        Hello(5, 400), Hello(6, 400, unicast=True), Ihu(96, 1200, IPv6Address("fe80::1")),
        Ihu(256, 1200, None), Ihu(96, 400, IPv6Address("2001:db8::1")),
        Update(network("2001:db8:0:1::1/128"), RID, 7, 96, 1600, SOURCE, 1234),
        Update(network("2001:db8:0:2::/64"), RID, 7, 192, 1600, SOURCE, None),
        Update(network("192.0.2.1/32"), RID, 7, 192, 1600, SOURCE, 2**200, v4_via_v6=True),
        RouteRequest(None), RouteRequest(network("2001:db8::/32")),
        RouteRequest(network("10.0.0.0/8")),
        SeqnoRequest(network("2001:db8::/32"), 3, 64, RID), AckRequest(1, 2), Ack(3),
        WildcardRetraction(400),
    ]
    [data] = encode(messages)
    decoded = decode(data, SOURCE)
    assert decoded.messages == messages
    assert not decoded.dropped


def test_prefixes_of_one_packet_are_compressed_and_restored() -> None:
    updates = [Update(network(f"2001:db8:0:{i:x}::1/128"), RID, 1, 96, 400)
               for i in range(1, 40)]
    [data] = encode(updates)
    # One Router-Id; the first Update in full, then the 9 bytes after the shared 7.
    assert len(data) == 4 + 12 + (12 + 16) + 38 * (12 + 9)
    assert [m.prefix for m in decode(data, SOURCE).messages] == [u.prefix for u in updates]


def test_a_retraction_has_infinite_metric() -> None:
    retraction = Update(network("2001:db8::/64"), RID, 9, INFINITY, 400, SOURCE)
    [data] = encode([retraction])
    [decoded] = decode(data, SOURCE).messages
    assert isinstance(decoded, Update) and decoded.retraction


def test_an_ipv4_update_after_an_explicit_next_hop_starts_a_packet_of_its_own() -> None:
    messages = [Update(network("2001:db8::/64"), RID, 1, 96, 400, IPv6Address("fe80::9")),
                Update(network("2001:db8:1::/64"), RID, 1, 96, 400, None)]
    packets = encode(messages)
    assert len(packets) == 2
    assert decode(packets[1], SOURCE).messages[0].next_hop == SOURCE


def test_large_batches_are_split_below_the_packet_limit() -> None:
    updates = [Update(network(f"2001:db8:{i:x}::/48"), RID, 1, 96, 400, SOURCE, 10**6)
               for i in range(400)]
    packets = encode(updates, max_packet=1000)
    assert len(packets) > 1 and all(len(p) <= 1000 for p in packets)
    assert [m for p in packets for m in decode(p, SOURCE).messages] == updates


def test_babeld_style_update_with_router_id_flag_and_ipv4_next_hop() -> None:
    # AE 1 with a Next Hop TLV, router-id taken from the prefix (flag 0x40).
    data = packet(
        tlv(7, bytes((1, 0)) + IPv4Address("10.0.0.1").packed),
        tlv(8, struct.pack("!BBBBHHH", 1, 0x40, 32, 0, 400, 3, 96) + bytes((10, 0, 0, 9))),
    )
    [update] = decode(data, SOURCE).messages
    assert update == Update(network("10.0.0.9/32"), bytes(4) + bytes((10, 0, 0, 9)), 3, 96, 400,
                            IPv4Address("10.0.0.1"))


def test_pad_unknown_tlvs_and_a_trailer_are_skipped() -> None:
    hello = tlv(4, struct.pack("!HHH", 0, 1, 400))
    data = packet(b"\x00", tlv(1, bytes(3)), tlv(99, b"whatever"), hello) + b"trailer"
    decoded = decode(data, SOURCE)
    assert decoded.messages == [Hello(1, 400)]
    assert decoded.dropped == {"unknown-tlv": 1}


def test_unknown_mandatory_sub_tlv_drops_only_its_update() -> None:
    rid = tlv(6, bytes(2) + RID)
    head = struct.pack("!BBBBHHH", 2, 0, 64, 0, 400, 1, 96) + bytes.fromhex("20010db800000000")
    with_mandatory = tlv(8, head + tlv(130, b"x"))
    with_experimental = tlv(8, head + tlv(113, b"y"))
    decoded = decode(packet(rid, with_mandatory, with_experimental), SOURCE)
    assert decoded.dropped == {"mandatory-subtlv": 1}
    assert [m.prefix for m in decoded.messages] == [network("2001:db8::/64")]


def test_mandatory_sub_tlv_in_a_hello_drops_the_hello() -> None:
    hello = tlv(4, struct.pack("!HHH", 0, 1, 400) + tlv(200, b""))
    assert decode(packet(hello), SOURCE).dropped == {"mandatory-subtlv": 1}


@pytest.mark.parametrize(("body", "reason"), [
    (tlv(4, b"\x00\x00"), "short"),  # Hello of 2 bytes
    (tlv(5, struct.pack("!BBHH", 9, 0, 96, 400)), "bad-ae"),  # IHU with AE 9
    (tlv(8, struct.pack("!BBBBHHH", 2, 0, 64, 0, 400, 1, 96) + bytes(8)), "no-router-id"),
    (tlv(8, struct.pack("!BBBBHHH", 2, 0, 200, 0, 400, 1, 96)), "bad-prefix"),  # plen 200
    (tlv(8, struct.pack("!BBBBHHH", 2, 0, 64, 4, 400, 1, 96) + bytes(4)), "bad-prefix"),
    (tlv(8, struct.pack("!BBBBHHH", 0, 0, 0, 0, 400, 1, 96)), "bad-prefix"),  # AE 0, finite
    (tlv(6, bytes(10)), "bad-router-id"),
    (tlv(10, struct.pack("!BBHBB", 0, 0, 1, 2, 0) + RID), "bad-ae"),
])
def test_malformed_tlvs_are_counted_by_reason(body: bytes, reason: str) -> None:
    decoded = decode(packet(body, tlv(4, struct.pack("!HHH", 0, 1, 400))), SOURCE)
    assert decoded.dropped == {reason: 1}
    assert decoded.messages == [Hello(1, 400)]  # the rest of the packet still counts


def test_a_tlv_longer_than_the_packet_ends_it() -> None:
    data = packet(tlv(4, struct.pack("!HHH", 0, 1, 400)), b"\x04\x40\x00")
    decoded = decode(data, SOURCE)
    assert decoded.messages == [Hello(1, 400)]
    assert decoded.dropped == {"truncated": 1}


@pytest.mark.parametrize(("data", "reason"), [
    (b"\x2a", "short"), (b"\x2b\x02\x00\x00", "magic"), (b"\x2a\x01\x00\x00", "version"),
    (b"\x2a\x02\x00\x09abc", "length"),
])
def test_a_bad_header_rejects_the_datagram(data: bytes, reason: str) -> None:
    with pytest.raises(BabelRejected) as caught:
        decode(data, SOURCE)
    assert caught.value.reason == reason


@FUZZ
@given(st.data())
def test_mutated_packets_never_raise_anything_but_a_rejection(data: st.DataObject) -> None:
    [base] = encode([
        Hello(1, 400), Ihu(96, 1200, IPv6Address("fe80::1")),
        Update(network("2001:db8:0:1::1/128"), RID, 7, 96, 1600, None, 1234),
        Update(network("192.0.2.1/32"), RID, 7, 96, 1600, None, 5, v4_via_v6=True),
        SeqnoRequest(network("2001:db8::/32"), 3, 64, RID), RouteRequest(None),
    ])
    mutated = data.draw(mutations(base))
    with contextlib.suppress(BabelRejected):
        decode(mutated, SOURCE)


@FUZZ
@given(st.binary(max_size=300))
def test_random_bodies_never_raise(body: bytes) -> None:
    decoded = decode(packet(body), SOURCE)
    assert sum(decoded.dropped.values()) + len(decoded.messages) <= len(body)
