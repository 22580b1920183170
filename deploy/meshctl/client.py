"""Clients meshctl (and tests) use: gRPC inspection over unix sockets, the bus."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import grpc
from google.protobuf import json_format, symbol_database
from google.protobuf.message import Message
from grpc_health.v1 import health_pb2, health_pb2_grpc
from mesh.common.v1 import envelope_pb2, inspect_pb2, inspect_pb2_grpc
from nats.aio.msg import Msg
from nats.errors import TimeoutError as NatsTimeout
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

from services.common import config as config_mod
from services.common.bus import STREAM, Bus
from services.common.envelope import EVENT_TYPE_HEADER, TYPE_URL_PREFIX

from ..node import NodeLayout

RPC_TIMEOUT = 5.0


class NodeError(RuntimeError):
    """The node cannot be reached or named; the message says why."""


@dataclass(frozen=True)
class Node:
    layout: NodeLayout
    config: config_mod.NodeConfig

    @classmethod
    def open(cls, root: Path) -> Node:
        layout = NodeLayout(root)
        if not layout.node_file.exists():
            raise NodeError(f"{root} is not a node directory (no node.toml)")
        cfg = config_mod.load(layout.node_file, env={})
        return cls(layout, cfg)

    @property
    def services(self) -> tuple[str, ...]:
        return self.config.node.services

    def socket(self, service: str) -> Path:
        return self.config.node.socket_path(service)


def channel(socket: Path) -> grpc.Channel:
    if not socket.exists():
        raise NodeError(f"no inspection socket at {socket}: is the service running?")
    return grpc.insecure_channel(f"unix:{socket}")


def status(socket: Path) -> inspect_pb2.StatusResponse:
    with channel(socket) as ch:
        try:
            return inspect_pb2_grpc.InspectStub(ch).Status(
                inspect_pb2.StatusRequest(), timeout=RPC_TIMEOUT
            )
        except grpc.RpcError as err:
            raise NodeError(f"{socket}: {err.code().name}: {err.details()}") from None


def health(socket: Path) -> str:
    """SERVING, NOT_SERVING, or UNREACHABLE when nothing answers on the socket."""
    try:
        with channel(socket) as ch:
            answer = health_pb2_grpc.HealthStub(ch).Check(
                health_pb2.HealthCheckRequest(), timeout=2.0
            )
    except (NodeError, grpc.RpcError):
        return "UNREACHABLE"
    return health_pb2.HealthCheckResponse.ServingStatus.Name(answer.status)


def unpack_any(packed: object) -> Message | None:
    """Decode an Any with whichever generated schema names its type."""
    type_name = packed.type_url.removeprefix(TYPE_URL_PREFIX)  # type: ignore[attr-defined]
    try:
        cls = symbol_database.Default().GetSymbol(type_name)
    except KeyError:
        return None
    message = cls()
    packed.Unpack(message)  # type: ignore[attr-defined]
    return message


def import_all_schemas() -> None:
    """Register every generated schema so events of any service can be printed."""
    import importlib
    import pkgutil

    import mesh

    for info in pkgutil.walk_packages(mesh.__path__, "mesh."):
        if info.name.endswith("_pb2"):
            importlib.import_module(info.name)


def event_as_dict(msg: Msg) -> dict[str, object]:
    envelope = envelope_pb2.Envelope()
    row: dict[str, object] = {
        "sequence": msg.metadata.sequence.stream,
        "subject": msg.subject,
        "type": (msg.headers or {}).get(EVENT_TYPE_HEADER, ""),
    }
    try:
        envelope.ParseFromString(msg.data)
    except Exception as err:  # malformed events are shown, not fatal
        row["error"] = f"undecodable envelope: {err}"
        return row
    row.update(
        event_id=envelope.event_id, source=envelope.source, aggregate_id=envelope.aggregate_id,
        occurred_at=envelope.occurred_at.ToJsonString() if envelope.HasField("occurred_at") else "",
    )
    payload = unpack_any(envelope.payload)
    row["payload"] = (
        json_format.MessageToDict(payload) if payload is not None else {"undecoded": True}
    )
    return row


async def follow_events(
    nats_url: str, subjects: Sequence[str], follow: bool, last: int
) -> AsyncIterator[Msg]:
    """Stored events on subjects (the last `last` of them, or all), then new ones if follow."""
    bus = await Bus.connect(nats_url, "meshctl", connect_timeout=5.0)
    try:
        info = await bus.js.stream_info(STREAM)
        start = max(1, info.state.last_seq - last + 1) if last else 1
        config = ConsumerConfig(
            filter_subjects=list(subjects), ack_policy=AckPolicy.NONE,
            deliver_policy=DeliverPolicy.BY_START_SEQUENCE, opt_start_seq=start,
            inactive_threshold=10.0, mem_storage=True,
        )
        consumer = await bus.js.add_consumer(STREAM, config)
        sub = await bus.js.pull_subscribe_bind(consumer=consumer.name, stream=STREAM)
        pending = consumer.num_pending
        while follow or pending > 0:
            try:
                msgs = await sub.fetch(256, timeout=1.0)
            except (TimeoutError, NatsTimeout):
                if not follow:
                    return
                continue
            for msg in msgs:
                pending = msg.metadata.num_pending
                yield msg
    finally:
        await bus.close()


def enter_netns(name: str) -> None:
    """Join a node's network namespace so its loopback nats-server is reachable."""
    if not name:
        return
    target = Path("/var/run/netns") / name
    if not target.exists():
        raise NodeError(f"network namespace {name} does not exist: is the mesh up?")
    if os.stat(target).st_ino == os.stat("/proc/self/ns/net").st_ino:
        return
    from pyroute2 import netns

    netns.setns(name)


def neighbor_rows(node: Node) -> list[dict[str, object]]:
    """Who the node hears and its link to each, from link's projection."""
    from mesh.link.v1 import link_pb2

    state = link_pb2.LinkState()
    status(node.socket("link")).state.Unpack(state)
    ledgers = meter_ledgers(node)
    rows = []
    for name in sorted(set(state.neighbors) | set(state.links)):
        seen = state.neighbors.get(name)
        link = state.links.get(name)
        state_name = link_pb2.LinkStatus.Name(link.status).removeprefix("LINK_STATUS_").lower() \
            if link is not None else "none"
        rows.append({
            "neighbor": name,
            "heard_on": seen.interface_name if seen is not None else "-",
            "address": seen.link_local_address if seen is not None else "-",
            "link": state_name,
            "tunnel": link.up.tunnel_interface if link is not None else "-",
            "ports": f"{link.up.listen_port}->{link.up.endpoint_port}" if link else "-",
            "downs": link.downs if link is not None else 0,
            **ledgers.get(name, {}),
            "chain_address": "0x" + (link.up.chain_address if link else seen.chain_address).hex()
            if (link or seen) else "-",
        })
    return rows


def meter_ledgers(node: Node) -> dict[str, dict[str, object]]:
    """Usage, debt and enforcement per neighbor, if the node runs meter."""
    if "meter" not in node.services or health(node.socket("meter")) != "SERVING":
        return {}
    from mesh.meter.v1 import meter_pb2

    from services.common.money import amount
    from services.meter.ledger import balance

    state = meter_pb2.MeterState()
    status(node.socket("meter")).state.Unpack(state)
    return {
        name: {
            "rx_bytes": ledger.rx_bytes,
            "tx_bytes": ledger.tx_bytes,
            "balance_wei": balance(ledger.debt),
            "enforcement": meter_pb2.Enforcement.Name(ledger.enforcement)
            .removeprefix("ENFORCEMENT_").lower(),
            "charged_wei": amount(ledger.debt.usage_charged),
        }
        for name, ledger in state.ledgers.items()
    }


def channel_rows(node: Node) -> list[dict[str, object]]:
    """Each payment channel of the node, from pay's projection."""
    from mesh.pay.v1 import pay_pb2

    from services.common.money import amount

    state = pay_pb2.PayState()
    status(node.socket("pay")).state.Unpack(state)
    rows = []
    for channel_hex, channel in sorted(state.channels.items(),
                                       key=lambda item: item[1].opened.block_number):
        outgoing = channel.opened.direction == pay_pb2.CHANNEL_DIRECTION_OUTGOING
        rows.append({
            "neighbor": channel.opened.counterparty_id or "-",
            "direction": "we pay" if outgoing else "pays us",
            "status": pay_pb2.ChannelStatus.Name(channel.status)
            .removeprefix("CHANNEL_STATUS_").lower(),
            "deposit_wei": amount(channel.deposit),
            "cumulative_wei": amount(channel.cumulative),
            "left_wei": amount(channel.deposit) - amount(channel.cumulative),
            "nonce": channel.nonce,
            "acknowledged": channel.acknowledged_nonce if outgoing else "-",
            "claimed_wei": amount(channel.claimed),
            "channel": channel_hex[:16],
        })
    return rows


def link_rows(node: Node) -> list[dict[str, str]]:
    """The node's links that are up: neighbor, tunnel, the neighbor's address in it."""
    from mesh.link.v1 import link_pb2

    state = link_pb2.LinkState()
    status(node.socket("link")).state.Unpack(state)
    return [{"neighbor": name, "tunnel": link.up.tunnel_interface,
             "peer_address": link.up.tunnel_peer_address}
            for name, link in sorted(state.links.items())
            if link.status == link_pb2.LINK_STATUS_UP]


def route_rows(node: Node) -> list[dict[str, object]]:
    """The selected route to each prefix, from route's projection."""
    from mesh.route.v1 import route_pb2

    from services.common.money import amount

    state = route_pb2.RouteState()
    status(node.socket("route")).state.Unpack(state)
    return [{
        "prefix": prefix,
        "via": route.next_hop_id,
        "metric": route.metric,
        "advertised_metric": route.advertised_metric,
        "penalty": route.penalty,
        "path_price": amount(route.path_price) if route.HasField("path_price") else 0,
        "our_price": amount(route.advertised_price) if route.HasField("advertised_price") else 0,
        "priced": "default" if route.price_defaulted else "advertised",
        "tunnel": route.tunnel_interface,
    } for prefix, route in sorted(state.routes.items())]


def exit_rows(node: Node) -> list[dict[str, object]]:
    """exit's view, a row per peer whatever the role: a client's exits (the
    one in use marked), an exit's clients."""
    from mesh.exit.v1 import exit_pb2

    from services.common.money import amount

    state = exit_pb2.ExitState()
    status(node.socket("exit")).state.Unpack(state)
    def billed(record: exit_pb2.ExitState.Exit | exit_pb2.ExitState.Client
               ) -> dict[str, object]:
        """What either side metered and billed on the tunnel, at the exit's prices."""
        registration = record.registration
        return {"bytes_up": record.bytes_up, "bytes_down": record.bytes_down,
                "owed_wei": amount(record.balance.usage_charged),
                "paid_wei": amount(record.balance.payments),
                "price_up": amount(registration.price_up),
                "price_down": amount(registration.price_down)}

    rows: list[dict[str, object]] = []
    for exit_id, known in sorted(state.exits.items()):
        registration = known.registration
        rows.append({
            "role": "client", "peer": exit_id,
            "state": ("in use" if exit_id == state.selected_exit_id else "standby")
            + (", tunnel up" if known.tunnel_up else ""),
            "addresses": ",".join(registration.client_addresses) or "-",
            "metric": known.route.metric if known.HasField("route") else "-",
            **billed(known),
        })
    for client_id, admitted in sorted(state.clients.items()):
        rows.append({
            "role": "exit", "peer": client_id,
            "state": ("cut off" if admitted.access == exit_pb2.CLIENT_ACCESS_BLOCKED
                      else "throttled" if admitted.access == exit_pb2.CLIENT_ACCESS_THROTTLED
                      else "tunnel up" if admitted.tunnel_up else "registered"),
            "addresses": ",".join(admitted.registration.client_addresses), "metric": "-",
            **billed(admitted),
        })
    return rows


def babel_status(node: Node) -> Message:
    """route's Babel speaker: neighbors with link costs, packet counters."""
    from mesh.route.v1 import control_pb2, control_pb2_grpc

    with channel(node.socket("route")) as ch:
        return control_pb2_grpc.RouteControlStub(ch).GetBabel(
            control_pb2.GetBabelRequest(), timeout=RPC_TIMEOUT)


def set_tradeoff(node: Node, permille: int) -> int:
    from mesh.route.v1 import control_pb2, control_pb2_grpc

    with channel(node.socket("route")) as ch:
        try:
            return control_pb2_grpc.RouteControlStub(ch).SetTradeoff(
                control_pb2.SetTradeoffRequest(price_weight_permille=permille),
                timeout=RPC_TIMEOUT).price_weight_permille
        except grpc.RpcError as err:
            raise NodeError(f"route refused: {err.details()}") from None


def payment_rows(node: Node) -> list[dict[str, object]]:
    """Per neighbor: what we should have paid it, what we paid (proofs sent and
    acknowledged) and what it paid us, from pay's projection."""
    from mesh.pay.v1 import pay_pb2

    from services.common.money import amount

    state = pay_pb2.PayState()
    status(node.socket("pay")).state.Unpack(state)
    rows = []
    for name, neighbor in sorted(state.neighbors.items()):
        outgoing = state.channels.get(neighbor.outgoing_channel)
        incoming = state.channels.get(neighbor.incoming_channel)
        target, paid = amount(neighbor.pay_target), amount(neighbor.paid)
        rows.append({
            "neighbor": name,
            "owed_wei": target,
            "paid_wei": paid,
            "unpaid_wei": max(0, target - paid),
            "proofs_sent": outgoing.nonce if outgoing else 0,
            "acknowledged": outgoing.acknowledged_nonce if outgoing else 0,
            "received_wei": amount(incoming.cumulative) if incoming else 0,
            "proofs_received": incoming.nonce if incoming else 0,
        })
    return rows
