"""pay on a live mesh: channels on anvil, balance proofs through the tunnels
while traffic flows both ways, kill -9 of pay at random moments, and a close
that settles exactly the last proof on chain."""

from __future__ import annotations

import contextlib
import json
import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator

import coincurve
import pytest
from mesh.meter.v1 import meter_pb2
from mesh.pay.v1 import pay_pb2
from pyroute2 import netns
from web3 import Web3

from deploy.emulator.mesh import EmulatedMesh, MeshError, clean, service_pid
from deploy.meshctl import client
from deploy.meshctl.client import NodeError
from deploy.node import NodeLayout
from services.common.identity import Identity
from services.common.money import amount
from services.pay.contracts import load_artifact
from services.pay.proofs import Domain
from services.pay.wire import PROOF_PORT, Proof, encode_proof
from tests.conftest import require_root, wait_for
from tests.netns.test_links import (
    LINE3_PEERS,
    line3,
    ns_run,
    route_over_tunnels,
    wait_all_linked,
    wait_for_traffic,
)

pytestmark = [pytest.mark.netns, pytest.mark.emulator]

SERVICES = ("discovery", "link", "meter", "pay")
PRICE = 1_000  # wei per byte, every router, so both sides of a tunnel bill alike
METER = {"price": PRICE, "default_neighbor_price": PRICE, "sample_interval": 0.1,
         "pay_threshold": PRICE * 1_000,  # a payment per kilobyte owed
         "throttle_threshold": 10**15, "cutoff_threshold": 10**16}
PAY = {"deposit": 10**15, "close_window": 6, "gone_after": 2.0, "chain_poll": 0.3,
       "resend_seconds": 0.5}
PAYMENTS, KILLS = 1_000, 20
PORT = 9100


def pay_state(mesh: EmulatedMesh, router: str) -> pay_pb2.PayState:
    state = pay_pb2.PayState()
    client.status(mesh.routers[router].layout.socket("pay")).state.Unpack(state)
    return state


def meter_debt(mesh: EmulatedMesh, router: str, neighbor: str) -> meter_pb2.DebtChanged:
    state = meter_pb2.MeterState()
    client.status(mesh.routers[router].layout.socket("meter")).state.Unpack(state)
    return state.ledgers[neighbor].debt


def channel(state: pay_pb2.PayState, neighbor: str, outgoing: bool) -> pay_pb2.PayState.Channel:
    n = state.neighbors[neighbor]
    return state.channels[n.outgoing_channel if outgoing else n.incoming_channel]


def channels_open(mesh: EmulatedMesh) -> bool:
    for router, peers in LINE3_PEERS.items():
        state = pay_state(mesh, router)
        for peer in peers:
            n = state.neighbors.get(peer)
            if n is None or n.outgoing_channel not in state.channels \
                    or n.incoming_channel not in state.channels:
                return False
    return True


class Traffic:
    """UDP both ways between r1 and r3 through r2, paced, until stopped."""

    def __init__(self, mesh: EmulatedMesh) -> None:
        self.stop = threading.Event()
        # Sockets made here, on the main thread: making one in a namespace
        # forks, and a fork beside gRPC calls on another thread is unsafe.
        self.flows = []
        for source, target in (("r1", "r3"), ("r3", "r1")):
            address = mesh.fabric.nodes[target].ipv6
            sink = netns.create_socket(mesh.fabric.netns(target), socket.AF_INET6,
                                       socket.SOCK_DGRAM, 0, flags=0)
            sink.bind((address, PORT))
            sock = netns.create_socket(mesh.fabric.netns(source), socket.AF_INET6,
                                       socket.SOCK_DGRAM, 0, flags=0)
            self.flows.append((sock, sink, address))
        self.threads = [threading.Thread(target=self.run, args=(sock, address), daemon=True)
                        for sock, _, address in self.flows]

    def run(self, sock: socket.socket, address: str) -> None:
        while not self.stop.is_set():
            for _ in range(20):
                with contextlib.suppress(OSError):  # a restarting tunnel: send on
                    sock.sendto(b"p" * 1000, (address, PORT))
            time.sleep(0.01)  # ~2 MB/s each way

    def __enter__(self) -> Traffic:
        for thread in self.threads:
            thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join(timeout=10)
        for sock, sink, _ in self.flows:
            sock.close()
            sink.close()


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmulatedMesh]:
    """One mesh for the module: the rejection test leaves it as it was, the
    kill test (last) cuts r1 off in the end."""
    require_root()
    prefix = f"py{os.getpid() % 10000}"
    tmp_path = tmp_path_factory.mktemp("pay")
    emulated = EmulatedMesh(line3(), prefix=prefix, root=tmp_path, services=SERVICES,
                            sections={"meter": METER, "pay": PAY})
    try:
        emulated.start()
        wait_all_linked(emulated)
        route_over_tunnels(emulated)
        wait_for_traffic(emulated)
        wait_for("a channel each way on every link", lambda: channels_open(emulated),
                 timeout=60)
        yield emulated
    finally:
        emulated.stop()
        clean(prefix, tmp_path)


def payments(mesh: EmulatedMesh) -> int:
    """Proofs r1 and r2 have signed to each other (0 while one's pay restarts)."""
    try:
        return (channel(pay_state(mesh, "r1"), "r2", outgoing=True).nonce
                + channel(pay_state(mesh, "r2"), "r1", outgoing=True).nonce)
    except NodeError:
        return 0


def agreed(mesh: EmulatedMesh, payer: str, payee: str) -> bool:
    try:
        sent = channel(pay_state(mesh, payer), payee, outgoing=True)
        taken = channel(pay_state(mesh, payee), payer, outgoing=False)
    except NodeError:
        return False
    return (sent.nonce == sent.acknowledged_nonce == taken.nonce
            and sent.cumulative == taken.cumulative)


def running_pid(layout: NodeLayout) -> int | None:
    try:
        return service_pid(layout, "pay")
    except MeshError:
        return None  # between a kill and supervisord's restart


def settled_up(mesh: EmulatedMesh, payer: str, payee: str) -> bool:
    """The payer's newest proof is acknowledged and taken, and the meters on both
    sides credit exactly its amount: nothing lost, nothing counted twice."""
    try:
        if not agreed(mesh, payer, payee):
            return False
        cumulative = channel(pay_state(mesh, payer), payee, outgoing=True).cumulative
        return (meter_debt(mesh, payer, payee).payments_sent
                == meter_debt(mesh, payee, payer).payments_received == cumulative)
    except NodeError:
        return False


def test_bad_proofs_from_a_neighbor_are_rejected_logged_and_not_credited(
    mesh: EmulatedMesh,
) -> None:
    """r1's own key signs what its pay never would; a stranger's key forges."""
    r1_key = Identity.load_or_create(mesh.routers["r1"].layout.data_dir / "keys").signing_key
    with Traffic(mesh):  # until r1 has paid r2 twice, so an older proof exists
        wait_for("r1's second payment", lambda: agreed(mesh, "r1", "r2") and channel(
            pay_state(mesh, "r2"), "r1", outgoing=False).nonce >= 2, timeout=60)
    wait_for("r1 and r2 to agree", lambda: agreed(mesh, "r1", "r2"), timeout=30)
    r1 = pay_state(mesh, "r1").neighbors["r2"]
    theirs = pay_state(mesh, "r2")
    incoming = theirs.channels[theirs.neighbors["r1"].incoming_channel]
    channel_id, nonce = incoming.opened.channel_id, incoming.nonce
    cumulative, deposit = amount(incoming.cumulative), amount(incoming.deposit)
    domain = Domain(31337, bytes.fromhex(mesh.chain.contract[2:]))  # type: ignore[union-attr]
    forger = coincurve.PrivateKey(os.urandom(32))

    def proof(n: int, value: int, key: coincurve.PrivateKey = r1_key) -> bytes:
        return encode_proof(Proof(channel_id, n, value, domain.sign(key, channel_id, n, value)))

    # Far from the real proofs, which may go on for a while (meters catch up):
    # each is refused for its own reason whatever r1 pays meanwhile.
    ahead = nonce + 10**6
    bad = {
        "WRONG_SIGNER": proof(ahead, deposit - 1, forger),
        "STALE_NONCE": proof(1, deposit - 1),
        "AMOUNT_DECREASED": proof(ahead, 1),
        "EXCEEDS_DEPOSIT": proof(ahead, deposit + 1),
        "OVERSIZED": b"\x01" + os.urandom(400),
        "MALFORMED": b"\x01" + os.urandom(40),
    }
    credited = amount(meter_debt(mesh, "r2", "r1").payments_received)
    index = int(ns_run(mesh, "r1", "cat", f"/sys/class/net/{r1.tunnel_interface}/ifindex"))
    sock = netns.create_socket(mesh.fabric.netns("r1"), socket.AF_INET6, socket.SOCK_DGRAM, 0,
                               flags=0)
    with sock:
        for datagram in bad.values():
            sock.sendto(datagram, (r1.tunnel_peer_address, PROOF_PORT, 0, index))
    log = mesh.routers["r2"].layout.log_dir / "pay.log"

    def logged() -> set[str]:
        return {reason for reason in bad
                if f"reason=PAYMENT_REJECT_REASON_{reason}" in log.read_text()}

    wait_for("every bad proof rejected in r2's log", lambda: logged() == set(bad), timeout=30)
    # what an operator sees: r2's four channels, r1's payments to it among them
    env = {**os.environ, "MESH_EMU_PREFIX": mesh.prefix, "MESH_EMU_ROOT": str(mesh.workdir.parent)}
    shown = subprocess.run([sys.executable, "-m", "deploy.meshctl", "-n", "r2", "channels",
                            "--json"], env=env, capture_output=True, text=True, check=True)
    rows = {(row["neighbor"], row["direction"]): row for row in json.loads(shown.stdout)}
    assert set(rows) == {(n, d) for n in ("r1", "r3") for d in ("we pay", "pays us")}
    assert rows[("r1", "pays us")]["nonce"] >= 2 and rows[("r1", "pays us")]["status"] == "open"
    assert "neighbor=r1" in log.read_text()
    # nothing was taken from them: r2 holds r1's real proofs only, and its meter
    # credits exactly those (r1's own ledger agrees)
    wait_for("r1 and r2 to settle up", lambda: settled_up(mesh, "r1", "r2"), timeout=60)
    after = pay_state(mesh, "r2").channels[channel_id.hex()]
    assert cumulative <= amount(after.cumulative) < deposit - 1
    assert amount(meter_debt(mesh, "r2", "r1").payments_received) >= credited


def test_payments_survive_kill_9_and_settle_exactly_the_last_proof(
    mesh: EmulatedMesh, capsys: pytest.CaptureFixture[str]
) -> None:
    rng = random.Random(os.getpid())
    started = time.monotonic()
    with Traffic(mesh):
        for _ in range(KILLS):
            time.sleep(rng.uniform(0.5, 2.5))
            layout = mesh.routers[rng.choice(("r1", "r2"))].layout
            os.kill(wait_for("pay running", lambda lay=layout: running_pid(lay)), signal.SIGKILL)
        wait_for(f"{PAYMENTS} payments between r1 and r2",
                 lambda: payments(mesh) >= PAYMENTS, timeout=300)
    elapsed = time.monotonic() - started
    # Meters catch up with the last traffic, pay settles the last debts; then
    # both channel ends and both meters hold one and the same amount.
    for payer, payee in (("r1", "r2"), ("r2", "r1"), ("r2", "r3"), ("r3", "r2")):
        wait_for(f"{payer} and {payee} to agree", lambda p=payer, q=payee: settled_up(mesh, p, q),
                 timeout=90)
    with capsys.disabled():
        print(f"\n  {payments(mesh)} payments r1<->r2 in {elapsed:.0f}s with {KILLS} kill -9")
    # What an operator sees (`meshctl payments`) is what the channels hold.
    # Payments go on (Babel's Hellos are metered traffic too), so the row and
    # the channels are compared as read between two payments.
    def operator_sees_the_channels() -> bool:
        rows = {r["neighbor"]: r for r in client.payment_rows(
            client.Node.open(mesh.routers["r2"].layout.root))}
        state = pay_state(mesh, "r2")
        to_r1 = channel(state, "r1", outgoing=True)
        from_r1 = channel(state, "r1", outgoing=False)
        return (rows["r1"]["paid_wei"], rows["r1"]["received_wei"],
                rows["r1"]["proofs_received"]) == (
            amount(to_r1.cumulative), amount(from_r1.cumulative), from_r1.nonce)

    wait_for("meshctl payments to show what r2's channels with r1 hold",
             operator_sees_the_channels, timeout=30)

    # r1 leaves for good: r2, the payee of r1's channel, claims the newest proof
    # it holds and closes; the chain pays exactly that.
    channel_id = channel(pay_state(mesh, "r2"), "r1", outgoing=False).opened.channel_id
    ns_run(mesh, "r1", "ip", "link", "set", "v-r2", "down")
    chain = mesh.chain
    assert chain is not None
    abi, _ = load_artifact()
    contract = chain.w3.eth.contract(address=Web3.to_checksum_address(chain.contract), abi=abi)
    names = [o["name"] for o in next(e for e in abi if e.get("name") == "channels")
             ["outputs"][0]["components"]]

    def on_chain() -> dict[str, object]:
        return dict(zip(names, contract.functions.channels(channel_id).call(), strict=True))

    wait_for("r1's channel to r2 settled", lambda: on_chain()["settled"], timeout=60)
    last = pay_state(mesh, "r2").channels[channel_id.hex()]
    settled = on_chain()
    assert (settled["claimed"], settled["nonce"]) == (amount(last.cumulative), last.nonce)
    # r1 may have signed a proof the cut kept from r2: the chain refunded it,
    # and r1's books follow the chain
    sent = pay_state(mesh, "r1").channels[channel_id.hex()]
    assert amount(sent.cumulative) >= settled["claimed"]
    wait_for("r1's ledger to count what the chain paid", lambda: amount(
        meter_debt(mesh, "r1", "r2").payments_sent) == settled["claimed"], timeout=60)
