"""`meshctl contract deploy` puts the channel contract on a real EVM node
(anvil) from a router's own identity, as an operator does on a public chain,
and says clearly why when it cannot."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from web3 import Web3

from deploy.chain.anvil import Anvil
from services.common.identity import Identity
from services.pay.chain import Chain, connect

REPO = Path(__file__).resolve().parents[2]


def meshctl(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "deploy.meshctl", *argv], cwd=REPO,
                          capture_output=True, text=True, timeout=120)


@pytest.fixture
def node(tmp_path: Path) -> Path:
    root = tmp_path / "node"
    subprocess.run([sys.executable, "-m", "deploy.node", "init", str(root), "--id", "r1"],
                   cwd=REPO, check=True, capture_output=True)
    return root


def test_a_router_deploys_the_contract_it_then_pays_through(node: Path) -> None:
    with Anvil() as anvil:
        identity = Identity.load_or_create(node / "data" / "keys")
        sender = Web3.to_checksum_address(identity.chain_address)
        poor = meshctl("-n", str(node), "contract", "deploy", "--chain-url", anvil.url)
        assert poor.returncode == 2
        assert f"meshctl: {sender} holds 0 wei" in poor.stderr and "fund it" in poor.stderr

        w3 = connect(anvil.url)
        w3.provider.make_request("anvil_setBalance",  # type: ignore[arg-type]
                                 [sender, hex(10**18)])
        done = meshctl("-n", str(node), "contract", "deploy", "--chain-url", anvil.url, "--json")
        assert done.returncode == 0, done.stderr
        doc = json.loads(done.stdout)
        assert doc["deployer"].lower() == sender.lower() and doc["chain_id"] == 31337
        assert len(w3.eth.get_code(doc["contract"])) > 0
        # pay's own client works against it: nothing credited to us yet.
        chain = Chain(w3, bytes.fromhex(doc["contract"][2:]), identity.signing_key)
        assert chain.withdrawable() == 0
        assert int(w3.eth.get_balance(sender)) < 10**18  # the router paid the gas

        plain = meshctl("-n", str(node), "contract", "deploy", "--chain-url", anvil.url)
        assert plain.returncode == 0, plain.stderr
        assert f'[pay]\nchain_url = "{anvil.url}"\ncontract = "0x' in plain.stdout


def test_no_chain_at_the_url_is_said_plainly(node: Path) -> None:
    missing = meshctl("-n", str(node), "contract", "deploy")
    assert missing.returncode == 2
    assert "no chain: give --chain-url, or set [pay] chain_url" in missing.stderr
    unreachable = meshctl("-n", str(node), "contract", "deploy",
                          "--chain-url", "http://127.0.0.1:9")
    assert unreachable.returncode == 2
    assert "cannot reach a chain at http://127.0.0.1:9" in unreachable.stderr
