"""Whether a neighbor's balance proof pays us, and how much: pure, so every
rule is tested without a socket.

A proof is taken only for a channel that this neighbor opened to pay us and
that is still open, signed by that channel's payer in our chain's and
contract's domain, with a nonce above and an amount not below the newest one
taken, and no more than the deposit. What it pays is its cumulative amount
less the newest one taken before it.
"""

from __future__ import annotations

from dataclasses import dataclass

from mesh.pay.v1 import pay_pb2

from services.common.money import amount, money

from .handlers import INCOMING, OPEN, purpose_of
from .proofs import Domain, ProofError
from .wire import Proof

R = pay_pb2.PaymentRejectReason


class PaymentRefused(ValueError):
    def __init__(self, reason: pay_pb2.PaymentRejectReason.ValueType, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason


@dataclass
class Taken:
    """The newest proof taken on a channel, ahead of the projection while its
    PaymentReceived is on its way through the log."""

    nonce: int
    cumulative: int


def check(state: pay_pb2.PayState, node_id: str, proof: Proof, domain: Domain,
          taken: Taken | None) -> pay_pb2.PaymentReceived:
    channel_hex = proof.channel_id.hex()
    channel = state.channels.get(channel_hex)
    if channel is None or channel.opened.direction != INCOMING \
            or channel.opened.counterparty_id != node_id:
        raise PaymentRefused(R.PAYMENT_REJECT_REASON_UNKNOWN_CHANNEL,
                             f"{channel_hex[:16]}… is no channel {node_id} opened to pay us")
    if channel.status != OPEN:
        raise PaymentRefused(R.PAYMENT_REJECT_REASON_CHANNEL_NOT_OPEN,
                             f"channel {channel_hex[:16]}… is closing or closed")
    last_nonce, last = channel.nonce, amount(channel.cumulative)
    if taken is not None and taken.nonce > last_nonce:
        last_nonce, last = taken.nonce, taken.cumulative
    if proof.nonce <= last_nonce:
        raise PaymentRefused(R.PAYMENT_REJECT_REASON_STALE_NONCE,
                             f"nonce {proof.nonce} is not above {last_nonce} (a replay)")
    if proof.amount < last:
        raise PaymentRefused(R.PAYMENT_REJECT_REASON_AMOUNT_DECREASED,
                             f"cumulative {proof.amount} is below {last}")
    deposit = amount(channel.deposit)
    if proof.amount > deposit:
        raise PaymentRefused(R.PAYMENT_REJECT_REASON_EXCEEDS_DEPOSIT,
                             f"cumulative {proof.amount} is above the deposit {deposit}")
    try:
        signer = domain.signer(proof.channel_id, proof.nonce, proof.amount, proof.signature)
    except ProofError as err:
        raise PaymentRefused(R.PAYMENT_REJECT_REASON_BAD_SIGNATURE, str(err)) from None
    if signer != channel.opened.payer_address:
        raise PaymentRefused(R.PAYMENT_REJECT_REASON_WRONG_SIGNER,
                             f"signed by 0x{signer.hex()}, not the payer "
                             f"0x{channel.opened.payer_address.hex()} (or for another "
                             "channel, contract or chain)")
    return pay_pb2.PaymentReceived(
        counterparty_id=node_id, channel_id=proof.channel_id, nonce=proof.nonce,
        cumulative=money(proof.amount), amount=money(proof.amount - last),
        signature=proof.signature, purpose=purpose_of(state, node_id))
