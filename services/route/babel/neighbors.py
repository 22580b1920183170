"""Babel neighbors: Hello history, IHU, and link cost (RFC 8966 3.4, appendix A).

Two cost rules, chosen per interface:
- "wired": 2-out-of-3. The link is up if two of the last three expected
  Hellos arrived; its cost is then the rxcost the neighbor reports in its IHU
  (our nominal cost of 96 on its side too, for a babeld).
- "etx": for lossy links. beta is the share of the last 16 expected Hellos
  received; rxcost = 256 / beta; cost = max(txcost, 256) * rxcost / 256.
"""

from __future__ import annotations

from dataclasses import dataclass

from .codec import INFINITY

NOMINAL_COST = 96
HISTORY = 16
# A neighbor whose Hellos jump this far (either way) has restarted: start over.
SEQNO_JUMP = 16


def seqno_after(a: int, b: int) -> bool:
    """a is later than b in 16-bit sequence arithmetic (RFC 8966 3.2.1)."""
    return 0 < ((a - b) & 0xFFFF) < 0x8000


def seqno_distance(a: int, b: int) -> int:
    """How far a is after b, negative if before."""
    d = (a - b) & 0xFFFF
    return d - 0x10000 if d >= 0x8000 else d


@dataclass
class Neighbor:
    interface: str
    address: str
    rule: str = "wired"
    history: int = 0  # bit 0 is the latest expected Hello; 1 = received
    expected: int | None = None  # seqno of the next Hello
    hello_interval: float = 0.0  # seconds, as the neighbor announced
    hello_deadline: float = 0.0  # when an expected Hello counts as missed
    txcost: int = INFINITY  # the rxcost from its last IHU about us
    ihu_deadline: float = 0.0
    hellos_received: int = 0

    def on_hello(self, seqno: int, interval_cs: int, now: float) -> None:
        self.hellos_received += 1
        gap = None if self.expected is None else seqno_distance(seqno, self.expected)
        if gap is None or abs(gap) > SEQNO_JUMP:
            self.history = 0
        elif gap < 0:
            # Late, not lost: the clock counted Hellos missed that the
            # neighbor's jittered timer (babeld's: 0.75-1.25 intervals) had
            # not sent yet. Undo them (RFC 8966 A.1); ignoring this Hello
            # instead kept a link down after a silence until the seqnos met.
            self.history >>= -gap
        else:
            self.history = (self.history << gap) & ((1 << HISTORY) - 1)
        self.history = ((self.history << 1) | 1) & ((1 << HISTORY) - 1)
        self.expected = (seqno + 1) & 0xFFFF
        self.hello_interval = interval_cs / 100
        # Missed only once 1.5 intervals have gone by, as babeld does.
        self.hello_deadline = now + 1.5 * self.hello_interval if interval_cs else float("inf")

    def on_ihu(self, rxcost: int, interval_cs: int, now: float) -> None:
        self.txcost = rxcost
        # An IHU lasts 3.5 of its intervals (RFC 8966 appendix A.3).
        self.ihu_deadline = now + 3.5 * interval_cs / 100 if interval_cs else float("inf")

    def tick(self, now: float) -> None:
        """Count the Hellos that did not come, and forget a stale IHU."""
        while self.expected is not None and self.hello_interval > 0 \
                and now >= self.hello_deadline:
            self.history = (self.history << 1) & ((1 << HISTORY) - 1)
            self.expected = (self.expected + 1) & 0xFFFF
            self.hello_deadline += self.hello_interval
            if self.history == 0:
                break
        if now >= self.ihu_deadline:
            self.txcost = INFINITY

    @property
    def silent(self) -> bool:
        """Nothing heard for the whole history: the neighbor can be forgotten."""
        return self.expected is not None and self.history == 0

    def rxcost(self) -> int:
        if self.rule == "wired":
            return NOMINAL_COST if bin(self.history & 0b111).count("1") >= 2 else INFINITY
        received = bin(self.history).count("1")
        if received == 0:
            return INFINITY
        return min(INFINITY, 256 * HISTORY // received)

    def cost(self) -> int:
        rxcost = self.rxcost()
        if rxcost >= INFINITY or self.txcost >= INFINITY:
            return INFINITY
        if self.rule == "wired":
            return self.txcost
        return min(INFINITY, max(self.txcost, 256) * rxcost // 256)
