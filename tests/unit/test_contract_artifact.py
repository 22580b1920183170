"""The committed contract artifact is what the pinned compiler makes of the
source: nobody deploys bytecode that the source does not say."""

from __future__ import annotations

import hashlib
import json

from services.pay.contracts import load_artifact
from services.pay.contracts.build import ARTIFACT, COMPILER, SOURCE, compile_source, render

REBUILD = "edited without rebuilding: run .venv/bin/python -m services.pay.contracts.build"


def test_the_artifact_is_the_source_compiled_by_the_pinned_vyper() -> None:
    committed = json.loads(ARTIFACT.read_text())
    source = SOURCE.read_text()
    assert committed["compiler"] == f"vyper {COMPILER}"
    assert committed["source_sha256"] == hashlib.sha256(source.encode()).hexdigest(), REBUILD
    fresh = compile_source(source)
    assert fresh["abi"] == committed["abi"], REBUILD
    assert fresh["bytecode"] == committed["bytecode"], REBUILD
    assert render(fresh) == ARTIFACT.read_text()  # stable formatting: rebuilding changes nothing
    assert load_artifact() == (committed["abi"], committed["bytecode"])
