"""The dataplane benchmark keeps working (its figures are read by people, not asserted)."""

from __future__ import annotations

import pytest

from tests.bench import bench_dataplane
from tests.conftest import require_root


@pytest.mark.netns
def test_bench_prints_its_figures_with_baselines(capsys: pytest.CaptureFixture[str]) -> None:
    require_root()
    bench_dataplane.main(["--neighbors", "4", "--destinations", "20", "--seconds", "1",
                          "--rounds", "2", "--samples", "3"])
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("bench:")]
    assert len(lines) == 3
    assert "with the eBPF counting program" in lines[0] and "ratio" in lines[0]
    assert "one snapshot of 4 neighbors x 21 destinations (84 counters)" in lines[1]
    assert "the nftables path" in lines[1] and "ratio" in lines[1]
    assert "kernel memory of that state" in lines[2]
