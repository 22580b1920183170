"""The ledger arithmetic: pure functions of the meter's state and a sample.

A sample holds the kernel's monotonic counters per (neighbor, destination).
The bytes since the previous sample are priced: bytes a neighbor sent us to
forward to D cost it our price for D (our own price plus the price of the
route we use to D); bytes we sent through it to D cost us its advertised
price for D. Both sides of one neighbor are netted into one balance.
"""

from __future__ import annotations

from dataclasses import dataclass

from mesh.meter.v1 import meter_pb2

from services.common.money import amount, money

# A retracted route's prefix is still counted and priced as it was for up to
# this many samples, while bytes to it keep coming (TCP resending into a
# route that flapped): its first sample without any ends it sooner.
RETRACTED_HOLD_SAMPLES = 10
MAX_SANE_PRICE = 10**15  # wei per byte: 10^21 wei (1,000 ETH) per megabyte is absurd
OTHER = "other"  # the counters' bucket for destinations with no known prefix


@dataclass(frozen=True)
class Thresholds:
    pay: int  # we owe this much: pay
    throttle: int  # they owe this much: throttle them
    cutoff: int  # they owe this much: stop forwarding for them
    throttle_rate_bps: int


@dataclass(frozen=True)
class Charge:
    rx_bytes: int
    tx_bytes: int
    charged: int  # they owe us for it
    owed: int  # we owe them for it


def delta(counter: int, previous: int) -> tuple[int, bool]:
    """Bytes since the previous reading, and whether the counter was reset
    (a counter below its last reading started again from zero)."""
    if counter < previous:
        return counter, True
    return counter - previous, False


def drop_idle_retracted(state: meter_pb2.MeterState, moved: set[str]) -> None:
    """After a sample: forget the retracted routes no byte went to in it, and
    those held long enough (their prefixes then stop being counted)."""
    for prefix, route in list(state.routes.items()):
        if not route.retracted:
            continue
        route.samples_retracted += 1
        if prefix not in moved or route.samples_retracted >= RETRACTED_HOLD_SAMPLES:
            del state.routes[prefix]


def our_price(state: meter_pb2.MeterState, prefix: str) -> int:
    """What a neighbor pays us per byte to D: our price plus our route's."""
    route = state.routes.get(prefix)
    own = amount(state.price.price)
    return own + (amount(route.tx_price) if route is not None else 0)


def their_price(state: meter_pb2.MeterState, neighbor: str, prefix: str, default: int) -> int:
    """What we pay a neighbor per byte to D: its advertised price, if our route
    to D goes through it or it advertises one too (bytes steered through it,
    as verify's probes are); else the documented default."""
    route = state.routes.get(prefix)
    if route is not None and route.next_hop_id == neighbor:
        return amount(route.rx_price)
    if route is not None and neighbor in route.alternative_prices:
        return amount(route.alternative_prices[neighbor])
    return default


def balance(debt: meter_pb2.DebtChanged) -> int:
    """Positive: the neighbor owes us; negative: we owe it."""
    return (amount(debt.usage_charged) + amount(debt.payments_sent)
            - amount(debt.usage_owed) - amount(debt.payments_received))


def with_totals(neighbor: str, charged: int, owed: int, received: int, sent: int,
                cause: meter_pb2.DebtCause, pay_threshold: int) -> meter_pb2.DebtChanged:
    debt = meter_pb2.DebtChanged(
        neighbor_id=neighbor, cause=cause, usage_charged=money(charged), usage_owed=money(owed),
        payments_received=money(received), payments_sent=money(sent),
    )
    net = balance(debt)
    debt.balance.CopyFrom(money(abs(net)))
    debt.direction = (meter_pb2.DEBT_DIRECTION_NEIGHBOR_OWES_US if net > 0
                      else meter_pb2.DEBT_DIRECTION_WE_OWE_NEIGHBOR if net < 0
                      else meter_pb2.DEBT_DIRECTION_EVEN)
    debt.payment_due = -net >= pay_threshold > 0
    return debt


def enforcement_for(net: int, limits: Thresholds) -> tuple[meter_pb2.Enforcement, int, int]:
    """(enforcement, rate limit, threshold crossed) for a balance."""
    if net >= limits.cutoff:
        return meter_pb2.ENFORCEMENT_BLOCKED, 0, limits.cutoff
    if net >= limits.throttle:
        return meter_pb2.ENFORCEMENT_THROTTLED, limits.throttle_rate_bps, limits.throttle
    return meter_pb2.ENFORCEMENT_OPEN, 0, 0
