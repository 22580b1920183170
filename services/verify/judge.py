"""What probes say about a neighbor's claim, and when a neighbor is penalized:
pure arithmetic, shared by the service (verdicts) and the handlers
(penalties), tested without a network.

The measured metric is what Babel would have computed on wired links had
the neighbor told the truth: 96 per link on the path times the ETX of the
loss seen. The links are counted on the way there, by the fewest hops a
hop-limited probe needed to get an answer; failing that (a path longer than
the probes reach), on the way back, from the replies' hop limits. A claim is an
over-claim when the measured metric exceeds ours through the neighbor by
more than the tolerance: a share of it, plus slack for one extra link (the
replies may come back another way).
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass

from mesh.verify.v1 import verify_pb2

NOMINAL_LINK_COST = 96
INITIAL_HOP_LIMIT = 64  # Linux's default for echo replies
MAX_METRIC = 0xFFFE


@dataclass(frozen=True)
class Tolerance:
    share: float = 0.5  # measured may exceed ours by this share...
    slack: int = NOMINAL_LINK_COST  # ...plus this much
    min_answered: int = 3  # fewer answers than this, and nothing is judged


@dataclass(frozen=True)
class Probes:
    sent: int
    rtts: list[float]  # seconds, one per answered probe
    hop_limits: list[int]  # of the answers
    # The smallest hop limit a probe was answered with: links on the way there.
    forward_hops: int | None = None

    @property
    def answered(self) -> int:
        return len(self.rtts)

    @property
    def hops(self) -> int:
        if self.forward_hops is not None:
            return self.forward_hops
        if not self.hop_limits:
            return 0
        return INITIAL_HOP_LIMIT - max(self.hop_limits) + 1


def measured_metric(probes: Probes) -> int:
    if probes.answered == 0:
        return MAX_METRIC + 1
    etx = probes.sent / probes.answered
    return min(MAX_METRIC, round(probes.hops * NOMINAL_LINK_COST * etx))


def verdict(probes: Probes, route_metric: int, tolerance: Tolerance) -> verify_pb2.Verdict:
    if probes.sent == 0:
        return verify_pb2.VERDICT_INCONCLUSIVE
    if probes.answered == 0:
        return verify_pb2.VERDICT_UNREACHABLE
    if probes.answered < min(tolerance.min_answered, probes.sent):
        return verify_pb2.VERDICT_INCONCLUSIVE
    allowed = route_metric * (1 + tolerance.share) + tolerance.slack
    if measured_metric(probes) > allowed:
        return verify_pb2.VERDICT_OVERCLAIMED
    return verify_pb2.VERDICT_HONEST


def percentile(values: list[float], share: float) -> float:
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(share * len(ordered)))]


def median(values: list[float]) -> float:
    return statistics.median(values) if values else 0.0


@dataclass(frozen=True)
class PenaltyPolicy:
    windows: int = 6  # the sliding evaluation: this many latest windows
    overclaimed: int = 2  # over-claims among them that bring a penalty
    base_seconds: int = 60  # the first penalty; each later one lasts twice as long
    max_seconds: int = 3600
    # Honest windows in a row that forgive one past offense.
    forgive_after: int = 30

    def duration(self, offenses: int) -> int:
        return min(self.max_seconds, self.base_seconds * 2 ** min(offenses, 16))
