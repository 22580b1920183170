"""The gas benchmark keeps working: every operation is measured beside Raiden's."""

from __future__ import annotations

import pytest

from tests.bench import bench_gas


def test_bench_prints_gas_beside_raiden(capsys: pytest.CaptureFixture[str]) -> None:
    gas = bench_gas.main([])
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("bench:")]
    assert len(lines) == len(gas) + 1
    assert sum("Raiden" in line and "ratio" in line for line in lines) == 5
    # gas is deterministic: the contract's cost, not the machine's speed
    assert all(21_000 < used < 300_000 for used in gas.values())
