"""The channel contract on two chains (eth-tester in process, anvil): the
happy path in coin and in a token, and every way a proof or a party could
cheat: replays from elsewhere, old or decreasing proofs, wrong signers,
malleated signatures, amounts above the deposit, and parties that refuse
transfers."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import pytest
from web3.contract import Contract
from web3.logs import DISCARD

from tests.chain.harness import NATIVE, ChainUnderTest, Key, Reverted, chain_under_test, compiled

DEPOSIT = 10**18
WINDOW = 600
N = 115792089237316195423570985008687907852837564279074904382605163141518161494337


@pytest.fixture(scope="module", params=["eth-tester", "anvil"])
def chain(request: pytest.FixtureRequest) -> Iterator[ChainUnderTest]:
    with chain_under_test(request.param) as under_test:
        yield under_test


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

    def claim(self, channel_id: bytes, nonce: int, amount: int, signature: bytes,
              by: Key | None = None) -> object:
        return self.chain.send(self.contract.functions.claim(channel_id, nonce, amount,
                                                             signature), by or self.payee)

    def state(self, channel_id: bytes) -> tuple:
        return tuple(self.contract.functions.channels(channel_id).call())

    def withdrawable(self, who: str, token: str = NATIVE) -> int:
        return int(self.contract.functions.withdrawable(token, who).call())


@pytest.fixture
def parties(chain: ChainUnderTest) -> Parties:
    return Parties(chain, chain.channels(), chain.key(), chain.key())


CLAIMED, NONCE, SETTLED = 4, 5, 8  # fields of a channel as the getter returns it


def test_happy_path_in_coin_pays_exactly_the_latest_proof(parties: Parties) -> None:
    p, chain = parties, parties.chain
    payer_before = chain.balance(p.payer.address)
    channel = p.open()
    p.claim(channel, 2, 3 * 10**17, p.sign(channel, 2, 3 * 10**17))  # cashed out mid-channel
    chain.send(p.contract.functions.top_up(channel, DEPOSIT), p.payer, value=DEPOSIT)
    p.claim(channel, 9, 12 * 10**17, p.sign(channel, 9, 12 * 10**17))
    chain.send(p.contract.functions.close(channel), p.payee)
    assert p.state(channel)[CLAIMED] == 12 * 10**17 and p.state(channel)[SETTLED]
    assert p.withdrawable(p.payee.address) == 12 * 10**17
    assert p.withdrawable(p.payer.address) == 2 * DEPOSIT - 12 * 10**17
    payee_before = chain.balance(p.payee.address)
    receipt = chain.send(p.contract.functions.withdraw(NATIVE), p.payee)
    gas = receipt["gasUsed"] * receipt["effectiveGasPrice"]
    assert chain.balance(p.payee.address) == payee_before + 12 * 10**17 - gas
    chain.send(p.contract.functions.withdraw(NATIVE), p.payer)
    # all the payer spent beyond gas is exactly what the payee got
    spent = payer_before - chain.balance(p.payer.address)
    assert 12 * 10**17 <= spent < 12 * 10**17 + 10**16
    with pytest.raises(Reverted, match="nothing to withdraw"):
        chain.send(p.contract.functions.withdraw(NATIVE), p.payee)


def test_happy_path_in_a_token(parties: Parties) -> None:
    p, chain = parties, parties.chain
    token = chain.deploy(*compiled("TestToken"))
    chain.send(token.functions.mint(p.payer.address, 5 * DEPOSIT), p.payer)
    chain.send(token.functions.approve(p.contract.address, DEPOSIT), p.payer)
    with pytest.raises(Reverted, match="no coin with a token"):
        chain.send(p.contract.functions.open(p.payee.address, token.address, DEPOSIT, WINDOW),
                   p.payer, value=1)
    receipt = chain.send(p.contract.functions.open(p.payee.address, token.address, DEPOSIT,
                                                   WINDOW), p.payer)
    channel = p.opened(receipt)
    p.claim(channel, 1, 4 * 10**17, p.sign(channel, 1, 4 * 10**17))
    chain.send(p.contract.functions.close(channel), p.payee)
    for who in (p.payee, p.payer):
        chain.send(p.contract.functions.withdraw(token.address), who)
    assert token.functions.balanceOf(p.payee.address).call() == 4 * 10**17
    assert token.functions.balanceOf(p.payer.address).call() == 5 * DEPOSIT - 4 * 10**17
    assert token.functions.balanceOf(p.contract.address).call() == 0


def test_payer_close_gives_the_payee_its_window_to_claim(parties: Parties) -> None:
    p, chain = parties, parties.chain
    channel = p.open()
    newest = p.sign(channel, 7, 5 * 10**17)
    chain.send(p.contract.functions.close(channel), p.payer)
    with pytest.raises(Reverted, match="already closing"):
        chain.send(p.contract.functions.close(channel), p.payer)
    with pytest.raises(Reverted, match="channel closing"):
        chain.send(p.contract.functions.top_up(channel, 1), p.payer, value=1)
    with pytest.raises(Reverted, match="window not over"):
        chain.send(p.contract.functions.settle(channel), p.payer)
    p.claim(channel, 7, 5 * 10**17, newest)  # the payee answers in time
    chain.travel(WINDOW + 1)
    late = p.sign(channel, 8, 6 * 10**17)
    with pytest.raises(Reverted, match="window over"):
        p.claim(channel, 8, 6 * 10**17, late)
    chain.send(p.contract.functions.settle(channel), p.payer)
    assert p.withdrawable(p.payee.address) == 5 * 10**17
    assert p.withdrawable(p.payer.address) == DEPOSIT - 5 * 10**17


def test_a_proof_replayed_from_another_channel_contract_or_chain_is_refused(
    parties: Parties,
) -> None:
    p, chain = parties, parties.chain
    channel, other = p.open(), p.open()
    assert channel != other  # ids are never reused, not even between the same parties
    elsewhere = chain.channels()
    for signature in (p.sign(other, 1, 10), p.sign(channel, 1, 10, contract=elsewhere),
                      p.sign(channel, 1, 10, chain_id=chain.chain_id + 1)):
        with pytest.raises(Reverted, match="wrong signer"):
            p.claim(channel, 1, 10, signature)


def test_an_old_or_decreasing_proof_is_refused(parties: Parties) -> None:
    p = parties
    channel = p.open()
    p.claim(channel, 5, 500, p.sign(channel, 5, 500))
    with pytest.raises(Reverted, match="stale nonce"):
        p.claim(channel, 5, 500, p.sign(channel, 5, 500))
    with pytest.raises(Reverted, match="stale nonce"):
        p.claim(channel, 4, 900, p.sign(channel, 4, 900))
    with pytest.raises(Reverted, match="amount decreased"):
        p.claim(channel, 6, 400, p.sign(channel, 6, 400))
    p.chain.send(p.contract.functions.close(channel), p.payee)
    with pytest.raises(Reverted, match="channel settled"):
        p.claim(channel, 7, 600, p.sign(channel, 7, 600))
    assert p.state(channel)[CLAIMED] == 500


def test_a_wrong_signer_or_a_malleated_signature_is_refused(parties: Parties) -> None:
    p, chain = parties, parties.chain
    channel = p.open()
    stranger = chain.key()
    for key in (p.payee, stranger):
        with pytest.raises(Reverted, match="wrong signer"):
            p.claim(channel, 1, 100, p.sign(channel, 1, 100, key=key))
    good = p.sign(channel, 1, 100)
    s = int.from_bytes(good[32:64], "big")
    twin = good[:32] + (N - s).to_bytes(32, "big") + bytes([55 - good[64]])
    with pytest.raises(Reverted, match="malleable signature"):
        p.claim(channel, 1, 100, twin)
    with pytest.raises(Reverted, match="bad signature v"):
        p.claim(channel, 1, 100, good[:64] + b"\x01")
    p.claim(channel, 1, 100, good, by=stranger)  # anyone may deliver the payee's proof
    assert p.withdrawable(p.payee.address) == 100


def test_an_amount_above_the_deposit_waits_for_a_top_up(parties: Parties) -> None:
    p, chain = parties, parties.chain
    channel = p.open()
    above = p.sign(channel, 1, DEPOSIT + 1)
    with pytest.raises(Reverted, match="exceeds deposit"):
        p.claim(channel, 1, DEPOSIT + 1, above)
    with pytest.raises(Reverted, match="not payer"):
        chain.send(p.contract.functions.top_up(channel, 1), p.payee, value=1)
    chain.send(p.contract.functions.top_up(channel, 1), p.payer, value=1)
    p.claim(channel, 1, DEPOSIT + 1, above)


def test_a_party_refusing_transfers_cannot_block_the_others_settlement(
    parties: Parties,
) -> None:
    p, chain = parties, parties.chain
    refuser = chain.deploy(*compiled("RefusingParty"), p.contract.address)
    # as payer: the payee closes at once, and the refund waits in the contract
    receipt = chain.send(refuser.functions.open(p.payee.address, WINDOW), p.payee,
                         value=DEPOSIT)
    channel = p.opened(receipt)
    chain.send(p.contract.functions.close(channel), p.payee)
    assert p.state(channel)[SETTLED]
    assert p.withdrawable(refuser.address) == DEPOSIT
    # as payee: the payer's close and settle go through, and its refund comes out
    receipt = chain.send(p.contract.functions.open(refuser.address, NATIVE, DEPOSIT, WINDOW),
                         p.payer, value=DEPOSIT)
    channel = p.opened(receipt)
    p.chain.send(p.contract.functions.claim(channel, 1, 10**17,
                                            p.sign(channel, 1, 10**17)), p.payer)
    chain.send(p.contract.functions.close(channel), p.payer)
    chain.travel(WINDOW + 1)
    chain.send(p.contract.functions.settle(channel), p.payer)
    before = chain.balance(p.payer.address)
    receipt = chain.send(p.contract.functions.withdraw(NATIVE), p.payer)
    gas = receipt["gasUsed"] * receipt["effectiveGasPrice"]
    assert chain.balance(p.payer.address) == before + DEPOSIT - 10**17 - gas
    assert p.withdrawable(refuser.address) == DEPOSIT + 10**17


def test_bad_opens_are_refused(parties: Parties) -> None:
    p, chain = parties, parties.chain
    calls = [
        (p.contract.functions.open(p.payer.address, NATIVE, DEPOSIT, WINDOW), DEPOSIT,
         "bad payee"),
        (p.contract.functions.open(p.payee.address, NATIVE, 0, WINDOW), 0, "no deposit"),
        (p.contract.functions.open(p.payee.address, NATIVE, DEPOSIT, 0), DEPOSIT, "bad window"),
        (p.contract.functions.open(p.payee.address, NATIVE, DEPOSIT, WINDOW), 1,
         "value is not the amount"),
    ]
    for call, value, message in calls:
        with pytest.raises(Reverted, match=message):
            chain.send(call, p.payer, value=value)
    with pytest.raises(Reverted, match="not a party"):
        chain.send(p.contract.functions.close(p.open()), chain.key())
