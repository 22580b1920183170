"""Gas of the channel contract's operations, measured on anvil, beside Raiden's
published figures for the nearest operation of its TokenNetwork:

    .venv/bin/python -m tests.bench.bench_gas

Raiden (one two-way channel, tokens only): openChannelWithDeposit 146,956;
closeChannel 118,501; settleChannel 108,569. Ours is one-way, in coin or a
token; the pairs compared are open with a deposit, the payer's close (which
starts the window, like Raiden's close), and settlement (the payee's claim of
the newest proof plus its close, which settles at once; or a settle after the
payer's window). Every party is a fresh account, so first writes to a slot
(20,000 more than later ones) are counted where they happen: the contract's
first open sets its channel counter, a payee's first claim its balance.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from typing import Any

from web3.logs import DISCARD

from tests.chain.harness import NATIVE, chain_under_test, compiled

RAIDEN = {"openChannelWithDeposit": 146_956, "closeChannel": 118_501,
          "settleChannel": 108_569}
DEPOSIT = 10**18
WINDOW = 600
CLAIM_AND_CLOSE = "claim + close by payee"
# every row of the table, in order, and the Raiden operation it compares with
ROWS: dict[str, str | None] = {
    "open, coin (contract's first)": "openChannelWithDeposit",
    "open, coin": "openChannelWithDeposit",
    "open, token (approve aside)": "openChannelWithDeposit",
    "top-up": None,
    "claim (payee's first)": None,
    "claim (a later one)": None,
    "close by payee (settles)": None,
    CLAIM_AND_CLOSE: "settleChannel",
    "close by payer (window)": "closeChannel",
    "settle after the window": "settleChannel",
    "withdraw": None,
}


def measure() -> dict[str, int]:
    """Gas used by each operation (CLAIM_AND_CLOSE aside), on a fresh anvil."""
    gas: dict[str, int] = {}
    with chain_under_test("anvil") as chain:
        contract = chain.channels()
        payer, payee = chain.key(), chain.key()
        domain = chain.domain(contract)

        def used(name: str, call: Any, value: int = 0) -> None:
            gas[name] = int(chain.send(call, payer, value=value)["gasUsed"])

        def open_coin(name: str | None) -> bytes:
            receipt = chain.send(contract.functions.open(payee.address, NATIVE, DEPOSIT, WINDOW),
                                 payer, value=DEPOSIT)
            if name:
                gas[name] = int(receipt["gasUsed"])
            [log] = contract.events.ChannelOpened().process_receipt(receipt, errors=DISCARD)
            return bytes(log["args"]["channel_id"])

        def as_payee(name: str, call: Any) -> None:
            gas[name] = int(chain.send(call, payee)["gasUsed"])

        def claim(name: str, channel: bytes, nonce: int, amount: int) -> None:
            signature = domain.sign(payer.private, channel, nonce, amount)
            as_payee(name, contract.functions.claim(channel, nonce, amount, signature))

        open_coin("open, coin (contract's first)")
        channel = open_coin("open, coin")
        used("top-up", contract.functions.top_up(channel, DEPOSIT), value=DEPOSIT)
        claim("claim (payee's first)", channel, 1, 10**17)
        claim("claim (a later one)", channel, 2, 2 * 10**17)
        as_payee("close by payee (settles)", contract.functions.close(channel))
        as_payee("withdraw", contract.functions.withdraw(NATIVE))

        channel = open_coin(None)
        used("close by payer (window)", contract.functions.close(channel))
        chain.travel(WINDOW + 1)
        used("settle after the window", contract.functions.settle(channel))

        token = chain.deploy(*compiled("TestToken"))
        chain.send(token.functions.mint(payer.address, DEPOSIT), payer)
        chain.send(token.functions.approve(contract.address, DEPOSIT), payer)
        used("open, token (approve aside)",
             contract.functions.open(payee.address, token.address, DEPOSIT, WINDOW))
    return gas


def table(gas: dict[str, int]) -> list[str]:
    """One line per row of ROWS: our gas, and Raiden's with the ratio where they pair."""
    gas = {**gas, CLAIM_AND_CLOSE: gas["claim (payee's first)"] + gas["close by payee (settles)"]}
    lines = [f"bench: gas {'operation':<30} {'ours':>8}  {'Raiden':<30} ratio"]
    for name, theirs in ROWS.items():
        line = f"bench: gas {name:<30} {gas[name]:>8,}"
        if theirs:
            raiden = f"{theirs} {RAIDEN[theirs]:,}"
            line += f"  {raiden:<30} {gas[name] / RAIDEN[theirs]:.2f}"
        lines.append(line)
    return lines


def main(argv: Sequence[str] | None = None) -> dict[str, int]:
    argparse.ArgumentParser(prog="python -m tests.bench.bench_gas",
                            description=__doc__.split("\n\n")[0]).parse_args(argv)
    gas = measure()
    for line in table(gas):
        print(line)
    return gas


if __name__ == "__main__":
    main()
