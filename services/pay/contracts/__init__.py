"""The channel contract: its committed artifact, and deploying it."""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any

import coincurve
from eth_account import Account
from web3 import Web3
from web3.exceptions import Web3Exception
from web3.types import TxReceipt

from services.common.identity import chain_address

ARTIFACT = Path(__file__).resolve().parent / "MeshChannels.json"


@functools.cache
def load_artifact() -> tuple[list[dict[str, Any]], str]:
    """(ABI, deployment bytecode) of MeshChannels."""
    artifact = json.loads(ARTIFACT.read_text())
    return artifact["abi"], artifact["bytecode"]


def deploy(w3: Web3, sender: str) -> str:
    """Deploy MeshChannels from an account the node holds; its checksum address."""
    abi, bytecode = load_artifact()
    tx_hash = w3.eth.contract(abi=abi, bytecode=bytecode).constructor().transact({"from": sender})
    return _deployed(w3.eth.wait_for_transaction_receipt(tx_hash))


def deploy_signed(w3: Web3, key: coincurve.PrivateKey, timeout: float = 300.0) -> TxReceipt:
    """Deploy MeshChannels from the account of a key we hold (a router's
    identity, on a public chain whose nodes hold no accounts): the receipt.
    Raises DeployError saying why when the account cannot pay or it fails."""
    abi, bytecode = load_artifact()
    sender = Web3.to_checksum_address(chain_address(key.public_key.format(compressed=True)))
    constructor = w3.eth.contract(abi=abi, bytecode=bytecode).constructor()
    balance = int(w3.eth.get_balance(sender))
    try:
        gas = int(constructor.estimate_gas({"from": sender}))
    except (Web3Exception, ValueError) as err:
        raise DeployError(f"the chain will not run the deployment from {sender} "
                          f"(balance {balance} wei): {err}") from None
    tx = constructor.build_transaction({
        "from": sender, "nonce": w3.eth.get_transaction_count(sender, "pending"),
        "chainId": int(w3.eth.chain_id), "gas": gas + gas // 4,
    })
    price = int(tx.get("maxFeePerGas", tx.get("gasPrice", 0)))
    if balance < tx["gas"] * price:
        raise DeployError(f"{sender} holds {balance} wei; deploying may cost up to "
                          f"{tx['gas'] * price} wei ({tx['gas']} gas at {price} wei): fund it")
    signed = Account.sign_transaction(tx, key.secret)
    w3.eth.send_raw_transaction(signed.raw_transaction)
    receipt = w3.eth.wait_for_transaction_receipt(signed.hash, timeout=timeout)
    _deployed(receipt)
    return receipt


class DeployError(RuntimeError):
    """Deploying the contract failed; the message says why."""


def _deployed(receipt: TxReceipt) -> str:
    if receipt["status"] != 1:
        raise DeployError(f"deploying MeshChannels failed in tx "
                          f"{receipt['transactionHash'].hex()}")
    return str(receipt["contractAddress"])
