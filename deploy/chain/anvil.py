"""anvil, the emulated mesh's chain: a local EVM node on loopback, started and
stopped by the project. The binary comes from the npm package
@foundry-rs/anvil (deploy/install.sh) and is called directly, not through
its node wrapper (6 ms to start instead of 157 ms).
"""

from __future__ import annotations

import ctypes
import json
import signal
import socket
import subprocess
import time
import urllib.request
from pathlib import Path
from types import TracebackType

BINARY = (Path(__file__).resolve().parent
          / "node_modules/@foundry-rs/anvil-linux-amd64/bin/anvil")
HARDFORK = "cancun"  # anvil's default is newer than most chains routers will use
# anvil's well-known development mnemonic: the funded accounts are derived from it
MNEMONIC = "test test test test test test test test test test test junk"


PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    """In the child: the kernel stops anvil when whoever started it dies, even by
    kill -9, so no chain outlives a crashed test or demo."""
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


class ChainError(RuntimeError):
    """The chain could not be started or does not answer."""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def rpc(url: str, method: str, *params: object, timeout: float = 5.0) -> object:
    """One JSON-RPC call over http:// or a node's IPC socket (a path); ChainError
    with the node's message on an error."""
    body = json.dumps({"jsonrpc": "2.0", "id": 1, "method": method, "params": list(params)})
    if url.startswith(("http://", "https://")):
        request = urllib.request.Request(url, body.encode(), {"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=timeout) as response:
            answer = json.load(response)
    else:
        answer = _ipc_call(url, body.encode(), timeout)
    if "error" in answer:
        raise ChainError(f"{method}: {answer['error'].get('message', answer['error'])}")
    return answer["result"]


def _ipc_call(path: str, body: bytes, timeout: float) -> dict[str, object]:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        sock.connect(path)
        sock.sendall(body)
        received = b""
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                raise ChainError(f"{path}: the node closed the connection mid-answer")
            received += chunk
            try:
                answer: dict[str, object] = json.loads(received)
            except ValueError:
                continue  # not all of it yet
            return answer


class Anvil:
    """A running anvil; `with Anvil() as chain: chain.url`."""

    def __init__(self, port: int | None = None, accounts: int = 20, balance_eth: int = 10**6,
                 block_time: float | None = None, log: Path | None = None,
                 ipc: Path | None = None, netns: str | None = None) -> None:
        """In network namespace `netns` if given (then reached over `ipc`,
        which it needs: its loopback is the namespace's)."""
        if not BINARY.exists():
            raise ChainError(f"{BINARY} is missing: run deploy/install.sh")
        if netns is not None and ipc is None:
            raise ChainError("anvil in a network namespace needs an IPC socket to be reached")
        self.port = port or free_port()
        self.url = str(ipc) if netns is not None else f"http://127.0.0.1:{self.port}"
        argv = [*(["ip", "netns", "exec", netns] if netns is not None else []),
                str(BINARY), "--host", "127.0.0.1", "--port", str(self.port),
                "--hardfork", HARDFORK, "--accounts", str(accounts),
                "--balance", str(balance_eth), "--mnemonic", MNEMONIC, "--silent"]
        if block_time is not None:
            argv += ["--block-time", str(block_time)]
        # Also on a unix socket: reachable from every network namespace.
        self.ipc = ipc
        if ipc is not None:
            argv += ["--ipc", str(ipc)]
        self.log = log
        output = open(log, "ab") if log else subprocess.DEVNULL  # noqa: SIM115 - kept for the process's life
        self.process = subprocess.Popen(argv, stdout=output, stderr=subprocess.STDOUT,
                                        preexec_fn=_die_with_parent)
        self._wait_ready()

    def _wait_ready(self, timeout: float = 15.0) -> None:
        deadline = time.monotonic() + timeout
        while True:
            if self.process.poll() is not None:
                raise ChainError(f"anvil exited with {self.process.returncode} "
                                 f"(port {self.port}; see {self.log})")
            try:
                rpc(self.url, "eth_chainId", timeout=1.0)
                return
            except (OSError, ChainError):
                if time.monotonic() > deadline:
                    self.stop()
                    raise ChainError(f"anvil on port {self.port} did not answer "
                                     f"within {timeout:.0f}s") from None
                time.sleep(0.05)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    def __enter__(self) -> Anvil:
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 trace: TracebackType | None) -> None:
        self.stop()
