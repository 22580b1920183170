"""Balance proofs are the EIP-712 data every wallet signs, and malformed or
malleated signatures are refused as the contract refuses them."""

from __future__ import annotations

import os

import coincurve
import pytest
from eth_account import Account
from eth_account.messages import encode_typed_data

from services.pay.proofs import CURVE_ORDER, Domain, ProofError

CHAIN_ID = 31337


def typed(contract: bytes, channel_id: bytes, nonce: int, amount: int) -> object:
    return encode_typed_data(full_message={
        "types": {
            "EIP712Domain": [{"name": "name", "type": "string"},
                             {"name": "version", "type": "string"},
                             {"name": "chainId", "type": "uint256"},
                             {"name": "verifyingContract", "type": "address"}],
            "BalanceProof": [{"name": "channelId", "type": "bytes32"},
                             {"name": "nonce", "type": "uint256"},
                             {"name": "amount", "type": "uint256"}]},
        "primaryType": "BalanceProof",
        "domain": {"name": "MeshChannels", "version": "1", "chainId": CHAIN_ID,
                   "verifyingContract": "0x" + contract.hex()},
        "message": {"channelId": channel_id, "nonce": nonce, "amount": amount}})


@pytest.fixture
def parts() -> tuple[coincurve.PrivateKey, Domain, bytes]:
    return coincurve.PrivateKey(os.urandom(32)), Domain(CHAIN_ID, os.urandom(20)), os.urandom(32)


def test_signature_is_the_standard_eip712_one(parts) -> None:
    key, domain, channel = parts
    amount = 3 * 10**21  # above 2**64: amounts are never uint64
    ours = domain.sign(key, channel, 7, amount)
    theirs = Account.sign_message(typed(domain.contract, channel, 7, amount), key.secret)
    assert ours == theirs.signature
    assert domain.signer(channel, 7, amount, ours) == bytes.fromhex(
        Account.from_key(key.secret).address[2:])


def test_a_proof_recovers_another_signer_for_other_data(parts) -> None:
    key, domain, channel = parts
    signature = domain.sign(key, channel, 1, 100)
    signer = domain.signer(channel, 1, 100, signature)
    assert domain.signer(channel, 1, 101, signature) != signer
    assert domain.signer(os.urandom(32), 1, 100, signature) != signer
    assert Domain(CHAIN_ID + 1, domain.contract).signer(channel, 1, 100, signature) != signer
    assert Domain(CHAIN_ID, os.urandom(20)).signer(channel, 1, 100, signature) != signer


def test_malleated_and_malformed_signatures_are_refused(parts) -> None:
    key, domain, channel = parts
    signature = domain.sign(key, channel, 1, 100)
    s = int.from_bytes(signature[32:64], "big")
    twin = signature[:32] + (CURVE_ORDER - s).to_bytes(32, "big") + bytes([55 - signature[64]])
    with pytest.raises(ProofError, match="lower half"):
        domain.signer(channel, 1, 100, twin)
    with pytest.raises(ProofError, match="not 65"):
        domain.signer(channel, 1, 100, signature[:64])
    with pytest.raises(ProofError, match="v is 1"):
        domain.signer(channel, 1, 100, signature[:64] + b"\x01")
    with pytest.raises(ProofError, match="uint256"):
        domain.sign(key, channel, 1, 2**256)
    with pytest.raises(ProofError, match="not 32"):
        domain.sign(key, channel[:31], 1, 1)
