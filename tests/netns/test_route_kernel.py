"""route's kernel side (services/route/kernel.py) in a namespace of its own."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tests.conftest import require_root

pytestmark = pytest.mark.netns

REPO = Path(__file__).resolve().parents[2]

RECONCILE = textwrap.dedent("""
    import json
    from services.route.kernel import KernelRoute, KernelRoutes

    kernel = KernelRoutes()
    failed = kernel.reconcile({
        "2001:db8:1::/64": KernelRoute("2001:db8:1::/64", "fe80::1", "d0"),
        "2001:db8:2::/64": KernelRoute("2001:db8:2::/64", "fe80::2", "mwgone0"),
    })
    print(json.dumps({"failed": failed, "installed": sorted(kernel.installed())}))
""")


def test_a_route_whose_tunnel_went_away_is_tried_again_and_the_others_go_in() -> None:
    # A link cut removes a tunnel between route choosing a route through it
    # and installing it: that route waits for the next reconcile, and the
    # service carries on (it used to die of the OSError).
    require_root()
    ns = f"rk{os.getpid() % 100000}"
    try:
        subprocess.run(["ip", "netns", "add", ns], check=True)
        # (This kernel has no dummy devices.)
        subprocess.run(["ip", "-n", ns, "link", "add", "d0", "type", "veth", "peer", "name", "d1"],
                       check=True)
        for device in ("d0", "d1"):
            subprocess.run(["ip", "-n", ns, "link", "set", device, "up"], check=True)
        done = subprocess.run(["ip", "netns", "exec", ns, sys.executable, "-c", RECONCILE],
                              cwd=REPO, capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stderr
        assert json.loads(done.stdout) == {"failed": ["2001:db8:2::/64"],
                                           "installed": ["2001:db8:1::/64"]}
    finally:
        subprocess.run(["ip", "netns", "del", ns], capture_output=True)
