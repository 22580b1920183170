"""Benchmark of balance proofs: signing and verifying, and their size.

    .venv/bin/python -m tests.bench.bench_pay [--proofs N]

Prints, each against a baseline measured in the same run:
  - proofs signed and verified per second on one core (target: 5,000 each),
    against eth-account signing and recovering the same EIP-712 data;
  - bytes of a proof and of its acknowledgement as datagrams, and with the
    headers of the tunnel (IPv6 + UDP inside, IPv6 + UDP + WireGuard outside);
  - payment bytes per megabyte of paid traffic at the default price and pay
    threshold (a payment per megabyte owed; target: under 0.02%).
"""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Callable, Sequence

import coincurve
from eth_account import Account
from eth_account.messages import encode_typed_data

from services.meter.service import MeterSettings
from services.pay.proofs import Domain
from services.pay.wire import Ack, Proof, encode_ack, encode_proof

INNER_HEADERS = 40 + 8  # IPv6 + UDP inside the tunnel
OUTER_HEADERS = 40 + 8 + 32  # IPv6 + UDP + WireGuard's header and tag outside
TYPES = {
    "EIP712Domain": [{"name": "name", "type": "string"}, {"name": "version", "type": "string"},
                     {"name": "chainId", "type": "uint256"},
                     {"name": "verifyingContract", "type": "address"}],
    "BalanceProof": [{"name": "channelId", "type": "bytes32"}, {"name": "nonce", "type": "uint256"},
                     {"name": "amount", "type": "uint256"}],
}


def rate(count: int, run: Callable[[int], object]) -> float:
    started = time.perf_counter()
    for i in range(count):
        run(i)
    return count / (time.perf_counter() - started)


def main(argv: Sequence[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(prog="python -m tests.bench.bench_pay",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--proofs", type=int, default=5_000, help="proofs to sign and verify")
    args = parser.parse_args(argv)
    key = coincurve.PrivateKey(os.urandom(32))
    domain = Domain(31337, os.urandom(20))
    channel = os.urandom(32)
    cumulative = 3 * 10**18  # 3 ETH: amounts are wider than 64 bits
    signatures = [domain.sign(key, channel, i + 1, cumulative + i) for i in range(args.proofs)]

    signed = rate(args.proofs, lambda i: domain.sign(key, channel, i + 1, cumulative + i))
    verified = rate(args.proofs, lambda i: domain.signer(channel, i + 1, cumulative + i,
                                                          signatures[i]))

    def typed(i: int) -> object:
        return encode_typed_data(full_message={
            "types": TYPES, "primaryType": "BalanceProof",
            "domain": {"name": "MeshChannels", "version": "1", "chainId": 31337,
                       "verifyingContract": "0x" + domain.contract.hex()},
            "message": {"channelId": channel, "nonce": i + 1, "amount": cumulative + i}})

    baseline_count = max(args.proofs // 10, 50)
    eth_signed = rate(baseline_count, lambda i: Account.sign_message(typed(i), key.secret))
    eth_verified = rate(baseline_count, lambda i: Account.recover_message(
        typed(i), signature=signatures[i]))
    print(f"bench: proofs signed {signed:,.0f}/s, verified {verified:,.0f}/s on one core "
          f"(target 5,000 each); eth-account {eth_signed:,.0f}/s and {eth_verified:,.0f}/s; "
          f"ratio {signed / eth_signed:.1f}x and {verified / eth_verified:.1f}x")

    proof = len(encode_proof(Proof(channel, 1_000_000, cumulative, signatures[0])))
    ack = len(encode_ack(Ack(channel, 1_000_000)))
    per_payment = proof + ack
    on_wire = per_payment + 2 * (INNER_HEADERS + OUTER_HEADERS)
    print(f"bench: proof {proof} bytes, acknowledgement {ack} bytes; a payment is "
          f"{per_payment} bytes of messages, {on_wire} bytes on the wire with the headers")

    meter = MeterSettings()
    paid_bytes = meter.pay_threshold / meter.price  # traffic one payment settles
    share, wire_share = per_payment / paid_bytes, on_wire / paid_bytes
    print(f"bench: payment bytes per MB of paid traffic {share * 100:.4f}% of messages, "
          f"{wire_share * 100:.4f}% on the wire (target under 0.02%; a payment per "
          f"{paid_bytes / 1e6:g} MB at {meter.price} wei/byte)")
    return {"signed": signed, "verified": verified, "proof_bytes": proof,
            "share": share, "wire_share": wire_share}


if __name__ == "__main__":
    main()
