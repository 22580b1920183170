"""The route table benchmark keeps working (its rate is read by people; only
what does not depend on the machine's speed is asserted)."""

from __future__ import annotations

import pytest

from tests.bench import bench_route_table


def test_bench_prints_updates_per_second_against_decoding(
    capsys: pytest.CaptureFixture[str],
) -> None:
    figures = bench_route_table.main(["--prefixes", "300", "--neighbors", "3"])
    [line] = [line for line in capsys.readouterr().out.splitlines() if line.startswith("bench:")]
    assert "Updates/s" in line and "decoding alone" in line and "ratio" in line
    assert figures["selected"] == 300  # every prefix got a route
    assert figures["processed"] > 0
