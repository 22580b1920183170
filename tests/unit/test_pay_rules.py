"""pay's rules, pure: when a proof is signed and for how much, which proofs
from a neighbor are taken, the datagrams' format, and which chain
transactions the projection calls for."""

from __future__ import annotations

import dataclasses
import os

import coincurve
import pytest
from google.protobuf.timestamp_pb2 import Timestamp
from hypothesis import given
from mesh.exit.v1 import exit_pb2
from mesh.link.v1 import link_pb2
from mesh.meter.v1 import meter_pb2
from mesh.pay.v1 import pay_pb2

from services.common.money import amount, money
from services.common.runtime import replay
from services.pay import plan
from services.pay.chain import to_event
from services.pay.handlers import INCOMING, OUTGOING, Payer, make_handlers
from services.pay.proofs import Domain, address_of
from services.pay.receive import PaymentRefused, Taken, check
from services.pay.service import DEFINITION
from services.pay.wire import (
    MAX_DATAGRAM_BYTES,
    Ack,
    Proof,
    ProofRejected,
    decode,
    encode_ack,
    encode_proof,
)
from tests.unit.events import event
from tests.unit.fuzzing import FUZZ, mutations

R = pay_pb2.PaymentRejectReason
THRESHOLD = 1_000
DEPOSIT = 100_000
KEY = coincurve.PrivateKey(b"\x01" * 32)
NEIGHBOR_KEY = coincurve.PrivateKey(b"\x02" * 32)
OURS, THEIRS = address_of(KEY.public_key), address_of(NEIGHBOR_KEY.public_key)
DOMAIN = Domain(31337, b"\xcc" * 20)
HANDLERS = make_handlers(Payer(KEY, DOMAIN, THRESHOLD))
OUT_ID, IN_ID = b"\xa0" * 32, b"\xb0" * 32


def fold(state: pay_pb2.PayState, payload: object, at: int | None = None) -> list:
    return list(HANDLERS[type(payload)](state, event(payload, at)))


def link_up() -> link_pb2.LinkUp:
    return link_pb2.LinkUp(neighbor_id="r2", chain_address=THEIRS, tunnel_interface="mw1",
                           tunnel_peer_address="fe80::2")


def opened(channel_id: bytes, direction: int, deposit: int = DEPOSIT) -> pay_pb2.ChannelOpened:
    payer, payee = (OURS, THEIRS) if direction == OUTGOING else (THEIRS, OURS)
    return pay_pb2.ChannelOpened(channel_id=channel_id, counterparty_id="r2",
                                 direction=direction, payer_address=payer,
                                 payee_address=payee, deposit=money(deposit))


def debt(owed: int, charged: int = 0, received: int = 0) -> meter_pb2.DebtChanged:
    return meter_pb2.DebtChanged(neighbor_id="r2", usage_owed=money(owed),
                                 usage_charged=money(charged), payments_received=money(received),
                                 payments_sent=money(0))


def linked(with_channels: bool = True) -> pay_pb2.PayState:
    state = pay_pb2.PayState()
    fold(state, link_up())
    if with_channels:
        fold(state, opened(OUT_ID, OUTGOING))
        fold(state, opened(IN_ID, INCOMING))
    return state


# -- paying -------------------------------------------------------------------


def test_a_debt_over_the_threshold_is_paid_with_one_signed_cumulative_proof() -> None:
    state = linked()
    [sent] = fold(state, debt(owed=4_000, charged=1_000))
    proof = sent.payload
    assert (proof.nonce, amount(proof.cumulative), amount(proof.amount)) == (1, 4_000, 4_000)
    assert DOMAIN.signer(OUT_ID, 1, 4_000, proof.signature) == OURS
    # the next debt pays only the difference, on the next nonce
    [sent] = fold(state, debt(owed=8_000, charged=1_000))
    assert (sent.payload.nonce, amount(sent.payload.cumulative),
            amount(sent.payload.amount)) == (2, 8_000, 4_000)
    assert amount(state.neighbors["r2"].paid) == 8_000


def test_a_debt_under_the_threshold_or_already_paid_pays_nothing() -> None:
    state = linked()
    assert fold(state, debt(owed=THRESHOLD - 1)) == []
    fold(state, debt(owed=5_000))
    assert fold(state, debt(owed=5_000)) == []  # same totals again: paid already
    assert fold(state, debt(owed=5_500)) == []  # 500 more is under the threshold


def test_each_direction_is_paid_by_its_sender_and_disagreeing_meters_settle() -> None:
    """What it sent us is its to pay; what it paid us does not make us pay
    more. Netted, two meters that disagree by a few percent paid each other
    back and forth without end."""
    ours, theirs = linked(), linked()
    # We count 10,000 owed for what we sent and 5,000 charged for what it
    # sent; its meter says 9,600 and 4,800 (loss on the way).
    [sent] = fold(ours, debt(owed=10_000, charged=5_000))
    assert amount(sent.payload.cumulative) == 10_000
    [its] = fold(theirs, debt(owed=4_800, charged=9_600, received=10_000))
    assert amount(its.payload.cumulative) == 4_800
    # Its payment arriving does not make us pay again.
    assert fold(ours, debt(owed=10_000, charged=5_000, received=4_800)) == []


def test_debt_waits_for_a_channel_and_the_deposit_caps_each_proof() -> None:
    state = linked(with_channels=False)
    assert fold(state, debt(owed=250_000)) == []  # no channel yet
    [sent] = fold(state, opened(OUT_ID, OUTGOING))
    assert amount(sent.payload.cumulative) == DEPOSIT  # all the deposit allows
    topped = pay_pb2.ChannelToppedUp(channel_id=OUT_ID, counterparty_id="r2",
                                     added=money(DEPOSIT), deposit=money(2 * DEPOSIT))
    [sent] = fold(state, topped)
    assert (sent.payload.nonce, amount(sent.payload.cumulative)) == (2, 2 * DEPOSIT)


def test_replay_decides_the_same_proofs() -> None:
    state = pay_pb2.PayState()
    events = [event(link_up()), event(opened(OUT_ID, OUTGOING)), event(debt(owed=7_000)),
              event(debt(owed=12_000))]
    decided = [out.payload for e in events for out in HANDLERS[type(e.payload)](state, e)]
    definition = dataclasses.replace(DEFINITION, handlers=HANDLERS)
    assert replay(definition, events) == state
    again = pay_pb2.PayState()
    assert [out.payload for e in events
            for out in HANDLERS[type(e.payload)](again, e)] == decided


# -- taking a neighbor's proof ---------------------------------------------------


def their_proof(nonce: int, cumulative: int, key: coincurve.PrivateKey = NEIGHBOR_KEY,
                channel: bytes = IN_ID, domain: Domain = DOMAIN) -> Proof:
    return Proof(channel, nonce, cumulative, domain.sign(key, channel, nonce, cumulative))


def test_a_valid_proof_pays_its_increase_over_the_newest_taken() -> None:
    state = linked()
    received = check(state, "r2", their_proof(1, 3_000), DOMAIN, None)
    assert (amount(received.amount), amount(received.cumulative)) == (3_000, 3_000)
    fold(state, received)
    received = check(state, "r2", their_proof(2, 5_000), DOMAIN, None)
    assert amount(received.amount) == 2_000
    # a proof taken but not yet back from the log counts as taken
    received = check(state, "r2", their_proof(4, 9_000), DOMAIN, Taken(3, 6_000))
    assert amount(received.amount) == 3_000


@pytest.mark.parametrize(("proof", "taken", "reason"), [
    (their_proof(1, 10, channel=OUT_ID), None, R.PAYMENT_REJECT_REASON_UNKNOWN_CHANNEL),
    (their_proof(1, 10, channel=os.urandom(32)), None, R.PAYMENT_REJECT_REASON_UNKNOWN_CHANNEL),
    (their_proof(1, 10, key=KEY), None, R.PAYMENT_REJECT_REASON_WRONG_SIGNER),
    (their_proof(1, 10, domain=Domain(1, DOMAIN.contract)), None,
     R.PAYMENT_REJECT_REASON_WRONG_SIGNER),
    (their_proof(1, 10, domain=Domain(31337, b"\x01" * 20)), None,
     R.PAYMENT_REJECT_REASON_WRONG_SIGNER),
    (their_proof(3, 10), Taken(3, 5), R.PAYMENT_REJECT_REASON_STALE_NONCE),
    (their_proof(4, 4), Taken(3, 5), R.PAYMENT_REJECT_REASON_AMOUNT_DECREASED),
    (their_proof(1, DEPOSIT + 1), None, R.PAYMENT_REJECT_REASON_EXCEEDS_DEPOSIT),
    (Proof(IN_ID, 1, 10, b"\x00" * 64 + b"\x1b"), None, R.PAYMENT_REJECT_REASON_BAD_SIGNATURE),
], ids=["our-own-channel", "unknown-channel", "wrong-signer", "other-chain", "other-contract",
        "replayed-nonce", "decreasing", "above-deposit", "garbage-signature"])
def test_bad_proofs_are_refused_with_their_reason(proof: Proof, taken: Taken | None,
                                                   reason: int) -> None:
    with pytest.raises(PaymentRefused) as refused:
        check(linked(), "r2", proof, DOMAIN, taken)
    assert refused.value.reason == reason
    assert str(refused.value)


def test_a_proof_from_another_neighbor_or_for_a_closing_channel_is_refused() -> None:
    state = linked()
    with pytest.raises(PaymentRefused, match="no channel r3 opened"):
        check(state, "r3", their_proof(1, 10), DOMAIN, None)
    fold(state, pay_pb2.ChannelCloseStarted(channel_id=IN_ID, settle_after=Timestamp(seconds=9)))
    with pytest.raises(PaymentRefused, match="closing or closed"):
        check(state, "r2", their_proof(1, 10), DOMAIN, None)


# -- the datagrams ---------------------------------------------------------------


def test_a_proof_is_small_and_round_trips() -> None:
    proof = their_proof(123_456, 3 * 10**21)
    datagram = encode_proof(proof)
    assert len(datagram) < 150
    assert decode(datagram) == proof
    assert decode(encode_ack(Ack(IN_ID, 7))) == Ack(IN_ID, 7)


@pytest.mark.parametrize(("data", "reason"), [
    (b"", "decode"), (b"\x07abc", "decode"), (b"\x01\xff\xff", "decode"),
    (b"\x01" + b"\x00" * MAX_DATAGRAM_BYTES, "oversize"),
    (encode_proof(Proof(IN_ID[:31], 1, 1, b"\x00" * 65)), "field"),
    (encode_proof(Proof(IN_ID, 1, 1, b"\x00" * 64)), "field"),
    (encode_proof(Proof(IN_ID, 0, 1, b"\x00" * 65)), "field"),
    (encode_proof(Proof(IN_ID, 1, 2**256, b"\x00" * 65)), "field"),
    (encode_proof(Proof(IN_ID, 1, 1, b"\x00" * 65)) + b"\x28\x01", "field"),
])
def test_malformed_datagrams_say_what_is_wrong(data: bytes, reason: str) -> None:
    with pytest.raises(ProofRejected) as rejected:
        decode(data)
    assert rejected.value.reason == reason


@FUZZ
@given(mutations(encode_proof(their_proof(5, 10**18))))
def test_mutated_proofs_are_rejected_or_decode_to_exactly_those_bytes(data: bytes) -> None:
    try:
        message = decode(data)
    except ProofRejected:
        return
    assert (encode_proof(message) if isinstance(message, Proof) else encode_ack(message)) == data


# -- the chain plan ----------------------------------------------------------------

TERMS = plan.Terms(deposit=DEPOSIT, top_up_below=0.25, close_window=60, gone_after=100)


def kinds(state: pay_pb2.PayState, now: float) -> list[str]:
    return [pay_pb2.TransactionKind.Name(w.kind).removeprefix("TRANSACTION_KIND_")
            for w in plan.wanted(state, TERMS, now)]


def test_a_linked_neighbor_gets_a_channel_and_a_top_up_before_it_runs_dry() -> None:
    state = linked(with_channels=False)
    [want] = plan.wanted(state, TERMS, 0)
    assert (want.function, want.value, want.args[2:]) == ("open", DEPOSIT, (DEPOSIT, 60))
    fold(state, opened(OUT_ID, OUTGOING))
    assert kinds(state, 0) == []
    fold(state, debt(owed=int(DEPOSIT * 0.8)))
    assert kinds(state, 0) == ["TOP_UP"]


def test_a_neighbor_gone_for_good_has_its_channels_claimed_closed_and_settled() -> None:
    state = linked()
    fold(state, pay_pb2.PaymentReceived(channel_id=IN_ID, nonce=3, cumulative=money(700),
                                        signature=b"s" * 65))
    fold(state, link_pb2.LinkDown(neighbor_id="r2"), at=1_000)
    assert kinds(state, 1_050) == []  # not gone long enough
    assert kinds(state, 1_200) == ["CLOSE", "DISPUTE"]  # close ours; claim theirs first
    fold(state, pay_pb2.ChannelDisputed(channel_id=IN_ID, nonce=3, cumulative=money(700)))
    assert kinds(state, 1_200) == ["CLOSE", "CLOSE"]
    fold(state, pay_pb2.ChannelCloseStarted(channel_id=OUT_ID,
                                            settle_after=Timestamp(seconds=1_300)))
    assert "SETTLE" not in kinds(state, 1_250)
    assert "SETTLE" in kinds(state, 1_300)


def test_a_payers_close_is_answered_with_our_newest_proof_in_time() -> None:
    state = linked()
    fold(state, pay_pb2.PaymentReceived(channel_id=IN_ID, nonce=9, cumulative=money(900),
                                        signature=b"s" * 65))
    fold(state, pay_pb2.ChannelCloseStarted(channel_id=IN_ID,
                                            settle_after=Timestamp(seconds=500)))
    [want] = plan.wanted(state, TERMS, 400)
    assert (want.function, want.args[1:3]) == ("claim", (9, 900))
    fold(state, pay_pb2.ChannelDisputed(channel_id=IN_ID, nonce=9, cumulative=money(900)))
    assert plan.wanted(state, TERMS, 400) == []


def test_contract_logs_become_events_only_for_our_channels() -> None:
    class FakeChain:  # the two attributes to_event reads
        chain_id, contract_address = 31337, b"\xcc" * 20

    state = linked(with_channels=False)
    entry = {"transactionHash": b"\x01" * 32, "blockNumber": 7}
    opened_log = {"channel_id": OUT_ID, "payer": "0x" + OURS.hex(), "payee": "0x" + THEIRS.hex(),
                  "token": "0x" + "00" * 20, "deposit": DEPOSIT, "close_window": 60}
    event = to_event("ChannelOpened", opened_log, entry, OURS, FakeChain(), state,  # type: ignore[arg-type]
                     lambda address: "r2" if address == THEIRS else "")
    assert event is not None and event.payload.direction == OUTGOING
    assert event.payload.counterparty_id == "r2" and event.payload.token_address == b""
    strangers = {**opened_log, "payer": "0x" + "11" * 20, "payee": "0x" + "22" * 20}
    assert to_event("ChannelOpened", strangers, entry, OURS, FakeChain(), state,  # type: ignore[arg-type]
                    lambda address: "") is None
    withdrawn = {"owner": "0x" + OURS.hex(), "token": "0x" + "00" * 20, "amount": 5}
    assert to_event("Withdrawn", withdrawn, entry, OURS, FakeChain(), state,  # type: ignore[arg-type]
                    lambda address: "") is None


def test_a_settlement_short_of_our_newest_proof_reverts_the_difference() -> None:
    state = linked()
    [sent] = fold(state, debt(owed=9_000))
    assert amount(sent.payload.cumulative) == 9_000
    # the payee only ever got (and claimed) 6,000 worth of our proofs
    [reverted] = fold(state, pay_pb2.ChannelClosed(channel_id=OUT_ID, paid=money(6_000),
                                                   refunded=money(DEPOSIT - 6_000)))
    assert (reverted.kind, amount(reverted.payload.amount)) == ("reverted", 3_000)
    assert amount(state.neighbors["r2"].paid) == 6_000
    assert state.neighbors["r2"].outgoing_channel == ""  # a new channel pays the rest
    assert fold(state, pay_pb2.ChannelClosed(channel_id=OUT_ID, paid=money(6_000))) == []


# -- exits --------------------------------------------------------------------


def exit_opened(counterparty: str, direction: int) -> pay_pb2.ChannelOpened:
    channel = opened(OUT_ID if direction == OUTGOING else IN_ID, direction)
    channel.counterparty_id = counterparty
    return channel


def test_a_client_pays_its_exit_what_its_own_meter_says_inside_the_tunnel() -> None:
    state = pay_pb2.PayState()
    fold(state, exit_pb2.ExitRegistered(
        role=exit_pb2.EXIT_ROLE_CLIENT, exit_id="ex", client_id="c", exit_chain_address=THEIRS,
        exit_tunnel_address="fd64::1", client_addresses=["fd64::2/128"]))
    exit_ = state.neighbors["exit:ex"]
    assert (exit_.purpose, exit_.tunnel_peer_address, exit_.tunnel_interface,
            exit_.receive_only) == (pay_pb2.PAYMENT_PURPOSE_EXIT, "fd64::1", "", False)
    [want] = plan.wanted(state, TERMS, 0)
    assert (want.function, want.counterparty) == ("open", "exit:ex")
    fold(state, exit_opened("exit:ex", OUTGOING))
    [sent] = fold(state, exit_pb2.ClientDebtChanged(
        role=exit_pb2.EXIT_ROLE_CLIENT, exit_id="ex", client_id="c", usage_charged=money(5_000)))
    assert sent.payload.purpose == pay_pb2.PAYMENT_PURPOSE_EXIT
    assert (sent.payload.counterparty_id, amount(sent.payload.cumulative)) == ("exit:ex", 5_000)


def test_an_exit_takes_its_clients_payments_and_opens_no_channel_to_them() -> None:
    state = pay_pb2.PayState()
    fold(state, exit_pb2.ExitRegistered(
        role=exit_pb2.EXIT_ROLE_EXIT, exit_id="ex", client_id="c", client_chain_address=THEIRS,
        client_addresses=["fd64::2/128"]))
    assert state.neighbors["client:c"].receive_only
    assert plan.wanted(state, TERMS, 0) == []
    fold(state, exit_opened("client:c", INCOMING))
    received = check(state, "client:c", their_proof(1, 700), DOMAIN, None)
    assert received.purpose == pay_pb2.PAYMENT_PURPOSE_EXIT and amount(received.amount) == 700
    # An exit's debt report is not the exit's to pay.
    assert fold(state, exit_pb2.ClientDebtChanged(
        role=exit_pb2.EXIT_ROLE_EXIT, exit_id="ex", client_id="c", usage_charged=money(9))) == []
