"""The proofs benchmark keeps working (its figures are read by people; only
what does not depend on the machine's speed is asserted)."""

from __future__ import annotations

import pytest

from tests.bench import bench_pay


def test_bench_prints_rates_sizes_and_overhead(capsys: pytest.CaptureFixture[str]) -> None:
    figures = bench_pay.main(["--proofs", "200"])
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("bench:")]
    assert len(lines) == 3
    assert "eth-account" in lines[0] and "ratio" in lines[0]
    assert figures["proof_bytes"] < 150
    assert figures["share"] < 0.0002  # under 0.02% of the traffic it pays for
