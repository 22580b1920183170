"""Checks that this machine can run the emulated mesh, before anything is built."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

# Every emulated router runs wireguard-go, and each instance takes one inotify
# instance; the usual default of 128 runs out with a few routers and services.
MIN_INOTIFY_INSTANCES = 1024
_INOTIFY_INSTANCES = Path("/proc/sys/fs/inotify/max_user_instances")

# (command, Debian package providing it)
_TOOLS = (
    ("ip", "iproute2"),
    ("tc", "iproute2"),
    ("nft", "nftables"),
    ("sysctl", "procps"),
)


class PreflightError(RuntimeError):
    """The machine cannot run the emulated mesh; the message says how to fix it."""


def preflight() -> None:
    """Raise PreflightError naming the fix if something is missing."""
    if os.geteuid() != 0:
        raise PreflightError("run as root: network namespaces need CAP_NET_ADMIN")
    for command, package in _TOOLS:
        if shutil.which(command) is None:
            raise PreflightError(
                f"{command} not found on PATH: install the Debian package {package} "
                f"(apt-get install {package}), or add /usr/sbin to PATH"
            )
    if not Path("/proc/self/ns/net").exists():
        raise PreflightError("this kernel has no network namespaces (CONFIG_NET_NS)")
    # Named namespaces are bind mounts under /var/run/netns (ip netns, pyroute2).
    run_dir = Path("/var/run")
    if not run_dir.is_dir() or not os.access(run_dir, os.W_OK):
        raise PreflightError(
            f"{run_dir} is missing or not writable: named network namespaces live in "
            f"{run_dir}/netns"
        )
    _raise_inotify_instances()


def _raise_inotify_instances() -> None:
    try:
        current = int(_INOTIFY_INSTANCES.read_text())
        if current < MIN_INOTIFY_INSTANCES:
            _INOTIFY_INSTANCES.write_text(f"{MIN_INOTIFY_INSTANCES}\n")
    except OSError as e:
        raise PreflightError(
            f"cannot raise {_INOTIFY_INSTANCES} to {MIN_INOTIFY_INSTANCES} "
            f"(wireguard-go needs one inotify instance per router): {e}"
        ) from e
