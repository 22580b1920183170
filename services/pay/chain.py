"""pay's side effects on the chain: signed transactions to the channel
contract, and the contract's logs read back as pay events.

Every transaction is signed here with an explicit account nonce and recorded
(TransactionPrepared, in the log) before it is broadcast; after a crash the
same signed bytes are broadcast again, and a node that already has them says
so: a retry never becomes a second transaction. web3 is synchronous: callers
run these methods in a thread.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import coincurve
from eth_account import Account
from google.protobuf.duration_pb2 import Duration
from google.protobuf.timestamp_pb2 import Timestamp
from mesh.pay.v1 import pay_pb2
from web3 import Web3
from web3.exceptions import TransactionNotFound, Web3RPCError

from services.common.money import money
from services.common.runtime import Outgoing

from .contracts import load_artifact
from .handlers import INCOMING, OUTGOING
from .proofs import address_of

NATIVE = b"\x00" * 20
GAS_MARGIN = 1.25  # over the node's estimate
# What nodes answer for a transaction they already hold or have mined.
ALREADY_SENT = ("already known", "nonce too low", "known transaction",
                "transaction already imported")


def connect(url: str) -> Web3:
    """An http(s):// URL, or the path of a node's IPC socket (how routers in
    network namespaces reach the emulated mesh's chain)."""
    if url.startswith(("http://", "https://")):
        return Web3(Web3.HTTPProvider(url, cache_allowed_requests=True))
    return Web3(Web3.IPCProvider(url.removeprefix("ipc://")))


@dataclass(frozen=True)
class Call:
    kind: pay_pb2.TransactionKind.ValueType
    function: str
    args: tuple[Any, ...]
    value: int = 0


class Chain:
    def __init__(self, w3: Web3, contract: bytes, key: coincurve.PrivateKey) -> None:
        abi, _ = load_artifact()
        self.w3 = w3
        self.key = key
        self.address = address_of(key.public_key)
        self.contract_address = contract
        self.contract = w3.eth.contract(address=Web3.to_checksum_address(contract), abi=abi)
        self.chain_id = int(w3.eth.chain_id)
        self._events = {
            bytes(Web3.keccak(text=_signature(entry))): getattr(self.contract.events,
                                                                entry["name"])()
            for entry in abi if entry["type"] == "event"
        }

    def account_nonce(self, reserved: Iterator[int]) -> int:
        """The next nonce: past every pending one the node has and every one we
        prepared (a prepared one may not have reached the node before a crash)."""
        on_chain = self.w3.eth.get_transaction_count(Web3.to_checksum_address(self.address),
                                                     "pending")
        return max([int(on_chain), *(n + 1 for n in reserved)])

    def prepare(self, call: Call, counterparty: str, channel_id: bytes,
                nonce: int) -> pay_pb2.TransactionPrepared:
        function = getattr(self.contract.functions, call.function)(*call.args)
        sender = Web3.to_checksum_address(self.address)
        gas = function.estimate_gas({"from": sender, "value": call.value})
        tx = function.build_transaction({
            "from": sender, "value": call.value, "nonce": nonce, "chainId": self.chain_id,
            "gas": int(gas * GAS_MARGIN),
        })
        signed = Account.sign_transaction(tx, self.key.secret)
        return pay_pb2.TransactionPrepared(
            counterparty_id=counterparty, channel_id=channel_id, kind=call.kind,
            tx_hash=bytes(signed.hash), account_nonce=nonce,
            raw_transaction=bytes(signed.raw_transaction), value=money(call.value))

    def broadcast(self, raw: bytes) -> None:
        try:
            self.w3.eth.send_raw_transaction(raw)
        except Web3RPCError as err:
            if not any(text in str(err).lower() for text in ALREADY_SENT):
                raise

    def mined(self, prepared: pay_pb2.TransactionPrepared) -> pay_pb2.TransactionMined | None:
        try:
            receipt = self.w3.eth.get_transaction_receipt(prepared.tx_hash)
        except TransactionNotFound:
            return None
        return pay_pb2.TransactionMined(
            counterparty_id=prepared.counterparty_id, channel_id=prepared.channel_id,
            kind=prepared.kind, tx_hash=prepared.tx_hash, succeeded=receipt["status"] == 1,
            block_number=receipt["blockNumber"], gas_used=receipt["gasUsed"])

    def withdrawable(self) -> int:
        """What the contract has credited us in the native coin."""
        return int(self.contract.functions.withdrawable(
            Web3.to_checksum_address(NATIVE), Web3.to_checksum_address(self.address)).call())

    def head(self) -> int:
        return int(self.w3.eth.block_number)

    def logs(self, first: int, last: int) -> list[tuple[str, dict[str, Any], dict[str, Any]]]:
        """(event name, its arguments, the log) for the contract's logs in [first, last]."""
        found = []
        for entry in self.w3.eth.get_logs({"address": self.contract.address,
                                           "fromBlock": first, "toBlock": last}):
            event = self._events.get(bytes(entry["topics"][0]))
            if event is None:
                continue
            decoded = event.process_log(entry)
            found.append((decoded["event"], dict(decoded["args"]), dict(entry)))
        return found

    def timestamp(self, block: int) -> int:
        return int(self.w3.eth.get_block(block)["timestamp"])


def _signature(entry: dict[str, Any]) -> str:
    return f"{entry['name']}({','.join(i['type'] for i in entry['inputs'])})"


def _address(value: str) -> bytes:
    return bytes.fromhex(value[2:])


def to_event(name: str, args: dict[str, Any], entry: dict[str, Any], ours: bytes,
             chain: Chain, channels: pay_pb2.PayState,
             counterparty_of: Callable[[bytes], str]) -> Outgoing | None:
    """The pay event a contract log means for us, or None when it is about a
    channel we are not a party to."""
    if "channel_id" not in args:
        return None  # Withdrawn: our own balance, nothing about a channel
    tx, block = bytes(entry["transactionHash"]), int(entry["blockNumber"])
    channel_id = bytes(args["channel_id"])
    aggregate = channel_id.hex()
    if name == "ChannelOpened":
        payer, payee = _address(args["payer"]), _address(args["payee"])
        if ours not in (payer, payee):
            return None
        outgoing = payer == ours
        return Outgoing("channel_opened", aggregate, pay_pb2.ChannelOpened(
            channel_id=channel_id, counterparty_id=counterparty_of(payee if outgoing else payer),
            direction=OUTGOING if outgoing else INCOMING, payer_address=payer,
            payee_address=payee, chain_id=chain.chain_id,
            contract_address=chain.contract_address,
            token_address=b"" if _address(args["token"]) == NATIVE else _address(args["token"]),
            deposit=money(args["deposit"]),
            challenge_period=Duration(seconds=int(args["close_window"])),
            tx_hash=tx, block_number=block))
    channel = channels.channels.get(aggregate)
    if channel is None:
        return None  # not ours: we saw no ChannelOpened with us in it
    counterparty = channel.opened.counterparty_id
    if name == "ChannelToppedUp":
        return Outgoing("channel_topped_up", aggregate, pay_pb2.ChannelToppedUp(
            channel_id=channel_id, counterparty_id=counterparty, added=money(args["added"]),
            deposit=money(args["deposit"]), tx_hash=tx, block_number=block))
    if name == "Claimed":
        return Outgoing("channel_disputed", aggregate, pay_pb2.ChannelDisputed(
            channel_id=channel_id, counterparty_id=counterparty,
            by_us=channel.opened.direction == INCOMING, nonce=int(args["nonce"]),
            cumulative=money(args["amount"]), tx_hash=tx, block_number=block))
    if name == "CloseRequested":
        return Outgoing("channel_close_started", aggregate, pay_pb2.ChannelCloseStarted(
            channel_id=channel_id, counterparty_id=counterparty,
            mode=pay_pb2.CLOSE_MODE_UNILATERAL, by_us=channel.opened.direction == OUTGOING,
            settle_after=Timestamp(seconds=int(args["closes_at"]) + 1),
            tx_hash=tx, block_number=block))
    if name == "Settled":
        return Outgoing("channel_closed", aggregate, pay_pb2.ChannelClosed(
            channel_id=channel_id, counterparty_id=counterparty, paid=money(args["paid"]),
            refunded=money(args["refunded"]), tx_hash=tx, block_number=block))
    return None
