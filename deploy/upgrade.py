"""Over-the-air upgrade of one service of a router.

A release is a copy of the `services/` tree (a directory, or a .tar.gz of
one, e.g. `git archive HEAD services | gzip`), unpacked under
`<node>/releases/<service>/<id>/`. Each service's program runs with
`python -P` and `PYTHONPATH=<node>/releases/<service>/current:<repo>`, so
while `current` is absent it runs the installed code, and once it points at
a release that service, and no other, imports its code from there.

An upgrade unpacks and checks the release (its service must import), points
`current` at it atomically, restarts that one program under supervisord, and
waits for it to answer SERVING; if it does not, `current` goes back to what
it was and the service is restarted on the old code. The other services, the
tunnels and the kernel's forwarding are never touched; the restarted service
resumes its projection from its snapshot and the event log, so no event is
lost.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tarfile
import time
from dataclasses import dataclass
from pathlib import Path

from deploy.meshctl import client
from deploy.node import REPO, NodeLayout, run_supervisorctl


class UpgradeError(RuntimeError):
    """The upgrade did not happen (or was rolled back); the message says why."""


@dataclass(frozen=True)
class Upgraded:
    service: str
    release: Path
    previous: Path | None
    seconds: float  # from the restart to SERVING


def _unpack(package: Path, into: Path) -> None:
    if package.is_dir():
        shutil.copytree(package, into, symlinks=False)
        return
    if not tarfile.is_tarfile(package):
        raise UpgradeError(f"{package}: neither a directory nor a tar archive of services/")
    with tarfile.open(package) as archive:
        archive.extractall(into, filter="data")


def _release_dir(unpacked: Path, service: str) -> Path:
    """The directory holding `services/`: the top, or its one subdirectory."""
    candidates = [unpacked, *[p for p in unpacked.iterdir() if p.is_dir()]]
    for candidate in candidates:
        if (candidate / "services" / service / "__main__.py").is_file():
            if not (candidate / "services" / "common" / "runtime.py").is_file():
                raise UpgradeError("the package has no services/common: a release carries "
                                   "the whole services/ tree")
            return candidate
    raise UpgradeError(f"the package has no services/{service}/__main__.py")


def _check_imports(release: Path, service: str) -> None:
    done = subprocess.run(
        [sys.executable, "-P", "-c", f"import services.{service}.service"],
        env={**os.environ, "PYTHONPATH": f"{release}{os.pathsep}{REPO}"},
        cwd=release, capture_output=True, text=True, timeout=120,
    )
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ["no output"])[-1]
        raise UpgradeError(f"services.{service} of the release does not import: {last}")


def _point(link: Path, target: Path | None) -> None:
    """Point `current` at target (None: at nothing) in one rename."""
    if target is None:
        link.unlink(missing_ok=True)
        return
    temporary = link.with_name(f".{link.name}.{os.getpid()}")
    temporary.unlink(missing_ok=True)
    temporary.symlink_to(target)
    temporary.rename(link)


def _restart(layout: NodeLayout, service: str) -> None:
    done = run_supervisorctl(layout, "restart", service)
    if done.returncode != 0:
        raise UpgradeError(f"supervisorctl restart {service}: "
                           f"{(done.stdout + done.stderr).strip()}")


def _serving(layout: NodeLayout, service: str, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if client.health(layout.socket(service)) == "SERVING":
            return True
        time.sleep(0.2)
    return False


def upgrade(layout: NodeLayout, service: str, package: Path,
            timeout: float = 60.0) -> Upgraded:
    if not package.exists():
        raise UpgradeError(f"{package}: no such file or directory")
    root = layout.releases(service)
    root.mkdir(parents=True, exist_ok=True)
    unpacked = root / time.strftime("%Y%m%dT%H%M%S")
    suffix = 1
    while unpacked.exists():
        unpacked = root / f"{time.strftime('%Y%m%dT%H%M%S')}-{suffix}"
        suffix += 1
    _unpack(package, unpacked)
    release = _release_dir(unpacked, service)
    _check_imports(release, service)
    link = layout.release_link(service)
    previous = link.resolve() if link.is_symlink() else None
    _point(link, release)
    started = time.monotonic()
    _restart(layout, service)
    if _serving(layout, service, timeout):
        return Upgraded(service, release, previous, time.monotonic() - started)
    _point(link, previous)
    _restart(layout, service)
    raise UpgradeError(f"{service} did not answer SERVING within {timeout:.0f}s on the new "
                       f"release; rolled back to {previous or 'the installed code'}")
