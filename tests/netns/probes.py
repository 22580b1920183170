"""Traffic probes run from inside a namespace (the machine has no ping binary)."""

from __future__ import annotations

import ipaddress
import os
import select
import socket
import struct
import time

from pyroute2 import netns

ECHO_REQUEST, ECHO_REPLY = 128, 129


def icmp6_socket(ns: str) -> socket.socket:
    # flags=0: fail rather than create the namespace if it is missing.
    return netns.create_socket(
        ns, socket.AF_INET6, socket.SOCK_RAW, socket.IPPROTO_ICMPV6, flags=0
    )


def echo_request(ident: int, seq: int) -> bytes:
    # The kernel fills in the ICMPv6 checksum on raw ICMPv6 sockets.
    return struct.pack("!BBHHH", ECHO_REQUEST, 0, 0, ident, seq) + b"meshemu"


def ping6(ns: str, dst: str, count: int, interval: float = 0.002, grace: float = 1.0,
          source: str | None = None) -> int:
    """Send `count` echo requests from `ns` (from `source` if given: where the
    kernel would pick a link's address no route leads back to); return how
    many got a reply."""
    ident = os.getpid() & 0xFFFF
    want = ipaddress.ip_address(dst)
    replies: set[int] = set()

    def receive(until: float) -> None:
        while len(replies) < count and (left := until - time.monotonic()) > 0:
            if not select.select([sock], [], [], left)[0]:
                return
            data, source = sock.recvfrom(2048)
            kind, _code, _sum, rid, seq = struct.unpack("!BBHHH", data[:8])
            if kind == ECHO_REPLY and rid == ident and ipaddress.ip_address(source[0]) == want:
                replies.add(seq)

    with icmp6_socket(ns) as sock:
        if source is not None:
            sock.bind((source, 0))
        for seq in range(count):
            sock.sendto(echo_request(ident, seq), (dst, 0))
            receive(time.monotonic() + interval)
        receive(time.monotonic() + grace)
    return len(replies)


