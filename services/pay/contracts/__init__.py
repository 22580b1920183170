"""The channel contract: its committed artifact, and deploying it."""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any

from web3 import Web3

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
    receipt = w3.eth.wait_for_transaction_receipt(tx_hash)
    if receipt["status"] != 1:
        raise RuntimeError(f"deploying MeshChannels failed in tx {tx_hash.hex()}")
    return str(receipt["contractAddress"])
