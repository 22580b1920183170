"""Balance proofs: EIP-712 typed data a payer signs to release a cumulative
amount of a channel's deposit to its payee.

    EIP712Domain(string name,string version,uint256 chainId,address verifyingContract)
    BalanceProof(bytes32 channelId,uint256 nonce,uint256 amount)

with name "MeshChannels" and version "1". The domain binds the chain and the
contract, the channel id (never reused by the contract) binds the channel, so
a proof cannot be replayed anywhere else. `amount` is cumulative: a newer
proof (higher nonce) replaces an older one, it never adds to it.

Signatures are 65 bytes r || s || v with v 27 or 28 and s in the lower half
of the curve order, exactly what the contract accepts: a malleated twin of a
valid signature is refused here as it is on chain. Hashing and signing are
done once per proof with a precomputed domain separator and coincurve.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import coincurve
from Crypto.Hash import keccak

NAME, VERSION = "MeshChannels", "1"
SIGNATURE_LENGTH = 65
CHANNEL_ID_LENGTH = 32
ADDRESS_LENGTH = 20
MAX_UINT256 = 2**256 - 1
# secp256k1's group order: an s above half of it is the malleated form
CURVE_ORDER = 0xFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFEBAAEDCE6AF48A03BBFD25E8CD0364141
HALF_ORDER = CURVE_ORDER // 2


def keccak256(data: bytes) -> bytes:
    return keccak.new(data=data, digest_bits=256).digest()


DOMAIN_TYPEHASH = keccak256(
    b"EIP712Domain(string name,string version,uint256 chainId,address verifyingContract)")
PROOF_TYPEHASH = keccak256(b"BalanceProof(bytes32 channelId,uint256 nonce,uint256 amount)")


class ProofError(ValueError):
    """A balance proof or signature is malformed; the message says how."""


def _word(value: int) -> bytes:
    if not 0 <= value <= MAX_UINT256:
        raise ProofError(f"{value} does not fit in a uint256")
    return value.to_bytes(32, "big")


def address_of(public_key: coincurve.PublicKey) -> bytes:
    """The 20-byte EVM address of a secp256k1 public key."""
    return keccak256(public_key.format(compressed=False)[1:])[-20:]


@dataclass(frozen=True)
class Domain:
    """Where proofs are valid: one chain, one deployed contract."""

    chain_id: int
    contract: bytes  # 20-byte address
    separator: bytes = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if len(self.contract) != ADDRESS_LENGTH:
            raise ProofError(f"contract address has {len(self.contract)} bytes, not 20")
        separator = keccak256(DOMAIN_TYPEHASH + keccak256(NAME.encode())
                              + keccak256(VERSION.encode()) + _word(self.chain_id)
                              + bytes(12) + self.contract)
        object.__setattr__(self, "separator", separator)

    def digest(self, channel_id: bytes, nonce: int, amount: int) -> bytes:
        """The 32 bytes that are signed: keccak256(0x1901 || separator || struct hash)."""
        if len(channel_id) != CHANNEL_ID_LENGTH:
            raise ProofError(f"channel id has {len(channel_id)} bytes, not 32")
        struct_hash = keccak256(PROOF_TYPEHASH + channel_id + _word(nonce) + _word(amount))
        return keccak256(b"\x19\x01" + self.separator + struct_hash)

    def sign(self, key: coincurve.PrivateKey, channel_id: bytes, nonce: int,
             amount: int) -> bytes:
        """r || s || v, v in {27, 28}; libsecp256k1 always produces the low s."""
        recoverable = key.sign_recoverable(self.digest(channel_id, nonce, amount), hasher=None)
        return recoverable[:64] + bytes([27 + recoverable[64]])

    def signer(self, channel_id: bytes, nonce: int, amount: int, signature: bytes) -> bytes:
        """The address that signed this proof; ProofError if the signature is
        malformed or malleated."""
        if len(signature) != SIGNATURE_LENGTH:
            raise ProofError(f"signature has {len(signature)} bytes, not 65")
        v = signature[64]
        if v not in (27, 28):
            raise ProofError(f"signature v is {v}, not 27 or 28")
        s = int.from_bytes(signature[32:64], "big")
        if not 0 < s <= HALF_ORDER:
            raise ProofError("signature s is not in the lower half of the curve order "
                             "(a malleated signature)")
        try:
            public = coincurve.PublicKey.from_signature_and_message(
                signature[:64] + bytes([v - 27]), self.digest(channel_id, nonce, amount),
                hasher=None)
        except Exception as err:  # coincurve raises plain Exception on a bad point
            raise ProofError(f"signature does not recover a key: {err}") from None
        return address_of(public)
