"""A chain to test the channel contract on: eth-tester (py-evm, in process)
or anvil (a real node on loopback), with funded keys that sign their own
transactions, time travel, and revert messages."""

from __future__ import annotations

import functools
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import coincurve
import vyper
from eth_account import Account
from eth_tester.exceptions import TransactionFailed
from web3 import EthereumTesterProvider, Web3
from web3.contract import Contract
from web3.exceptions import ContractLogicError

from deploy.chain.anvil import Anvil
from services.pay.contracts import load_artifact
from services.pay.proofs import Domain, address_of

CONTRACTS = Path(__file__).resolve().parent / "contracts"
NATIVE = "0x" + "00" * 20
FUNDS = 10**22  # 10,000 ETH: eth-tester's bank holds a million


@functools.cache
def compiled(name: str) -> tuple[list[dict[str, Any]], str]:
    out = vyper.compile_code((CONTRACTS / f"{name}.vy").read_text(),
                             output_formats=["abi", "bytecode"])
    return out["abi"], out["bytecode"]


class Key:
    """An account whose key we hold: it signs transactions and proofs."""

    def __init__(self) -> None:
        self.private = coincurve.PrivateKey(os.urandom(32))
        self.address = Web3.to_checksum_address(address_of(self.private.public_key))


class Reverted(AssertionError):
    pass


class ChainUnderTest:
    def __init__(self, w3: Web3, kind: str) -> None:
        self.w3 = w3
        self.kind = kind
        self.chain_id = int(w3.eth.chain_id)
        self.bank = w3.eth.accounts[0]

    def key(self) -> Key:
        key = Key()
        if self.kind == "anvil":
            self.w3.provider.make_request("anvil_setBalance",  # type: ignore[arg-type]
                                          [key.address, hex(FUNDS)])
        else:
            self.wait(self.w3.eth.send_transaction({"from": self.bank, "to": key.address,
                                                     "value": FUNDS}))
        return key

    def wait(self, tx_hash: bytes) -> Any:
        return self.w3.eth.wait_for_transaction_receipt(tx_hash)

    def deploy(self, abi: list[dict[str, Any]], bytecode: str, *args: object) -> Contract:
        receipt = self.wait(self.w3.eth.contract(abi=abi, bytecode=bytecode)
                            .constructor(*args).transact({"from": self.bank}))
        return self.w3.eth.contract(address=receipt["contractAddress"], abi=abi)

    def channels(self) -> Contract:
        return self.deploy(*load_artifact())

    def domain(self, contract: Contract) -> Domain:
        return Domain(self.chain_id, bytes.fromhex(contract.address[2:]))

    def send(self, call: Any, key: Key, value: int = 0) -> Any:
        """Sign and send a contract call as key; its receipt. Reverted (with
        the contract's message) if the node refuses it."""
        try:
            tx = call.build_transaction({
                "from": key.address, "value": value, "chainId": self.chain_id,
                "nonce": self.w3.eth.get_transaction_count(key.address, "pending")})
        except (ContractLogicError, TransactionFailed) as err:  # anvil's, eth-tester's
            raise Reverted(str(err)) from None
        signed = Account.sign_transaction(tx, key.private.secret)
        receipt = self.wait(self.w3.eth.send_raw_transaction(signed.raw_transaction))
        assert receipt["status"] == 1, receipt
        return receipt

    def now(self) -> int:
        return int(self.w3.eth.get_block("latest")["timestamp"])

    def travel(self, seconds: int) -> None:
        if self.kind == "anvil":
            self.w3.provider.make_request("evm_increaseTime", [seconds])  # type: ignore[arg-type]
            self.w3.provider.make_request("evm_mine", [])  # type: ignore[arg-type]
        else:
            tester = self.w3.provider.ethereum_tester  # type: ignore[attr-defined]
            tester.time_travel(self.now() + seconds)

    def balance(self, address: str) -> int:
        return int(self.w3.eth.get_balance(address))


@contextmanager
def chain_under_test(kind: str) -> Iterator[ChainUnderTest]:
    if kind == "anvil":
        with Anvil() as anvil:
            yield ChainUnderTest(Web3(Web3.HTTPProvider(anvil.url, cache_allowed_requests=True)),
                            kind)
    else:
        yield ChainUnderTest(Web3(EthereumTesterProvider()), kind)
