"""The convergence benchmark keeps working against babeld (its times are read
by people; only that both converged and were printed is asserted)."""

from __future__ import annotations

import pytest

from tests.bench import bench_route_convergence
from tests.conftest import require_root

pytestmark = [pytest.mark.netns, pytest.mark.emulator]


def test_bench_prints_both_convergence_times_and_ratios(
    capsys: pytest.CaptureFixture[str],
) -> None:
    require_root()
    figures = bench_route_convergence.main([])
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("bench:")]
    assert len(lines) == 2
    assert all("ours" in line and "babeld" in line and "ratio" in line for line in lines)
    assert all(seconds > 0 for seconds in figures.values())
