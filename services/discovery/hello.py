"""The signed hello a router multicasts on each physical link.

Wire format: one `mesh.discovery.v1.Hello` per UDP datagram, sent to
[HELLO_GROUP]:HELLO_PORT on every physical interface (link-local scope, so it
never leaves the link). The signature covers HELLO_TAG followed by the message
with its signature cleared, in deterministic serialization; a receiver takes
only the canonical encoding of what it parsed, so it verifies exactly the bytes
that were signed (fields a newer sender adds are signed and kept as well).

This module is pure: no sockets, no clock. The caller passes its clock as
`now_ms` and, per identity key, the `sent_at_ms` of the last hello it accepted.
It should also ignore its own hellos (multicast loops back): compare
`HelloInfo.identity_key` with its own.

`decode_hello` runs its checks in this order and raises `HelloRejected` with
the reason of the first that fails (cheap checks first, but the signature is
verified before freshness, so "stale", "future" and "replay" are reported only
for hellos the claimed key really signed):

    "oversize"   more than MAX_HELLO_BYTES
    "decode"     not a Hello, or not its canonical encoding
    "field"      node_id not [a-z0-9][a-z0-9_-]{0,31}, identity key not 33
                 bytes, WireGuard key not 32, endpoint_port not 1..65535,
                 hello_interval_ms not 100..60000
    "signature"  not 65 bytes, or not by identity_key over these bytes
    "future"     sent_at_ms more than max_skew_ms ahead of now_ms
    "stale"      sent_at_ms older than now_ms - max_age_ms
    "replay"     sent_at_ms not after the last hello accepted from that key
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Final

from google.protobuf.message import DecodeError
from mesh.discovery.v1 import hello_pb2

from services.common.identity import (
    IDENTITY_KEY_LENGTH,
    SIGNATURE_LENGTH,
    Identity,
    chain_address,
    verify,
)
from services.common.wire import WireRejected

HELLO_GROUP: Final = "ff02::1:6d73"  # link-local scope; 6d73 = "ms"
HELLO_PORT: Final = 7386
MAX_HELLO_BYTES: Final = 512
HELLO_TAG: Final = b"mesh-hello-v1"

WIREGUARD_KEY_LENGTH: Final = 32
MIN_INTERVAL_MS: Final = 100
MAX_INTERVAL_MS: Final = 60_000
_NODE_ID: Final = re.compile(r"[a-z0-9][a-z0-9_-]{0,31}")

REASONS: Final = frozenset(
    {"oversize", "decode", "field", "signature", "stale", "future", "replay"}
)


class HelloRejected(WireRejected):
    """A received hello failed a check; `reason` is one of REASONS."""

    WHAT = "hello"
    REASONS = REASONS


@dataclass(frozen=True)
class HelloInfo:
    """What a verified hello says about its sender."""

    node_id: str
    identity_key: bytes
    chain_address: bytes
    wireguard_key: bytes
    endpoint_port: int
    hello_interval_ms: int
    sent_at_ms: int


def _field_error(hello: hello_pb2.Hello) -> str | None:
    """What is wrong with the hello's fields, or None; shared by both directions."""
    if not _NODE_ID.fullmatch(hello.node_id):
        return f"node_id {hello.node_id[:40]!r} is not [a-z0-9][a-z0-9_-]{{0,31}}"
    if len(hello.identity_key) != IDENTITY_KEY_LENGTH:
        return f"identity_key has {len(hello.identity_key)} bytes, not {IDENTITY_KEY_LENGTH}"
    if len(hello.wireguard_key) != WIREGUARD_KEY_LENGTH:
        return f"wireguard_key has {len(hello.wireguard_key)} bytes, not {WIREGUARD_KEY_LENGTH}"
    if not 1 <= hello.endpoint_port <= 65535:
        return f"endpoint_port {hello.endpoint_port} is not 1..65535"
    if not MIN_INTERVAL_MS <= hello.hello_interval_ms <= MAX_INTERVAL_MS:
        return (
            f"hello_interval_ms {hello.hello_interval_ms} is not "
            f"{MIN_INTERVAL_MS}..{MAX_INTERVAL_MS}"
        )
    return None


def _signed_bytes(hello: hello_pb2.Hello) -> bytes:
    unsigned = hello_pb2.Hello()
    unsigned.CopyFrom(hello)
    unsigned.ClearField("signature")
    return HELLO_TAG + unsigned.SerializeToString(deterministic=True)


def encode_hello(
    identity: Identity, node_id: str, endpoint_port: int, hello_interval_ms: int, sent_at_ms: int
) -> bytes:
    """The signed hello datagram; ValueError if an argument is out of range."""
    # protobuf itself raises ValueError for values that do not fit the field.
    hello = hello_pb2.Hello(
        node_id=node_id,
        identity_key=identity.identity_key,
        wireguard_key=identity.wireguard_public,
        endpoint_port=endpoint_port,
        hello_interval_ms=hello_interval_ms,
        sent_at_ms=sent_at_ms,
    )
    error = _field_error(hello)
    if error is not None:
        raise ValueError(error)
    hello.signature = identity.sign(_signed_bytes(hello))
    return hello.SerializeToString(deterministic=True)


def decode_hello(
    data: bytes,
    now_ms: int,
    last_sent_at_ms: int | None = None,
    *,
    max_age_ms: int = 10_000,
    max_skew_ms: int = 5_000,
) -> HelloInfo:
    """Verify a received hello (checks and reasons in the module docstring).

    last_sent_at_ms is the sent_at_ms of the last hello accepted from the
    same identity key (None if none): a hello must be strictly newer.
    """
    if len(data) > MAX_HELLO_BYTES:
        raise HelloRejected("oversize", f"{len(data)} bytes, at most {MAX_HELLO_BYTES}")
    hello = hello_pb2.Hello()
    try:
        hello.ParseFromString(data)
    except DecodeError as err:
        raise HelloRejected("decode", str(err)) from None
    # Only the canonical encoding: then the bytes verified are the bytes signed,
    # and no two encodings of one hello exist.
    if hello.SerializeToString(deterministic=True) != data:
        raise HelloRejected("decode", "not the canonical encoding of a Hello")
    error = _field_error(hello)
    if error is not None:
        raise HelloRejected("field", error)
    if len(hello.signature) != SIGNATURE_LENGTH:
        raise HelloRejected(
            "signature", f"signature has {len(hello.signature)} bytes, not {SIGNATURE_LENGTH}"
        )
    if not verify(hello.identity_key, hello.signature, _signed_bytes(hello)):
        raise HelloRejected("signature", f"not signed by {hello.identity_key.hex()}")
    sent = hello.sent_at_ms
    if sent > now_ms + max_skew_ms:
        raise HelloRejected("future", f"sent_at_ms {sent} is {sent - now_ms} ms ahead")
    if sent < now_ms - max_age_ms:
        raise HelloRejected("stale", f"sent_at_ms {sent} is {now_ms - sent} ms old")
    if last_sent_at_ms is not None and sent <= last_sent_at_ms:
        raise HelloRejected(
            "replay", f"sent_at_ms {sent} is not after the last accepted {last_sent_at_ms}"
        )
    return HelloInfo(
        node_id=hello.node_id,
        identity_key=hello.identity_key,
        # The signature verified, so identity_key is a valid curve point.
        chain_address=chain_address(hello.identity_key),
        wireguard_key=hello.wireguard_key,
        endpoint_port=hello.endpoint_port,
        hello_interval_ms=hello.hello_interval_ms,
        sent_at_ms=sent,
    )
