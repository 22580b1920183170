"""Registration with an exit, the pure part: what a client signs, how an exit
checks it, which addresses a client gets, and how a client picks an exit.
No sockets here; the service and the tests use the same functions.
"""

from __future__ import annotations

import ipaddress
import struct
import urllib.parse
from collections.abc import Mapping
from dataclasses import dataclass

from mesh.exit.v1 import exit_pb2, registration_pb2

from services.common.identity import IDENTITY_KEY_LENGTH, chain_address, verify
from services.common.money import amount

WIREGUARD_KEY_LENGTH = 32
NOMINAL_LINK_COST = 96
_DOMAIN = b"mesh-exit-register\x00"
_OFFER_DOMAIN = b"mesh-exit-offer\x00"


def registration_message(request: registration_pb2.RegisterRequest) -> bytes:
    """The bytes a client signs: every field but the signature, unambiguously."""
    exit_id, client_id = request.exit_id.encode(), request.client_id.encode()
    return (_DOMAIN + struct.pack("!H", len(exit_id)) + exit_id
            + struct.pack("!H", len(client_id)) + client_id
            + request.identity_key + request.wireguard_key
            + struct.pack("!Q", request.timestamp_ms))


def offer_message(offer: registration_pb2.ExitOffer) -> bytes:
    """The bytes an exit signs: every field of its offer but the signature."""
    exit_id = offer.exit_id.encode()
    return (_OFFER_DOMAIN + struct.pack("!H", len(exit_id)) + exit_id + offer.identity_key
            + offer.wireguard_key + struct.pack("!I", offer.tunnel_port)
            + offer.price_up.SerializeToString(deterministic=True)
            + offer.price_down.SerializeToString(deterministic=True))


def check_offer(offer: registration_pb2.ExitOffer, exit_id: str,
                pinned: bytes) -> str | None:
    """None if the client may register with this offer, else why not: it must
    be the exit's own, signed by its identity key, and that key must be the
    one pinned at the first registration with it (if any)."""
    if offer.exit_id != exit_id:
        return f"the offer is from {offer.exit_id!r}, not {exit_id!r}"
    if len(offer.wireguard_key) != WIREGUARD_KEY_LENGTH:
        return f"wireguard_key is {len(offer.wireguard_key)} bytes, not {WIREGUARD_KEY_LENGTH}"
    if not verify(offer.identity_key, offer.signature, offer_message(offer)):
        return "the offer is not signed by the identity key it carries"
    if pinned and offer.identity_key != pinned:
        return (f"identity {offer.identity_key.hex()[:16]}… is not the pinned "
                f"{pinned.hex()[:16]}… of the first registration")
    return None


def check_answer(answer: exit_pb2.ExitRegistered, offer: registration_pb2.ExitOffer
                 ) -> str | None:
    """None if a registration's answer is the offering exit's: its tunnel key,
    and the chain address of its identity (where the client's money goes)."""
    if answer.exit_wireguard_key != offer.wireguard_key:
        return "the answer's WireGuard key is not the offer's"
    if answer.exit_chain_address != chain_address(offer.identity_key):
        return "the answer's chain address is not the exit identity's"
    if not answer.client_addresses:
        return "no tunnel address for us"
    for direction in ("price_up", "price_down"):
        if amount(getattr(answer, direction)) > amount(getattr(offer, direction)):
            return (f"the answer's {direction} {amount(getattr(answer, direction))} is above "
                    f"the offer's {amount(getattr(offer, direction))}")
    return None


# A client registers again at its exit's new prices when one moved this much.
REQUOTE_STEP = 0.05


def repriced(registration: exit_pb2.ExitRegistered, offer: registration_pb2.ExitOffer) -> bool:
    """The offer's prices moved from the registration's by REQUOTE_STEP or more."""
    for direction in ("price_up", "price_down"):
        was, now = amount(getattr(registration, direction)), amount(getattr(offer, direction))
        if (abs(now - was) >= REQUOTE_STEP * was) if was else now != 0:
            return True
    return False


def peer_address(peer: str) -> str:
    """The IP address in a gRPC peer string ("ipv6:[2001:db8::1]:5000", its
    brackets maybe %-escaped, or "ipv4:192.0.2.1:5000"); "" for any other."""
    kind, _, where = urllib.parse.unquote(peer).partition(":")
    if kind == "ipv6" and where.startswith("["):
        return where[1:].partition("]")[0]
    if kind == "ipv4":
        return where.rpartition(":")[0]
    return ""


def response_price(routes: Mapping[str, exit_pb2.ExitState.RouteToExit], address: str) -> int:
    """What the mesh charges per byte carried to address: the path price of
    the longest route prefix holding it; 0 with none (a client on the
    internet is answered over the uplink, which the mesh does not bill)."""
    try:
        where = ipaddress.ip_address(address)
    except ValueError:
        return 0
    best: tuple[int, int] | None = None
    for prefix, route in routes.items():
        network = ipaddress.ip_network(prefix, strict=False)
        if where.version == network.version and where in network and (
                best is None or network.prefixlen > best[0]):
            best = (network.prefixlen, amount(route.path_price))
    return best[1] if best is not None else 0


@dataclass(frozen=True)
class Refusal:
    reason: exit_pb2.RefusalReason
    detail: str


def check_request(
    request: registration_pb2.RegisterRequest, exit_id: str, now_ms: int, window_ms: int
) -> Refusal | None:
    """None if the exit should admit the request, else why not."""
    malformed = exit_pb2.REFUSAL_REASON_MALFORMED
    if not request.client_id:
        return Refusal(malformed, "no client_id")
    if len(request.identity_key) != IDENTITY_KEY_LENGTH:
        return Refusal(malformed, f"identity_key is {len(request.identity_key)} bytes, "
                                  f"not {IDENTITY_KEY_LENGTH}")
    if len(request.wireguard_key) != WIREGUARD_KEY_LENGTH:
        return Refusal(malformed, f"wireguard_key is {len(request.wireguard_key)} bytes, "
                                  f"not {WIREGUARD_KEY_LENGTH}")
    if request.exit_id != exit_id:
        return Refusal(malformed, f"addressed to exit {request.exit_id!r}, this is {exit_id!r}")
    if not verify(request.identity_key, request.signature, registration_message(request)):
        return Refusal(exit_pb2.REFUSAL_REASON_BAD_SIGNATURE,
                       "the signature is not the identity key's over the request")
    if abs(now_ms - request.timestamp_ms) > window_ms:
        return Refusal(exit_pb2.REFUSAL_REASON_STALE,
                       f"timestamp {(now_ms - request.timestamp_ms) / 1000:.0f}s away from "
                       f"the exit's clock (the window is {window_ms / 1000:.0f}s)")
    return None


def client_address(pool: str, index: int) -> str:
    """The index-th client's /128 in the pool (::1 is the exit's own)."""
    network = ipaddress.IPv6Network(pool)
    if index + 2 >= network.num_addresses:
        raise IndexError(f"pool {pool} has no address for client {index}")
    return f"{network[index + 2]}/128"


def exit_address(pool: str) -> str:
    """The exit's own address in the pool, with the pool's length."""
    network = ipaddress.IPv6Network(pool)
    return f"{network[1]}/{network.prefixlen}"


def addresses_for(state: exit_pb2.ExitState, client_id: str, identity_key: bytes,
                  pool: str) -> list[str] | None:
    """A registered client keeps its addresses (the same identity registering
    again, say with a new WireGuard key); a new one gets the lowest free one.
    None when another identity holds the client id, or the pool is full."""
    known = state.clients.get(client_id)
    if known is not None and known.HasField("registration"):
        if known.registration.client_identity_key != identity_key:
            return None
        return list(known.registration.client_addresses)
    taken = {a for c in state.clients.values() for a in c.registration.client_addresses}
    index = 0
    while True:
        try:
            candidate = client_address(pool, index)
        except IndexError:
            return None
        if candidate not in taken:
            return [candidate]
        index += 1


@dataclass(frozen=True)
class Candidate:
    exit_id: str
    metric: int
    price: int  # wei per byte: the path to the exit plus the exit's own prices


def choose(candidates: list[Candidate], avoid: set[str]) -> Candidate | None:
    """The exit by route quality, then price: among those whose route is within
    one link of the best metric, the cheapest; `avoid` (exits that just
    failed) only when there is nothing else."""
    usable = [c for c in candidates if c.exit_id not in avoid] or list(candidates)
    if not usable:
        return None
    best = min(c.metric for c in usable)
    close = [c for c in usable if c.metric <= best + NOMINAL_LINK_COST]
    return min(close, key=lambda c: (c.price, c.metric, c.exit_id))


@dataclass(frozen=True)
class Usage:
    bytes_up: int
    bytes_down: int
    charged: int
    reset: bool


def usage_since(base: tuple[int, int], counters: tuple[int, int],
                prices: tuple[int, int]) -> Usage:
    """Bytes up and down since the last reading of a tunnel's counters, and
    what they cost. Counters that went back (the tunnel was made again)
    count from zero."""
    reset = counters[0] < base[0] or counters[1] < base[1]
    start = (0, 0) if reset else base
    up, down = counters[0] - start[0], counters[1] - start[1]
    return Usage(up, down, up * prices[0] + down * prices[1], reset)


def client_access(debt: int, usage: int, throttle_debt: int, cut_off_debt: int,
                  tolerance: float) -> exit_pb2.ClientAccess.ValueType:
    """Throttled past throttle_debt, cut off past cut_off_debt: each beyond
    `tolerance` of the client's usage (what the exit sent and the client
    never got is on the exit's bill only)."""
    slack = tolerance * usage
    if debt > cut_off_debt + slack:
        return exit_pb2.CLIENT_ACCESS_BLOCKED
    if debt > throttle_debt + slack:
        return exit_pb2.CLIENT_ACCESS_THROTTLED
    return exit_pb2.CLIENT_ACCESS_OPEN
