"""exit's projection, for every role the node plays: the clients an exit
admitted (and, on an exit, every route: what carrying response traffic to
a client costs), the exits a client may use (with the route to each) and
the one it uses. Pure functions of (state, event).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from google.protobuf.message import Message
from mesh.exit.v1 import exit_pb2
from mesh.pay.v1 import pay_pb2
from mesh.route.v1 import route_pb2

from services.common.envelope import Event, MalformedEvent
from services.common.money import MoneyError, amount, money
from services.common.runtime import Handler, Outgoing
from services.pay.handlers import client_counterparty, exit_counterparty

EXIT, CLIENT = exit_pb2.EXIT_ROLE_EXIT, exit_pb2.EXIT_ROLE_CLIENT


def on_registered(
    state: exit_pb2.ExitState, event: Event[exit_pb2.ExitRegistered]
) -> list[Outgoing]:
    registered = event.payload
    if not registered.client_addresses:
        raise MalformedEvent(f"registration of {registered.client_id!r} without addresses")
    if registered.role == EXIT:
        state.clients[registered.client_id].registration.CopyFrom(registered)
    elif registered.role == CLIENT:
        state.exits[registered.exit_id].registration.CopyFrom(registered)
    else:
        raise MalformedEvent(f"registration in role {registered.role}")
    return []


def on_selected(state: exit_pb2.ExitState, event: Event[exit_pb2.ExitSelected]) -> list[Outgoing]:
    state.selected_exit_id = event.payload.exit_id
    return []


def on_tunnel_up(state: exit_pb2.ExitState, event: Event[exit_pb2.ExitTunnelUp]) -> list[Outgoing]:
    up = event.payload
    if up.role == EXIT:
        state.clients[up.peer_id].tunnel_up = True
    elif up.role == CLIENT:
        state.exits[up.peer_id].tunnel_up = True
    return []


def on_tunnel_down(
    state: exit_pb2.ExitState, event: Event[exit_pb2.ExitTunnelDown]
) -> list[Outgoing]:
    down = event.payload
    if down.role == EXIT and down.peer_id in state.clients:
        state.clients[down.peer_id].tunnel_up = False
    elif down.role == CLIENT and down.peer_id in state.exits:
        state.exits[down.peer_id].tunnel_up = False
        if state.selected_exit_id == down.peer_id:
            state.selected_exit_id = ""
    return []


def settle(balance: exit_pb2.ClientDebtChanged, usage: int, payments: int) -> None:
    balance.usage_charged.CopyFrom(money(usage))
    balance.payments.CopyFrom(money(payments))
    balance.debt.CopyFrom(money(max(0, usage - payments)))
    balance.credit.CopyFrom(money(max(0, payments - usage)))


def _record(state: exit_pb2.ExitState, counterparty: str
            ) -> exit_pb2.ExitState.Client | exit_pb2.ExitState.Exit | None:
    """The client or exit behind pay's id for it (None for a neighbor's)."""
    for peer, client in state.clients.items():
        if client_counterparty(peer) == counterparty:
            return client
    for peer, known in state.exits.items():
        if exit_counterparty(peer) == counterparty:
            return known
    return None


def on_payment(state: exit_pb2.ExitState, event: Event[Any]) -> list[Outgoing]:
    """What a client paid its exit (PaymentSent on the client, PaymentReceived
    on the exit; PaymentReverted takes one back) lowers its debt."""
    payment = event.payload
    if payment.purpose != pay_pb2.PAYMENT_PURPOSE_EXIT:
        return []
    record = _record(state, payment.counterparty_id)
    if record is None:
        raise MalformedEvent(f"exit payment with {payment.counterparty_id!r}: no such "
                             "client or exit")
    try:
        paid = amount(payment.amount)
        usage, payments = amount(record.balance.usage_charged), amount(record.balance.payments)
    except MoneyError as err:
        raise MalformedEvent(f"exit payment with {payment.counterparty_id}: {err}") from None
    payments = payments - paid if isinstance(payment, pay_pb2.PaymentReverted) else payments + paid
    settle(record.balance, usage, max(payments, 0))
    return []


def on_enforcement(state: exit_pb2.ExitState, event: Event[exit_pb2.ClientEnforcementChanged]
                   ) -> list[Outgoing]:
    changed = event.payload
    if changed.client_id not in state.clients:
        raise MalformedEvent(f"enforcement of unknown client {changed.client_id!r}")
    state.clients[changed.client_id].access = changed.access
    return []


def on_usage(state: exit_pb2.ExitState, event: Event[exit_pb2.ClientUsageMetered]
             ) -> list[Outgoing]:
    """Totals, the counters' new base, and the balance: what the client owes
    the exit for its usage so far, less what it paid."""
    used = event.payload
    record: exit_pb2.ExitState.Client | exit_pb2.ExitState.Exit
    if used.role == EXIT:
        record = state.clients[used.client_id]
    elif used.role == CLIENT:
        record = state.exits[used.exit_id]
    else:
        raise MalformedEvent(f"usage in role {used.role}")
    try:
        charged = amount(used.charged)
        total = amount(record.balance.usage_charged) + charged
        payments = amount(record.balance.payments)
    except MoneyError as err:
        raise MalformedEvent(f"usage of {used.client_id} at {used.exit_id}: {err}") from None
    record.bytes_up += used.bytes_up
    record.bytes_down += used.bytes_down
    record.up_counter, record.down_counter = used.bytes_up_counter, used.bytes_down_counter
    balance = record.balance
    balance.role, balance.exit_id, balance.client_id = used.role, used.exit_id, used.client_id
    settle(balance, total, payments)
    return []


def make_handlers(exit_prefixes: Mapping[str, str], serving: bool = False
                  ) -> Mapping[type[Message], Handler[Any]]:
    """exit_prefixes: the configured exits' addresses (as route names them,
    a /128) to their ids. An exit (serving) keeps every route, to price its
    clients' response traffic; anyone else only the routes to its exits."""

    def on_route_changed(
        state: exit_pb2.ExitState, event: Event[route_pb2.RouteChanged]
    ) -> list[Outgoing]:
        route = event.payload
        retracted = route.change == route_pb2.ROUTE_CHANGE_RETRACTED
        kept = exit_pb2.ExitState.RouteToExit(
            prefix=route.prefix, metric=route.metric, path_price=route.path_price,
            next_hop_id=route.next_hop_id)
        if serving:
            if retracted:
                state.mesh_routes.pop(route.prefix, None)
            else:
                state.mesh_routes[route.prefix].CopyFrom(kept)
        exit_id = exit_prefixes.get(route.prefix)
        if exit_id is None:
            return []
        if retracted:
            state.exits[exit_id].ClearField("route")
        else:
            state.exits[exit_id].route.CopyFrom(kept)
        return []

    return {
        exit_pb2.ExitRegistered: on_registered,
        exit_pb2.ExitSelected: on_selected,
        exit_pb2.ExitTunnelUp: on_tunnel_up,
        exit_pb2.ExitTunnelDown: on_tunnel_down,
        exit_pb2.ClientUsageMetered: on_usage,
        exit_pb2.ClientEnforcementChanged: on_enforcement,
        pay_pb2.PaymentReceived: on_payment,
        pay_pb2.PaymentSent: on_payment,
        pay_pb2.PaymentReverted: on_payment,
        route_pb2.RouteChanged: on_route_changed,
    }


def summarize(state: exit_pb2.ExitState) -> Mapping[str, Any]:
    return {
        "clients": ",".join(sorted(state.clients)) or "-",
        "clients_up": sum(1 for c in state.clients.values() if c.tunnel_up),
        "clients_cut_off": ",".join(sorted(
            c for c, x in state.clients.items()
            if x.access == exit_pb2.CLIENT_ACCESS_BLOCKED)) or "-",
        "clients_throttled": ",".join(sorted(
            c for c, x in state.clients.items()
            if x.access == exit_pb2.CLIENT_ACCESS_THROTTLED)) or "-",
        "exit": state.selected_exit_id or "-",
        "exits_routed": ",".join(sorted(e for e, x in state.exits.items()
                                        if x.HasField("route"))) or "-",
    }
