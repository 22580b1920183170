"""The signed hello: round trip, every rejection reason from a crafted hello,
tampering, and fuzzing (decode_hello returns a HelloInfo or raises
HelloRejected, nothing else). No network, no clock."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st
from mesh.discovery.v1 import hello_pb2

from services.common.identity import Identity
from services.discovery.hello import (
    HELLO_GROUP,
    HELLO_PORT,
    HELLO_TAG,
    MAX_HELLO_BYTES,
    REASONS,
    HelloInfo,
    HelloRejected,
    decode_hello,
    encode_hello,
)
from tests.unit.fuzzing import FUZZ, mutations

NOW = 1_700_000_000_000


@pytest.fixture(scope="module")
def alice(tmp_path_factory: pytest.TempPathFactory) -> Identity:
    return Identity.load_or_create(tmp_path_factory.mktemp("alice"))


@pytest.fixture(scope="module")
def mallory(tmp_path_factory: pytest.TempPathFactory) -> Identity:
    return Identity.load_or_create(tmp_path_factory.mktemp("mallory"))


@pytest.fixture(scope="module")
def valid(alice: Identity) -> bytes:
    return encode_hello(alice, "alice", 7387, 1000, NOW)


def craft(
    identity: Identity, signer: Identity | None = None, tag: bytes = HELLO_TAG, **fields: object
) -> bytes:
    """A hello signed as the module docstring says, with any field overridden;
    signed by `signer` (default: identity) over `tag`."""
    hello = hello_pb2.Hello(
        node_id="alice",
        identity_key=identity.identity_key,
        wireguard_key=identity.wireguard_public,
        endpoint_port=7387,
        hello_interval_ms=1000,
        sent_at_ms=NOW,
    )
    for name, value in fields.items():
        setattr(hello, name, value)
    if "signature" not in fields:
        signed = tag + hello.SerializeToString(deterministic=True)
        hello.signature = (signer or identity).sign(signed)
    return hello.SerializeToString(deterministic=True)


def test_round_trip(alice: Identity, valid: bytes) -> None:
    info = decode_hello(valid, NOW + 20)
    assert info == HelloInfo(
        node_id="alice",
        identity_key=alice.identity_key,
        chain_address=alice.chain_address,
        wireguard_key=alice.wireguard_public,
        endpoint_port=7387,
        hello_interval_ms=1000,
        sent_at_ms=NOW,
    )


def test_constants() -> None:
    assert HELLO_GROUP.startswith("ff02:")  # link-local multicast scope
    assert (HELLO_PORT, MAX_HELLO_BYTES, HELLO_TAG) == (7386, 512, b"mesh-hello-v1")


def test_size(alice: Identity) -> None:
    longest = encode_hello(alice, "a" * 32, 65535, 60_000, 2**64 - 1)
    print(
        f"hello: {len(encode_hello(alice, 'alice', 7387, 1000, NOW))} bytes, at most {len(longest)}"
    )
    assert len(longest) < 300


def test_the_signed_bytes_are_as_documented(alice: Identity, valid: bytes) -> None:
    assert craft(alice, node_id="alice") == valid  # signing is deterministic (RFC 6979)


def test_fields_a_newer_sender_adds_are_signed_and_accepted(alice: Identity) -> None:
    unknown = bytes([15 << 3 | 0, 42])  # field 15, varint 42
    hello = hello_pb2.Hello.FromString(craft(alice))
    hello.ClearField("signature")
    unsigned = hello.SerializeToString(deterministic=True) + unknown
    signature = alice.sign(HELLO_TAG + unsigned)
    # Serialization puts known fields in number order, unknown ones last.
    data = unsigned[: -len(unknown)] + bytes([7 << 3 | 2, 65]) + signature + unknown
    assert decode_hello(data, NOW).node_id == "alice"
    forged = data[:-1] + bytes([43])
    with pytest.raises(HelloRejected) as err:
        decode_hello(forged, NOW)
    assert err.value.reason == "signature"


@pytest.mark.parametrize(
    ("node_id", "port", "interval"),
    [
        ("Alice", 7387, 1000),
        ("", 7387, 1000),
        ("a" * 33, 7387, 1000),
        ("-a", 7387, 1000),
        ("alice", 0, 1000),
        ("alice", 65536, 1000),
        ("alice", -1, 1000),
        ("alice", 7387, 99),
        ("alice", 7387, 60_001),
    ],
)
def test_encode_refuses_bad_arguments(
    alice: Identity, node_id: str, port: int, interval: int
) -> None:
    with pytest.raises(ValueError):
        encode_hello(alice, node_id, port, interval, NOW)


def _non_canonical(alice: Identity) -> bytes:
    # The same hello with node_id sent twice (the parser keeps the last).
    return b"\x0a\x01x" + craft(alice)


def _unknown_field_first(alice: Identity) -> bytes:
    return bytes([15 << 3 | 0, 1]) + craft(alice)


# (name, build(alice, mallory) -> bytes, now_ms, last_sent_at_ms, reason)
REJECTIONS = [
    ("oversize", lambda a, m: b"\x00" * (MAX_HELLO_BYTES + 1), NOW, None, "oversize"),
    (
        "oversize-valid-prefix",
        lambda a, m: craft(a) + b"\x00" * MAX_HELLO_BYTES,
        NOW,
        None,
        "oversize",
    ),
    ("garbage", lambda a, m: b"\xff\xff\xff", NOW, None, "decode"),
    ("bad-utf8", lambda a, m: b"\x0a\x02\xff\xfe", NOW, None, "decode"),
    ("truncated", lambda a, m: craft(a)[:-1], NOW, None, "decode"),
    ("duplicate-field", lambda a, m: _non_canonical(a), NOW, None, "decode"),
    ("unknown-field-first", lambda a, m: _unknown_field_first(a), NOW, None, "decode"),
    ("empty", lambda a, m: b"", NOW, None, "field"),
    ("node-id-upper", lambda a, m: craft(a, node_id="Alice"), NOW, None, "field"),
    ("node-id-empty", lambda a, m: craft(a, node_id=""), NOW, None, "field"),
    ("node-id-long", lambda a, m: craft(a, node_id="a" * 33), NOW, None, "field"),
    ("node-id-newline", lambda a, m: craft(a, node_id="alice\n"), NOW, None, "field"),
    (
        "identity-key-short",
        lambda a, m: craft(a, identity_key=a.identity_key[:32]),
        NOW,
        None,
        "field",
    ),
    ("wireguard-key-short", lambda a, m: craft(a, wireguard_key=b"\x01" * 31), NOW, None, "field"),
    ("port-zero", lambda a, m: craft(a, endpoint_port=0), NOW, None, "field"),
    ("port-too-big", lambda a, m: craft(a, endpoint_port=65536), NOW, None, "field"),
    ("interval-short", lambda a, m: craft(a, hello_interval_ms=99), NOW, None, "field"),
    ("interval-long", lambda a, m: craft(a, hello_interval_ms=60_001), NOW, None, "field"),
    ("unsigned", lambda a, m: craft(a, signature=b""), NOW, None, "signature"),
    ("signature-short", lambda a, m: craft(a, signature=b"\x01" * 64), NOW, None, "signature"),
    ("signed-by-other", lambda a, m: craft(a, signer=m), NOW, None, "signature"),
    ("other-tag", lambda a, m: craft(a, tag=b"mesh-handshake-init-v1"), NOW, None, "signature"),
    (
        "key-not-on-curve",
        lambda a, m: craft(a, identity_key=b"\x02" + b"\xff" * 32),
        NOW,
        None,
        "signature",
    ),
    ("future", lambda a, m: craft(a), NOW - 5_001, None, "future"),
    ("stale", lambda a, m: craft(a), NOW + 10_001, None, "stale"),
    ("replay-same", lambda a, m: craft(a), NOW, NOW, "replay"),
    ("replay-older", lambda a, m: craft(a), NOW, NOW + 1, "replay"),
]


@pytest.mark.parametrize(
    ("build", "now", "last", "reason"), [r[1:] for r in REJECTIONS], ids=[r[0] for r in REJECTIONS]
)
def test_rejection(
    alice: Identity, mallory: Identity, build: object, now: int, last: int | None, reason: str
) -> None:
    data = build(alice, mallory)  # type: ignore[operator]
    with pytest.raises(HelloRejected) as err:
        decode_hello(data, now, last)
    assert err.value.reason == reason, err.value
    assert isinstance(err.value, ValueError)


def test_every_reason_is_produced() -> None:
    assert {r[-1] for r in REJECTIONS} == REASONS


@pytest.mark.parametrize(
    ("now", "last"), [(NOW - 5_000, None), (NOW + 10_000, None), (NOW, NOW - 1)]
)
def test_window_edges_are_accepted(valid: bytes, now: int, last: int | None) -> None:
    assert decode_hello(valid, now, last).sent_at_ms == NOW


def test_window_is_configurable(valid: bytes) -> None:
    assert decode_hello(valid, NOW + 60_000, max_age_ms=60_000).sent_at_ms == NOW
    with pytest.raises(HelloRejected) as err:
        decode_hello(valid, NOW - 1, max_skew_ms=0)
    assert err.value.reason == "future"


def test_tampering_any_byte_is_rejected(valid: bytes) -> None:
    reasons: set[str] = set()
    for i in range(len(valid)):
        for flip in (0x01, 0x80, 0xFF):
            tampered = bytearray(valid)
            tampered[i] ^= flip
            with pytest.raises(HelloRejected) as err:
                decode_hello(bytes(tampered), NOW)
            reasons.add(err.value.reason)
    assert reasons <= {"decode", "field", "signature"}
    assert "signature" in reasons


def test_every_truncation_is_rejected(valid: bytes) -> None:
    for end in range(len(valid)):
        with pytest.raises(HelloRejected):
            decode_hello(valid[:end], NOW)


def _decode_or_reject(data: bytes, now: int, last: int | None) -> None:
    try:
        info = decode_hello(data, now, last)
    except HelloRejected as err:
        assert err.reason in REASONS
    else:
        assert len(info.identity_key) == 33 and len(info.chain_address) == 20
        assert now - 10_000 <= info.sent_at_ms <= now + 5_000


@FUZZ
@given(
    data=st.binary(max_size=600),
    now=st.integers(-(2**65), 2**65),
    last=st.none() | st.integers(-(2**65), 2**65),
)
def test_fuzz_arbitrary_bytes(data: bytes, now: int, last: int | None) -> None:
    _decode_or_reject(data, now, last)


@FUZZ
@given(st.data())
def test_fuzz_mutated_hello(valid: bytes, data: st.DataObject) -> None:
    mutated = data.draw(mutations(valid))
    _decode_or_reject(mutated, NOW, None)
