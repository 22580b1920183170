"""Money on the wire: an integer of base units as minimal big-endian bytes plus
a denomination (amounts in wei exceed 2^64, and floats lose base units)."""

from __future__ import annotations

from mesh.common.v1 import envelope_pb2

DEFAULT_DENOM = "wei"


class MoneyError(ValueError):
    """An amount that cannot be money: negative, or in another denomination."""


def money(amount: int, denom: str = DEFAULT_DENOM) -> envelope_pb2.Money:
    if amount < 0:
        raise MoneyError(f"amount {amount} is negative: money is never negative on the wire")
    return envelope_pb2.Money(amount=amount.to_bytes((amount.bit_length() + 7) // 8, "big"),
                              denom=denom)


def amount(value: envelope_pb2.Money, denom: str = DEFAULT_DENOM) -> int:
    """The integer in value; an empty Money is zero."""
    if value.denom and value.denom != denom:
        raise MoneyError(f"amount in {value.denom!r}, expected {denom!r}")
    return int.from_bytes(value.amount, "big")
