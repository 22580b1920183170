"""Compile the channel contract with the pinned Vyper and write its artifact:

    .venv/bin/python -m services.pay.contracts.build

MeshChannels.json holds the ABI and bytecode routers deploy and call; it is
committed, and a test compiles the source again and compares, so the two
never drift apart.
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
SOURCE = HERE / "MeshChannels.vy"
ARTIFACT = HERE / "MeshChannels.json"
COMPILER = "0.4.3"


class CompilerMismatch(RuntimeError):
    pass


def compile_source(source: str) -> dict[str, Any]:
    import vyper

    if vyper.__version__.split("+")[0] != COMPILER:
        raise CompilerMismatch(f"vyper {vyper.__version__} is installed; the contract is "
                               f"built with {COMPILER} (run deploy/install.sh)")
    out = vyper.compile_code(source, output_formats=["abi", "bytecode"])
    return {
        "compiler": f"vyper {COMPILER}",
        "source_sha256": hashlib.sha256(source.encode()).hexdigest(),
        "abi": out["abi"],
        "bytecode": out["bytecode"],
    }


def render(artifact: dict[str, Any]) -> str:
    return json.dumps(artifact, indent=1, sort_keys=True) + "\n"


def main() -> None:
    artifact = compile_source(SOURCE.read_text())
    ARTIFACT.write_text(render(artifact))
    print(f"{ARTIFACT}: {len(artifact['bytecode']) // 2 - 1} bytes of bytecode, "
          f"{len(artifact['abi'])} ABI entries", file=sys.stderr)


if __name__ == "__main__":
    main()
