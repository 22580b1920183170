"""The emulated mesh's chain: anvil, in the internet's namespace when the
topology has one, reached on an IPC socket (routers in their namespaces
reach it through the shared filesystem), the channel contract deployed on
it, and every router's chain address funded."""

from __future__ import annotations

import contextlib
import os
import signal
import tempfile
from pathlib import Path

from web3 import Web3

from deploy.chain.anvil import Anvil
from services.pay.chain import connect
from services.pay.contracts import deploy

PID_FILE = "chain.pid"
ROUTER_FUNDS_WEI = 1_000 * 10**18


def ipc_path(prefix: str) -> Path:
    # Unix socket paths are short (108 bytes): not under a test's deep tmp dir.
    return Path(tempfile.gettempdir()) / f"mesh-chain-{prefix}.ipc"


class MeshChain:
    def __init__(self, workdir: Path, prefix: str, netns: str | None = None) -> None:
        self.workdir = workdir
        self.ipc = ipc_path(prefix)
        self.ipc.unlink(missing_ok=True)
        # Blocks every second, as on a real chain: time on chain moves on, so a
        # close window ends without someone having to send a transaction.
        self.anvil = Anvil(log=workdir / "anvil.log", ipc=self.ipc, block_time=1, netns=netns)
        (workdir / PID_FILE).write_text(str(self.anvil.process.pid))
        self.w3 = connect(self.anvil.url)
        self.contract = deploy(self.w3, self.w3.eth.accounts[0])

    @property
    def url(self) -> str:
        return str(self.ipc)

    def fund(self, address: bytes, wei: int = ROUTER_FUNDS_WEI) -> None:
        self.w3.provider.make_request("anvil_setBalance",  # type: ignore[arg-type]
                                      [Web3.to_checksum_address(address), hex(wei)])

    def balance(self, address: bytes) -> int:
        return int(self.w3.eth.get_balance(Web3.to_checksum_address(address)))

    def stop(self) -> None:
        self.anvil.stop()
        (self.workdir / PID_FILE).unlink(missing_ok=True)
        self.ipc.unlink(missing_ok=True)


def stop_stale(workdir: Path) -> None:
    """Stop the chain an earlier, crashed run left."""
    pid_file = workdir / PID_FILE
    with contextlib.suppress(OSError, ValueError):
        pid = int(pid_file.read_text())
        if Path(f"/proc/{pid}/exe").resolve().name == "anvil":
            os.kill(pid, signal.SIGKILL)
        pid_file.unlink()
