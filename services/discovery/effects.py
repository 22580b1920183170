"""discovery's only I/O: one UDP socket per physical interface, joined to the
hello group on that link, and one per uplink for unicast hellos to routers
across the internet; sending and receiving hellos."""

from __future__ import annotations

import socket
import struct

from services.common.interfaces import Interface

from .hello import HELLO_GROUP, HELLO_PORT, MAX_HELLO_BYTES


def open_socket(interface: Interface) -> socket.socket:
    sock = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, interface.name.encode())
    group = socket.inet_pton(socket.AF_INET6, HELLO_GROUP) + struct.pack("@I", interface.index)
    sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_JOIN_GROUP, group)
    sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_MULTICAST_IF, interface.index)
    sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_MULTICAST_HOPS, 1)
    sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_MULTICAST_LOOP, 0)
    sock.bind(("::", HELLO_PORT))
    sock.setblocking(False)
    return sock


def open_uplink_socket(interface: Interface) -> socket.socket:
    """Unicast only: a hello over the internet goes to one configured address."""
    sock = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, interface.name.encode())
    sock.bind(("::", HELLO_PORT))
    sock.setblocking(False)
    return sock


def send_hello(sock: socket.socket, interface: Interface, data: bytes,
               to: str = HELLO_GROUP) -> None:
    """To the link's hello group, or to one address (an internet peer: the
    interface index scopes only link-local addresses)."""
    sock.sendto(data, (to, HELLO_PORT, 0, interface.index))


def receive(sock: socket.socket) -> tuple[bytes, str] | None:
    """One datagram (truncated past the size any hello may have) and its source."""
    try:
        data, source = sock.recvfrom(MAX_HELLO_BYTES + 1)
    except BlockingIOError:
        return None
    return data, source[0].split("%")[0]
