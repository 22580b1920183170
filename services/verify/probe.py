"""ICMPv6 echo probes, each through the neighbor its firewall mark steers it
to, with the replies' round-trip times and hop limits.

Inside a tunnel a probe is an echo request of a size user traffic has, from
the router's own address: nothing marks it as a probe, so a neighbor cannot
favour probes over the traffic it carries.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import socket
import struct
import time
from dataclasses import dataclass, field

from .judge import Probes

ECHO_REQUEST, ECHO_REPLY = 128, 129
ICMP6_FILTER = 1  # <netinet/icmp6.h>
ICMP_HEADER = struct.Struct("!BBHHH")


@dataclass(frozen=True)
class Target:
    key: str  # whatever the caller names it by
    address: str
    mark: int


@dataclass
class _Pending:
    target: Target
    sent_at: float
    hop_limit: int | None  # None: the default, for loss and round trips
    reply: tuple[float, int] | None = field(default=None)  # (rtt, hop limit)


def _only_echo_replies() -> bytes:
    """An ICMP6_FILTER letting echo replies through and nothing else."""
    blocked = [0xFFFFFFFF] * 8
    blocked[ECHO_REPLY >> 5] &= ~(1 << (ECHO_REPLY & 31))
    return struct.pack("8I", *blocked)


class Prober:
    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_INET6, socket.SOCK_RAW, socket.IPPROTO_ICMPV6)
        self.sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_RECVHOPLIMIT, 1)
        self.sock.setsockopt(socket.IPPROTO_ICMPV6, ICMP6_FILTER, _only_echo_replies())
        self.sock.setblocking(False)

    def close(self) -> None:
        self.sock.close()

    async def burst(self, targets: list[Target], count: int, spacing: float,
                    timeout: float, max_hops: int = 12,
                    count_hops: set[str] | None = None) -> dict[str, Probes]:
        """`count` probes to each target, interleaved, `spacing` seconds apart,
        then, to the targets in `count_hops` (all if None), two with each hop
        limit 1..max_hops (the fewest answered counts the links there);
        replies are awaited `timeout` seconds after the last."""
        loop = asyncio.get_running_loop()
        ident = random.randrange(0x10000)
        pending: dict[int, _Pending] = {}

        def readable() -> None:
            while True:
                try:
                    data, ancillary, _flags, source = self.sock.recvmsg(2048, 64)
                except BlockingIOError:
                    return
                if len(data) < ICMP_HEADER.size:
                    continue
                kind, _code, _sum, rid, seq = ICMP_HEADER.unpack_from(data)
                probe = pending.get(seq)
                if kind != ECHO_REPLY or rid != ident or probe is None or probe.reply:
                    continue
                if source[0].split("%")[0] != probe.target.address:
                    continue
                hop_limit = next((struct.unpack("@i", value)[0]
                                  for level, kind_, value in ancillary
                                  if level == socket.IPPROTO_IPV6
                                  and kind_ == socket.IPV6_HOPLIMIT), 0)
                probe.reply = (time.monotonic() - probe.sent_at, hop_limit)

        loop.add_reader(self.sock.fileno(), readable)
        try:
            seq = 0
            # Each hop limit twice: one lost probe would add a link to the count.
            rounds = [None] * count + [h for h in range(1, max_hops + 1) for _ in range(2)]
            for hop_limit in rounds:
                for target in targets:
                    if hop_limit is not None and count_hops is not None \
                            and target.key not in count_hops:
                        continue
                    seq = (seq + 1) & 0xFFFF
                    pending[seq] = _Pending(target, time.monotonic(), hop_limit)
                    self._send(target, ident, seq, hop_limit)
                await asyncio.sleep(spacing)
            await asyncio.sleep(timeout)
        finally:
            loop.remove_reader(self.sock.fileno())
        results: dict[str, Probes] = {}
        for target in targets:
            mine = [p for p in pending.values() if p.target is target and p.hop_limit is None]
            answered = [p.reply for p in mine if p.reply is not None]
            reached = [p.hop_limit for p in pending.values() if p.target is target
                       and p.hop_limit is not None and p.reply is not None]
            results[target.key] = Probes(sent=len(mine), rtts=[r[0] for r in answered],
                                         hop_limits=[r[1] for r in answered],
                                         forward_hops=min(reached, default=None))
        return results

    def _send(self, target: Target, ident: int, seq: int, hop_limit: int | None) -> None:
        # Sizes spread like ordinary traffic, not a fixed probe size.
        payload = random.randbytes(random.choice((48, 56, 120, 200, 512, 1200)))
        packet = ICMP_HEADER.pack(ECHO_REQUEST, 0, 0, ident, seq) + payload
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, target.mark)
        ancillary = [] if hop_limit is None else [
            (socket.IPPROTO_IPV6, socket.IPV6_HOPLIMIT, struct.pack("@i", hop_limit))]
        # Unsent counts as lost: no route now is an answer too.
        with contextlib.suppress(OSError):
            self.sock.sendmsg([packet], ancillary, 0, (target.address, 0))
