"""The datagrams pay sends a neighbor: a balance proof, and its acknowledgement
(proto/mesh/pay/v1/proofs.proto). This module only parses and frames; whether
a well-formed proof pays anything is decided in receive.py.

Rejection reasons (ProofRejected.reason):
    "oversize"  more than MAX_DATAGRAM_BYTES
    "decode"    an unknown kind byte, or not protobuf
    "field"     a field of the wrong size, or a non-canonical encoding
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final, TypeVar

from google.protobuf.message import DecodeError
from mesh.pay.v1 import proofs_pb2

from services.common.wire import WireRejected

from .proofs import CHANNEL_ID_LENGTH, SIGNATURE_LENGTH

PROOF_PORT: Final = 7388
MAX_DATAGRAM_BYTES: Final = 256
PROOF, ACK = b"\x01", b"\x02"
MAX_AMOUNT_BYTES: Final = 32  # a uint256


M = TypeVar("M", proofs_pb2.BalanceProof, proofs_pb2.ProofAcknowledged)


class ProofRejected(WireRejected):
    WHAT = "payment datagram"
    REASONS = frozenset({"oversize", "decode", "field"})


@dataclass(frozen=True)
class Proof:
    channel_id: bytes
    nonce: int
    amount: int
    signature: bytes


@dataclass(frozen=True)
class Ack:
    channel_id: bytes
    nonce: int


def encode_proof(proof: Proof) -> bytes:
    message = proofs_pb2.BalanceProof(
        channel_id=proof.channel_id, nonce=proof.nonce,
        amount=proof.amount.to_bytes((proof.amount.bit_length() + 7) // 8, "big"),
        signature=proof.signature)
    return PROOF + message.SerializeToString(deterministic=True)


def encode_ack(ack: Ack) -> bytes:
    message = proofs_pb2.ProofAcknowledged(channel_id=ack.channel_id, nonce=ack.nonce)
    return ACK + message.SerializeToString(deterministic=True)


def decode(data: bytes) -> Proof | Ack:
    """The message in one datagram; ProofRejected says what is wrong with it."""
    if len(data) > MAX_DATAGRAM_BYTES:
        raise ProofRejected("oversize", f"{len(data)} bytes, at most {MAX_DATAGRAM_BYTES}")
    kind, body = data[:1], data[1:]
    if kind == PROOF:
        proof = _parse(proofs_pb2.BalanceProof(), body)
        _channel(proof.channel_id)
        if len(proof.signature) != SIGNATURE_LENGTH:
            raise ProofRejected("field", f"signature of {len(proof.signature)} bytes, not 65")
        if len(proof.amount) > MAX_AMOUNT_BYTES or proof.amount[:1] == b"\x00":
            raise ProofRejected("field", "amount is not a minimal uint256")
        if proof.nonce == 0:
            raise ProofRejected("field", "nonce 0: proofs start at 1")
        return Proof(proof.channel_id, proof.nonce, int.from_bytes(proof.amount, "big"),
                     proof.signature)
    if kind == ACK:
        ack = _parse(proofs_pb2.ProofAcknowledged(), body)
        _channel(ack.channel_id)
        return Ack(ack.channel_id, ack.nonce)
    raise ProofRejected("decode", f"unknown message kind {kind.hex() or 'empty'}")


def _parse(message: M, body: bytes) -> M:
    try:
        message.ParseFromString(body)
    except DecodeError as err:
        raise ProofRejected("decode", f"not a {type(message).__name__}: {err}") from None
    message.DiscardUnknownFields()  # so that they show as a difference below
    if message.SerializeToString(deterministic=True) != body:
        raise ProofRejected("field", "not the canonical encoding (unknown or repeated fields)")
    return message


def _channel(channel_id: bytes) -> None:
    if len(channel_id) != CHANNEL_ID_LENGTH:
        raise ProofRejected("field", f"channel id of {len(channel_id)} bytes, not 32")
