"""meshctl: inspect and drive a mesh router from the command line.

    meshctl status [SERVICE]          health and projection of each service
    meshctl identity                  public keys and chain address
    meshctl neighbors                 neighbors heard, link state, tunnel, usage, debt
    meshctl price [N|auto]            the router's price per byte, or set it
    meshctl payments                  per neighbor: owed, paid, received, proofs
    meshctl routes                    selected routes: next hop, metric, price
    meshctl route tradeoff [0..1000]  how much price weighs against quality
    meshctl route babel               Babel neighbors, link costs, malformed counters
    meshctl exits                     exits in use (client), clients (exit): bills, payments
                                      (also `meshctl exit`)
    meshctl events [--follow]         the node's event log, decoded
    meshctl upgrade SERVICE PACKAGE   a new release of one service, restarting only it
    meshctl contract deploy           put the channel contract on a chain (a real one too)
    meshctl inject ping --count N     test traffic for sharp (the chassis' probe)
    meshctl emu up|down|status|clean  the emulated mesh (network namespaces)
    meshctl demo                      bring up the emulated mesh and watch it

A node is a directory written by `python -m deploy.node init` (default
/var/lib/mesh) or, with a mesh emulated on this machine, a router's name.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from google.protobuf import json_format

from services.common.config import ConfigError

from . import client, emu
from .client import Node, NodeError
from .tables import table

DEFAULT_NODE = Path(os.environ.get("MESH_NODE", "/var/lib/mesh"))


def resolve_node(spec: str) -> Node:
    path = Path(spec)
    if path.is_dir():
        return Node.open(path)
    if "/" not in spec:
        emulated = emu.node_dir(emu.current_prefix(), spec)
        if emulated.is_dir():
            return Node.open(emulated)
    raise NodeError(
        f"{spec}: no node directory there, and no router of that name in a running emulated mesh"
    )


def _plain(value: object) -> object:
    """Struct numbers are doubles: show whole ones without the .0."""
    return int(value) if isinstance(value, float) and value.is_integer() else value


def cmd_status(args: argparse.Namespace) -> int:
    node = resolve_node(args.node)
    services = [args.service] if args.service else list(node.services)
    unknown = sorted(set(services) - set(node.services))
    if unknown:
        raise NodeError(f"{', '.join(unknown)}: not a service of node {node.config.node.id} "
                        f"(it runs {', '.join(node.services)})")
    rows, docs = [], []
    for service in services:
        socket = node.socket(service)
        state = client.health(socket)
        if state == "UNREACHABLE":
            rows.append([service, state, "-", "-", "-", "-", ""])
            docs.append({"service": service, "health": state})
            continue
        answer = client.status(socket)
        summary = json_format.MessageToDict(answer.summary)
        rows.append([
            service, state, answer.last_sequence, answer.events_handled,
            answer.events_rejected, answer.events_published,
            " ".join(f"{k}={_plain(v)}" for k, v in summary.items()),
        ])
        doc = json_format.MessageToDict(answer, preserving_proto_field_name=True)
        doc["health"] = state
        decoded = client.unpack_any(answer.state)
        if decoded is not None:
            doc["state"] = json_format.MessageToDict(decoded, preserving_proto_field_name=True)
        docs.append(doc)
    if args.json:
        print(json.dumps(docs, indent=2))
    else:
        print(f"node {node.config.node.id} ({node.layout.root})")
        print(table(["service", "health", "seq", "handled", "rejected", "published", "summary"],
                    rows))
    return 0 if all(r[1] == "SERVING" for r in rows) else 1


def cmd_events(args: argparse.Namespace) -> int:
    node = resolve_node(args.node)
    client.enter_netns(node.config.node.netns)

    async def run() -> None:
        async for msg in client.follow_events(
            node.config.node.nats_url, args.subject, args.follow, args.last
        ):
            row = client.event_as_dict(msg)
            if args.json:
                print(json.dumps(row), flush=True)
            else:
                payload = json.dumps(row.get("payload", row.get("error")), separators=(",", ":"))
                print(f"{row['sequence']:>8} {row['subject']:<40} {row['type']} {payload}",
                      flush=True)

    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(run())
    return 0


def cmd_inject(args: argparse.Namespace) -> int:
    from mesh.sharp.v1 import sharp_pb2

    from services.common.bus import Bus

    node = resolve_node(args.node)
    client.enter_netns(node.config.node.netns)

    async def run() -> None:
        bus = await Bus.connect(node.config.node.nats_url, "meshctl", connect_timeout=5.0)
        seq = 0
        try:
            while args.count == 0 or seq < args.count:
                seq += 1
                await bus.publish_event(
                    sharp_pb2.PingSent(sequence=seq, value=seq, origin=args.origin),
                    service="sharp", kind="ping", aggregate_id=args.origin,
                    node_id=node.config.node.id, version=seq, source="meshctl",
                )
                if args.rate:
                    await asyncio.sleep(1.0 / args.rate)
        finally:
            await bus.close()
            print(f"published {seq} pings from {args.origin}")

    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(run())
    return 0


def cmd_identity(args: argparse.Namespace) -> int:
    import base64

    from services.common.identity import Identity, IdentityError

    node = resolve_node(args.node)
    keys = node.config.node.data_dir / "keys"
    if not (keys / "identity.key").exists():
        raise NodeError(f"{keys}: no keys yet (they are made when discovery or link first runs)")
    try:
        identity = Identity.load_or_create(keys)
    except IdentityError as err:
        raise NodeError(str(err)) from None
    doc = {
        "node_id": node.config.node.id,
        "identity_key": identity.identity_key.hex(),
        "chain_address": "0x" + identity.chain_address.hex(),
        "wireguard_key": base64.b64encode(identity.wireguard_public).decode(),
    }
    if args.json:
        print(json.dumps(doc, indent=2))
    else:
        print("\n".join(f"{key:<14} {value}" for key, value in doc.items()))
    return 0


def cmd_contract_deploy(args: argparse.Namespace) -> int:
    from web3.exceptions import TimeExhausted

    from services.common.identity import Identity, IdentityError
    from services.pay.chain import connect
    from services.pay.contracts import DeployError, deploy_signed

    node = resolve_node(args.node)
    url = args.chain_url or node.config.sections.get("pay", {}).get("chain_url", "")
    if not url:
        raise NodeError("no chain: give --chain-url, or set [pay] chain_url in node.toml")
    try:
        identity = Identity.load_or_create(node.config.node.data_dir / "keys")
    except IdentityError as err:
        raise NodeError(str(err)) from None
    w3 = connect(url)
    try:
        chain_id = int(w3.eth.chain_id)
    except Exception as err:  # any transport's failure: the URL is what is wrong
        raise NodeError(f"cannot reach a chain at {url}: {err}") from None
    print(f"deploying MeshChannels on chain {chain_id} from 0x{identity.chain_address.hex()} "
          f"(this router's identity), waiting for it to be mined ...", file=sys.stderr)
    try:
        receipt = deploy_signed(w3, identity.signing_key, timeout=args.timeout)
    except DeployError as err:
        raise NodeError(str(err)) from None
    except TimeExhausted:
        raise NodeError(f"not mined after {args.timeout:.0f}s: the transaction may still be; "
                        "look for the account's contract before deploying again") from None
    address = receipt["contractAddress"]
    doc = {"contract": address, "chain_id": chain_id, "chain_url": url,
           "block": receipt["blockNumber"], "gas_used": receipt["gasUsed"],
           "deployer": "0x" + identity.chain_address.hex()}
    if args.json:
        print(json.dumps(doc, indent=2))
    else:
        print(f"MeshChannels at {address} (block {doc['block']}, {doc['gas_used']} gas).\n"
              "Every router of the mesh pays through it: in each one's node.toml,\n\n"
              f'[pay]\nchain_url = "{url}"\ncontract = "{address}"')
    return 0


def print_rows(rows: list[dict[str, object]], headers: list[str], as_json: bool,
               empty: str) -> None:
    if as_json:
        print(json.dumps(rows, indent=2))
    else:
        print(table(headers, [[r.get(h, "-") for h in headers] for r in rows]) if rows
              else empty)


def cmd_neighbors(args: argparse.Namespace) -> int:
    node = resolve_node(args.node)
    if "link" not in node.services:
        raise NodeError(f"node {node.config.node.id} runs no link service")
    rows = client.neighbor_rows(node)
    headers = ["neighbor", "heard_on", "address", "link", "tunnel", "ports", "downs"]
    if any("balance_wei" in r for r in rows):
        headers += ["rx_bytes", "tx_bytes", "balance_wei", "enforcement"]
    print_rows(rows, headers, args.json, "no neighbors heard yet")
    return 0


def cmd_channels(args: argparse.Namespace) -> int:
    node = resolve_node(args.node)
    if "pay" not in node.services:
        raise NodeError(f"node {node.config.node.id} runs no pay service")
    headers = ["neighbor", "direction", "status", "deposit_wei", "cumulative_wei",
               "left_wei", "nonce", "acknowledged", "claimed_wei", "channel"]
    print_rows(client.channel_rows(node), headers, args.json, "no channels yet")
    return 0


def cmd_payments(args: argparse.Namespace) -> int:
    node = resolve_node(args.node)
    if "pay" not in node.services:
        raise NodeError(f"node {node.config.node.id} runs no pay service")
    headers = ["neighbor", "owed_wei", "paid_wei", "unpaid_wei", "proofs_sent", "acknowledged",
               "received_wei", "proofs_received"]
    print_rows(client.payment_rows(node), headers, args.json, "no payments yet")
    return 0


def cmd_price(args: argparse.Namespace) -> int:
    import grpc
    from mesh.meter.v1 import control_pb2, control_pb2_grpc, meter_pb2

    from services.common.money import amount, money

    node = resolve_node(args.node)
    if "meter" not in node.services:
        raise NodeError(f"node {node.config.node.id} runs no meter service")
    socket = node.socket("meter")
    if args.value is not None:
        if args.value == "auto":
            request = control_pb2.SetPriceRequest(automatic=True)
        else:
            try:
                wanted = int(args.value)
            except ValueError:
                raise NodeError(f"price {args.value!r}: give wei per byte, or auto") from None
            if wanted < 0:
                raise NodeError(f"price {wanted}: a price is not negative")
            request = control_pb2.SetPriceRequest(price=money(wanted))
        with client.channel(socket) as ch:
            try:
                control_pb2_grpc.MeterControlStub(ch).SetPrice(request, timeout=client.RPC_TIMEOUT)
            except grpc.RpcError as err:
                raise NodeError(f"meter refused: {err.details()}") from None
    state = meter_pb2.MeterState()
    client.status(socket).state.Unpack(state)
    mode = meter_pb2.PricingMode.Name(state.price.mode).removeprefix("PRICING_MODE_").lower()
    price = amount(state.price.price)
    doc = {"price_wei_per_byte": price, "price_wei_per_megabyte": price * 10**6, "mode": mode}
    print(json.dumps(doc) if args.json else
          f"{price} wei/byte ({price * 10**6} wei/MB), {mode}")
    return 0


def route_node(spec: str) -> Node:
    node = resolve_node(spec)
    if "route" not in node.services:
        raise NodeError(f"node {node.config.node.id} runs no route service")
    return node


def cmd_routes(args: argparse.Namespace) -> int:
    headers = ["prefix", "via", "metric", "penalty", "path_price", "our_price", "priced"]
    print_rows(client.route_rows(route_node(args.node)), headers, args.json, "no routes yet")
    return 0


def cmd_exits(args: argparse.Namespace) -> int:
    node = resolve_node(args.node)
    if "exit" not in node.services:
        raise NodeError(f"node {node.config.node.id} runs no exit service")
    headers = ["role", "peer", "state", "addresses", "metric", "price_up", "price_down",
               "bytes_up", "bytes_down", "owed_wei", "paid_wei"]
    print_rows(client.exit_rows(node), headers, args.json,
               "no exits or clients yet")
    return 0


def cmd_route_tradeoff(args: argparse.Namespace) -> int:
    node = route_node(args.node)
    if args.permille is None:
        weight = client.babel_status(node).price_weight_permille
    else:
        if not 0 <= args.permille <= 1000:
            raise NodeError(f"tradeoff {args.permille}: give 0 (quality only) to 1000 "
                            "(price only) permille")
        weight = client.set_tradeoff(node, args.permille)
    print(json.dumps({"price_weight_permille": weight}) if args.json else
          f"price weight {weight}/1000: routes ranked {1000 - weight}/1000 by metric, "
          f"{weight}/1000 by price")
    return 0


def cmd_route_babel(args: argparse.Namespace) -> int:
    status = client.babel_status(route_node(args.node))
    if args.json:
        print(json_format.MessageToJson(status, always_print_fields_with_no_presence=True))
        return 0
    print(f"router-id {status.router_id.hex()}  seqno {status.seqno}  "
          f"packets {status.packets_received}  updates {status.updates_received}  "
          f"routes held {status.table_routes}  sources {status.sources}  "
          f"seqno requests {status.seqno_requests_sent}")
    dropped = {**{f"packet:{k}": v for k, v in status.packets_rejected.items()},
               **{f"tlv:{k}": v for k, v in status.tlvs_dropped.items()}}
    print("malformed: " + (", ".join(f"{k} {v}" for k, v in sorted(dropped.items())) or "none"))
    rows = [[n.node_id or "-", n.interface, n.address, n.rxcost, n.txcost, n.cost,
             n.hellos_received] for n in status.neighbors]
    print(table(["neighbor", "interface", "address", "rxcost", "txcost", "cost", "hellos"], rows)
          if rows else "no Babel neighbors yet")
    return 0


def cmd_upgrade(args: argparse.Namespace) -> int:
    from deploy.upgrade import UpgradeError, upgrade

    node = resolve_node(args.node)
    if args.service not in node.services:
        raise NodeError(f"node {node.config.node.id} runs no {args.service} service "
                        f"(it runs {', '.join(node.services)})")
    try:
        done = upgrade(node.layout, args.service, Path(args.package), timeout=args.timeout)
    except UpgradeError as err:
        raise NodeError(f"upgrade of {args.service} failed: {err}") from None
    print(f"{args.service} upgraded to {done.release} (was "
          f"{done.previous or 'the installed code'}); SERVING {done.seconds:.1f}s after the "
          "restart; no other service was restarted")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="meshctl", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "-n", "--node", default=str(DEFAULT_NODE),
        help="node directory, or a router's name in the emulated mesh "
        "(default: $MESH_NODE or /var/lib/mesh)",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    status = sub.add_parser("status", help="health and projection summary of each service")
    status.add_argument("service", nargs="?", help="one service (default: all of the node's)")
    status.add_argument("--json", action="store_true", help="full projections as JSON")
    status.set_defaults(func=cmd_status)

    identity = sub.add_parser("identity", help="the node's public keys and chain address")
    identity.add_argument("--json", action="store_true", help="as JSON")
    identity.set_defaults(func=cmd_identity)

    neighbors = sub.add_parser("neighbors", help="neighbors heard and the link to each")
    neighbors.add_argument("--json", action="store_true", help="as JSON")
    neighbors.set_defaults(func=cmd_neighbors)

    channels = sub.add_parser("channels", help="payment channels: deposits, proofs, claims")
    channels.add_argument("--json", action="store_true", help="as JSON")
    channels.set_defaults(func=cmd_channels)

    payments = sub.add_parser("payments", help="per neighbor: owed, paid, received, proofs")
    payments.add_argument("--json", action="store_true", help="as JSON")
    payments.set_defaults(func=cmd_payments)

    price = sub.add_parser("price", help="show or set the router's price per byte")
    price.add_argument("value", nargs="?", metavar="N|auto",
                       help="set a fixed price in wei per byte, or auto (automatic pricing)")
    price.add_argument("--json", action="store_true", help="as JSON")
    price.set_defaults(func=cmd_price)

    routes = sub.add_parser("routes", help="the selected route to each prefix, metric and price")
    routes.add_argument("--json", action="store_true", help="as JSON")
    routes.set_defaults(func=cmd_routes)

    exits = sub.add_parser(
        "exits", aliases=["exit"],
        help="exits: the one a client uses, an exit's clients")
    exits.add_argument("--json", action="store_true", help="as JSON")
    exits.set_defaults(func=cmd_exits)

    route = sub.add_parser("route", help="Babel: the quality/price knob, neighbors, counters")
    route_sub = route.add_subparsers(dest="what", required=True)
    tradeoff = route_sub.add_parser(
        "tradeoff", help="show or set how much price weighs against route quality")
    tradeoff.add_argument("permille", nargs="?", type=int, metavar="0..1000",
                          help="0 picks routes by metric alone, 1000 by price alone")
    tradeoff.add_argument("--json", action="store_true", help="as JSON")
    tradeoff.set_defaults(func=cmd_route_tradeoff)
    babel = route_sub.add_parser("babel", help="Babel neighbors, link costs, packet counters")
    babel.add_argument("--json", action="store_true", help="as JSON")
    babel.set_defaults(func=cmd_route_babel)

    upgrade = sub.add_parser(
        "upgrade", help="install a new release of one service and restart only it",
        description="Install PACKAGE (a directory or .tar.gz holding a services/ tree, e.g. "
        "`git archive HEAD services | gzip > r.tar.gz`) as SERVICE's code and restart only "
        "that service under supervisord; rolled back if it does not answer SERVING.")
    upgrade.add_argument("service", help="the service to upgrade, e.g. route")
    upgrade.add_argument("package", help="directory or .tar.gz with services/")
    upgrade.add_argument("--timeout", type=float, default=60.0,
                         help="seconds to wait for SERVING before rolling back (default 60)")
    upgrade.set_defaults(func=cmd_upgrade)

    contract = sub.add_parser("contract", help="the payment-channel contract on a chain")
    contract_sub = contract.add_subparsers(dest="what", required=True)
    deploy = contract_sub.add_parser(
        "deploy", help="deploy the channel contract, paid by this router's chain address",
        description="Deploy MeshChannels on an EVM chain in a transaction signed with this "
        "router's identity key (see `meshctl identity` for its chain address, which needs "
        "funds for the gas), wait for it to be mined, and print the [pay] lines for node.toml.")
    deploy.add_argument("--chain-url", default="",
                        help="JSON-RPC: http(s)://host:port or a node's IPC socket path "
                        "(default: [pay] chain_url of the node)")
    deploy.add_argument("--timeout", type=float, default=300.0,
                        help="seconds to wait for the transaction to be mined (default 300)")
    deploy.add_argument("--json", action="store_true", help="as JSON")
    deploy.set_defaults(func=cmd_contract_deploy)

    events = sub.add_parser("events", help="print the node's event log")
    events.add_argument("-f", "--follow", action="store_true", help="keep printing new events")
    events.add_argument("--subject", action="append", default=None,
                        help="filter subject, repeatable (default: evt.>)")
    events.add_argument("--last", type=int, default=0, help="start this many events back")
    events.add_argument("--json", action="store_true", help="one JSON object per line")
    events.set_defaults(func=cmd_events)

    inject = sub.add_parser("inject", help="publish test traffic on the node's bus")
    inject_sub = inject.add_subparsers(dest="what", required=True)
    ping = inject_sub.add_parser("ping", help="PingSent events for sharp")
    ping.add_argument("--count", type=int, default=1,
                      help="how many (default 1; 0: until interrupted)")
    ping.add_argument("--rate", type=float, default=0.0,
                      help="pings per second (default: as fast as the log stores them)")
    ping.add_argument("--origin", default="meshctl", help="origin name (aggregate id)")
    ping.set_defaults(func=cmd_inject)

    emu.add_commands(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "subject", None) is None and args.command == "events":
        args.subject = ["evt.>"]
    if args.command == "inject" and (args.count < 0 or args.rate < 0):
        parser.error("--count and --rate must not be negative")
    client.import_all_schemas()
    try:
        code = args.func(args)
    except (NodeError, ConfigError, emu.EmuError) as err:
        print(f"meshctl: {err}", file=sys.stderr)
        code = 2
    sys.exit(code)


if __name__ == "__main__":
    main()
