"""Babel packets and TLVs (RFC 8966 section 4), both ways.

The decoder resolves what Babel leaves to per-packet parser state (the
current router-id, next hops, prefix compression), so it yields messages that
stand alone; the encoder puts that state back in, compressing prefixes and
emitting Router-Id and Next Hop TLVs only when they change.

What a receiver must tolerate it tolerates: Pad1/PadN and unknown TLVs are
skipped, a TLV too short for its type or with a bad address encoding is
dropped (and counted) with the rest of the packet kept, an unknown mandatory
sub-TLV (type 128 and up) drops its enclosing TLV. Only a bad packet header
rejects the whole packet.

Our one extension is the price sub-TLV (type PRICE_SUBTLV, in the experimental
range 112-126, so not mandatory): inside an Update it carries the path price
per byte, an unsigned big-endian integer of 1 to 32 bytes. A stock babeld
ignores it and installs the route.
"""

from __future__ import annotations

import ipaddress
import struct
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network
from typing import ClassVar

from services.common.wire import WireRejected

MAGIC, VERSION = 42, 2
PORT = 6696
MULTICAST_GROUP = "ff02::1:6"
HEADER = struct.Struct("!BBH")
INFINITY = 0xFFFF
MAX_PACKET = 1400  # what we send: below the smallest MTU of a tunnel over a tunnel

PAD1, PADN, ACK_REQUEST, ACK, HELLO, IHU, ROUTER_ID, NEXT_HOP, UPDATE = range(9)
ROUTE_REQUEST, SEQNO_REQUEST = 9, 10
PRICE_SUBTLV = 112
MANDATORY_SUBTLV = 128

AE_WILDCARD, AE_IPV4, AE_IPV6, AE_LINK_LOCAL, AE_V4_VIA_V6 = range(5)
HELLO_UNICAST = 0x8000
UPDATE_DEFAULT_PREFIX, UPDATE_ROUTER_ID = 0x80, 0x40
LINK_LOCAL_PREFIX = bytes.fromhex("fe80000000000000")
MAX_PRICE_BYTES = 32

Address = IPv4Address | IPv6Address
Network = IPv4Network | IPv6Network


class BabelRejected(WireRejected):
    """A whole datagram that is not a Babel packet."""

    WHAT = "babel packet"
    REASONS = frozenset({"short", "magic", "version", "length"})


class TlvDropped(ValueError):
    """One TLV is ignored; the reason keys the malformed counters."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason


# -- messages ----------------------------------------------------------------


@dataclass(frozen=True)
class AckRequest:
    opaque: int
    interval: int  # centiseconds


@dataclass(frozen=True)
class Ack:
    opaque: int


@dataclass(frozen=True)
class Hello:
    seqno: int
    interval: int  # centiseconds; 0 means "no more scheduled hellos"
    unicast: bool = False


@dataclass(frozen=True)
class Ihu:
    rxcost: int
    interval: int  # centiseconds
    address: Address | None = None  # None: the wildcard, "you, whoever you are"


@dataclass(frozen=True)
class Update:
    """One route, resolved: prefix, router-id and next hop stand alone here."""

    prefix: Network
    router_id: bytes
    seqno: int
    metric: int
    interval: int  # centiseconds
    next_hop: Address | None = None  # None: the sender of the packet
    price: int | None = None  # per byte; None when the sub-TLV was absent
    # A v4 prefix whose next hop is IPv6 (RFC 9229), so AE 4 on the wire.
    v4_via_v6: bool = False

    @property
    def retraction(self) -> bool:
        return self.metric == INFINITY


@dataclass(frozen=True)
class WildcardRetraction:
    """An Update with AE 0: every route of the sender is gone."""

    interval: int


@dataclass(frozen=True)
class RouteRequest:
    prefix: Network | None  # None: a wildcard request, "send me a full dump"


@dataclass(frozen=True)
class SeqnoRequest:
    prefix: Network
    seqno: int
    hop_count: int
    router_id: bytes


Message = AckRequest | Ack | Hello | Ihu | Update | WildcardRetraction | RouteRequest | SeqnoRequest


@dataclass
class Packet:
    messages: list[Message] = field(default_factory=list)
    # TLVs ignored, by reason: "unknown-tlv", "mandatory-subtlv", "short", ...
    dropped: Counter[str] = field(default_factory=Counter)


# -- addresses and prefixes ------------------------------------------------------


def _address_bytes(ae: int) -> int:
    return {AE_IPV4: 4, AE_IPV6: 16, AE_LINK_LOCAL: 8, AE_V4_VIA_V6: 4}[ae]


def _make_network(ae: int, raw: bytes, plen: int) -> Network:
    """A prefix from its full address bytes; host bits must be zero in Babel's
    sense only up to plen, so they are masked, not rejected."""
    if ae in (AE_IPV4, AE_V4_VIA_V6):
        return IPv4Network((int.from_bytes(raw[:4]), plen), strict=False)
    return IPv6Network((int.from_bytes(raw[:16]), plen), strict=False)


def _compression_key(ae: int) -> int:
    return AE_IPV4 if ae == AE_V4_VIA_V6 else ae


def _full_bytes(ae: int) -> int:
    return 4 if ae in (AE_IPV4, AE_V4_VIA_V6) else 16


class _Reader:
    """Per-packet parser state (RFC 8966 section 4.5)."""

    def __init__(self, source: IPv6Address | None) -> None:
        self.router_id: bytes | None = None
        # Next hops by family (4 or 6); AE 2 and 3 both set the IPv6 one.
        self.next_hop: dict[int, Address | None] = {4: None, 6: source}
        # Default prefixes by AE; AE 4 shares AE 1's (RFC 9229).
        self.default_prefix: dict[int, bytes] = {}

    def address(self, ae: int, body: bytes) -> tuple[Address | None, int]:
        """An address in the encoding `ae` at the start of body, and its length."""
        if ae == AE_WILDCARD:
            return None, 0
        if ae not in (AE_IPV4, AE_IPV6, AE_LINK_LOCAL, AE_V4_VIA_V6):
            raise TlvDropped("bad-ae", f"address encoding {ae}")
        size = _address_bytes(ae)
        if len(body) < size:
            raise TlvDropped("short", f"address of AE {ae} needs {size} bytes")
        raw = body[:size]
        if ae == AE_IPV6:
            return IPv6Address(raw), size
        if ae == AE_LINK_LOCAL:
            return IPv6Address(LINK_LOCAL_PREFIX + raw), size
        return IPv4Address(raw), size

    def prefix(self, ae: int, plen: int, omitted: int, body: bytes) -> tuple[bytes, int]:
        """Full address bytes of a (compressed) prefix, and the bytes it took."""
        if ae == AE_WILDCARD:
            if plen != 0:
                raise TlvDropped("bad-prefix", "a wildcard prefix of non-zero length")
            return b"", 0
        if ae not in (AE_IPV4, AE_IPV6, AE_LINK_LOCAL, AE_V4_VIA_V6):
            raise TlvDropped("bad-ae", f"address encoding {ae}")
        if ae == AE_LINK_LOCAL:
            if plen > 64 + 64 or omitted:
                raise TlvDropped("bad-prefix", "link-local prefix with compression")
            size = (max(plen - 64, 0) + 7) // 8
            if len(body) < size or size > 8:
                raise TlvDropped("short", "link-local prefix")
            return LINK_LOCAL_PREFIX + body[:size].ljust(8, b"\0"), size
        full = _full_bytes(ae)
        if plen > full * 8:
            raise TlvDropped("bad-prefix", f"prefix length {plen} for AE {ae}")
        wanted = (plen + 7) // 8
        if omitted > wanted:
            raise TlvDropped("bad-prefix", f"{omitted} bytes omitted of a {plen}-bit prefix")
        if omitted:
            default = self.default_prefix.get(_compression_key(ae))
            if default is None:
                raise TlvDropped("bad-prefix", "compressed prefix with no default prefix")
        else:
            default = b""
        size = wanted - omitted
        if len(body) < size:
            raise TlvDropped("short", "prefix")
        raw = (default[:omitted] + body[:size]).ljust(full, b"\0")
        return raw, size


def _sub_tlvs(body: bytes) -> Iterator[tuple[int, bytes]]:
    """Sub-TLVs; a truncated one ends the TLV as malformed."""
    i = 0
    while i < len(body):
        kind = body[i]
        if kind == PAD1:
            i += 1
            continue
        if i + 2 > len(body) or i + 2 + body[i + 1] > len(body):
            raise TlvDropped("short", "truncated sub-TLV")
        length = body[i + 1]
        yield kind, body[i + 2:i + 2 + length]
        i += 2 + length


def _no_mandatory(body: bytes) -> None:
    for kind, _ in _sub_tlvs(body):
        if kind >= MANDATORY_SUBTLV:
            raise TlvDropped("mandatory-subtlv", f"unknown mandatory sub-TLV {kind}")


def _need(body: bytes, size: int, what: str) -> None:
    if len(body) < size:
        raise TlvDropped("short", f"{what} needs {size} bytes, has {len(body)}")


class _Decoder:
    def __init__(self, source: IPv6Address | None) -> None:
        self.state = _Reader(source)

    def tlv(self, kind: int, body: bytes) -> Message | None:
        handler = self.HANDLERS.get(kind)
        if handler is None:
            raise TlvDropped("unknown-tlv", f"type {kind}")
        return handler(self, body)

    def ack_request(self, body: bytes) -> Message:
        _need(body, 6, "Ack Request")
        _, opaque, interval = struct.unpack_from("!HHH", body)
        _no_mandatory(body[6:])
        return AckRequest(opaque, interval)

    def ack(self, body: bytes) -> Message:
        _need(body, 2, "Ack")
        _no_mandatory(body[2:])
        return Ack(struct.unpack_from("!H", body)[0])

    def hello(self, body: bytes) -> Message:
        _need(body, 6, "Hello")
        flags, seqno, interval = struct.unpack_from("!HHH", body)
        _no_mandatory(body[6:])
        return Hello(seqno, interval, bool(flags & HELLO_UNICAST))

    def ihu(self, body: bytes) -> Message:
        _need(body, 6, "IHU")
        ae, _, rxcost, interval = struct.unpack_from("!BBHH", body)
        address, size = self.state.address(ae, body[6:])
        _no_mandatory(body[6 + size:])
        return Ihu(rxcost, interval, address)

    def router_id(self, body: bytes) -> None:
        _need(body, 10, "Router-Id")
        router_id = body[2:10]
        if router_id in (bytes(8), b"\xff" * 8):
            raise TlvDropped("bad-router-id", "all zeros or all ones")
        _no_mandatory(body[10:])
        self.state.router_id = router_id

    def next_hop(self, body: bytes) -> None:
        _need(body, 2, "Next Hop")
        ae = body[0]
        if ae in (AE_WILDCARD, AE_V4_VIA_V6):
            raise TlvDropped("bad-ae", f"next hop in AE {ae}")
        address, size = self.state.address(ae, body[2:])
        _no_mandatory(body[2 + size:])
        self.state.next_hop[4 if ae == AE_IPV4 else 6] = address

    def update(self, body: bytes) -> Message:
        _need(body, 10, "Update")
        ae, flags, plen, omitted, interval, seqno, metric = struct.unpack_from("!BBBBHHH", body)
        raw, size = self.state.prefix(ae, plen, omitted, body[10:])
        price = None
        for kind, sub in _sub_tlvs(body[10 + size:]):
            if kind >= MANDATORY_SUBTLV:
                raise TlvDropped("mandatory-subtlv", f"unknown mandatory sub-TLV {kind}")
            if kind == PRICE_SUBTLV:
                if not 1 <= len(sub) <= MAX_PRICE_BYTES:
                    raise TlvDropped("bad-price", f"price of {len(sub)} bytes")
                price = int.from_bytes(sub)
        if ae == AE_WILDCARD:
            if metric != INFINITY:
                raise TlvDropped("bad-prefix", "a wildcard Update that is not a retraction")
            return WildcardRetraction(interval)
        if flags & UPDATE_DEFAULT_PREFIX and ae in (AE_IPV4, AE_IPV6, AE_V4_VIA_V6):
            self.state.default_prefix[_compression_key(ae)] = raw
        if flags & UPDATE_ROUTER_ID:
            self.state.router_id = (bytes(4) + raw[:4]) if len(raw) == 4 else raw[8:16]
        router_id = self.state.router_id
        if router_id is None:
            raise TlvDropped("no-router-id", "an Update before any Router-Id")
        next_hop = self.state.next_hop[4 if ae == AE_IPV4 else 6]
        if ae == AE_IPV4 and next_hop is None:
            raise TlvDropped("no-next-hop", "an IPv4 Update with no IPv4 next hop")
        return Update(prefix=_make_network(ae, raw, plen), router_id=router_id, seqno=seqno,
                      metric=metric, interval=interval, next_hop=next_hop, price=price,
                      v4_via_v6=ae == AE_V4_VIA_V6)

    def route_request(self, body: bytes) -> Message:
        _need(body, 2, "Route Request")
        ae, plen = body[0], body[1]
        raw, size = self.state.prefix(ae, plen, 0, body[2:])
        _no_mandatory(body[2 + size:])
        return RouteRequest(None if ae == AE_WILDCARD else _make_network(ae, raw, plen))

    def seqno_request(self, body: bytes) -> Message:
        _need(body, 14, "Seqno Request")
        ae, plen, seqno, hop_count, _ = struct.unpack_from("!BBHBB", body)
        if ae == AE_WILDCARD:
            raise TlvDropped("bad-ae", "a wildcard Seqno Request")
        router_id = body[6:14]
        raw, size = self.state.prefix(ae, plen, 0, body[14:])
        _no_mandatory(body[14 + size:])
        return SeqnoRequest(_make_network(ae, raw, plen), seqno, hop_count, router_id)

    HANDLERS: ClassVar = {
        ACK_REQUEST: ack_request, ACK: ack, HELLO: hello, IHU: ihu, ROUTER_ID: router_id,
        NEXT_HOP: next_hop, UPDATE: update, ROUTE_REQUEST: route_request,
        SEQNO_REQUEST: seqno_request, PADN: lambda self, body: None,
    }


def decode(data: bytes, source: IPv6Address | None = None) -> Packet:
    """Parse one datagram. `source` is the sender's address: the implied next
    hop of IPv6 Updates."""
    if len(data) < HEADER.size:
        raise BabelRejected("short", f"{len(data)} bytes")
    magic, version, length = HEADER.unpack_from(data)
    if magic != MAGIC:
        raise BabelRejected("magic", f"magic {magic}, not {MAGIC}")
    if version != VERSION:
        raise BabelRejected("version", f"version {version}, not {VERSION}")
    if HEADER.size + length > len(data):
        raise BabelRejected("length", f"body of {length} bytes in a {len(data)}-byte datagram")
    body = data[HEADER.size:HEADER.size + length]  # what follows is the trailer
    decoder = _Decoder(source)
    packet = Packet()
    i = 0
    while i < len(body):
        kind = body[i]
        if kind == PAD1:
            i += 1
            continue
        if i + 2 > len(body) or i + 2 + body[i + 1] > len(body):
            packet.dropped["truncated"] += 1
            break
        tlv_body = body[i + 2:i + 2 + body[i + 1]]
        i += 2 + body[i + 1]
        try:
            message = decoder.tlv(kind, tlv_body)
        except TlvDropped as dropped:
            packet.dropped[dropped.reason] += 1
            continue
        if message is not None:
            packet.messages.append(message)
    return packet


# -- encoding ------------------------------------------------------------------------


def _tlv(kind: int, body: bytes) -> bytes:
    assert len(body) <= 255, kind
    return bytes((kind, len(body))) + body


def _ae_of(address: Address | None) -> int:
    if address is None:
        return AE_WILDCARD
    if isinstance(address, IPv4Address):
        return AE_IPV4
    return AE_LINK_LOCAL if address.packed[:8] == LINK_LOCAL_PREFIX else AE_IPV6


def _address_body(address: Address | None) -> tuple[int, bytes]:
    ae = _ae_of(address)
    if address is None:
        return ae, b""
    packed = address.packed
    return ae, packed[8:] if ae == AE_LINK_LOCAL else packed


def _prefix_ae(update: Update) -> int:
    if isinstance(update.prefix, IPv4Network):
        return AE_V4_VIA_V6 if update.v4_via_v6 else AE_IPV4
    return AE_IPV6


def _price_subtlv(price: int) -> bytes:
    raw = price.to_bytes(max(1, (price.bit_length() + 7) // 8))
    if len(raw) > MAX_PRICE_BYTES:
        raise ValueError(f"price {price} does not fit {MAX_PRICE_BYTES} bytes")
    return _tlv(PRICE_SUBTLV, raw)


class Encoder:
    """Packs messages into packets of at most MAX_PACKET bytes."""

    def __init__(self, max_packet: int = MAX_PACKET) -> None:
        self.max_body = max_packet - HEADER.size
        self.packets: list[bytes] = []
        self._body = bytearray()
        self._reset()

    def _reset(self) -> None:
        self._router_id: bytes | None = None
        self._next_hop: dict[int, Address | None] = {}
        self._previous: dict[int, bytes] = {}

    def _append(self, chunk: bytes, prelude: bytes = b"") -> None:
        if len(self._body) + len(prelude) + len(chunk) > self.max_body:
            self._flush()
            raise _Restart
        self._body += prelude + chunk

    def _flush(self) -> None:
        if self._body:
            self.packets.append(HEADER.pack(MAGIC, VERSION, len(self._body)) + self._body)
        self._body = bytearray()
        self._reset()

    def add(self, message: Message) -> None:
        for _ in range(2):
            try:
                self._add(message)
                return
            except _Restart:
                continue
        raise ValueError(f"{message} does not fit one packet")

    def _add(self, message: Message) -> None:
        match message:
            case Hello(seqno=seqno, interval=interval, unicast=unicast):
                flags = HELLO_UNICAST if unicast else 0
                self._append(_tlv(HELLO, struct.pack("!HHH", flags, seqno, interval)))
            case Ihu(rxcost=rxcost, interval=interval, address=address):
                ae, raw = _address_body(address)
                self._append(_tlv(IHU, struct.pack("!BBHH", ae, 0, rxcost, interval) + raw))
            case AckRequest(opaque=opaque, interval=interval):
                self._append(_tlv(ACK_REQUEST, struct.pack("!HHH", 0, opaque, interval)))
            case Ack(opaque=opaque):
                self._append(_tlv(ACK, struct.pack("!H", opaque)))
            case WildcardRetraction(interval=interval):
                self._append(_tlv(UPDATE, struct.pack("!BBBBHHH", AE_WILDCARD, 0, 0, 0,
                                                      interval, 0, INFINITY)))
            case Update():
                self._update(message)
            case RouteRequest(prefix=prefix):
                if prefix is None:
                    self._append(_tlv(ROUTE_REQUEST, bytes((AE_WILDCARD, 0))))
                else:
                    ae, raw = _prefix_body(prefix)
                    self._append(_tlv(ROUTE_REQUEST, bytes((ae, prefix.prefixlen)) + raw))
            case SeqnoRequest(prefix=prefix, seqno=seqno, hop_count=hops, router_id=rid):
                ae, raw = _prefix_body(prefix)
                body = struct.pack("!BBHBB", ae, prefix.prefixlen, seqno, hops, 0) + rid + raw
                self._append(_tlv(SEQNO_REQUEST, body))

    def _update(self, update: Update) -> None:
        family = 4 if _prefix_ae(update) == AE_IPV4 else 6
        if update.next_hop is None and self._next_hop.get(family) is not None:
            self._flush()  # only a new packet brings back "the sender" as next hop
        prelude = b""
        if update.router_id != self._router_id:
            prelude += _tlv(ROUTER_ID, bytes(2) + update.router_id)
        if update.next_hop is not None and self._next_hop.get(family) != update.next_hop:
            ae, raw = _address_body(update.next_hop)
            prelude += _tlv(NEXT_HOP, bytes((ae, 0)) + raw)
        ae = _prefix_ae(update)
        full = update.prefix.network_address.packed
        wanted = (update.prefix.prefixlen + 7) // 8
        # AE 4 shares AE 1's compression state: simpler never to compress it.
        compress = ae != AE_V4_VIA_V6
        previous = self._previous.get(ae, b"") if compress else b""
        omitted = 0
        while omitted < min(wanted, len(previous)) and previous[omitted] == full[omitted]:
            omitted += 1
        sub = b"" if update.price is None else _price_subtlv(update.price)
        flags = UPDATE_DEFAULT_PREFIX if compress else 0
        body = struct.pack("!BBBBHHH", ae, flags, update.prefix.prefixlen, omitted,
                           update.interval, update.seqno, update.metric)
        self._append(_tlv(UPDATE, body + full[omitted:wanted] + sub), prelude)
        self._router_id = update.router_id
        if update.next_hop is not None:
            self._next_hop[family] = update.next_hop
        if compress:
            self._previous[ae] = full

    def finish(self) -> list[bytes]:
        self._flush()
        packets, self.packets = self.packets, []
        return packets


class _Restart(Exception):
    """The message did not fit: a new packet was started, encode it again."""


def _prefix_body(prefix: Network) -> tuple[int, bytes]:
    ae = AE_IPV4 if isinstance(prefix, IPv4Network) else AE_IPV6
    return ae, prefix.network_address.packed[:(prefix.prefixlen + 7) // 8]


def encode(messages: Iterable[Message], max_packet: int = MAX_PACKET) -> list[bytes]:
    encoder = Encoder(max_packet)
    for message in messages:
        encoder.add(message)
    return encoder.finish()


def network(text: str) -> Network:
    return ipaddress.ip_network(text, strict=False)
