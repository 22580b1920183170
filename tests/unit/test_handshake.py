"""The link handshake: round trip, every rejection reason from a crafted init
or response, replay, tampering, the bounded nonce cache, and fuzzing (peek,
respond and accept return an Offer or raise HandshakeRejected, nothing else).
No network, no clock."""

from __future__ import annotations

import hashlib
from collections.abc import Callable

import pytest
from hypothesis import given
from hypothesis import strategies as st
from mesh.link.v1 import handshake_pb2

from services.common.identity import Identity
from services.link.handshake import (
    HANDSHAKE_PORT,
    INIT_TAG,
    MAX_HANDSHAKE_BYTES,
    REASONS,
    RESPONSE_TAG,
    HandshakeRejected,
    Initiator,
    Offer,
    Responder,
)
from tests.unit.fuzzing import FUZZ, mutations

NOW = 1_700_000_000_000
NONCE = bytes(range(16))


@pytest.fixture(scope="module")
def ids(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Identity]:
    return {
        name: Identity.load_or_create(tmp_path_factory.mktemp(name))
        for name in ("alice", "bob", "carol")
    }


def initiator(ids: dict[str, Identity], now: int = NOW, nonce: bytes | None = None) -> Initiator:
    return Initiator(ids["alice"], "alice", 20001, ids["bob"].identity_key, now, nonce)


def sign(
    message: handshake_pb2.HandshakeInit | handshake_pb2.HandshakeResponse,
    signer: Identity,
    tag: bytes,
) -> bytes:
    """Sign as the module docstring says: tag + message without its signature."""
    message.signature = signer.sign(tag + message.SerializeToString(deterministic=True))
    return message.SerializeToString(deterministic=True)


def craft_init(
    ids: dict[str, Identity], signer: str = "alice", tag: bytes = INIT_TAG, **fields: object
) -> bytes:
    """An init from alice to bob with any field overridden, signed by `signer`."""
    alice = ids["alice"]
    init = handshake_pb2.HandshakeInit(
        node_id="alice",
        identity_key=alice.identity_key,
        wireguard_key=alice.wireguard_public,
        wireguard_port=20001,
        responder_identity_key=ids["bob"].identity_key,
        nonce=NONCE,
        sent_at_ms=NOW,
    )
    for name, value in fields.items():
        setattr(init, name, value)
    if "signature" in fields:
        return init.SerializeToString(deterministic=True)
    return sign(init, ids[signer], tag)


def craft_response(
    ids: dict[str, Identity],
    init: bytes,
    signer: str = "bob",
    tag: bytes = RESPONSE_TAG,
    **fields: object,
) -> bytes:
    """bob's response to `init` with any field overridden, signed by `signer`."""
    bob = ids["bob"]
    response = handshake_pb2.HandshakeResponse(
        node_id="bob",
        identity_key=bob.identity_key,
        wireguard_key=bob.wireguard_public,
        wireguard_port=20002,
        init_digest=hashlib.sha256(init).digest(),
        nonce=NONCE[::-1],
        sent_at_ms=NOW,
    )
    for name, value in fields.items():
        setattr(response, name, value)
    if "signature" in fields:
        return response.SerializeToString(deterministic=True)
    return sign(response, ids[signer], tag)


def test_round_trip(ids: dict[str, Identity]) -> None:
    alice, bob = ids["alice"], ids["bob"]
    start = initiator(ids)
    responder = Responder(bob, "bob")
    expected_alice = Offer("alice", alice.identity_key, alice.wireguard_public, 20001)
    assert responder.peek(start.message, NOW + 3) == expected_alice
    response, offer = responder.respond(start.message, NOW + 5, 20002)
    assert offer == expected_alice
    assert start.accept(response, NOW + 9) == Offer(
        "bob", bob.identity_key, bob.wireguard_public, 20002
    )


def test_constants() -> None:
    assert (HANDSHAKE_PORT, MAX_HANDSHAKE_BYTES) == (7387, 1024)
    assert (INIT_TAG, RESPONSE_TAG) == (b"mesh-handshake-init-v1", b"mesh-handshake-resp-v1")


def test_sizes(ids: dict[str, Identity]) -> None:
    longest = Initiator(ids["alice"], "a" * 32, 65535, ids["bob"].identity_key, 2**64 - 1)
    response, _ = Responder(ids["bob"], "b" * 32).respond(longest.message, 2**64 - 1, 65535)
    print(f"init: at most {len(longest.message)} bytes, response: at most {len(response)}")
    assert len(longest.message) < 400 and len(response) < 400


def test_the_signed_bytes_are_as_documented(ids: dict[str, Identity]) -> None:
    assert initiator(ids, nonce=NONCE).message == craft_init(ids)  # RFC 6979: deterministic


def test_peek_records_nothing_and_respond_answers_a_nonce_once(ids: dict[str, Identity]) -> None:
    responder = Responder(ids["bob"], "bob")
    message = initiator(ids).message
    responder.peek(message, NOW)
    responder.peek(message, NOW)
    responder.respond(message, NOW, 20002)
    for replay in (
        lambda: responder.peek(message, NOW + 1),
        lambda: responder.respond(message, NOW + 1, 20002),
    ):
        with pytest.raises(HandshakeRejected) as err:
            replay()
        assert err.value.reason == "replay"
    # A retry is a new init (new nonce), which is answered.
    responder.respond(initiator(ids, now=NOW + 2).message, NOW + 2, 20002)


def test_a_response_is_accepted_once(ids: dict[str, Identity]) -> None:
    start = initiator(ids)
    response, _ = Responder(ids["bob"], "bob").respond(start.message, NOW, 20002)
    start.accept(response, NOW)
    with pytest.raises(HandshakeRejected) as err:
        start.accept(response, NOW)
    assert err.value.reason == "replay"


def test_a_rejected_response_does_not_spoil_the_initiator(ids: dict[str, Identity]) -> None:
    start = initiator(ids)
    with pytest.raises(HandshakeRejected):
        start.accept(craft_response(ids, start.message, signer="carol"), NOW)
    response, _ = Responder(ids["bob"], "bob").respond(start.message, NOW, 20002)
    assert start.accept(response, NOW).node_id == "bob"


def test_nonce_cache_is_bounded_and_forgets_safely(ids: dict[str, Identity]) -> None:
    responder = Responder(ids["bob"], "bob", nonce_cache=2)
    inits = [initiator(ids, now=NOW + i).message for i in range(3)]
    for message in inits:
        responder.respond(message, NOW + 3, 20002)
    assert len(responder._by_age) == len(responder._nonces) == 2
    # The oldest nonce was forgotten, but its init is still refused as a replay.
    for message in inits:
        with pytest.raises(HandshakeRejected) as err:
            responder.peek(message, NOW + 3)
        assert err.value.reason == "replay"
    responder.respond(initiator(ids, now=NOW + 1).message, NOW + 3, 20002)  # newer than forgotten


Build = Callable[[dict[str, Identity]], bytes]

# (name, build(ids) -> init bytes, now_ms, reason) for Responder(bob).peek/respond
INIT_REJECTIONS: list[tuple[str, Build, int, str]] = [
    ("oversize", lambda i: b"\x00" * (MAX_HANDSHAKE_BYTES + 1), NOW, "oversize"),
    ("garbage", lambda i: b"\xff\xff\xff", NOW, "decode"),
    ("truncated", lambda i: craft_init(i)[:-1], NOW, "decode"),
    ("duplicate-field", lambda i: b"\x0a\x01x" + craft_init(i), NOW, "decode"),
    # Same wire types, so it parses; its 32-byte init_digest reads as a responder key.
    ("response-as-init", lambda i: craft_response(i, craft_init(i)), NOW, "field"),
    ("empty", lambda i: b"", NOW, "field"),
    ("node-id", lambda i: craft_init(i, node_id="Alice"), NOW, "field"),
    ("identity-key", lambda i: craft_init(i, identity_key=b"\x02" * 32), NOW, "field"),
    ("wireguard-key", lambda i: craft_init(i, wireguard_key=b"\x01" * 33), NOW, "field"),
    ("port-zero", lambda i: craft_init(i, wireguard_port=0), NOW, "field"),
    ("port-too-big", lambda i: craft_init(i, wireguard_port=70000), NOW, "field"),
    ("nonce-short", lambda i: craft_init(i, nonce=NONCE[:15]), NOW, "field"),
    (
        "responder-key-short",
        lambda i: craft_init(i, responder_identity_key=b"\x03" * 20),
        NOW,
        "field",
    ),
    (
        "addressed-to-carol",
        lambda i: craft_init(i, responder_identity_key=i["carol"].identity_key),
        NOW,
        "wrong-peer",
    ),
    (
        "from-myself",
        lambda i: craft_init(i, signer="bob", node_id="bob", identity_key=i["bob"].identity_key),
        NOW,
        "wrong-peer",
    ),
    ("unsigned", lambda i: craft_init(i, signature=b""), NOW, "signature"),
    ("signed-by-carol", lambda i: craft_init(i, signer="carol"), NOW, "signature"),
    ("response-tag", lambda i: craft_init(i, tag=RESPONSE_TAG), NOW, "signature"),
    ("future", lambda i: craft_init(i), NOW - 5_001, "future"),
    ("stale", lambda i: craft_init(i), NOW + 10_001, "stale"),
]

# (name, build(ids) -> response bytes to an init from alice, now_ms, reason)
RESPONSE_REJECTIONS: list[tuple[str, Callable[[dict[str, Identity], bytes], bytes], int, str]] = [
    ("oversize", lambda i, m: b"\x00" * (MAX_HANDSHAKE_BYTES + 1), NOW, "oversize"),
    ("garbage", lambda i, m: b"\x12\x05ab", NOW, "decode"),
    ("duplicate-field", lambda i, m: b"\x0a\x01x" + craft_response(i, m), NOW, "decode"),
    ("init-as-response", lambda i, m: m, NOW, "field"),
    ("node-id", lambda i, m: craft_response(i, m, node_id="b" * 33), NOW, "field"),
    ("digest-short", lambda i, m: craft_response(i, m, init_digest=b"\x00" * 31), NOW, "field"),
    ("nonce-long", lambda i, m: craft_response(i, m, nonce=NONCE + b"\x00"), NOW, "field"),
    ("port-zero", lambda i, m: craft_response(i, m, wireguard_port=0), NOW, "field"),
    (
        "from-carol",
        lambda i, m: craft_response(
            i,
            m,
            signer="carol",
            node_id="carol",
            identity_key=i["carol"].identity_key,
            wireguard_key=i["carol"].wireguard_public,
        ),
        NOW,
        "wrong-peer",
    ),
    ("signed-by-carol", lambda i, m: craft_response(i, m, signer="carol"), NOW, "signature"),
    ("unsigned", lambda i, m: craft_response(i, m, signature=b"\x00" * 65), NOW, "signature"),
    ("init-tag", lambda i, m: craft_response(i, m, tag=INIT_TAG), NOW, "signature"),
    (
        "answers-another-init",
        lambda i, m: craft_response(i, initiator(i, now=NOW + 1).message),
        NOW,
        "unsolicited",
    ),
    ("future", lambda i, m: craft_response(i, m), NOW - 5_001, "future"),
    ("stale", lambda i, m: craft_response(i, m), NOW + 10_001, "stale"),
]


@pytest.mark.parametrize(
    ("build", "now", "reason"),
    [r[1:] for r in INIT_REJECTIONS],
    ids=[r[0] for r in INIT_REJECTIONS],
)
def test_init_rejection(ids: dict[str, Identity], build: Build, now: int, reason: str) -> None:
    responder = Responder(ids["bob"], "bob")
    data = build(ids)
    for call in (lambda: responder.peek(data, now), lambda: responder.respond(data, now, 20002)):
        with pytest.raises(HandshakeRejected) as err:
            call()
        assert err.value.reason == reason, err.value


@pytest.mark.parametrize(
    ("build", "now", "reason"),
    [r[1:] for r in RESPONSE_REJECTIONS],
    ids=[r[0] for r in RESPONSE_REJECTIONS],
)
def test_response_rejection(
    ids: dict[str, Identity],
    build: Callable[[dict[str, Identity], bytes], bytes],
    now: int,
    reason: str,
) -> None:
    start = initiator(ids)
    with pytest.raises(HandshakeRejected) as err:
        start.accept(build(ids, start.message), now)
    assert err.value.reason == reason, err.value


def test_every_reason_is_produced() -> None:
    produced = {r[-1] for r in INIT_REJECTIONS + RESPONSE_REJECTIONS} | {"replay"}
    assert produced == REASONS  # replay: the two tests above


@pytest.mark.parametrize("now", [NOW - 5_000, NOW + 10_000])
def test_window_edges_are_accepted(ids: dict[str, Identity], now: int) -> None:
    start = initiator(ids, nonce=NONCE)
    response, _ = Responder(ids["bob"], "bob").respond(craft_init(ids), now, 20002)
    assert start.accept(response, now).node_id == "bob"


def test_own_arguments_are_checked(ids: dict[str, Identity]) -> None:
    alice, bob = ids["alice"], ids["bob"]
    bad_inits = [
        lambda: Initiator(alice, "alice", 20001, alice.identity_key, NOW),
        lambda: Initiator(alice, "Alice", 20001, bob.identity_key, NOW),
        lambda: Initiator(alice, "alice", 0, bob.identity_key, NOW),
        lambda: Initiator(alice, "alice", 20001, bob.identity_key[:20], NOW),
        lambda: Initiator(alice, "alice", 20001, bob.identity_key, NOW, b"short"),
        lambda: Responder(bob, "Bob"),
        lambda: Responder(bob, "bob", nonce_cache=0),
        lambda: Responder(bob, "bob").respond(initiator(ids).message, NOW, 0),
    ]
    for bad in bad_inits:
        with pytest.raises(ValueError):
            bad()


def _tamper(data: bytes) -> list[bytes]:
    out = []
    for i in range(len(data)):
        for flip in (0x01, 0x80, 0xFF):
            tampered = bytearray(data)
            tampered[i] ^= flip
            out.append(bytes(tampered))
    return out


def test_tampering_any_byte_of_an_init_is_rejected(ids: dict[str, Identity]) -> None:
    responder = Responder(ids["bob"], "bob")
    reasons: set[str] = set()
    for tampered in _tamper(initiator(ids).message):
        with pytest.raises(HandshakeRejected) as err:
            responder.peek(tampered, NOW)
        reasons.add(err.value.reason)
    assert reasons <= {"decode", "field", "wrong-peer", "signature"}
    assert "signature" in reasons


def test_tampering_any_byte_of_a_response_is_rejected(ids: dict[str, Identity]) -> None:
    start = initiator(ids)
    response, _ = Responder(ids["bob"], "bob").respond(start.message, NOW, 20002)
    reasons: set[str] = set()
    for tampered in _tamper(response):
        with pytest.raises(HandshakeRejected) as err:
            start.accept(tampered, NOW)
        reasons.add(err.value.reason)
    assert reasons <= {"decode", "field", "wrong-peer", "signature"}
    assert "signature" in reasons
    assert start.accept(response, NOW).node_id == "bob"


def _offer_or_reject(call: Callable[[], Offer]) -> None:
    try:
        offer = call()
    except HandshakeRejected as err:
        assert err.reason in REASONS
    else:
        assert len(offer.identity_key) == 33 and 1 <= offer.wireguard_port <= 65535


@pytest.fixture(scope="module")
def fuzz_init(ids: dict[str, Identity]) -> bytes:
    return initiator(ids).message


@pytest.fixture(scope="module")
def fuzz_responder(ids: dict[str, Identity]) -> Responder:
    return Responder(ids["bob"], "bob", nonce_cache=64)


@FUZZ
@given(data=st.binary(max_size=1100), now=st.integers(-(2**65), 2**65))
def test_fuzz_responder_arbitrary_bytes(fuzz_responder: Responder, data: bytes, now: int) -> None:
    _offer_or_reject(lambda: fuzz_responder.peek(data, now))
    _offer_or_reject(lambda: fuzz_responder.respond(data, now, 20002)[1])


@FUZZ
@given(st.data())
def test_fuzz_responder_mutated_init(
    fuzz_responder: Responder, fuzz_init: bytes, data: st.DataObject
) -> None:
    mutated = data.draw(mutations(fuzz_init))
    _offer_or_reject(lambda: fuzz_responder.peek(mutated, NOW))
    _offer_or_reject(lambda: fuzz_responder.respond(mutated, NOW, 20002)[1])


@pytest.fixture(scope="module")
def fuzz_pair(ids: dict[str, Identity]) -> tuple[Initiator, bytes]:
    start = initiator(ids)
    return start, Responder(ids["bob"], "bob").respond(start.message, NOW, 20002)[0]


@FUZZ
@given(data=st.binary(max_size=1100), now=st.integers(-(2**65), 2**65))
def test_fuzz_initiator_arbitrary_bytes(
    fuzz_pair: tuple[Initiator, bytes], data: bytes, now: int
) -> None:
    _offer_or_reject(lambda: fuzz_pair[0].accept(data, now))


@FUZZ
@given(st.data())
def test_fuzz_initiator_mutated_response(
    fuzz_pair: tuple[Initiator, bytes], data: st.DataObject
) -> None:
    start, response = fuzz_pair
    mutated = data.draw(mutations(response))
    _offer_or_reject(lambda: start.accept(mutated, NOW))
