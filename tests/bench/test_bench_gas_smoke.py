"""The gas benchmark keeps working: every operation is measured, and those
that pair with one of Raiden's are shown beside it with the ratio."""

from __future__ import annotations

import pytest

from tests.bench import bench_gas


def test_bench_prints_gas_beside_raiden(capsys: pytest.CaptureFixture[str]) -> None:
    gas = bench_gas.main([])
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("bench:")]
    assert len(lines) == 1 + len(bench_gas.ROWS)  # a header, then one line per row
    for line, (name, theirs) in zip(lines[1:], bench_gas.ROWS.items(), strict=True):
        assert line.startswith(f"bench: gas {name} ")
        figures = line.removeprefix(f"bench: gas {name}").split()
        assert int(figures[0].replace(",", "")) > 0
        if theirs:
            assert figures[1:3] == [theirs, f"{bench_gas.RAIDEN[theirs]:,}"]
            assert float(figures[3]) > 0
        else:
            assert len(figures) == 1
    # gas is deterministic: the contract's cost, not the machine's speed
    assert all(21_000 < used < 300_000 for used in gas.values())
