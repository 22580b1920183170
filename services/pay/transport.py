"""The UDP socket proofs travel on: port PROOF_PORT inside each tunnel, between
the tunnels' link-local addresses, so only an authenticated neighbor can
reach it and the arrival interface names who sent a datagram. Between a
client and its exit, inside the exit tunnel, the addresses are global (the
exit's tunnel serves every client): the source address names the sender."""

from __future__ import annotations

import asyncio
import contextlib
import socket

from .wire import MAX_DATAGRAM_BYTES, PROOF_PORT


class Transport:
    def __init__(self, port: int = PROOF_PORT) -> None:
        self.port = port
        self.sock = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("::", port))
        self.sock.setblocking(False)
        # (datagram, arrival interface or "" for a global source, source address)
        self.inbox: asyncio.Queue[tuple[bytes, str, str]] = asyncio.Queue(maxsize=4096)
        self.sent_bytes = 0

    def start(self) -> None:
        asyncio.get_running_loop().add_reader(self.sock.fileno(), self._readable)

    def _readable(self) -> None:
        while True:
            try:
                data, source = self.sock.recvfrom(MAX_DATAGRAM_BYTES + 1)
            except BlockingIOError:
                return
            # A link-local source carries the arrival interface as its scope.
            with contextlib.suppress(OSError, asyncio.QueueFull):
                interface = socket.if_indextoname(source[3]) if source[3] else ""
                self.inbox.put_nowait((data, interface, source[0].split("%")[0]))

    def send(self, data: bytes, address: str, interface: str) -> bool:
        try:
            scope = socket.if_nametoindex(interface) if interface else 0
            self.sock.sendto(data, (address, self.port, 0, scope))
        except OSError:
            return False  # the tunnel is gone or not up yet: resent later
        self.sent_bytes += len(data)
        return True
