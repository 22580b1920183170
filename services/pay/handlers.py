"""pay's decisions, pure: the projection of channels and neighbors, and when to
release a new balance proof.

A payment is decided here, from meter's DebtChanged (or a channel opening or
growing), and the decision updates the channel at once: the next decision
already sees it, so two debts in a row never sign two proofs of the same
nonce. The proof is signed deterministically (RFC 6979), so a replay after a
crash decides the very same PaymentSent, which the log drops as a duplicate:
a proof is in the log before the transport ever sends it, and a restart
resends that proof, never a second one.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import coincurve
from google.protobuf.message import Message
from mesh.exit.v1 import exit_pb2
from mesh.link.v1 import link_pb2
from mesh.meter.v1 import meter_pb2
from mesh.pay.v1 import pay_pb2

from services.common.envelope import Event, MalformedEvent
from services.common.money import MoneyError, amount, money
from services.common.runtime import Handler, Outgoing

from .proofs import Domain

OUTGOING, INCOMING = pay_pb2.CHANNEL_DIRECTION_OUTGOING, pay_pb2.CHANNEL_DIRECTION_INCOMING
OPEN, CLOSING, CLOSED = (pay_pb2.CHANNEL_STATUS_OPEN, pay_pb2.CHANNEL_STATUS_CLOSING,
                         pay_pb2.CHANNEL_STATUS_CLOSED)


@dataclass(frozen=True)
class Payer:
    """Who signs our proofs, where they are valid, and when a debt is paid."""

    key: coincurve.PrivateKey
    domain: Domain
    pay_threshold: int


def _amount(value: Any, what: str) -> int:
    try:
        return amount(value)
    except MoneyError as err:
        raise MalformedEvent(f"{what}: {err}") from None


def neighbor_by_address(state: pay_pb2.PayState, address: bytes) -> str:
    """The node id of the neighbor with this chain address, or ''."""
    for node_id, neighbor in state.neighbors.items():
        if neighbor.chain_address == address:
            return node_id
    return ""


def exit_counterparty(exit_id: str) -> str:
    """pay's id for an exit we use (it may be a neighbor as well, under its name)."""
    return f"exit:{exit_id}"


def client_counterparty(client_id: str) -> str:
    """pay's id for a client of our exit."""
    return f"client:{client_id}"


def purpose_of(state: pay_pb2.PayState, node_id: str) -> pay_pb2.PaymentPurpose.ValueType:
    neighbor = state.neighbors.get(node_id)
    if neighbor is not None and neighbor.purpose == pay_pb2.PAYMENT_PURPOSE_EXIT:
        return pay_pb2.PAYMENT_PURPOSE_EXIT
    return pay_pb2.PAYMENT_PURPOSE_FORWARDING


def adopt_channels(state: pay_pb2.PayState, node_id: str, chain_address: bytes) -> None:
    """Channels the chain showed before we knew whose they are."""
    for channel_hex, channel in state.channels.items():
        opened = channel.opened
        if opened.counterparty_id or channel.status == CLOSED:
            continue
        theirs = opened.payee_address if opened.direction == OUTGOING else opened.payer_address
        if theirs == chain_address:
            opened.counterparty_id = node_id
            attach(state, channel_hex, channel)


def open_channel(state: pay_pb2.PayState, channel_hex: str) -> pay_pb2.PayState.Channel | None:
    channel = state.channels.get(channel_hex)
    return channel if channel is not None and channel.status == OPEN else None


def make_handlers(payer: Payer) -> Mapping[type[Message], Handler[pay_pb2.PayState]]:
    def pay_due(state: pay_pb2.PayState, node_id: str) -> list[Outgoing]:
        neighbor = state.neighbors.get(node_id)
        if neighbor is None:
            return []
        due = amount(neighbor.pay_target) - amount(neighbor.paid)
        channel = open_channel(state, neighbor.outgoing_channel)
        if due < payer.pay_threshold or channel is None or due <= 0:
            return []
        cumulative = amount(channel.cumulative)
        paying = min(due, amount(channel.deposit) - cumulative)
        if paying <= 0:
            return []  # the deposit is spent: the top-up will let us pay on
        channel_id = channel.opened.channel_id
        nonce, cumulative = channel.nonce + 1, cumulative + paying
        signature = payer.domain.sign(payer.key, channel_id, nonce, cumulative)
        channel.nonce, channel.signature = nonce, signature
        channel.cumulative.CopyFrom(money(cumulative))
        neighbor.paid.CopyFrom(money(amount(neighbor.paid) + paying))
        return [Outgoing("sent", node_id, pay_pb2.PaymentSent(
            counterparty_id=node_id, channel_id=channel_id, nonce=nonce,
            cumulative=money(cumulative), amount=money(paying), signature=signature,
            purpose=purpose_of(state, node_id)))]

    def on_link_up(state: pay_pb2.PayState, event: Event[link_pb2.LinkUp]) -> list[Outgoing]:
        up = event.payload
        neighbor = state.neighbors[up.neighbor_id]
        neighbor.chain_address = up.chain_address
        neighbor.tunnel_interface = up.tunnel_interface
        neighbor.tunnel_peer_address = up.tunnel_peer_address
        neighbor.up = True
        neighbor.ClearField("down_since")
        adopt_channels(state, up.neighbor_id, up.chain_address)
        return pay_due(state, up.neighbor_id)

    def on_exit_registered(
        state: pay_pb2.PayState, event: Event[exit_pb2.ExitRegistered]
    ) -> list[Outgoing]:
        """A client pays the exit it registered with; an exit takes its
        clients' payments. Both inside the exit tunnel, over its addresses."""
        registered = event.payload
        if registered.role == exit_pb2.EXIT_ROLE_CLIENT:
            node_id, chain_address = (exit_counterparty(registered.exit_id),
                                      registered.exit_chain_address)
            address = registered.exit_tunnel_address
        elif registered.role == exit_pb2.EXIT_ROLE_EXIT:
            node_id, chain_address = (client_counterparty(registered.client_id),
                                      registered.client_chain_address)
            address = registered.client_addresses[0] if registered.client_addresses else ""
        else:
            return []
        if len(chain_address) != 20 or not address:
            raise MalformedEvent(f"registration for {node_id}: no chain address or tunnel address")
        neighbor = state.neighbors[node_id]
        neighbor.chain_address = chain_address
        neighbor.tunnel_interface = ""
        neighbor.tunnel_peer_address = address.split("/")[0]
        neighbor.purpose = pay_pb2.PAYMENT_PURPOSE_EXIT
        neighbor.receive_only = registered.role == exit_pb2.EXIT_ROLE_EXIT
        neighbor.up = True
        adopt_channels(state, node_id, chain_address)
        return pay_due(state, node_id)

    def on_client_debt(
        state: pay_pb2.PayState, event: Event[exit_pb2.ClientDebtChanged]
    ) -> list[Outgoing]:
        """A client pays its exit what its own meter says it used."""
        debt = event.payload
        if debt.role != exit_pb2.EXIT_ROLE_CLIENT:
            return []
        node_id = exit_counterparty(debt.exit_id)
        if node_id not in state.neighbors:
            raise MalformedEvent(f"debt with exit {debt.exit_id} before its registration")
        state.neighbors[node_id].pay_target.CopyFrom(
            money(_amount(debt.usage_charged, f"debt with {node_id}")))
        return pay_due(state, node_id)

    def on_link_down(state: pay_pb2.PayState, event: Event[link_pb2.LinkDown]) -> list[Outgoing]:
        neighbor = state.neighbors.get(event.payload.neighbor_id)
        if neighbor is not None and neighbor.up:
            neighbor.up = False
            neighbor.down_since.CopyFrom(event.envelope.occurred_at)
        return []

    def on_debt(state: pay_pb2.PayState, event: Event[meter_pb2.DebtChanged]) -> list[Outgoing]:
        # Each direction is paid by its sender, as its own meter counted it.
        # Netting the two (paying owed - charged + received) never settles
        # when the two meters disagree: the payers' excess moves back and
        # forth between the neighbors, larger every round.
        debt = event.payload
        target = _amount(debt.usage_owed, f"debt with {debt.neighbor_id}")
        state.neighbors[debt.neighbor_id].pay_target.CopyFrom(money(target))
        return pay_due(state, debt.neighbor_id)

    def on_opened(state: pay_pb2.PayState, event: Event[pay_pb2.ChannelOpened]) -> list[Outgoing]:
        opened = event.payload
        channel_hex = opened.channel_id.hex()
        if channel_hex in state.channels:
            return []
        channel = state.channels[channel_hex]
        channel.opened.CopyFrom(opened)
        channel.status = OPEN
        channel.deposit.CopyFrom(opened.deposit)
        channel.cumulative.CopyFrom(money(0))
        if not opened.counterparty_id:
            return []  # attached when the link to its owner comes up
        attach(state, channel_hex, channel)
        return pay_due(state, opened.counterparty_id)

    def on_topped_up(
        state: pay_pb2.PayState, event: Event[pay_pb2.ChannelToppedUp]
    ) -> list[Outgoing]:
        channel = state.channels.get(event.payload.channel_id.hex())
        if channel is None:
            return []
        channel.deposit.CopyFrom(event.payload.deposit)
        return pay_due(state, channel.opened.counterparty_id)

    def on_close_started(
        state: pay_pb2.PayState, event: Event[pay_pb2.ChannelCloseStarted]
    ) -> list[Outgoing]:
        channel = state.channels.get(event.payload.channel_id.hex())
        if channel is not None and channel.status == OPEN:
            channel.status = CLOSING
            channel.settle_after.CopyFrom(event.payload.settle_after)
        return []

    def on_disputed(
        state: pay_pb2.PayState, event: Event[pay_pb2.ChannelDisputed]
    ) -> list[Outgoing]:
        channel = state.channels.get(event.payload.channel_id.hex())
        if channel is not None and event.payload.nonce > channel.claimed_nonce:
            channel.claimed_nonce = event.payload.nonce
            channel.claimed.CopyFrom(event.payload.cumulative)
        return []

    def on_closed(state: pay_pb2.PayState, event: Event[pay_pb2.ChannelClosed]) -> list[Outgoing]:
        channel_hex = event.payload.channel_id.hex()
        channel = state.channels.get(channel_hex)
        if channel is None or channel.status == CLOSED:
            return []
        channel.status = CLOSED
        out: list[Outgoing] = []
        node_id = channel.opened.counterparty_id
        unpaid = amount(channel.cumulative) - _amount(event.payload.paid, "settlement")
        if channel.opened.direction == OUTGOING and unpaid > 0 and node_id in state.neighbors:
            # Refunded to us: those proofs did not pay after all.
            paid = state.neighbors[node_id].paid
            paid.CopyFrom(money(amount(paid) - unpaid))
            out.append(Outgoing("reverted", node_id, pay_pb2.PaymentReverted(
                counterparty_id=node_id, channel_id=channel.opened.channel_id,
                amount=money(unpaid), purpose=purpose_of(state, node_id))))
        neighbor = state.neighbors.get(channel.opened.counterparty_id)
        if neighbor is not None:
            if neighbor.outgoing_channel == channel_hex:
                neighbor.outgoing_channel = ""
            if neighbor.incoming_channel == channel_hex:
                neighbor.incoming_channel = ""
        return out

    def on_sent(state: pay_pb2.PayState, event: Event[pay_pb2.PaymentSent]) -> list[Outgoing]:
        return []  # applied when decided (pay_due); here it only comes back from the log

    def on_acknowledged(
        state: pay_pb2.PayState, event: Event[pay_pb2.PaymentAcknowledged]
    ) -> list[Outgoing]:
        channel = state.channels.get(event.payload.channel_id.hex())
        if channel is not None:
            channel.acknowledged_nonce = max(channel.acknowledged_nonce, event.payload.nonce)
        return []

    def on_received(
        state: pay_pb2.PayState, event: Event[pay_pb2.PaymentReceived]
    ) -> list[Outgoing]:
        received = event.payload
        channel = state.channels.get(received.channel_id.hex())
        if channel is None:
            raise MalformedEvent(f"payment on unknown channel {received.channel_id.hex()}")
        if received.nonce > channel.nonce:
            channel.nonce, channel.signature = received.nonce, received.signature
            channel.cumulative.CopyFrom(received.cumulative)
        return []

    def on_prepared(
        state: pay_pb2.PayState, event: Event[pay_pb2.TransactionPrepared]
    ) -> list[Outgoing]:
        state.pending_transactions[event.payload.tx_hash.hex()].CopyFrom(event.payload)
        return []

    def on_mined(state: pay_pb2.PayState, event: Event[pay_pb2.TransactionMined]) -> list[Outgoing]:
        state.pending_transactions.pop(event.payload.tx_hash.hex(), None)
        return []

    def on_scanned(
        state: pay_pb2.PayState, event: Event[pay_pb2.ChainScanned]
    ) -> list[Outgoing]:
        state.chain_block = max(state.chain_block, event.payload.block_number)
        return []

    def on_reverted(
        state: pay_pb2.PayState, event: Event[pay_pb2.PaymentReverted]
    ) -> list[Outgoing]:
        return []  # applied when decided (on_closed)

    def on_rejected(
        state: pay_pb2.PayState, event: Event[pay_pb2.PaymentRejected]
    ) -> list[Outgoing]:
        return []  # a record for operators; nothing changes

    return {
        link_pb2.LinkUp: on_link_up,
        exit_pb2.ExitRegistered: on_exit_registered,
        exit_pb2.ClientDebtChanged: on_client_debt,
        link_pb2.LinkDown: on_link_down,
        meter_pb2.DebtChanged: on_debt,
        pay_pb2.ChannelOpened: on_opened,
        pay_pb2.ChannelToppedUp: on_topped_up,
        pay_pb2.ChannelCloseStarted: on_close_started,
        pay_pb2.ChannelDisputed: on_disputed,
        pay_pb2.ChannelClosed: on_closed,
        pay_pb2.PaymentSent: on_sent,
        pay_pb2.PaymentAcknowledged: on_acknowledged,
        pay_pb2.PaymentReceived: on_received,
        pay_pb2.PaymentRejected: on_rejected,
        pay_pb2.PaymentReverted: on_reverted,
        pay_pb2.TransactionPrepared: on_prepared,
        pay_pb2.TransactionMined: on_mined,
        pay_pb2.ChainScanned: on_scanned,
    }


def attach(state: pay_pb2.PayState, channel_hex: str, channel: pay_pb2.PayState.Channel) -> None:
    """Make an open channel its neighbor's current one in its direction."""
    neighbor = state.neighbors[channel.opened.counterparty_id]
    if channel.opened.direction == OUTGOING:
        neighbor.outgoing_channel = channel_hex
    else:
        neighbor.incoming_channel = channel_hex


def summarize(state: pay_pb2.PayState) -> Mapping[str, Any]:
    channels = state.channels.values()
    return {
        "neighbors": len(state.neighbors),
        "channels_open": sum(1 for c in channels if c.status == OPEN),
        "paid": sum(amount(n.paid) for n in state.neighbors.values()),
        "received": sum(amount(c.cumulative) for c in channels
                        if c.opened.direction == INCOMING),
        # What our open channels still hold to pay with.
        "deposit_left": sum(amount(c.deposit) - amount(c.cumulative) for c in channels
                            if c.opened.direction == OUTGOING and c.status == OPEN),
        "pending_transactions": len(state.pending_transactions),
        "chain_block": state.chain_block,
    }
