"""Gas of the channel contract's operations, measured on anvil, beside Raiden's
published figures for the nearest operation of its TokenNetwork:

    .venv/bin/python -m tests.bench.bench_gas

Raiden (one two-way channel, tokens only): openChannelWithDeposit 146,956;
closeChannel 118,501; settleChannel 108,569. Ours is one-way, in coin or a
token; the pairs compared are open with a deposit, the payer's close (which
starts the window, like Raiden's close), and settlement (the payee's claim of
the newest proof plus its close, which settles at once; or a settle after the
payer's window).
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from web3.logs import DISCARD

from tests.chain.harness import NATIVE, chain_under_test, compiled

RAIDEN = {"open": 146_956, "close": 118_501, "settle": 108_569}
DEPOSIT = 10**18


def measure() -> dict[str, int]:
    gas: dict[str, int] = {}
    with chain_under_test("anvil") as chain:
        contract = chain.channels()
        payer, payee = chain.key(), chain.key()
        domain = chain.domain(contract)

        def used(name: str, receipt: dict[str, int]) -> dict[str, int]:
            gas[name] = receipt["gasUsed"]
            return receipt

        def opened(receipt: object) -> bytes:
            [log] = contract.events.ChannelOpened().process_receipt(receipt, errors=DISCARD)
            return bytes(log["args"]["channel_id"])

        channel = opened(used("open, coin", chain.send(contract.functions.open(
            payee.address, NATIVE, DEPOSIT, 600), payer, value=DEPOSIT)))
        used("top-up", chain.send(contract.functions.top_up(channel, DEPOSIT), payer,
                                  value=DEPOSIT))
        signature = domain.sign(payer.private, channel, 1, 10**17)
        used("claim", chain.send(contract.functions.claim(channel, 1, 10**17, signature), payee))
        used("close by payee (settles)", chain.send(contract.functions.close(channel), payee))
        used("withdraw", chain.send(contract.functions.withdraw(NATIVE), payee))

        channel = opened(chain.send(contract.functions.open(payee.address, NATIVE, DEPOSIT, 600),
                                    payer, value=DEPOSIT))
        used("close by payer (window)", chain.send(contract.functions.close(channel), payer))
        chain.travel(601)
        used("settle after the window", chain.send(contract.functions.settle(channel), payer))

        token = chain.deploy(*compiled("TestToken"))
        chain.send(token.functions.mint(payer.address, DEPOSIT), payer)
        chain.send(token.functions.approve(contract.address, DEPOSIT), payer)
        used("open, token (approve aside)", chain.send(contract.functions.open(
            payee.address, token.address, DEPOSIT, 600), payer))
    return gas


def main(argv: Sequence[str] | None = None) -> dict[str, int]:
    argparse.ArgumentParser(prog="python -m tests.bench.bench_gas",
                            description=__doc__.split("\n\n")[0]).parse_args(argv)
    gas = measure()
    settle = gas["claim"] + gas["close by payee (settles)"]
    pairs = {
        "open, coin": RAIDEN["open"], "open, token (approve aside)": RAIDEN["open"],
        "close by payer (window)": RAIDEN["close"],
        "settle after the window": RAIDEN["settle"],
    }
    for name, value in gas.items():
        theirs = pairs.get(name)
        versus = (f"  Raiden {theirs:,}  ratio {value / theirs:.2f}" if theirs else "")
        print(f"bench: gas {name:<30} {value:>8,}{versus}")
    print(f"bench: gas {'claim + close by payee':<30} {settle:>8,}  Raiden {RAIDEN['settle']:,}"
          f"  ratio {settle / RAIDEN['settle']:.2f}")
    return gas


if __name__ == "__main__":
    main()
