"""The automatic pricing algorithm and the meter's refusals of absurd input."""

from __future__ import annotations

import pytest
from google.protobuf import timestamp_pb2
from mesh.common.v1 import envelope_pb2
from mesh.meter.v1 import meter_pb2
from mesh.route.v1 import route_pb2

from services.common.config import ConfigError
from services.common.envelope import Event, MalformedEvent
from services.common.money import MoneyError, money
from services.meter import pricing
from services.meter.handlers import make_handlers
from services.meter.service import MeterSettings, policy_of


def test_price_rises_with_utilisation_within_bounds() -> None:
    assert pricing.automatic_price(0.0, 100, 1_100) == 100
    assert pricing.automatic_price(0.5, 100, 1_100) == 600
    assert pricing.automatic_price(1.0, 100, 1_100) == 1_100
    assert pricing.utilisation(250e6, 100_000_000) == 1.0  # clamped
    assert pricing.utilisation(-1, 100_000_000) == 0.0


def test_smoothing_and_announcing_ignore_noise() -> None:
    u = 0.0
    for _ in range(3):
        u = pricing.smooth(u, 1.0)
    assert 0.4 < u < 0.5  # three busy samples move it about half way
    assert not pricing.worth_announcing(1_000, 1_040)
    assert pricing.worth_announcing(1_000, 1_050)
    assert pricing.worth_announcing(0, 1)


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"price": 10**16}, "price 10000000000000000 is outside"),
        ({"pricing": "cheap"}, "is not manual or automatic"),
        ({"min_price": 5, "max_price": 4}, "min_price is above max_price"),
        ({"throttle_threshold": 10, "cutoff_threshold": 5}, "throttle_threshold <= cutoff"),
        ({"throttle_rate_bps": 0}, "throttle_rate_bps must be positive"),
    ],
)
def test_bad_meter_settings_are_refused(settings: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        MeterSettings(**settings)  # type: ignore[arg-type]


def meter_handles(route: route_pb2.RouteChanged) -> None:
    handlers = make_handlers(policy_of(MeterSettings()))
    env = envelope_pb2.Envelope(event_id="e", occurred_at=timestamp_pb2.Timestamp(seconds=1))
    handlers[route_pb2.RouteChanged](meter_pb2.MeterState(),
                                     Event(envelope=env, payload=route, subject="s", sequence=1))


def test_absurd_or_negative_money_is_refused() -> None:
    with pytest.raises(MoneyError, match="negative"):
        money(-1)
    with pytest.raises(MalformedEvent, match="absurd"):
        meter_handles(route_pb2.RouteChanged(prefix="2001:db8::/64", next_hop_id="b",
                                             path_price=money(10**18)))


@pytest.mark.parametrize(
    ("prefix", "message"),
    [
        ("2001:db8::1/64", "has host bits set"),
        ("not-a-prefix", "does not appear to be"),
        ("2001:DB8::/64", r"not canonical \(that is 2001:db8::/64\)"),
    ],
)
def test_routes_to_bad_prefixes_are_refused(prefix: str, message: str) -> None:
    """Meter's counters are keyed by canonical prefixes: a route it could not
    count by is refused, saying why, instead of stopping the sampler."""
    with pytest.raises(MalformedEvent, match=message):
        meter_handles(route_pb2.RouteChanged(prefix=prefix, next_hop_id="b",
                                             path_price=money(10)))
