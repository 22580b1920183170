"""The mutual signed handshake that binds a neighbor's WireGuard key to its
identity key, before link makes a tunnel for it.

Two UDP datagrams between the neighbors' link-local addresses, port
HANDSHAKE_PORT:

    initiator -> responder   HandshakeInit: my node id, identity key,
                             WireGuard key and the listen port of the
                             WireGuard interface I made for you; whom it is
                             for (your identity key, from your hello); a
                             random nonce; my clock; my signature.
    responder -> initiator   HandshakeResponse: the same facts about the
                             responder, sha256 of the init it answers, its own
                             nonce, its clock, its signature.

Each message is signed over a domain tag (INIT_TAG or RESPONSE_TAG) followed
by the message with its signature cleared, in deterministic serialization; a
receiver takes only the canonical encoding of what it parsed, so it verifies
exactly the bytes that were signed. The init names its responder, so it cannot
be redirected to another router; the response carries the init's digest, so it
answers that init and no other; freshness and the responder's nonce cache stop
either being replayed. sha256(init + response) names the session.

Who initiates is the caller's business. Suggested rule: of two neighbors, the
one with the lower identity_key (bytewise) initiates when it hears the other's
hello; the higher one only responds. A retry is a new Initiator (a new nonce
and clock): the responder answers each nonce once.

This module is pure: no sockets, no clock (callers pass `now_ms`, milliseconds
since the Unix epoch). Checks run in this order and raise `HandshakeRejected`
with the reason of the first that fails (the signature is verified before
freshness and replay, so those are reported only for genuine messages):

    "oversize"     more than MAX_HANDSHAKE_BYTES
    "decode"       not the expected message, or not its canonical encoding
    "field"        node_id not [a-z0-9][a-z0-9_-]{0,31}; identity keys not 33
                   bytes, WireGuard key not 32, port not 1..65535, nonce not
                   16, init_digest not 32
    "wrong-peer"   an init not addressed to me (or from myself); a response
                   not from the identity key I expected (from its hello)
    "signature"    not 65 bytes, or not by the message's identity key
    "unsolicited"  a response whose init_digest is not my init's
    "future"       sent_at_ms more than max_skew_ms ahead of now_ms
    "stale"        sent_at_ms older than now_ms - max_age_ms
    "replay"       an init whose nonce was answered (or is as old as nonces the
                   full cache forgot); a second response to an accepted init
"""

from __future__ import annotations

import hashlib
import heapq
import os
import re
from dataclasses import dataclass
from typing import Final, TypeVar

from google.protobuf.message import DecodeError
from mesh.link.v1 import handshake_pb2

from services.common.identity import IDENTITY_KEY_LENGTH, SIGNATURE_LENGTH, Identity, verify
from services.common.wire import WireRejected

HANDSHAKE_PORT: Final = 7387
MAX_HANDSHAKE_BYTES: Final = 1024
INIT_TAG: Final = b"mesh-handshake-init-v1"
RESPONSE_TAG: Final = b"mesh-handshake-resp-v1"

WIREGUARD_KEY_LENGTH: Final = 32
NONCE_LENGTH: Final = 16
DIGEST_LENGTH: Final = 32
_NODE_ID: Final = re.compile(r"[a-z0-9][a-z0-9_-]{0,31}")

REASONS: Final = frozenset(
    {
        "oversize",
        "decode",
        "field",
        "signature",
        "stale",
        "future",
        "replay",
        "wrong-peer",
        "unsolicited",
    }
)

_M = TypeVar("_M", handshake_pb2.HandshakeInit, handshake_pb2.HandshakeResponse)


class HandshakeRejected(WireRejected):
    """A received handshake message failed a check; `reason` is one of REASONS."""

    WHAT = "handshake"
    REASONS = REASONS


@dataclass(frozen=True)
class Offer:
    """The verified facts about one side of a handshake."""

    node_id: str
    identity_key: bytes
    wireguard_key: bytes
    wireguard_port: int


def _offer(message: _M) -> Offer:
    return Offer(
        node_id=message.node_id,
        identity_key=message.identity_key,
        wireguard_key=message.wireguard_key,
        wireguard_port=message.wireguard_port,
    )


def _field_error(message: _M) -> str | None:
    """What is wrong with a message's fields, or None; shared by both directions."""
    if not _NODE_ID.fullmatch(message.node_id):
        return f"node_id {message.node_id[:40]!r} is not [a-z0-9][a-z0-9_-]{{0,31}}"
    lengths = [
        ("identity_key", message.identity_key, IDENTITY_KEY_LENGTH),
        ("wireguard_key", message.wireguard_key, WIREGUARD_KEY_LENGTH),
        ("nonce", message.nonce, NONCE_LENGTH),
    ]
    if isinstance(message, handshake_pb2.HandshakeInit):
        lengths.append(
            ("responder_identity_key", message.responder_identity_key, IDENTITY_KEY_LENGTH)
        )
    else:
        lengths.append(("init_digest", message.init_digest, DIGEST_LENGTH))
    for name, value, length in lengths:
        if len(value) != length:
            return f"{name} has {len(value)} bytes, not {length}"
    if not 1 <= message.wireguard_port <= 65535:
        return f"wireguard_port {message.wireguard_port} is not 1..65535"
    return None


def _signed_bytes(tag: bytes, message: _M) -> bytes:
    unsigned = type(message)()
    unsigned.CopyFrom(message)
    unsigned.ClearField("signature")
    return tag + unsigned.SerializeToString(deterministic=True)


def _sign(identity: Identity, tag: bytes, message: _M) -> bytes:
    """Sign message in place and return its wire bytes; ValueError on bad fields."""
    error = _field_error(message)
    if error is not None:
        raise ValueError(error)
    message.signature = identity.sign(_signed_bytes(tag, message))
    return message.SerializeToString(deterministic=True)


def _parse(cls: type[_M], data: bytes) -> _M:
    """oversize, decode and field checks."""
    if len(data) > MAX_HANDSHAKE_BYTES:
        raise HandshakeRejected("oversize", f"{len(data)} bytes, at most {MAX_HANDSHAKE_BYTES}")
    message = cls()
    try:
        message.ParseFromString(data)
    except DecodeError as err:
        raise HandshakeRejected("decode", str(err)) from None
    # Only the canonical encoding: then the bytes verified (and the digest the
    # response carries) are the bytes signed.
    if message.SerializeToString(deterministic=True) != data:
        raise HandshakeRejected("decode", f"not the canonical encoding of a {cls.__name__}")
    error = _field_error(message)
    if error is not None:
        raise HandshakeRejected("field", error)
    return message


def _check_signature(tag: bytes, message: _M) -> None:
    if len(message.signature) != SIGNATURE_LENGTH:
        raise HandshakeRejected(
            "signature", f"signature has {len(message.signature)} bytes, not {SIGNATURE_LENGTH}"
        )
    if not verify(message.identity_key, message.signature, _signed_bytes(tag, message)):
        raise HandshakeRejected("signature", f"not signed by {message.identity_key.hex()}")


def _check_fresh(sent_at_ms: int, now_ms: int, max_age_ms: int, max_skew_ms: int) -> None:
    if sent_at_ms > now_ms + max_skew_ms:
        raise HandshakeRejected(
            "future", f"sent_at_ms {sent_at_ms} is {sent_at_ms - now_ms} ms ahead"
        )
    if sent_at_ms < now_ms - max_age_ms:
        raise HandshakeRejected("stale", f"sent_at_ms {sent_at_ms} is {now_ms - sent_at_ms} ms old")


class Initiator:
    """One handshake attempt towards the neighbor whose hello named peer_identity_key."""

    def __init__(
        self,
        identity: Identity,
        node_id: str,
        wireguard_port: int,
        peer_identity_key: bytes,
        now_ms: int,
        nonce: bytes | None = None,
        *,
        max_age_ms: int = 10_000,
        max_skew_ms: int = 5_000,
    ) -> None:
        if peer_identity_key == identity.identity_key:
            raise ValueError("a router does not handshake with itself")
        init = handshake_pb2.HandshakeInit(
            node_id=node_id,
            identity_key=identity.identity_key,
            wireguard_key=identity.wireguard_public,
            wireguard_port=wireguard_port,
            responder_identity_key=peer_identity_key,
            nonce=os.urandom(NONCE_LENGTH) if nonce is None else nonce,
            sent_at_ms=now_ms,
        )
        self._message = _sign(identity, INIT_TAG, init)
        self._digest = hashlib.sha256(self._message).digest()
        self._peer_identity_key = peer_identity_key
        self._max_age_ms = max_age_ms
        self._max_skew_ms = max_skew_ms
        self._answered = False

    @property
    def message(self) -> bytes:
        """The signed HandshakeInit datagram (resend these same bytes on loss)."""
        return self._message

    def accept(self, data: bytes, now_ms: int) -> Offer:
        """Verify the peer's response to this init; return the peer's Offer."""
        response = _parse(handshake_pb2.HandshakeResponse, data)
        if response.identity_key != self._peer_identity_key:
            raise HandshakeRejected(
                "wrong-peer",
                f"response from {response.identity_key.hex()}, "
                f"expected {self._peer_identity_key.hex()}",
            )
        _check_signature(RESPONSE_TAG, response)
        if response.init_digest != self._digest:
            raise HandshakeRejected("unsolicited", "answers an init that is not mine")
        _check_fresh(response.sent_at_ms, now_ms, self._max_age_ms, self._max_skew_ms)
        # One init, one session: a copy of the response must not start another.
        if self._answered:
            raise HandshakeRejected("replay", "this init was already answered")
        self._answered = True
        return _offer(response)


class Responder:
    """Answers the inits addressed to this router, each nonce once."""

    def __init__(
        self,
        identity: Identity,
        node_id: str,
        *,
        max_age_ms: int = 10_000,
        max_skew_ms: int = 5_000,
        nonce_cache: int = 4096,
    ) -> None:
        if not _NODE_ID.fullmatch(node_id):
            raise ValueError(f"node_id {node_id!r} is not [a-z0-9][a-z0-9_-]{{0,31}}")
        if nonce_cache < 1:
            raise ValueError(f"nonce_cache {nonce_cache} must be at least 1")
        self._identity = identity
        self._node_id = node_id
        self._max_age_ms = max_age_ms
        self._max_skew_ms = max_skew_ms
        self._capacity = nonce_cache
        # Answered nonces, and a min-heap of (sent_at_ms, nonce) to evict the oldest.
        self._nonces: set[bytes] = set()
        self._by_age: list[tuple[int, bytes]] = []
        # Newest sent_at_ms evicted so far: an init this old might be one whose
        # nonce was forgotten, so it counts as a replay.
        self._forgotten_ms = -1

    def peek(self, data: bytes, now_ms: int) -> Offer:
        """Verify an init fully without recording its nonce; the initiator's Offer.

        Lets the caller allocate a WireGuard port for the peer before respond().
        """
        return _offer(self._verify(data, now_ms))

    def respond(self, data: bytes, now_ms: int, wireguard_port: int) -> tuple[bytes, Offer]:
        """Verify an init, record its nonce and sign the response.

        Returns the HandshakeResponse datagram and the initiator's Offer.
        """
        if not 1 <= wireguard_port <= 65535:
            raise ValueError(f"wireguard_port {wireguard_port} is not 1..65535")
        init = self._verify(data, now_ms)
        self._remember(init.nonce, init.sent_at_ms)
        response = handshake_pb2.HandshakeResponse(
            node_id=self._node_id,
            identity_key=self._identity.identity_key,
            wireguard_key=self._identity.wireguard_public,
            wireguard_port=wireguard_port,
            init_digest=hashlib.sha256(data).digest(),
            nonce=os.urandom(NONCE_LENGTH),
            sent_at_ms=now_ms,
        )
        return _sign(self._identity, RESPONSE_TAG, response), _offer(init)

    def _verify(self, data: bytes, now_ms: int) -> handshake_pb2.HandshakeInit:
        init = _parse(handshake_pb2.HandshakeInit, data)
        mine = self._identity.identity_key
        if init.responder_identity_key != mine:
            raise HandshakeRejected(
                "wrong-peer", f"addressed to {init.responder_identity_key.hex()}, not to me"
            )
        if init.identity_key == mine:
            raise HandshakeRejected("wrong-peer", "from my own identity key")
        _check_signature(INIT_TAG, init)
        _check_fresh(init.sent_at_ms, now_ms, self._max_age_ms, self._max_skew_ms)
        if init.nonce in self._nonces:
            raise HandshakeRejected("replay", f"nonce {init.nonce.hex()} was already answered")
        if init.sent_at_ms <= self._forgotten_ms:
            raise HandshakeRejected(
                "replay",
                f"sent_at_ms {init.sent_at_ms} is not after {self._forgotten_ms}, "
                "the newest nonce the full cache forgot",
            )
        return init

    def _remember(self, nonce: bytes, sent_at_ms: int) -> None:
        self._nonces.add(nonce)
        heapq.heappush(self._by_age, (sent_at_ms, nonce))
        while len(self._by_age) > self._capacity:
            evicted_ms, evicted = heapq.heappop(self._by_age)
            self._nonces.discard(evicted)
            self._forgotten_ms = max(self._forgotten_ms, evicted_ms)
