"""meter's handlers: the ledger as a fold of links, samples, routes, prices and
payments. Pure: a replay bills the same bytes the same way."""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from google.protobuf.message import Message
from mesh.link.v1 import link_pb2
from mesh.meter.v1 import meter_pb2
from mesh.pay.v1 import pay_pb2
from mesh.route.v1 import route_pb2

from services.common.envelope import Event, MalformedEvent
from services.common.money import MoneyError, amount, money
from services.common.runtime import Handler, Outgoing

from .ledger import (
    MAX_SANE_PRICE,
    Thresholds,
    balance,
    delta,
    drop_idle_retracted,
    enforcement_for,
    our_price,
    their_price,
    with_totals,
)


@dataclass(frozen=True)
class Policy:
    """The configured numbers the decisions depend on."""

    thresholds: Thresholds
    default_neighbor_price: int


def on_link_up(state: meter_pb2.MeterState, event: Event[link_pb2.LinkUp]) -> list[Outgoing]:
    ledger = state.ledgers[event.payload.neighbor_id]
    if ledger.tunnel_interface != event.payload.tunnel_interface:
        # A new tunnel's counters start from zero: forget the old readings.
        ledger.tunnel_interface = event.payload.tunnel_interface
        ledger.ClearField("counters")
    if ledger.enforcement == meter_pb2.ENFORCEMENT_UNSPECIFIED:
        ledger.enforcement = meter_pb2.ENFORCEMENT_OPEN
    return []


def on_route_changed(
    state: meter_pb2.MeterState, event: Event[route_pb2.RouteChanged]
) -> list[Outgoing]:
    route = event.payload
    try:
        canonical = str(ipaddress.ip_network(route.prefix))
    except ValueError as err:
        raise MalformedEvent(f"route to {route.prefix!r}: {err}") from None
    if canonical != route.prefix:
        # The counters name their destinations canonically: another spelling
        # would never be priced by this route.
        raise MalformedEvent(f"route to {route.prefix!r}: not canonical (that is {canonical})")
    if route.change == route_pb2.ROUTE_CHANGE_RETRACTED:
        if route.prefix in state.routes:
            held = state.routes[route.prefix]
            held.retracted = True
            held.samples_retracted = 0
        return []
    try:
        price = amount(route.path_price)  # what the next hop charges us
    except MoneyError as err:
        raise MalformedEvent(f"route to {route.prefix}: {err}") from None
    if price > MAX_SANE_PRICE:
        raise MalformedEvent(f"route to {route.prefix}: price {price} wei/byte is absurd")
    alternatives = {a.next_hop_id: a.price for a in route.alternatives}
    for neighbor, offered in alternatives.items():
        try:
            their = amount(offered)
        except MoneyError as err:
            raise MalformedEvent(f"route to {route.prefix} via {neighbor}: {err}") from None
        if their > MAX_SANE_PRICE:
            raise MalformedEvent(f"route to {route.prefix} via {neighbor}: price {their} "
                                 "wei/byte is absurd")
    state.routes[route.prefix].CopyFrom(meter_pb2.MeterState.RoutePrice(
        next_hop_id=route.next_hop_id, tx_price=money(price), rx_price=money(price),
        alternative_prices=alternatives))
    return []


def on_price_set(state: meter_pb2.MeterState, event: Event[meter_pb2.PriceSet]) -> list[Outgoing]:
    state.price.CopyFrom(event.payload)
    return []


def make_handlers(policy: Policy) -> Mapping[type[Message], Handler[Any]]:
    """The handler table, closed over the configured thresholds and prices."""

    def decide(state: meter_pb2.MeterState, neighbor: str, cause: meter_pb2.DebtCause,
               charged: int, owed: int, received: int, sent: int) -> list[Outgoing]:
        ledger = state.ledgers[neighbor]
        debt = with_totals(neighbor, charged, owed, received, sent, cause,
                           policy.thresholds.pay)
        out = []
        if debt != ledger.debt:
            ledger.debt.CopyFrom(debt)
            out.append(Outgoing("debt", neighbor, debt))
        net = balance(debt)
        enforcement, rate, threshold = enforcement_for(net, policy.thresholds)
        if enforcement != ledger.enforcement or rate != ledger.rate_limit_bps:
            reason = {
                meter_pb2.ENFORCEMENT_OPEN: meter_pb2.ENFORCEMENT_REASON_PAID,
                meter_pb2.ENFORCEMENT_THROTTLED:
                    meter_pb2.ENFORCEMENT_REASON_THROTTLE_THRESHOLD_CROSSED,
                meter_pb2.ENFORCEMENT_BLOCKED:
                    meter_pb2.ENFORCEMENT_REASON_CUTOFF_THRESHOLD_CROSSED,
            }[enforcement]
            out.append(Outgoing("enforcement", neighbor, meter_pb2.EnforcementChanged(
                neighbor_id=neighbor, enforcement=enforcement, previous=ledger.enforcement,
                rate_limit_bps=rate, debt=money(max(net, 0)), threshold=money(threshold),
                reason=reason,
            )))
            ledger.enforcement = enforcement
            ledger.rate_limit_bps = rate
        return out

    def totals(ledger: meter_pb2.MeterState.Ledger) -> tuple[int, int, int, int]:
        d = ledger.debt
        return (amount(d.usage_charged), amount(d.usage_owed), amount(d.payments_received),
                amount(d.payments_sent))

    def on_sampled(
        state: meter_pb2.MeterState, event: Event[meter_pb2.CountersSampled]
    ) -> list[Outgoing]:
        by_tunnel = {ledger.tunnel_interface: name for name, ledger in state.ledgers.items()}
        out: list[Outgoing] = []
        moved: set[str] = set()
        for sample in event.payload.neighbors:
            neighbor = by_tunnel.get(sample.tunnel_interface)
            if neighbor is None:
                continue  # a tunnel no LinkUp told us about: nobody to bill
            ledger = state.ledgers[neighbor]
            usage = meter_pb2.UsageMetered(neighbor_id=neighbor)
            charged = owed = 0
            for dest in sample.destinations:
                last = ledger.counters[dest.prefix]
                rx, rx_reset = delta(dest.rx_bytes, last.rx_bytes)
                tx, tx_reset = delta(dest.tx_bytes, last.tx_bytes)
                last.rx_bytes, last.tx_bytes = dest.rx_bytes, dest.tx_bytes
                usage.counters_reset |= rx_reset or tx_reset
                if not rx and not tx:
                    continue
                moved.add(dest.prefix)
                rx_price = our_price(state, dest.prefix)
                tx_price = their_price(state, neighbor, dest.prefix,
                                       policy.default_neighbor_price)
                charged += rx * rx_price
                owed += tx * tx_price
                usage.destinations.add(
                    prefix=dest.prefix, rx_bytes=rx, tx_bytes=tx,
                    rx_price=money(rx_price), tx_price=money(tx_price),
                    rx_bytes_counter=dest.rx_bytes, tx_bytes_counter=dest.tx_bytes,
                )
                usage.rx_bytes += rx
                usage.tx_bytes += tx
            if not usage.destinations:
                continue
            usage.charged.CopyFrom(money(charged))
            usage.owed.CopyFrom(money(owed))
            ledger.rx_bytes += usage.rx_bytes
            ledger.tx_bytes += usage.tx_bytes
            out.append(Outgoing("usage", neighbor, usage))
            c, o, r, s = totals(ledger)
            out += decide(state, neighbor, meter_pb2.DEBT_CAUSE_USAGE, c + charged, o + owed,
                          r, s)
        drop_idle_retracted(state, moved)
        return out

    def credit(state: meter_pb2.MeterState, payment: pay_pb2.PaymentReceived
               | pay_pb2.PaymentSent | pay_pb2.PaymentReverted,
               cause: meter_pb2.DebtCause.ValueType) -> list[Outgoing]:
        """A payment for forwarding, either way (or one of ours reverted), moves
        the neighbor's balance; exit payments belong to the exit's ledger."""
        if payment.purpose != pay_pb2.PAYMENT_PURPOSE_FORWARDING:
            return []
        neighbor = payment.counterparty_id
        what = f"{type(payment).__name__} with {neighbor}"
        if neighbor not in state.ledgers:
            raise MalformedEvent(f"{what}: not a neighbor")
        try:
            paid = amount(payment.amount)
        except MoneyError as err:
            raise MalformedEvent(f"{what}: {err}") from None
        c, o, r, s = totals(state.ledgers[neighbor])
        if cause == meter_pb2.DEBT_CAUSE_PAYMENT_RECEIVED:
            r += paid
        elif cause == meter_pb2.DEBT_CAUSE_PAYMENT_SENT:
            s += paid
        else:
            s = max(s - paid, 0)
        return decide(state, neighbor, cause, c, o, r, s)

    def on_payment_received(
        state: meter_pb2.MeterState, event: Event[pay_pb2.PaymentReceived]
    ) -> list[Outgoing]:
        return credit(state, event.payload, meter_pb2.DEBT_CAUSE_PAYMENT_RECEIVED)

    def on_payment_sent(
        state: meter_pb2.MeterState, event: Event[pay_pb2.PaymentSent]
    ) -> list[Outgoing]:
        return credit(state, event.payload, meter_pb2.DEBT_CAUSE_PAYMENT_SENT)

    def on_payment_reverted(
        state: meter_pb2.MeterState, event: Event[pay_pb2.PaymentReverted]
    ) -> list[Outgoing]:
        return credit(state, event.payload, meter_pb2.DEBT_CAUSE_PAYMENT_REVERTED)

    return {
        link_pb2.LinkUp: on_link_up,
        route_pb2.RouteChanged: on_route_changed,
        meter_pb2.PriceSet: on_price_set,
        meter_pb2.CountersSampled: on_sampled,
        pay_pb2.PaymentReceived: on_payment_received,
        pay_pb2.PaymentSent: on_payment_sent,
        pay_pb2.PaymentReverted: on_payment_reverted,
    }


def summarize(state: meter_pb2.MeterState) -> Mapping[str, Any]:
    owed_to_us = sum(max(balance(ledger.debt), 0) for ledger in state.ledgers.values())
    return {
        "price": amount(state.price.price),
        "neighbors": len(state.ledgers),
        "owed_to_us": owed_to_us,
        "throttled": sum(1 for x in state.ledgers.values()
                         if x.enforcement == meter_pb2.ENFORCEMENT_THROTTLED),
        "blocked": sum(1 for x in state.ledgers.values()
                       if x.enforcement == meter_pb2.ENFORCEMENT_BLOCKED),
    }


