"""The demo's settlement report: bytes, prices and payments reconciled across
the whole mesh, from every router's meter ledgers and every exit's bills.

Both ends of a link meter the same bytes at the same prices, so what one
says it owes the other is what the other says it is owed; what one paid is
what the other received; and what is left owing, netted both ways, stays
under the pay threshold (the debtor pays each time it crosses it). The
report says, per link and for the whole mesh, how far each holds.

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

    @property
    def metered_off(self) -> float:
        return abs(self.owed - self.charged) / max(self.owed, self.charged, 1)


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
    # Per link, what is left owing after netting both ways (positive: the
    # first name owes the second), by the first one's meter.
    outstanding: dict[tuple[str, str], int] = field(default_factory=dict)
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

    def lines(self) -> list[str]:
        total_owed = sum(d.owed for d in self.directions)
        total_charged = sum(d.charged for d in self.directions)
        total_paid = sum(d.paid for d in self.directions)
        total_bytes = sum(d.bytes for d in self.directions)
        off = abs(total_owed - total_charged) / max(total_owed, total_charged, 1)
        out = [f"settlement: {total_bytes:,} bytes metered over {len(self.outstanding)} links; "
               f"{total_owed:,} wei owed by the payers' meters, {total_charged:,} by the "
               f"payees' (off by {off:.2%}); {total_paid:,} wei paid"]
        for d in self.directions:
            if d.owed or d.charged or d.paid:
                out.append(f"  {d.payer}->{d.payee}: {d.bytes:,} B, owes {d.owed:,} / charged "
                           f"{d.charged:,} ({d.metered_off:.2%} apart), paid {d.paid:,} / "
                           f"received {d.received:,}")
        left = ", ".join(f"{a}-{b} {v:+,}" for (a, b), v in sorted(self.outstanding.items()))
        out.append(f"  left owing after netting: {left or 'nothing'}")
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
                                  mine.sent, other.received)
            report.directions.append(direction)
            if (direction.metered_off > METER_TOLERANCE
                    and abs(direction.owed - direction.charged) > pay_threshold // 10):
                report.problems.append(
                    f"{payer}->{payee}: meters {direction.metered_off:.1%} apart "
                    f"(owes {mine.owed:,}, charged {other.charged:,})")
            report.check_paid(direction, f"{payer}->{payee}")
            if payer < payee:
                net = (mine.owed - mine.sent) - (mine.charged - mine.received)
                report.outstanding[(payer, payee)] = net
                if abs(net) > 2 * pay_threshold:
                    report.problems.append(f"{payer}-{payee}: {net:+,} wei left owing, over "
                                           f"twice the pay threshold {pay_threshold:,}")
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
        if direction.owed - direction.paid > 2 * pay_threshold:
            report.problems.append(f"{payer}->{payee} (exit): {direction.owed - direction.paid:,}"
                                   f" wei unpaid, over twice the pay threshold {pay_threshold:,}")
        report.margins[payer] = report.margins.get(payer, 0) - direction.owed
        report.margins[payee] = report.margins.get(payee, 0) + direction.charged
    return report
