"""The demo's settlement report: bytes, prices and payments reconciled across
the whole mesh, from every router's meter ledgers and every exit's bills.

Both ends of a link meter the same bytes at the same prices, so what one
says it owes the other is what the other says it is owed, but for what was
lost between the two meters: the sender counts a packet as it forwards it
into the tunnel, the receiver as it forwards it on, and a full queue on the
way (the tunnel's, the receiving socket's) drops some under load. The
report tells the two apart: the bytes the payee counted against the bytes
the payer sent (the loss), and the prices, what the payee charged against
what the payer owes for the bytes that arrived. What one paid is what the
other received; and each payer has paid what its own meter says it owes,
but for less than twice the pay threshold (it pays each time it crosses
it). The report says, per direction and for the whole mesh, how far each
holds.

A client and its exit are no neighbors, but the same holds between them:
both meter the exit tunnel and bill it at the exit's prices, and the client
pays the exit on a channel. The exit is a router like any other: it pays
its gateways for the response traffic it sends into the mesh, so its
margin is what its clients paid less what the mesh charged it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from mesh.meter.v1 import meter_pb2

from services.common.money import amount

# Meters sample on their own clocks, control traffic (probes, ICMP) never
# stops, and a price that changes with a route reaches the two ends a moment
# apart: the last moments may be in one ledger and not yet in the other's
# (0.5% at most per link on the default 7-router demo, 0.01% overall). Two
# meters disagree when they are this far apart, and by more than a tenth of
# the pay threshold (below it a debt is not even paid yet).
METER_TOLERANCE = 0.03
# A TCP download at full speed through a chain of wireguard-go tunnels on two
# loaded cores loses packets at its bottleneck, between two meters: up to
# 3.2% per link seen in CI (tests/netns/test_exit.py), which TCP resends.
# The payer pays for them (its meter counted them); beyond this share a link
# is broken rather than loaded.
LOSS_TOLERANCE = 0.1
# What an exit sent and its client never received (lost on the way, then
# sent again by TCP) is on the exit's bill only: the client's may be this
# much below (the exit's own default debt_tolerance), never above.
EXIT_TOLERANCE = 0.1


@dataclass(frozen=True)
class Ledger:
    """One router's view of one neighbor (meter's ledger)."""

    rx_bytes: int = 0
    tx_bytes: int = 0
    charged: int = 0  # the neighbor owes us, by our meter
    owed: int = 0  # we owe the neighbor, by our meter
    received: int = 0  # payments from it
    sent: int = 0  # payments to it


def ledger_from(ledger: meter_pb2.MeterState.Ledger) -> Ledger:
    """From meter's ledger: its byte totals and DebtChanged's running totals."""
    debt = ledger.debt
    return Ledger(ledger.rx_bytes, ledger.tx_bytes, amount(debt.usage_charged),
                  amount(debt.usage_owed), amount(debt.payments_received),
                  amount(debt.payments_sent))


@dataclass(frozen=True)
class Direction:
    """Everything about a pays b, as both meters and both pay services see it."""

    payer: str
    payee: str
    bytes: int  # the payer's bytes through the payee (its tx)
    owed: int  # by the payer's meter
    charged: int  # by the payee's meter
    paid: int  # by the payer's pay
    received: int  # by the payee's pay
    arrived: int | None = None  # the bytes the payee counted from the payer (its rx)

    @property
    def lost(self) -> int:
        """Bytes the payer's meter counted and the payee's never saw."""
        return 0 if self.arrived is None else self.bytes - self.arrived

    @property
    def loss(self) -> float:
        return self.lost / max(self.bytes, 1)

    @property
    def owed_for_arrived(self) -> int:
        """What the payer owes for the bytes that arrived, at its own prices."""
        if self.arrived is None or not self.bytes:
            return self.owed
        return self.owed * self.arrived // self.bytes

    @property
    def metered_off(self) -> float:
        """How far the two meters' prices are apart, over the same bytes."""
        expected = self.owed_for_arrived
        return abs(expected - self.charged) / max(expected, self.charged, 1)

    @property
    def unpaid(self) -> int:
        """What the payer's meter says it owes and it has not paid."""
        return self.owed - self.paid


@dataclass(frozen=True)
class ExitBill:
    """One client's bill with one exit, as its exit service sees it."""

    bytes: int  # through the exit tunnel, both ways
    charged: int  # usage at the exit's prices
    payments: int  # paid (by a client) or received (by an exit)


@dataclass
class Report:
    directions: list[Direction] = field(default_factory=list)
    exit_directions: list[Direction] = field(default_factory=list)
    margins: dict[str, int] = field(default_factory=dict)  # earned - spent, per router
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def check_paid(self, direction: Direction, name: str) -> None:
        """What the payer paid must be what the payee received."""
        if direction.paid != direction.received:
            self.problems.append(f"{name}: paid {direction.paid:,} but {direction.payee} "
                                 f"received {direction.received:,}")

    def check_direction(self, d: Direction, pay_threshold: int) -> None:
        """Both meters of one direction agree, but for what was lost between
        them, and the payer paid what its own meter says."""
        name = f"{d.payer}->{d.payee}"
        noise = pay_threshold // 10  # below it a debt is not even paid yet
        # The lost bytes are priced at the direction's average: those of a
        # dearer or cheaper destination shift the estimate by up to their share.
        if (d.metered_off > METER_TOLERANCE + max(d.loss, 0)
                and abs(d.owed_for_arrived - d.charged) > noise):
            self.problems.append(
                f"{name}: meters price the same bytes {d.metered_off:.1%} apart (owes "
                f"{d.owed_for_arrived:,} for the {d.arrived:,} B that arrived, charged "
                f"{d.charged:,})")
        if d.loss > LOSS_TOLERANCE and d.owed - d.owed_for_arrived > noise:
            self.problems.append(f"{name}: {d.lost:,} B ({d.loss:.1%}) sent that {d.payee} "
                                 f"never counted, over {LOSS_TOLERANCE:.0%}")
        if d.loss < -METER_TOLERANCE and d.owed_for_arrived - d.owed > noise:
            self.problems.append(f"{name}: {d.payee} counted {-d.lost:,} B more than "
                                 f"{d.payer} sent ({-d.loss:.1%})")
        self.check_paid(d, name)
        self.check_unpaid(d, name, pay_threshold)

    def check_unpaid(self, d: Direction, name: str, pay_threshold: int) -> None:
        """The payer pays each time its debt crosses the threshold."""
        if d.unpaid > 2 * pay_threshold:
            self.problems.append(f"{name}: {d.unpaid:+,} wei left unpaid, over twice the pay "
                                 f"threshold {pay_threshold:,}")

    def lines(self) -> list[str]:
        total_owed = sum(d.owed for d in self.directions)
        total_charged = sum(d.charged for d in self.directions)
        total_paid = sum(d.paid for d in self.directions)
        total_bytes = sum(d.bytes for d in self.directions)
        total_lost = sum(d.lost for d in self.directions)
        off = abs(total_owed - total_charged) / max(total_owed, total_charged, 1)
        links = {frozenset((d.payer, d.payee)) for d in self.directions}
        out = [f"settlement: {total_bytes:,} bytes metered over {len(links)} links, "
               f"{total_lost:,} lost between the meters; {total_owed:,} wei owed by the "
               f"payers' meters, {total_charged:,} by the payees' (off by {off:.2%}); "
               f"{total_paid:,} wei paid"]
        for d in self.directions:
            if d.owed or d.charged or d.paid:
                out.append(f"  {d.payer}->{d.payee}: {d.bytes:,} B ({d.loss:.2%} lost), owes "
                           f"{d.owed:,} / charged {d.charged:,} (prices {d.metered_off:.2%} "
                           f"apart), paid {d.paid:,} / received {d.received:,}")
        left = ", ".join(f"{d.payer}->{d.payee} {d.unpaid:+,}" for d in self.directions
                         if d.unpaid)
        out.append(f"  left unpaid by the payers' meters: {left or 'nothing'}")
        for d in self.exit_directions:
            out.append(f"  {d.payer}->{d.payee} (exit): {d.bytes:,} B, owes {d.owed:,} / "
                       f"charged {d.charged:,} ({d.metered_off:.2%} apart), paid {d.paid:,} "
                       f"/ received {d.received:,}")
        for exit_name in sorted({d.payee for d in self.exit_directions}):
            earned = sum(d.received for d in self.exit_directions if d.payee == exit_name)
            spent = sum(d.paid for d in self.directions if d.payer == exit_name)
            out.append(f"  exit {exit_name}: {earned:,} wei received from its clients, "
                       f"{spent:,} wei paid to the mesh for response traffic")
        margins = ", ".join(f"{r} {m:+,}" for r, m in sorted(self.margins.items()))
        out.append(f"  earned minus spent on traffic, per router: {margins}")
        out.append("settlement: reconciled" if self.ok else
                   "settlement: NOT reconciled: " + "; ".join(self.problems))
        return out


def reconcile(ledgers: Mapping[str, Mapping[str, Ledger]], pay_threshold: int,
              exit_bills: Mapping[tuple[str, str], tuple[ExitBill, ExitBill]] | None = None,
              ) -> Report:
    """ledgers[router][neighbor]: every router's meter ledger per neighbor;
    exit_bills[(client, exit)]: the client's bill and the exit's."""
    report = Report()
    for payer, theirs in sorted(ledgers.items()):
        for payee, mine in sorted(theirs.items()):
            other = ledgers.get(payee, {}).get(payer)
            if other is None:
                report.problems.append(f"{payee} has no ledger for {payer}")
                continue
            direction = Direction(payer, payee, mine.tx_bytes, mine.owed, other.charged,
                                  mine.sent, other.received, other.rx_bytes)
            report.directions.append(direction)
            report.check_direction(direction, pay_threshold)
        report.margins[payer] = sum(lg.charged - lg.owed for lg in theirs.values())
    for (payer, payee), (mine, theirs_) in sorted((exit_bills or {}).items()):
        direction = Direction(payer, payee, mine.bytes, mine.charged, theirs_.charged,
                              mine.payments, theirs_.payments)
        report.exit_directions.append(direction)
        if not ((1 - EXIT_TOLERANCE) * direction.charged - pay_threshold // 10
                <= direction.owed <= direction.charged + pay_threshold // 10):
            report.problems.append(
                f"{payer}->{payee} (exit): the client's bill {direction.owed:,} is not within "
                f"{EXIT_TOLERANCE:.0%} below the exit's {direction.charged:,}")
        report.check_paid(direction, f"{payer}->{payee} (exit)")
        report.check_unpaid(direction, f"{payer}->{payee} (exit)", pay_threshold)
        report.margins[payer] = report.margins.get(payer, 0) - direction.owed
        report.margins[payee] = report.margins.get(payee, 0) + direction.charged
    return report
