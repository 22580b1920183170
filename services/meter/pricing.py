"""The automatic pricing algorithm.

The price rises with how busy the router's links are: with utilisation u in
[0, 1] (the busiest tunnel's forwarded bit rate over the configured link
capacity, smoothed as an exponentially weighted mean with weight 0.2 per
sample), price = min_price + (max_price - min_price) * u. A new price is
announced only when it moves by 5% or more, so routes do not churn on noise.
"""

from __future__ import annotations

SMOOTHING = 0.2
ANNOUNCE_STEP = 0.05


def utilisation(bits_per_second: float, capacity_bps: int) -> float:
    return min(1.0, max(0.0, bits_per_second / capacity_bps)) if capacity_bps > 0 else 0.0


def smooth(previous: float, sample: float) -> float:
    return previous + SMOOTHING * (sample - previous)


def automatic_price(util: float, min_price: int, max_price: int) -> int:
    return min_price + int((max_price - min_price) * util)


def worth_announcing(current: int, proposed: int) -> bool:
    if current == 0:
        return proposed != 0
    return abs(proposed - current) >= ANNOUNCE_STEP * current
