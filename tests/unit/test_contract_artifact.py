"""The committed contract artifact is what the pinned compiler makes of the
source: nobody deploys bytecode that the source does not say."""

from __future__ import annotations

import json

from services.pay.contracts.build import ARTIFACT, COMPILER, SOURCE, compile_source, render


def test_the_artifact_is_the_source_compiled_by_the_pinned_vyper() -> None:
    committed = json.loads(ARTIFACT.read_text())
    assert committed["compiler"] == f"vyper {COMPILER}"
    assert render(compile_source(SOURCE.read_text())) == ARTIFACT.read_text()
