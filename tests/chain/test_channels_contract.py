"""The channel contract on two chains (eth-tester in process, anvil): the
happy path in coin and in a token, the payer's close window, and every way a
proof or a party could cheat: replays from elsewhere, old or decreasing
proofs, wrong signers, malleated signatures, amounts above the deposit,
parties that refuse transfers, reused channel ids."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pytest
from eth_abi import encode
from web3.contract import Contract
from web3.logs import DISCARD

from services.pay.proofs import keccak256
from tests.chain.harness import NATIVE, ChainUnderTest, Key, Reverted, compiled

DEPOSIT = 10**18
WINDOW = 600
N = 115792089237316195423570985008687907852837564279074904382605163141518161494337
CLAIMED, NONCE, CLOSES_AT, SETTLED = 4, 5, 7, 8  # fields of a channel as the getter returns it


def cost(receipt: Any) -> int:
    """What a transaction's gas cost its sender, in wei."""
    return int(receipt["gasUsed"] * receipt["effectiveGasPrice"])


@dataclass
class Parties:
    chain: ChainUnderTest
    contract: Contract
    payer: Key
    payee: Key

    def open(self, deposit: int = DEPOSIT, window: int = WINDOW) -> bytes:
        receipt = self.chain.send(self.contract.functions.open(
            self.payee.address, NATIVE, deposit, window), self.payer, value=deposit)
        return self.opened(receipt)

    def opened(self, receipt: object) -> bytes:
        """The id of the channel a transaction opened (other contracts' logs aside)."""
        [log] = self.contract.events.ChannelOpened().process_receipt(receipt, errors=DISCARD)
        return bytes(log["args"]["channel_id"])

    def sign(self, channel_id: bytes, nonce: int, amount: int, key: Key | None = None,
             contract: Contract | None = None, chain_id: int | None = None) -> bytes:
        domain = self.chain.domain(contract or self.contract)
        if chain_id is not None:
            domain = type(domain)(chain_id, domain.contract)
        return domain.sign((key or self.payer).private, channel_id, nonce, amount)

    def claim(self, channel_id: bytes, nonce: int, amount: int, signature: bytes | None = None,
              by: Key | None = None) -> Any:
        """The payee (or `by`) claims a proof, by default one the payer signs now."""
        signature = signature or self.sign(channel_id, nonce, amount)
        return self.chain.send(self.contract.functions.claim(channel_id, nonce, amount,
                                                             signature), by or self.payee)

    def close(self, channel_id: bytes, by: Key) -> Any:
        return self.chain.send(self.contract.functions.close(channel_id), by)

    def top_up(self, channel_id: bytes, amount: int, value: int | None = None) -> Any:
        return self.chain.send(self.contract.functions.top_up(channel_id, amount), self.payer,
                               value=amount if value is None else value)

    def withdraw(self, who: Key, token: str = NATIVE) -> Any:
        return self.chain.send(self.contract.functions.withdraw(token), who)

    def state(self, channel_id: bytes) -> tuple[Any, ...]:
        return tuple(self.contract.functions.channels(channel_id).call())

    def withdrawable(self, who: str, token: str = NATIVE) -> int:
        return int(self.contract.functions.withdrawable(token, who).call())


@pytest.fixture
def parties(chain: ChainUnderTest) -> Parties:
    return Parties(chain, chain.channels(), chain.key(), chain.key())


def test_happy_path_in_coin_pays_exactly_the_latest_proof(parties: Parties) -> None:
    p, chain = parties, parties.chain
    payer_before, payee_before = chain.balance(p.payer.address), chain.balance(p.payee.address)
    receipt = p.chain.send(p.contract.functions.open(p.payee.address, NATIVE, DEPOSIT, WINDOW),
                           p.payer, value=DEPOSIT)
    channel = p.opened(receipt)
    payer_gas, payee_gas = cost(receipt), 0
    # the payer signs a proof per payment; the payee holds the newest
    proofs = {nonce: (nonce * 10**17, p.sign(channel, nonce, nonce * 10**17))
              for nonce in range(1, 13)}
    payee_gas += cost(p.claim(channel, 3, *proofs[3]))  # cashed out mid-channel
    assert p.withdrawable(p.payee.address) == 3 * 10**17
    payer_gas += cost(p.top_up(channel, DEPOSIT))
    payee_gas += cost(p.claim(channel, 12, *proofs[12]))
    payee_gas += cost(p.close(channel, p.payee))
    assert p.state(channel)[CLAIMED] == 12 * 10**17 and p.state(channel)[SETTLED]
    assert p.withdrawable(p.payee.address) == 12 * 10**17
    assert p.withdrawable(p.payer.address) == 2 * DEPOSIT - 12 * 10**17
    payee_gas += cost(p.withdraw(p.payee))
    payer_gas += cost(p.withdraw(p.payer))
    assert chain.balance(p.payee.address) == payee_before + 12 * 10**17 - payee_gas
    assert chain.balance(p.payer.address) == payer_before - 12 * 10**17 - payer_gas
    assert chain.balance(p.contract.address) == 0
    with pytest.raises(Reverted, match="nothing to withdraw"):
        p.withdraw(p.payee)


def test_happy_path_in_a_token(parties: Parties) -> None:
    p, chain = parties, parties.chain
    token = chain.deploy(*compiled("TestToken"))
    chain.send(token.functions.mint(p.payer.address, 5 * DEPOSIT), p.payer)
    chain.send(token.functions.approve(p.contract.address, 2 * DEPOSIT), p.payer)
    with pytest.raises(Reverted, match="no coin with a token"):
        chain.send(p.contract.functions.open(p.payee.address, token.address, DEPOSIT, WINDOW),
                   p.payer, value=1)
    channel = p.opened(chain.send(p.contract.functions.open(
        p.payee.address, token.address, DEPOSIT, WINDOW), p.payer))
    assert token.functions.balanceOf(p.contract.address).call() == DEPOSIT
    proofs = {nonce: (nonce * 10**17, p.sign(channel, nonce, nonce * 10**17))
              for nonce in range(1, 16)}
    p.claim(channel, 4, *proofs[4])
    with pytest.raises(Reverted, match="no coin with a token"):
        p.top_up(channel, DEPOSIT, value=DEPOSIT)
    p.top_up(channel, DEPOSIT, value=0)
    p.claim(channel, 15, *proofs[15])
    p.close(channel, p.payee)
    assert p.withdrawable(p.payee.address, token.address) == 15 * 10**17
    assert p.withdrawable(p.payer.address, token.address) == 2 * DEPOSIT - 15 * 10**17
    assert p.withdrawable(p.payee.address) == 0  # nothing credited in coin
    for who in (p.payee, p.payer):
        p.withdraw(who, token.address)
    assert token.functions.balanceOf(p.payee.address).call() == 15 * 10**17
    assert token.functions.balanceOf(p.payer.address).call() == 5 * DEPOSIT - 15 * 10**17
    assert token.functions.balanceOf(p.contract.address).call() == 0


def test_payer_close_gives_the_payee_its_window_to_claim(parties: Parties) -> None:
    p, chain = parties, parties.chain
    channel = p.open()
    newest = p.sign(channel, 7, 5 * 10**17)
    receipt = p.close(channel, p.payer)
    closes_at = p.state(channel)[CLOSES_AT]
    assert closes_at == chain.w3.eth.get_block(receipt["blockNumber"])["timestamp"] + WINDOW
    with pytest.raises(Reverted, match="already closing"):
        p.close(channel, p.payer)
    with pytest.raises(Reverted, match="channel closing"):
        p.top_up(channel, 1)
    with pytest.raises(Reverted, match="window not over"):
        chain.send(p.contract.functions.settle(channel), p.payer)
    p.claim(channel, 7, 5 * 10**17, newest)  # the payee answers in time
    chain.travel(WINDOW + 1)
    with pytest.raises(Reverted, match="window over"):
        p.claim(channel, 8, 6 * 10**17)
    chain.send(p.contract.functions.settle(channel), chain.key())  # anyone may settle
    with pytest.raises(Reverted, match="channel settled"):
        chain.send(p.contract.functions.settle(channel), p.payer)
    assert p.withdrawable(p.payee.address) == 5 * 10**17
    assert p.withdrawable(p.payer.address) == DEPOSIT - 5 * 10**17


def test_a_proof_replayed_from_another_channel_contract_or_chain_is_refused(
    parties: Parties,
) -> None:
    p, chain = parties, parties.chain
    channel, other = p.open(), p.open()
    elsewhere = chain.channels()  # a second MeshChannels
    for signature in (p.sign(other, 1, 10), p.sign(channel, 1, 10, contract=elsewhere),
                      p.sign(channel, 1, 10, chain_id=chain.chain_id + 1)):
        with pytest.raises(Reverted, match="wrong signer"):
            p.claim(channel, 1, 10, signature)
    p.claim(channel, 1, 10)  # the same proof, signed for this channel here, is good


def test_an_old_or_decreasing_proof_is_refused_at_settlement(parties: Parties) -> None:
    p = parties
    channel = p.open()
    p.claim(channel, 5, 500)
    p.close(channel, p.payer)  # in the window, the payee's newest proof is already in
    with pytest.raises(Reverted, match="stale nonce"):
        p.claim(channel, 5, 500)  # the same proof again
    with pytest.raises(Reverted, match="stale nonce"):
        p.claim(channel, 4, 900)  # an older proof, however much it says
    with pytest.raises(Reverted, match="amount decreased"):
        p.claim(channel, 6, 400)  # newer, but for less
    p.claim(channel, 6, 500)  # newer for as much is fine
    p.close(channel, p.payee)
    with pytest.raises(Reverted, match="channel settled"):
        p.claim(channel, 7, 600)
    assert p.state(channel)[CLAIMED] == 500 and p.state(channel)[NONCE] == 6
    assert p.withdrawable(p.payee.address) == 500


def test_a_proof_signed_by_the_payee_or_a_stranger_is_refused(parties: Parties) -> None:
    p, chain = parties, parties.chain
    channel = p.open()
    for key in (p.payee, chain.key()):
        with pytest.raises(Reverted, match="wrong signer"):
            p.claim(channel, 1, 100, p.sign(channel, 1, 100, key=key))
    with pytest.raises(Reverted, match="wrong signer"):  # ecrecover fails: empty(address)
        p.claim(channel, 1, 100, bytes(32) + (1).to_bytes(32, "big") + b"\x1b")
    assert p.withdrawable(p.payee.address) == 0


def test_a_malleated_signature_is_refused(parties: Parties) -> None:
    p, chain = parties, parties.chain
    channel = p.open()
    good = p.sign(channel, 1, 100)
    s = int.from_bytes(good[32:64], "big")
    twin = good[:32] + (N - s).to_bytes(32, "big") + bytes([55 - good[64]])  # v flipped
    with pytest.raises(Reverted, match="malleable signature"):
        p.claim(channel, 1, 100, twin)
    with pytest.raises(Reverted, match="bad signature v"):
        p.claim(channel, 1, 100, good[:64] + b"\x01")
    p.claim(channel, 1, 100, good, by=chain.key())  # anyone may deliver the payee's proof
    assert p.withdrawable(p.payee.address) == 100


def test_an_amount_above_the_deposit_waits_for_a_top_up(parties: Parties) -> None:
    p, chain = parties, parties.chain
    channel = p.open()
    above = p.sign(channel, 1, DEPOSIT + 1)
    with pytest.raises(Reverted, match="exceeds deposit"):
        p.claim(channel, 1, DEPOSIT + 1, above)
    with pytest.raises(Reverted, match="not payer"):
        chain.send(p.contract.functions.top_up(channel, 1), p.payee, value=1)
    with pytest.raises(Reverted, match="value is not the amount"):
        p.top_up(channel, 1, value=2)
    p.top_up(channel, 1)
    assert p.state(channel)[3] == DEPOSIT + 1
    p.claim(channel, 1, DEPOSIT + 1, above)
    assert p.withdrawable(p.payee.address) == DEPOSIT + 1


def test_a_payer_refusing_transfers_cannot_block_settlement(parties: Parties) -> None:
    """With pushed refunds, a payer whose every receipt of coin reverts would
    make each settlement of its channels revert. Here settling only credits
    it. (A contract has no key, so it signs no proofs: its payee's claims are
    refused, and the payee is paid in an ordinary channel beside it.)"""
    p, chain = parties, parties.chain
    refuser = chain.deploy(*compiled("RefusingParty"), p.contract.address)
    at_once = p.opened(chain.send(refuser.functions.open(p.payee.address, WINDOW), p.payer,
                                  value=DEPOSIT))
    windowed = p.opened(chain.send(refuser.functions.open(p.payee.address, WINDOW), p.payer,
                                   value=DEPOSIT))
    ordinary = p.open()
    with pytest.raises(Reverted, match="wrong signer"):
        p.claim(at_once, 1, 10**17)
    p.claim(ordinary, 1, 3 * 10**17)
    p.close(at_once, p.payee)  # the payee settles the refuser's channel at once
    chain.send(refuser.functions.close(windowed), p.payer)  # the refuser starts its window
    chain.travel(WINDOW + 1)
    chain.send(p.contract.functions.settle(windowed), p.payee)
    assert p.state(at_once)[SETTLED] and p.state(windowed)[SETTLED]
    assert p.withdrawable(refuser.address) == 2 * DEPOSIT  # the refunds wait, credited
    p.close(ordinary, p.payee)
    before = chain.balance(p.payee.address)
    receipt = p.withdraw(p.payee)
    assert chain.balance(p.payee.address) == before + 3 * 10**17 - cost(receipt)
    assert p.withdrawable(p.payee.address) == 0
    assert chain.balance(p.contract.address) == 2 * DEPOSIT + DEPOSIT - 3 * 10**17


def test_a_payee_refusing_transfers_cannot_block_the_payers_refund(parties: Parties) -> None:
    p, chain = parties, parties.chain
    refuser = chain.deploy(*compiled("RefusingParty"), p.contract.address)
    channel = p.opened(chain.send(p.contract.functions.open(refuser.address, NATIVE, DEPOSIT,
                                                            WINDOW), p.payer, value=DEPOSIT))
    p.claim(channel, 1, 10**17, by=p.payer)  # anyone may deliver a proof for the payee
    p.close(channel, p.payer)
    chain.travel(WINDOW + 1)
    chain.send(p.contract.functions.settle(channel), p.payer)
    before = chain.balance(p.payer.address)
    receipt = p.withdraw(p.payer)
    assert chain.balance(p.payer.address) == before + DEPOSIT - 10**17 - cost(receipt)
    assert p.withdrawable(refuser.address) == 10**17
    assert chain.balance(p.contract.address) == 10**17


def test_channel_ids_are_never_reused(parties: Parties) -> None:
    p, chain = parties, parties.chain
    first = p.open()
    count = p.contract.functions.channel_count().call()
    assert first == keccak256(encode(["address", "uint256", "uint256"],
                                     [p.contract.address, chain.chain_id, count]))
    p.claim(first, 1, 10)
    p.close(first, p.payee)
    second = p.open()  # same parties, same terms
    assert second != first
    assert p.state(second)[CLAIMED] == 0 and not p.state(second)[SETTLED]
    # the settled channel stays settled: its proofs and top-ups are refused
    with pytest.raises(Reverted, match="channel settled"):
        p.claim(first, 2, 20)
    with pytest.raises(Reverted, match="channel settled"):
        p.top_up(first, 1)
    with pytest.raises(Reverted, match="channel settled"):
        p.close(first, p.payer)
    # a proof for the first channel is worth nothing in the second
    with pytest.raises(Reverted, match="wrong signer"):
        p.claim(second, 2, 20, p.sign(first, 2, 20))


def test_bad_opens_are_refused(parties: Parties) -> None:
    p, chain = parties, parties.chain
    calls = [
        (p.contract.functions.open(p.payer.address, NATIVE, DEPOSIT, WINDOW), DEPOSIT,
         "bad payee"),
        (p.contract.functions.open(NATIVE, NATIVE, DEPOSIT, WINDOW), DEPOSIT, "bad payee"),
        (p.contract.functions.open(p.payee.address, NATIVE, 0, WINDOW), 0, "no deposit"),
        (p.contract.functions.open(p.payee.address, NATIVE, DEPOSIT, 0), DEPOSIT, "bad window"),
        (p.contract.functions.open(p.payee.address, NATIVE, DEPOSIT, 30 * 86400 + 1), DEPOSIT,
         "bad window"),
        (p.contract.functions.open(p.payee.address, NATIVE, DEPOSIT, WINDOW), 1,
         "value is not the amount"),
        (p.contract.functions.open(p.payee.address, chain.key().address, DEPOSIT, WINDOW), 0,
         "token not a contract"),
    ]
    for call, value, message in calls:
        with pytest.raises(Reverted, match=message):
            chain.send(call, p.payer, value=value)
    token = chain.deploy(*compiled("TestToken"))  # no allowance: transferFrom reverts
    with pytest.raises(Reverted):
        chain.send(p.contract.functions.open(p.payee.address, token.address, DEPOSIT, WINDOW),
                   p.payer)
    for window in (1, 30 * 86400):  # the bounds themselves are fine
        p.open(window=window)
    with pytest.raises(Reverted, match="not a party"):
        p.close(p.open(), chain.key())
    with pytest.raises(Reverted, match="no such channel"):
        p.claim(bytes(32), 1, 1, p.sign(bytes(32), 1, 1))
