"""verify's judgment: what probes say about a claim, and when a neighbor is
penalized, forgiven and pardoned (pure rules; the live test is in netns)."""

from __future__ import annotations

import itertools

from mesh.route.v1 import route_pb2
from mesh.verify.v1 import verify_pb2

from services.verify.handlers import make_handlers
from services.verify.judge import PenaltyPolicy, Probes, Tolerance, measured_metric, verdict
from services.verify.service import REMEASURE_WINDOWS, Verifier, vias
from tests.unit.events import event

TOLERANCE = Tolerance()
HONEST, OVER = verify_pb2.VERDICT_HONEST, verify_pb2.VERDICT_OVERCLAIMED


def probes(sent: int, answered: int, hops: int) -> Probes:
    return Probes(sent=sent, rtts=[0.001] * answered, hop_limits=[64 - hops + 1] * answered,
                  forward_hops=hops if answered else None)


def test_measured_metric_is_96_a_link_times_etx() -> None:
    assert measured_metric(probes(10, 10, 3)) == 288
    assert measured_metric(probes(10, 5, 2)) == 384  # half lost: ETX 2
    # Without hop-limited answers the replies' hop limits count the links.
    assert measured_metric(Probes(10, [0.001] * 10, [62] * 10)) == 288


def test_a_route_three_links_long_claimed_as_one_is_an_overclaim() -> None:
    assert verdict(probes(10, 10, 3), route_metric=96, tolerance=TOLERANCE) == OVER
    assert verdict(probes(10, 10, 3), route_metric=288, tolerance=TOLERANCE) == HONEST


def test_loss_within_tolerance_is_honest() -> None:
    # 30% lost on a true three-link route: ETX 1.43, 411 < 288 * 1.5 + 96.
    assert verdict(probes(10, 7, 3), route_metric=288, tolerance=TOLERANCE) == HONEST


def test_no_answer_is_unreachable_and_too_few_is_inconclusive() -> None:
    assert verdict(probes(10, 0, 0), 96, TOLERANCE) == verify_pb2.VERDICT_UNREACHABLE
    assert verdict(probes(10, 2, 1), 96, TOLERANCE) == verify_pb2.VERDICT_INCONCLUSIVE
    assert verdict(probes(0, 0, 0), 96, TOLERANCE) == verify_pb2.VERDICT_INCONCLUSIVE


POLICY = PenaltyPolicy(windows=6, overclaimed=2, base_seconds=60, forgive_after=3)


ROUNDS = itertools.count(1)


def window(handlers: dict, state: verify_pb2.VerifyState, judged: int, at: int = 1000,
           neighbor: str = "liar", prefix: str = "2001:db8::1/128",
           round_started: int | None = None) -> list:
    """A verdict on neighbor's route to prefix from a probing round (a new
    one unless round_started names it)."""
    verified = verify_pb2.RouteVerified(neighbor_id=neighbor, prefix=prefix, verdict=judged)
    verified.window_start.seconds = round_started or next(ROUNDS)
    return list(handlers[verify_pb2.RouteVerified](state, event(verified, at=at)))


def with_an_honest_neighbor() -> verify_pb2.VerifyState:
    state = verify_pb2.VerifyState()
    state.neighbors["honest"].verdicts["VERDICT_HONEST"] = 1
    return state


def test_two_overclaims_in_the_window_bring_a_penalty_that_doubles() -> None:
    handlers = make_handlers(POLICY)
    state = with_an_honest_neighbor()
    assert window(handlers, state, OVER) == []
    assert window(handlers, state, HONEST) == []
    [decided] = window(handlers, state, OVER, at=1000)
    window(handlers, state, HONEST)
    # The evidence outlives the honest windows after it.
    assert state.neighbors["liar"].last_overclaim.verdict == OVER
    penalty = decided.payload
    assert (decided.kind, penalty.neighbor_id) == ("penalized", "liar")
    assert penalty.mode == verify_pb2.PENALTY_MODE_EXCLUDE
    assert penalty.expires_at.seconds == 1000 + 60
    handlers[verify_pb2.NeighborPenalized](state, event(penalty))
    assert window(handlers, state, OVER) == []  # penalized already
    handlers[verify_pb2.NeighborPardoned](state, event(verify_pb2.NeighborPardoned(
        neighbor_id="liar", reason=verify_pb2.PARDON_REASON_EXPIRED)))
    window(handlers, state, OVER)
    [again] = window(handlers, state, OVER, at=5000)
    assert again.payload.expires_at.seconds == 5000 + 120


def test_a_round_that_went_badly_on_every_prefix_counts_once() -> None:
    """The machine stalls for a moment: every prefix through the neighbor
    looks over-claimed in that one round. No penalty until another round."""
    handlers = make_handlers(POLICY)
    state = with_an_honest_neighbor()
    for target in range(1, 5):
        assert window(handlers, state, OVER, prefix=f"2001:db8::{target}/128",
                      round_started=77) == []
    [decided] = window(handlers, state, OVER, round_started=78)
    assert decided.kind == "penalized"


def test_the_last_unpenalized_neighbor_is_not_excluded() -> None:
    """Excluding it would cut the router off: a router that finds every
    neighbor lying is likelier measuring its own trouble."""
    handlers = make_handlers(POLICY)
    alone = verify_pb2.VerifyState()
    assert window(handlers, alone, OVER) == [] and window(handlers, alone, OVER) == []
    state = with_an_honest_neighbor()
    state.neighbors["honest"].penalty.neighbor_id = "honest"  # penalized already
    assert window(handlers, state, OVER) == [] and window(handlers, state, OVER) == []
    state.neighbors["third"].verdicts["VERDICT_HONEST"] = 1
    [decided] = window(handlers, state, OVER)
    assert decided.payload.neighbor_id == "liar"


def test_honest_windows_forgive_past_offenses() -> None:
    handlers = make_handlers(POLICY)
    state = verify_pb2.VerifyState()
    state.neighbors["liar"].offenses = 2
    for _ in range(3):
        window(handlers, state, HONEST)
    assert state.neighbors["liar"].offenses == 1


def test_every_neighbor_advertising_a_route_is_probed() -> None:
    handlers = make_handlers(POLICY)
    state = verify_pb2.VerifyState()
    handlers[route_pb2.RouteChanged](state, event(route_pb2.RouteChanged(
        prefix="2001:db8::1/128", next_hop_id="a", tunnel_interface="mwa", metric=192,
        advertised_metric=96, change=route_pb2.ROUTE_CHANGE_SELECTED,
        alternatives=[route_pb2.RouteChanged.Alternative(
            next_hop_id="b", tunnel_interface="mwb", next_hop_address="fe80::b", metric=384,
            advertised_metric=288)])))
    through = vias(state.targets["2001:db8::1/128"])
    assert [(v.neighbor_id, v.tunnel, v.metric) for v in through] == [("a", "mwa", 192),
                                                                    ("b", "mwb", 384)]


def test_only_routes_are_targets_and_retractions_remove_them() -> None:
    handlers = make_handlers(POLICY)
    state = verify_pb2.VerifyState()
    handlers[route_pb2.RouteChanged](state, event(route_pb2.RouteChanged(
        prefix="2001:db8::1/128", next_hop_id="n", metric=192, advertised_metric=96,
        change=route_pb2.ROUTE_CHANGE_SELECTED)))
    assert state.targets["2001:db8::1/128"].metric == 192
    handlers[route_pb2.RouteChanged](state, event(route_pb2.RouteChanged(
        prefix="2001:db8::1/128", change=route_pb2.ROUTE_CHANGE_RETRACTED)))
    assert not state.targets


def test_links_are_counted_now_and_then_and_the_fewer_of_two_counts_is_used() -> None:
    """Hop-limited probes die on the way after the hop before billed them: the
    count is kept per route and taken again every few windows; a lost probe
    (one link too many) does not count, nor does a count from before the
    neighbor's own route grew longer, once counted twice since."""
    verifier = Verifier.__new__(Verifier)
    verifier.hops = {}
    key = ("2001:db8::9/128", "r2", "fe80::2", 1)
    assert verifier.with_hops(key, probes(10, 10, 3)).forward_hops == 3
    unmeasured = Probes(10, [0.001] * 10, [62] * 10)  # no hop-limited round this window
    assert verifier.with_hops(key, unmeasured).forward_hops == 3
    assert verifier.with_hops(key, probes(10, 10, 4)).forward_hops == 3  # one was lost
    assert verifier.hops[key] == (4, 3, 0)
    # The neighbor now forwards on a longer path: the old count goes.
    assert verifier.with_hops(key, probes(10, 10, 5)).forward_hops == 4
    assert verifier.with_hops(key, probes(10, 10, 5)).forward_hops == 5
    for _ in range(REMEASURE_WINDOWS):
        verifier.with_hops(key, unmeasured)
    assert verifier.hops[key][2] >= REMEASURE_WINDOWS  # due to be counted again
