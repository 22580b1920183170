"""The README's two commands are what CI and users run."""

from __future__ import annotations

from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_ci_runs_the_readme_test_command() -> None:
    readme = (REPO / "README.md").read_text().split("```sh\n")
    install_and_demo, install_and_test = (block.split("\n```")[0] for block in readme[1:3])
    assert install_and_demo.startswith("bash deploy/install.sh && ")
    ci = (REPO / ".ci" / "run").read_text()
    assert install_and_test in ci.splitlines()
