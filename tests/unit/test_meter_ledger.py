"""meter's ledger: pricing, netting, thresholds, resets and replay, pure."""

from __future__ import annotations

from mesh.link.v1 import link_pb2
from mesh.meter.v1 import meter_pb2
from mesh.pay.v1 import pay_pb2
from mesh.route.v1 import route_pb2

from services.common.money import amount, money
from services.meter.handlers import Policy, make_handlers
from services.meter.ledger import RETRACTED_HOLD_SAMPLES, Thresholds, balance
from tests.unit.events import event

POLICY = Policy(Thresholds(pay=1_000, throttle=50_000, cutoff=100_000,
                           throttle_rate_bps=1_000_000), default_neighbor_price=7)
HANDLERS = make_handlers(POLICY)


def fold(state: meter_pb2.MeterState, payload: object) -> list:
    return list(HANDLERS[type(payload)](state, event(payload)))


def sample(tunnel: str, **by_prefix: tuple[int, int]) -> meter_pb2.CountersSampled:
    counters = meter_pb2.CountersSampled()
    n = counters.neighbors.add(tunnel_interface=tunnel)
    for prefix, (rx, tx) in by_prefix.items():
        n.destinations.add(prefix=prefix.replace("_", ":"), rx_bytes=rx, tx_bytes=tx)
    return counters


def fresh() -> meter_pb2.MeterState:
    state = meter_pb2.MeterState()
    fold(state, meter_pb2.PriceSet(price=money(10)))
    fold(state, link_pb2.LinkUp(neighbor_id="b", tunnel_interface="mwb"))
    return state


def test_bytes_are_priced_and_netted_per_neighbor() -> None:
    state = fresh()
    fold(state, sample("mwb", other=(100, 100)))  # a new tunnel's counters start at zero
    decided = fold(state, sample("mwb", other=(1_100, 600)))
    usage = next(d.payload for d in decided if d.kind == "usage")
    assert (usage.rx_bytes, usage.tx_bytes) == (1_000, 500)
    assert amount(usage.charged) == 1_000 * 10 and amount(usage.owed) == 500 * 7
    ledger = state.ledgers["b"]
    assert balance(ledger.debt) == 1_100 * 10 - 600 * 7
    assert (ledger.rx_bytes, ledger.tx_bytes) == (1_100, 600)
    assert ledger.debt.direction == meter_pb2.DEBT_DIRECTION_NEIGHBOR_OWES_US


def test_our_price_to_a_destination_includes_our_route() -> None:
    state = fresh()
    fold(state, route_pb2.RouteChanged(prefix="2001:db8::/64", next_hop_id="c",
                                       path_price=money(5)))
    fold(state, sample("mwb", **{"2001_db8__/64": (0, 0)}))
    fold(state, sample("mwb", **{"2001_db8__/64": (100, 0)}))
    assert amount(state.ledgers["b"].debt.usage_charged) == 100 * (10 + 5)


def test_bytes_through_a_neighbor_off_our_route_cost_its_advertised_price() -> None:
    """verify probes through every neighbor advertising a prefix: we owe such
    a neighbor what it advertised, as it charges us, not the default."""
    state = fresh()
    fold(state, route_pb2.RouteChanged(
        prefix="2001:db8::/64", next_hop_id="c", path_price=money(5),
        alternatives=[route_pb2.RouteChanged.Alternative(next_hop_id="b", price=money(9))]))
    fold(state, sample("mwb", **{"2001_db8__/64": (0, 0)}))
    fold(state, sample("mwb", **{"2001_db8__/64": (0, 100)}))
    assert amount(state.ledgers["b"].debt.usage_owed) == 100 * 9


def retracted(prefix: str) -> route_pb2.RouteChanged:
    return route_pb2.RouteChanged(prefix=prefix, change=route_pb2.ROUTE_CHANGE_RETRACTED)


def test_bytes_still_going_to_a_retracted_route_cost_what_they_did() -> None:
    """A route that flaps under load: what TCP resends to it meanwhile is billed
    at the price the neighbor at the other end still charges for it, not the
    default; the first sample with none forgets it."""
    state = fresh()
    fold(state, route_pb2.RouteChanged(prefix="2001:db8::/64", next_hop_id="b",
                                       path_price=money(5)))
    fold(state, sample("mwb", **{"2001_db8__/64": (0, 0)}))
    fold(state, retracted("2001:db8::/64"))
    fold(state, sample("mwb", **{"2001_db8__/64": (100, 100)}))
    debt = state.ledgers["b"].debt
    assert (amount(debt.usage_charged), amount(debt.usage_owed)) == (100 * (10 + 5), 100 * 5)
    assert state.routes["2001:db8::/64"].retracted
    fold(state, sample("mwb", **{"2001_db8__/64": (100, 100)}))
    assert "2001:db8::/64" not in state.routes


def test_a_retracted_route_is_held_for_a_while_at_most() -> None:
    state = fresh()
    fold(state, route_pb2.RouteChanged(prefix="2001:db8::/64", next_hop_id="b",
                                       path_price=money(5)))
    fold(state, retracted("2001:db8::/64"))
    for n in range(1, RETRACTED_HOLD_SAMPLES):
        fold(state, sample("mwb", **{"2001_db8__/64": (n, n)}))
        assert "2001:db8::/64" in state.routes
    fold(state, sample("mwb", **{"2001_db8__/64": (RETRACTED_HOLD_SAMPLES,) * 2}))
    assert "2001:db8::/64" not in state.routes


def test_a_route_back_before_it_went_idle_is_no_longer_retracted() -> None:
    state = fresh()
    selected = route_pb2.RouteChanged(prefix="2001:db8::/64", next_hop_id="b",
                                      path_price=money(5))
    fold(state, selected)
    fold(state, retracted("2001:db8::/64"))
    fold(state, sample("mwb", **{"2001_db8__/64": (1, 1)}))
    fold(state, selected)
    for n in range(2, 2 * RETRACTED_HOLD_SAMPLES):
        fold(state, sample("mwb", **{"2001_db8__/64": (n, n)}))
    assert not state.routes["2001:db8::/64"].retracted
    fold(state, sample("mwb", **{"2001_db8__/64": (n, n)}))
    assert "2001:db8::/64" in state.routes


def test_retracting_an_unknown_route_changes_nothing() -> None:
    state = fresh()
    fold(state, retracted("2001:db8::/64"))
    assert not state.routes


def test_thresholds_throttle_then_block_and_payment_restores() -> None:
    state = fresh()
    fold(state, sample("mwb", other=(0, 0)))
    decided = fold(state, sample("mwb", other=(6_000, 0)))  # owes 60,000 > throttle
    change = next(d.payload for d in decided if d.kind == "enforcement")
    assert change.enforcement == meter_pb2.ENFORCEMENT_THROTTLED
    assert change.rate_limit_bps == 1_000_000
    decided = fold(state, sample("mwb", other=(11_000, 0)))  # 110,000 > cut-off
    assert state.ledgers["b"].enforcement == meter_pb2.ENFORCEMENT_BLOCKED
    decided = fold(state, pay_pb2.PaymentReceived(
        counterparty_id="b", amount=money(100_000), purpose=pay_pb2.PAYMENT_PURPOSE_FORWARDING))
    change = next(d.payload for d in decided if d.kind == "enforcement")
    assert change.enforcement == meter_pb2.ENFORCEMENT_OPEN
    assert change.reason == meter_pb2.ENFORCEMENT_REASON_PAID
    assert balance(state.ledgers["b"].debt) == 10_000


def test_a_reset_counter_bills_from_zero_not_negative() -> None:
    state = fresh()
    fold(state, sample("mwb", other=(5_000, 0)))
    decided = fold(state, sample("mwb", other=(300, 0)))
    usage = next(d.payload for d in decided if d.kind == "usage")
    assert usage.counters_reset and usage.rx_bytes == 300


def test_unknown_tunnels_bill_nobody() -> None:
    state = fresh()
    assert fold(state, sample("mwstranger", other=(10**9, 0))) == []
    assert set(state.ledgers) == {"b"}


def test_replay_gives_the_same_ledger() -> None:
    events = [meter_pb2.PriceSet(price=money(10)),
              link_pb2.LinkUp(neighbor_id="b", tunnel_interface="mwb"),
              *(sample("mwb", other=(i * 1_000, i * 300)) for i in range(20))]
    states = []
    for _ in range(2):
        state = meter_pb2.MeterState()
        for payload in events:
            fold(state, payload)
        states.append(state.SerializeToString(deterministic=True))
    assert states[0] == states[1]


def test_a_reverted_payment_no_longer_counts_as_sent() -> None:
    state = fresh()
    fold(state, pay_pb2.PaymentSent(counterparty_id="b", amount=money(5_000),
                                    purpose=pay_pb2.PAYMENT_PURPOSE_FORWARDING))
    decided = fold(state, pay_pb2.PaymentReverted(counterparty_id="b", amount=money(2_000),
                                                  purpose=pay_pb2.PAYMENT_PURPOSE_FORWARDING))
    debt = next(d.payload for d in decided if d.kind == "debt")
    assert amount(debt.payments_sent) == 3_000
    assert debt.cause == meter_pb2.DEBT_CAUSE_PAYMENT_REVERTED
