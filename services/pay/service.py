"""pay's definition, settings, and its two loops: proofs with neighbors (send
the newest until acknowledged; validate, record, then acknowledge what
arrives) and the chain (read the contract's logs, follow prepared
transactions, prepare the ones the projection calls for)."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from dataclasses import dataclass, field
from typing import Any

from mesh.pay.v1 import pay_pb2
from web3.exceptions import ContractLogicError, Web3Exception

from services.common.config import ConfigError, NodeConfig
from services.common.identity import Identity
from services.common.logs import kv
from services.common.money import amount, money
from services.common.runtime import Outgoing, ServiceDefinition, ServiceRuntime
from services.meter.service import MeterSettings

from . import plan
from .chain import Call, Chain, connect, to_event
from .handlers import Payer, make_handlers, neighbor_by_address, summarize
from .proofs import Domain
from .receive import PaymentRefused, Taken, check
from .transport import Transport
from .wire import Ack, Proof, ProofRejected, decode, encode_ack, encode_proof

log = logging.getLogger("pay")

REJECTION_RECORD_EVERY_S = 10.0
REFUSED_RETRY_S = 5.0  # a transaction the chain refused is tried again after this
WITHDRAW_CHECK_S = 5.0
R = pay_pb2.PaymentRejectReason
WIRE_REASONS = {"oversize": R.PAYMENT_REJECT_REASON_OVERSIZED,
                "decode": R.PAYMENT_REJECT_REASON_MALFORMED,
                "field": R.PAYMENT_REJECT_REASON_MALFORMED}


@dataclass(frozen=True)
class PaySettings:
    chain_url: str = field(default="", metadata={
        "help": "the chain's JSON-RPC: http(s)://host:port, or the path of a node's IPC socket"})
    contract: str = field(default="", metadata={
        "help": "address (0x...) of the deployed MeshChannels contract"})
    deposit: int = field(default=10**17, metadata={
        "help": "wei escrowed in each channel we open, and added by each top-up"})
    top_up_below: float = field(default=0.25, metadata={
        "help": "top a channel up when less than this share of a deposit is left"})
    close_window: int = field(default=3600, metadata={
        "help": "seconds a payee has to answer our close with its newest proof"})
    gone_after: float = field(default=600.0, metadata={
        "help": "seconds a neighbor is down before its channels are closed and settled"})
    resend_seconds: float = field(default=1.0, metadata={
        "help": "an unacknowledged proof is sent again after this long"})
    chain_poll: float = field(default=1.0, metadata={
        "help": "seconds between reads of the chain"})

    def __post_init__(self) -> None:
        if not self.chain_url:
            raise ConfigError("[pay] chain_url is required (a JSON-RPC URL or an IPC path)")
        if len(self.contract) != 42 or not self.contract.startswith("0x"):
            raise ConfigError(f"[pay] contract {self.contract!r} is not a 0x address")
        if self.deposit <= 0:
            raise ConfigError("[pay] deposit must be positive")
        if not 0 <= self.top_up_below < 1:
            raise ConfigError("[pay] top_up_below is a share: 0 <= it < 1")
        if self.close_window < 1:
            raise ConfigError("[pay] close_window must be at least 1 second")

    @property
    def terms(self) -> plan.Terms:
        return plan.Terms(deposit=self.deposit, top_up_below=self.top_up_below,
                          close_window=self.close_window, gone_after=self.gone_after)


class Pay:
    """What pay's loops share: the key, the chain, the socket, and what is in
    flight ahead of the projection."""

    def __init__(self, rt: ServiceRuntime[pay_pb2.PayState], chain: Chain,
                 domain: Domain) -> None:
        self.rt = rt
        self.settings = rt.cfg.section("pay", PaySettings)
        self.chain = chain
        self.domain = domain
        self.transport = Transport()
        self.taken: dict[str, Taken] = {}
        self.sent: dict[str, tuple[int, float]] = {}
        self.prepared: dict[str, pay_pb2.TransactionPrepared] = {}
        self.rejections: dict[tuple[str, int], float] = {}
        self.refused: dict[tuple[int, str, bytes], float] = {}
        self.withdraw_checked = 0.0

    async def publish(self, out: Outgoing, event_id: str) -> None:
        """Publish, then wait until the projection has it: the next decision
        must see it (a second open or top-up would cost real money)."""
        await self.rt.wait_handled(await self.rt.publish(out, event_id=event_id))

    # -- proofs ------------------------------------------------------------------

    def send_due(self) -> None:
        now = time.monotonic()
        state = self.rt.state
        for node_id, neighbor in state.neighbors.items():
            channel = state.channels.get(neighbor.outgoing_channel)
            if not neighbor.up or channel is None or channel.nonce <= channel.acknowledged_nonce:
                continue
            key = channel.opened.channel_id.hex()
            nonce, at = self.sent.get(key, (0, 0.0))
            if nonce == channel.nonce and now - at < self.settings.resend_seconds:
                continue
            datagram = encode_proof(Proof(channel.opened.channel_id, channel.nonce,
                                          amount(channel.cumulative), channel.signature))
            if self.transport.send(datagram, neighbor.tunnel_peer_address,
                                   neighbor.tunnel_interface):
                self.sent[key] = (channel.nonce, now)
                log.debug(kv("proof.sent", to=node_id, nonce=channel.nonce,
                             cumulative=amount(channel.cumulative)))

    def sender_of(self, interface: str, address: str
                  ) -> tuple[str, pay_pb2.PayState.Neighbor] | None:
        """A neighbor by its tunnel; an exit or a client of ours by its
        address inside the exit tunnel (interface "")."""
        for node_id, neighbor in self.rt.state.neighbors.items():
            if not neighbor.up:
                continue
            if interface and neighbor.tunnel_interface == interface:
                return node_id, neighbor
            if not interface and not neighbor.tunnel_interface \
                    and neighbor.tunnel_peer_address == address:
                return node_id, neighbor
        return None

    async def on_datagram(self, data: bytes, interface: str, address: str) -> None:
        sender = self.sender_of(interface, address)
        if sender is None:
            log.info(kv("proof.dropped", interface=interface or "-", source=address,
                        why="no neighbor's tunnel, exit or client"))
            return
        node_id, neighbor = sender
        try:
            message = decode(data)
        except ProofRejected as err:
            await self.reject(node_id, WIRE_REASONS[err.reason], str(err), len(data), None)
            return
        if isinstance(message, Ack):
            await self.on_ack(node_id, message)
            return
        await self.on_proof(node_id, neighbor, message, len(data))

    async def on_proof(self, node_id: str, neighbor: pay_pb2.PayState.Neighbor, proof: Proof,
                       size: int) -> None:
        key = proof.channel_id.hex()
        try:
            received = check(self.rt.state, node_id, proof, self.domain, self.taken.get(key))
        except PaymentRefused as err:
            if self.already_have(key, proof):
                self.ack(neighbor, proof)  # our acknowledgement was lost: repeat it
                return
            await self.reject(node_id, err.reason, str(err), size, proof)
            return
        self.taken[key] = Taken(proof.nonce, proof.amount)
        # In the log before the acknowledgement leaves: a crash now makes the
        # payer resend, and the resend is taken (or recognised) after restart.
        await self.rt.publish(Outgoing("received", node_id, received),
                              event_id=f"received-{key}-{proof.nonce}")
        log.info(kv("payment.received", neighbor=node_id, nonce=proof.nonce,
                    amount=amount(received.amount), cumulative=proof.amount))
        self.ack(neighbor, proof)

    def already_have(self, key: str, proof: Proof) -> bool:
        channel = self.rt.state.channels.get(key)
        taken = self.taken.get(key)
        newest = [(channel.nonce, amount(channel.cumulative))] if channel is not None else []
        newest += [(taken.nonce, taken.cumulative)] if taken is not None else []
        return (proof.nonce, proof.amount) in newest

    def ack(self, neighbor: pay_pb2.PayState.Neighbor, proof: Proof) -> None:
        self.transport.send(encode_ack(Ack(proof.channel_id, proof.nonce)),
                            neighbor.tunnel_peer_address, neighbor.tunnel_interface)

    async def on_ack(self, node_id: str, ack: Ack) -> None:
        channel = self.rt.state.channels.get(ack.channel_id.hex())
        if channel is None or channel.opened.counterparty_id != node_id \
                or ack.nonce <= channel.acknowledged_nonce or ack.nonce > channel.nonce:
            return  # late, duplicate or not about a proof of ours: nothing to learn
        await self.rt.publish(Outgoing("acknowledged", node_id, pay_pb2.PaymentAcknowledged(
            counterparty_id=node_id, channel_id=ack.channel_id, nonce=ack.nonce,
            cumulative=channel.cumulative)), event_id=f"ack-{ack.channel_id.hex()}-{ack.nonce}")

    async def reject(self, node_id: str, reason: pay_pb2.PaymentRejectReason.ValueType,
                     detail: str, size: int, proof: Proof | None) -> None:
        log.warning(kv("payment.rejected", neighbor=node_id, reason=R.Name(reason),
                       detail=detail))
        now = time.monotonic()
        if now - self.rejections.get((node_id, reason), -1e9) < REJECTION_RECORD_EVERY_S:
            return  # logged; the log of events is not flooded
        self.rejections[(node_id, reason)] = now
        event = pay_pb2.PaymentRejected(counterparty_id=node_id, reason=reason,
                                        detail=detail[:500], size_bytes=size)
        if proof is not None:
            event.channel_id, event.nonce = proof.channel_id, proof.nonce
            event.cumulative.CopyFrom(money(proof.amount))
        await self.rt.publish(Outgoing("rejected", node_id, event))

    async def proof_loop(self) -> None:
        self.transport.start()
        while True:
            self.send_due()
            try:
                data, interface, address = await asyncio.wait_for(
                    self.transport.inbox.get(), 0.05)
            except TimeoutError:
                continue
            await self.on_datagram(data, interface, address)

    # -- the chain ---------------------------------------------------------------

    async def scan(self) -> int:
        """Publish the contract's events since the last scan; the head read."""
        state = self.rt.state
        head = await asyncio.to_thread(self.chain.head)
        if head <= state.chain_block:
            return head
        logs = await asyncio.to_thread(self.chain.logs, state.chain_block + 1, head)
        for name, args, entry in logs:
            event = to_event(name, args, entry, self.chain.address, self.chain, state,
                             lambda address: neighbor_by_address(self.rt.state, address))
            if event is not None:
                log.info(kv("chain.event", kind=name, channel=event.aggregate_id[:16],
                            block=entry["blockNumber"]))
                await self.publish(event, f"log-{entry['transactionHash'].hex()}-"
                                          f"{entry['logIndex']}")
        await self.publish(Outgoing("chain_scanned", self.rt.node_id,
                                    pay_pb2.ChainScanned(block_number=head)), f"scanned-{head}")
        return head

    async def follow_transactions(self, head: int) -> None:
        pending = {**self.prepared, **self.rt.state.pending_transactions}
        for tx_hex, prepared in pending.items():
            mined = await asyncio.to_thread(self.chain.mined, prepared)
            if mined is None:
                await asyncio.to_thread(self.chain.broadcast, prepared.raw_transaction)
                continue
            if mined.block_number > head:
                continue  # its logs are not read yet: wait, or we would act twice
            if not mined.succeeded:
                log.warning(kv("tx.failed", kind=pay_pb2.TransactionKind.Name(mined.kind),
                               neighbor=mined.counterparty_id, tx=tx_hex[:16]))
            await self.publish(Outgoing("tx_mined", mined.counterparty_id or self.rt.node_id,
                                        mined), f"mined-{tx_hex}")
            self.prepared.pop(tx_hex, None)

    async def transact(self) -> None:
        state = self.rt.state
        pending = {**self.prepared, **state.pending_transactions}
        busy = {(tx.kind, tx.counterparty_id, tx.channel_id) for tx in pending.values()}
        wanted = plan.wanted(state, self.settings.terms, time.time())
        if time.monotonic() - self.withdraw_checked >= WITHDRAW_CHECK_S:
            # Settlements and claims credit us in the contract: pull it out.
            self.withdraw_checked = time.monotonic()
            if await asyncio.to_thread(self.chain.withdrawable) > 0:
                wanted.append(plan.withdraw(self.rt.node_id))
        for want in wanted:
            if want.key in busy or time.monotonic() - self.refused.get(want.key, -1e9) \
                    < REFUSED_RETRY_S:
                continue
            prepared = await self.submit(want, pending)
            if prepared is not None:
                pending[prepared.tx_hash.hex()] = prepared

    async def submit(self, want: plan.Wanted, pending: dict[str, pay_pb2.TransactionPrepared]
                     ) -> pay_pb2.TransactionPrepared | None:
        nonce = await asyncio.to_thread(
            self.chain.account_nonce, iter(tx.account_nonce for tx in pending.values()))
        try:
            prepared = await asyncio.to_thread(
                self.chain.prepare, Call(want.kind, want.function, want.args, want.value),
                want.counterparty, want.channel_id, nonce)
        except (ContractLogicError, Web3Exception, ValueError) as err:
            # e.g. a window that ends with the next block: tried again later
            self.refused[want.key] = time.monotonic()
            log.warning(kv("tx.refused", kind=pay_pb2.TransactionKind.Name(want.kind),
                           neighbor=want.counterparty, error=_reason(err)))
            return None
        self.refused.pop(want.key, None)
        tx_hex = prepared.tx_hash.hex()
        # Recorded before it is broadcast: after a crash the same bytes go out.
        await self.publish(Outgoing("tx_prepared", want.counterparty, prepared), f"tx-{tx_hex}")
        self.prepared[tx_hex] = prepared
        log.info(kv("tx.sent", kind=pay_pb2.TransactionKind.Name(want.kind),
                    neighbor=want.counterparty, value=want.value, nonce=nonce))
        await asyncio.to_thread(self.chain.broadcast, prepared.raw_transaction)
        return prepared

    async def chain_loop(self) -> None:
        log.info(kv("chain.connected", chain_id=self.chain.chain_id,
                    contract=self.settings.contract, account="0x" + self.chain.address.hex()))
        while True:
            try:
                head = await self.scan()
                await self.follow_transactions(head)
                await self.transact()
            except (OSError, Web3Exception) as err:
                log.warning(kv("chain.unavailable", error=str(err)[:200]))
            await asyncio.sleep(self.settings.chain_poll)


def _reason(err: Exception) -> str:
    """The revert message, without the ABI-encoded data web3 appends."""
    message = err.args[0] if err.args and isinstance(err.args[0], str) else str(err)
    return message[:200]


async def proof_loop(rt: ServiceRuntime[pay_pb2.PayState]) -> None:
    await rt.context.proof_loop()


async def chain_loop(rt: ServiceRuntime[pay_pb2.PayState]) -> None:
    await rt.context.chain_loop()


SUBJECTS = ("evt.link.up.>", "evt.link.down.>", "evt.meter.debt.>", "evt.pay.>",
            "evt.exit.registered.>", "evt.exit.debt.>")


def configure(definition: ServiceDefinition[Any], cfg: NodeConfig) -> ServiceDefinition[Any]:
    """The handlers sign proofs: they need the key and the chain's domain, which
    one connection to the chain tells; the loops share that connection."""
    settings = cfg.section("pay", PaySettings)
    key = Identity.load_or_create(cfg.node.data_dir / "keys").signing_key
    chain = Chain(connect(settings.chain_url), bytes.fromhex(settings.contract[2:]), key)
    domain = Domain(chain.chain_id, chain.contract_address)
    payer = Payer(key, domain, cfg.section("meter", MeterSettings).pay_threshold)
    return dataclasses.replace(definition, handlers=make_handlers(payer),
                               context=lambda rt: Pay(rt, chain, domain))


DEFINITION: ServiceDefinition[Any] = ServiceDefinition(
    name="pay",
    state_type=pay_pb2.PayState,
    subjects=SUBJECTS,
    handlers={},
    summarize=summarize,
    tasks=(proof_loop, chain_loop),
    # configure() makes the handlers (they sign with the node's key) and the
    # context (it shares configure's connection to the chain)
)
