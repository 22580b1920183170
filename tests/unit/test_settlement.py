"""The demo's settlement report: what reconciles and what does not."""

from __future__ import annotations

from deploy.emulator.settlement import Ledger, reconcile

THRESHOLD = 10**11


def mesh(owed: int = 10**12, charged: int = 10**12, paid: int = 95 * 10**10,
         received: int = 95 * 10**10) -> dict[str, dict[str, Ledger]]:
    """a pays b for 1 MB at 10^6 wei/B; b pays nothing back."""
    return {"a": {"b": Ledger(tx_bytes=10**6, owed=owed, sent=paid)},
            "b": {"a": Ledger(rx_bytes=10**6, charged=charged, received=received)}}


def test_agreeing_meters_and_payments_reconcile() -> None:
    report = reconcile(mesh(), THRESHOLD)
    assert report.ok, report.problems
    assert report.outstanding == {("a", "b"): 5 * 10**10}
    assert report.margins == {"a": -10**12, "b": 10**12}
    assert report.lines()[-1] == "settlement: reconciled"


def test_meters_far_apart_do_not() -> None:
    report = reconcile(mesh(charged=9 * 10**11), THRESHOLD)
    assert not report.ok
    assert "meters 10.0% apart" in report.problems[0]


def test_a_small_absolute_difference_is_noise() -> None:
    # 5% apart, but on 10^11 wei: a tenth of the pay threshold or less.
    ledgers = mesh(owed=2 * 10**11, charged=19 * 10**10, paid=0, received=0)
    assert reconcile(ledgers, THRESHOLD).ok


def test_a_payment_lost_between_payer_and_payee_does_not() -> None:
    report = reconcile(mesh(received=90 * 10**10), THRESHOLD)
    assert any("received" in p for p in report.problems)


def test_a_debt_left_unpaid_does_not() -> None:
    report = reconcile(mesh(paid=0, received=0), THRESHOLD)
    assert any("left owing" in p for p in report.problems)
    assert "NOT reconciled" in report.lines()[-1]


def test_a_ledger_missing_on_one_side_is_reported() -> None:
    report = reconcile({"a": {"b": Ledger(owed=5)}}, THRESHOLD)
    assert report.problems == ["b has no ledger for a"]
