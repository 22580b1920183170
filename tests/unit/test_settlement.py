"""The demo's settlement report: what reconciles and what does not."""

from __future__ import annotations

from deploy.emulator.settlement import ExitBill, Ledger, reconcile

THRESHOLD = 10**11


def mesh(owed: int = 10**12, charged: int = 10**12, paid: int = 95 * 10**10,
         received: int = 95 * 10**10, arrived: int = 10**6) -> dict[str, dict[str, Ledger]]:
    """a pays b for 1 MB at 10^6 wei/B; b pays nothing back."""
    return {"a": {"b": Ledger(tx_bytes=10**6, owed=owed, sent=paid)},
            "b": {"a": Ledger(rx_bytes=arrived, charged=charged, received=received)}}


def test_agreeing_meters_and_payments_reconcile() -> None:
    report = reconcile(mesh(), THRESHOLD)
    assert report.ok, report.problems
    [direction] = [d for d in report.directions if d.payer == "a"]
    assert (direction.unpaid, direction.lost) == (5 * 10**10, 0)
    assert "  left unpaid by the payers' meters: a->b +50,000,000,000" in report.lines()
    assert report.margins == {"a": -10**12, "b": 10**12}
    assert report.lines()[-1] == "settlement: reconciled"


def test_meters_far_apart_do_not() -> None:
    report = reconcile(mesh(charged=9 * 10**11), THRESHOLD)
    assert not report.ok
    assert "meters price the same bytes 10.0% apart" in report.problems[0]


def test_bytes_lost_between_the_meters_are_loss_not_a_price_disagreement() -> None:
    # 5% of what a sent never reached b's meter: b charged the rest at the
    # same price, and a paid for all it sent.
    report = reconcile(mesh(charged=95 * 10**10, arrived=95 * 10**4, paid=10**12,
                            received=10**12), THRESHOLD)
    assert report.ok, report.problems
    assert report.directions[0].lost == 5 * 10**4
    assert "  a->b: 1,000,000 B (5.00% lost), owes 1,000,000,000,000 / charged " \
           "950,000,000,000 (prices 0.00% apart), paid 1,000,000,000,000 / received " \
           "1,000,000,000,000" in report.lines()
    # The lost bytes may have been dearer or cheaper than the average: the
    # prices may be apart by that share more. The arrived bytes priced 10%
    # apart are still a disagreement.
    assert reconcile(mesh(charged=92 * 10**10, arrived=95 * 10**4, paid=10**12,
                          received=10**12), THRESHOLD).ok
    report = reconcile(mesh(charged=85 * 10**10, arrived=95 * 10**4, paid=10**12,
                            received=10**12), THRESHOLD)
    assert any("prices" not in p and "10.5% apart" in p for p in report.problems), report.problems


def test_a_link_that_loses_more_than_a_tenth_does_not() -> None:
    report = reconcile(mesh(charged=8 * 10**11, arrived=8 * 10**5, paid=10**12,
                            received=10**12), THRESHOLD)
    assert report.problems == ["a->b: 200,000 B (20.0%) sent that b never counted, over 10%"]


def test_a_payee_that_counts_more_than_was_sent_does_not() -> None:
    report = reconcile(mesh(charged=11 * 10**11, arrived=11 * 10**5, paid=10**12,
                            received=10**12), THRESHOLD)
    assert report.problems == ["a->b: b counted 100,000 B more than a sent (10.0%)"]


def test_a_small_absolute_difference_is_noise() -> None:
    # 5% apart, but on 10^11 wei: a tenth of the pay threshold or less.
    ledgers = mesh(owed=2 * 10**11, charged=19 * 10**10, paid=0, received=0)
    assert reconcile(ledgers, THRESHOLD).ok


def test_a_payment_lost_between_payer_and_payee_does_not() -> None:
    report = reconcile(mesh(received=90 * 10**10), THRESHOLD)
    assert any("received" in p for p in report.problems)


def test_a_debt_left_unpaid_does_not() -> None:
    report = reconcile(mesh(paid=0, received=0), THRESHOLD)
    assert report.problems == ["a->b: +1,000,000,000,000 wei left unpaid, over twice the "
                               "pay threshold 100,000,000,000"]
    assert "NOT reconciled" in report.lines()[-1]


def test_a_ledger_missing_on_one_side_is_reported() -> None:
    report = reconcile({"a": {"b": Ledger(owed=5)}}, THRESHOLD)
    assert report.problems == ["b has no ledger for a"]


def exit_mesh(client_bill: int = 19 * 10**11, exit_bill: int = 2 * 10**12,
              paid: int = 19 * 10**11, received: int = 19 * 10**11,
              ) -> tuple[dict[str, dict[str, Ledger]], dict[tuple[str, str],
                                                          tuple[ExitBill, ExitBill]]]:
    """c downloads 1 MB through exit x at 2*10^6 wei/B; x pays its gateway g
    10^6 wei/B for the response traffic, g charges it the same."""
    ledgers = {"x": {"g": Ledger(tx_bytes=10**6, owed=10**12, sent=10**12)},
               "g": {"x": Ledger(rx_bytes=10**6, charged=10**12, received=10**12)}}
    bills = {("c", "x"): (ExitBill(10**6, client_bill, paid),
                          ExitBill(10**6, exit_bill, received))}
    return ledgers, bills


def test_an_exit_earns_from_its_clients_what_it_pays_the_mesh_and_its_fee() -> None:
    report = reconcile(*exit_mesh()[:1], THRESHOLD, exit_mesh()[1])
    assert report.ok, report.problems
    # What the exit sent and the client never got is on the exit's bill only.
    assert report.margins == {"x": 2 * 10**12 - 10**12, "g": 10**12, "c": -19 * 10**11}
    assert "  exit x: 1,900,000,000,000 wei received from its clients, " \
           "1,000,000,000,000 wei paid to the mesh for response traffic" in report.lines()


def test_a_client_billed_above_its_exit_or_far_below_does_not_reconcile() -> None:
    ledgers, over = exit_mesh(client_bill=21 * 10**11, paid=21 * 10**11,
                              received=21 * 10**11)
    assert any("not within 10% below" in p for p in reconcile(ledgers, THRESHOLD, over).problems)
    ledgers, under = exit_mesh(client_bill=17 * 10**11, paid=17 * 10**11,
                               received=17 * 10**11)
    assert any("not within 10% below" in p for p in reconcile(ledgers, THRESHOLD, under).problems)


def test_a_client_that_does_not_pay_its_exit_does_not_reconcile() -> None:
    ledgers, bills = exit_mesh(paid=0, received=0)
    assert any("unpaid" in p for p in reconcile(ledgers, THRESHOLD, bills).problems)
    ledgers, bills = exit_mesh(received=10**12)
    assert any("x received" in p for p in reconcile(ledgers, THRESHOLD, bills).problems)
