"""The benchmark keeps working (its figures are read by people, not asserted)."""

from __future__ import annotations

import pytest

from tests.bench import bench_bus
from tests.conftest import require_root


def test_bench_prints_its_figures_with_baselines(capsys: pytest.CaptureFixture[str]) -> None:
    require_root()
    bench_bus.main(["--events", "200", "--samples", "50"])
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("bench:")]
    assert len(lines) == 3
    assert "bare NATS p50" in lines[0] and "ratio p50" in lines[0]
    assert "bare JetStream publishes" in lines[1]
    assert "idle router RSS" in lines[2] and "wireguard-go" in lines[2]
