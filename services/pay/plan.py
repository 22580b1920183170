"""Which chain transactions the projection calls for, pure: open a channel to
each linked neighbor, top it up before the deposit runs out, close channels
of neighbors gone for good, answer a payer's close with our newest proof,
settle when the window has passed, and withdraw what settlement credited.

At most one transaction of a kind per channel (or neighbor) is in flight:
the caller skips what a pending transaction already covers.
"""

from __future__ import annotations

from dataclasses import dataclass

from mesh.pay.v1 import pay_pb2
from web3 import Web3

from services.common.money import amount

from .handlers import CLOSING, INCOMING, OPEN, OUTGOING

K = pay_pb2.TransactionKind
NATIVE_TOKEN = "0x" + "00" * 20


@dataclass(frozen=True)
class Terms:
    deposit: int  # wei escrowed per channel, and per top-up
    top_up_below: float  # top up when less than this share of the deposit is left
    close_window: int  # seconds a payee has to answer our close
    gone_after: float  # seconds a neighbor is down before its channels close


@dataclass(frozen=True)
class Wanted:
    kind: pay_pb2.TransactionKind.ValueType
    counterparty: str
    channel_id: bytes  # empty for an open
    function: str
    args: tuple[object, ...]
    value: int = 0

    @property
    def key(self) -> tuple[int, str, bytes]:
        return (self.kind, self.counterparty, self.channel_id)


def checksum(address: bytes) -> str:
    return str(Web3.to_checksum_address(address))


def wanted(state: pay_pb2.PayState, terms: Terms, now: float) -> list[Wanted]:
    out: list[Wanted] = []
    for node_id, neighbor in sorted(state.neighbors.items()):
        gone = (not neighbor.up and neighbor.HasField("down_since")
                and now - neighbor.down_since.seconds > terms.gone_after)
        outgoing = state.channels.get(neighbor.outgoing_channel)
        if neighbor.up and neighbor.chain_address and outgoing is None \
                and not neighbor.receive_only:
            out.append(Wanted(K.TRANSACTION_KIND_OPEN, node_id, b"", "open",
                              (checksum(neighbor.chain_address), NATIVE_TOKEN, terms.deposit,
                               terms.close_window), terms.deposit))
        elif outgoing is not None and outgoing.status == OPEN:
            cid = outgoing.opened.channel_id
            left = amount(outgoing.deposit) - amount(outgoing.cumulative)
            if gone:
                out.append(Wanted(K.TRANSACTION_KIND_CLOSE, node_id, cid, "close", (cid,)))
            elif left < terms.top_up_below * terms.deposit:
                out.append(Wanted(K.TRANSACTION_KIND_TOP_UP, node_id, cid, "top_up",
                                  (cid, terms.deposit), terms.deposit))
        incoming = state.channels.get(neighbor.incoming_channel)
        if gone and incoming is not None and incoming.status == OPEN:
            out.append(claim_or_close(node_id, incoming))
    for channel in state.channels.values():
        cid, node_id = channel.opened.channel_id, channel.opened.counterparty_id
        if channel.status != CLOSING:
            continue
        if channel.opened.direction == INCOMING and channel.nonce > channel.claimed_nonce \
                and now < channel.settle_after.seconds:
            out.append(Wanted(K.TRANSACTION_KIND_DISPUTE, node_id, cid, "claim",
                              (cid, channel.nonce, amount(channel.cumulative),
                               channel.signature)))
        elif channel.opened.direction == OUTGOING and now >= channel.settle_after.seconds:
            out.append(Wanted(K.TRANSACTION_KIND_SETTLE, node_id, cid, "settle", (cid,)))
    return out


def claim_or_close(node_id: str, channel: pay_pb2.PayState.Channel) -> Wanted:
    """As payee: claim the newest proof first, then close (which settles at once)."""
    cid = channel.opened.channel_id
    if channel.nonce > channel.claimed_nonce:
        return Wanted(K.TRANSACTION_KIND_DISPUTE, node_id, cid, "claim",
                      (cid, channel.nonce, amount(channel.cumulative), channel.signature))
    return Wanted(K.TRANSACTION_KIND_CLOSE, node_id, cid, "close", (cid,))


def withdraw(node_id: str) -> Wanted:
    """Pull what the contract credited us (the caller read that it did)."""
    return Wanted(K.TRANSACTION_KIND_WITHDRAW, node_id, b"", "withdraw", (NATIVE_TOKEN,))
