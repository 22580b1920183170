"""Babel's logic: link cost, feasibility, selection with a price, and whole
meshes of speakers in memory (convergence, a cut, the knob, a restart)."""

from __future__ import annotations

import pytest

from services.route.babel.codec import INFINITY, Update, network
from services.route.babel.neighbors import NOMINAL_COST, Neighbor
from services.route.babel.table import RouteTable, Selected, best
from tests.unit.babel_sim import SimulatedMesh

RID = bytes.fromhex("0102030405060708")
PREFIX = network("2001:db8::/64")


# -- link cost ---------------------------------------------------------------------


def hellos(neighbor: Neighbor, seqnos: list[int], interval_cs: int = 100) -> None:
    for i, seqno in enumerate(seqnos):
        neighbor.on_hello(seqno, interval_cs, now=float(i))


def test_wired_link_is_up_with_two_of_the_last_three_hellos() -> None:
    neighbor = Neighbor("eth0", "fe80::1")
    neighbor.on_ihu(NOMINAL_COST, 300, now=0.0)
    hellos(neighbor, [1, 2])
    assert neighbor.cost() == NOMINAL_COST
    hellos(neighbor, [4])  # 3 missed: 1 of the last 3 (2 missed, 4 heard)... 2, _, 4
    assert neighbor.rxcost() == NOMINAL_COST
    hellos(neighbor, [7])  # 4, _, _, 7: one of three
    assert neighbor.rxcost() == INFINITY and neighbor.cost() == INFINITY


def test_missing_hellos_are_counted_by_the_clock() -> None:
    neighbor = Neighbor("eth0", "fe80::1")
    neighbor.on_ihu(NOMINAL_COST, 300, now=0.0)
    hellos(neighbor, [1, 2, 3])
    neighbor.tick(now=2.0 + 1.5 * 1.0 + 1.0)  # two intervals past the deadline
    assert neighbor.rxcost() == INFINITY


def test_ihu_expires_after_three_and_a_half_intervals() -> None:
    neighbor = Neighbor("eth0", "fe80::1")
    hellos(neighbor, [1, 2, 3])
    neighbor.on_ihu(NOMINAL_COST, 100, now=2.0)
    neighbor.tick(now=5.4)
    assert neighbor.txcost == NOMINAL_COST
    neighbor.tick(now=5.6)
    assert neighbor.txcost == INFINITY


def test_etx_grows_with_loss() -> None:
    clean, lossy = Neighbor("w0", "fe80::1", "etx"), Neighbor("w0", "fe80::2", "etx")
    hellos(clean, list(range(1, 17)))
    hellos(lossy, list(range(1, 17, 2)))  # every other one
    for neighbor in (clean, lossy):
        neighbor.on_ihu(256, 300, now=16.0)
    assert clean.cost() == 256
    assert lossy.cost() == 512


def test_a_late_hello_undoes_the_misses_the_clock_counted() -> None:
    # babeld jitters its Hellos: after a silence the clock may have counted
    # Hellos missed that were never sent. The next one comes "from the past".
    neighbor = Neighbor("eth0", "fe80::1")
    neighbor.on_ihu(NOMINAL_COST, 10_000, now=0.0)
    hellos(neighbor, [1, 2, 3])
    neighbor.tick(now=9.0)  # silence: the clock expects seqno 10 by now
    assert neighbor.expected == 10 and neighbor.rxcost() == INFINITY
    neighbor.on_hello(8, 100, now=9.1)  # babeld sent only 4..8, of which 8 arrives
    neighbor.on_hello(9, 100, now=10.0)
    assert neighbor.expected == 10
    assert neighbor.cost() == NOMINAL_COST  # up again two Hellos after the silence


def test_a_neighbor_whose_seqnos_jump_has_restarted() -> None:
    neighbor = Neighbor("eth0", "fe80::1")
    hellos(neighbor, [100, 101, 102])
    hellos(neighbor, [5000])
    assert neighbor.history == 1 and neighbor.expected == 5001


# -- feasibility and selection --------------------------------------------------


def update(seqno: int, metric: int, price: int | None = None) -> Update:
    return Update(PREFIX, RID, seqno, metric, 400, None, price)


def test_feasibility_wants_a_newer_seqno_or_a_smaller_metric() -> None:
    table = RouteTable(default_path_price=7)
    table.advertised(PREFIX, RID, 10, 200, now=0.0)
    assert not table.feasible(PREFIX, RID, 10, 200)
    assert table.feasible(PREFIX, RID, 10, 199)
    assert table.feasible(PREFIX, RID, 11, 5000)
    assert not table.feasible(PREFIX, RID, 9, 1)
    assert table.feasible(PREFIX, RID, 9, INFINITY)  # retractions always are


def test_an_unfeasible_route_is_kept_but_not_selected() -> None:
    table = RouteTable(default_path_price=7)
    table.advertised(PREFIX, RID, 10, 200, now=0.0)
    assert table.update("n1", update(10, 300), now=0.0, selected=None)
    feasible, preferred = table.select(PREFIX, {"n1": 96}, {}, weight=0)
    assert feasible is None
    assert preferred is not None and preferred.neighbor == "n1"


def candidate(neighbor: str, metric: int, price: int, penalty: int = 0) -> Selected:
    return Selected(PREFIX, neighbor, RID, 1, metric, metric - 96, penalty, price, False, None)


def test_the_knob_moves_the_choice_from_the_good_path_to_the_cheap_one() -> None:
    good, cheap = candidate("good", 192, 50), candidate("cheap", 384, 10)
    picks = {w: best([good, cheap], w).neighbor for w in (0, 250, 500, 750, 1000)}
    assert picks == {0: "good", 250: "good", 500: "cheap", 750: "cheap", 1000: "cheap"}


def test_with_every_price_zero_the_metric_decides_at_any_weight() -> None:
    routes = [candidate("a", 300, 0), candidate("b", 200, 0), candidate("c", 250, 0)]
    assert {best(routes, w).neighbor for w in range(0, 1001, 100)} == {"b"}


def test_ties_are_broken_so_the_ranking_is_total() -> None:
    routes = [candidate("z", 200, 5), candidate("a", 200, 5)]
    assert best(routes, 500).neighbor == best(list(reversed(routes)), 500).neighbor == "a"


def test_a_penalty_costs_metric_and_an_exclusion_removes_the_route() -> None:
    table = RouteTable(default_path_price=0)
    table.update("liar", update(1, 0), now=0.0, selected=None)
    table.update("honest", update(1, 96), now=0.0, selected=None)
    costs = {"liar": 96, "honest": 96}
    assert table.select(PREFIX, costs, {}, 0)[0].neighbor == "liar"
    assert table.select(PREFIX, costs, {"liar": 200}, 0)[0].neighbor == "honest"
    assert table.select(PREFIX, costs, {"liar": None}, 0)[0].neighbor == "honest"


def test_a_penalized_neighbor_still_routes_to_itself() -> None:
    """Its neighbors penalize a router that relayed a liar's routes before it
    caught the liar itself: its own addresses, one link away, stay reachable
    through it (every route to it went through it: excluded, it was cut off
    from the mesh), its other routes do not."""
    table = RouteTable(default_path_price=0)
    table.update("relayer", update(1, 0), now=0.0, selected=None)  # it originates PREFIX
    table.update("honest", update(1, 96), now=0.0, selected=None)
    costs = {"relayer": 96, "honest": 96}
    origins = {"relayer": RID}
    assert table.select(PREFIX, costs, {"relayer": None}, 0, origins)[0].neighbor == "relayer"
    assert table.select(PREFIX, costs, {"relayer": 500}, 0, origins)[0].neighbor == "relayer"
    # Another router's prefix through it: excluded as before.
    assert table.select(PREFIX, costs, {"relayer": None}, 0,
                        {"relayer": b"another"})[0].neighbor == "honest"


def test_a_route_without_the_price_sub_tlv_gets_the_default_price() -> None:
    table = RouteTable(default_path_price=7)
    table.update("babeld", update(1, 96, price=None), now=0.0, selected=None)
    table.update("ours", update(1, 96, price=3), now=0.0, selected=None)
    routes = {r.neighbor: r for r in table.candidates(PREFIX, {"babeld": 96, "ours": 96}, {})}
    assert (routes["babeld"].path_price, routes["babeld"].price_defaulted) == (7, True)
    assert (routes["ours"].path_price, routes["ours"].price_defaulted) == (3, False)


# -- meshes in memory ---------------------------------------------------------------

RING = [("a", "b"), ("b", "c"), ("c", "d"), ("d", "e"), ("e", "f"), ("f", "a"), ("a", "d")]


def test_a_ring_with_a_chord_converges_on_shortest_paths() -> None:
    mesh = SimulatedMesh(RING)
    mesh.run(6)
    assert mesh.converged()
    assert mesh.via("a", "d") == "d"
    assert mesh.route("b", "e").metric == 3 * NOMINAL_COST  # b-a-d-e
    assert mesh.route("a", "c").path_price == 0


def test_a_cut_link_is_routed_around_and_healed() -> None:
    mesh = SimulatedMesh(RING)
    mesh.run(6)
    mesh.cut.add(frozenset(("a", "d")))
    mesh.run(8)
    assert mesh.via("a", "d") in {"b", "f"}
    assert mesh.route("a", "d").metric == 3 * NOMINAL_COST
    mesh.cut.clear()
    mesh.run(8)
    assert mesh.via("a", "d") == "d"


def test_the_knob_flips_between_the_cheap_and_the_good_path() -> None:
    # a reaches d through e (2 hops, e is dear) or b-c (3 hops, cheap).
    mesh = SimulatedMesh([("a", "b"), ("b", "c"), ("c", "d"), ("a", "e"), ("e", "d")],
                         prices={"b": 1, "c": 1, "e": 10})
    mesh.run(6)
    assert mesh.via("a", "d") == "e"
    mesh.speakers["a"].set_weight(1000)
    mesh.run(3)  # the cheap route is unfeasible until d's seqno goes up on request
    assert mesh.via("a", "d") == "b"
    assert mesh.route("a", "d").path_price == 2
    mesh.speakers["a"].set_weight(0)
    mesh.run(1)
    assert mesh.via("a", "d") == "e"


def test_price_adds_up_along_the_path() -> None:
    mesh = SimulatedMesh([("a", "b"), ("b", "c"), ("c", "d")], prices={"b": 3, "c": 5, "d": 2})
    mesh.run(6)
    # a pays b what b advertises: b's price plus c's plus d's own.
    assert mesh.route("a", "d").path_price == 3 + 5 + 2


def test_a_withdrawn_prefix_is_retracted_everywhere() -> None:
    mesh = SimulatedMesh(RING)
    mesh.run(6)
    mesh.speakers["d"].originate([])
    mesh.run(2)
    assert all(mesh.route(n, "d") is None for n in mesh.names if n != "d")


@pytest.mark.parametrize("persisted", [True, False])
def test_a_restart_with_a_persisted_seqno_is_feasible_at_once(persisted: bool) -> None:
    mesh = SimulatedMesh([("a", "b"), ("b", "c")])
    old = mesh.speakers["c"] = mesh.start("c", 2, 0, 1.0, seqno=10)
    mesh.run(5)
    old.originate([])  # cleared from the mesh, as after a long outage
    mesh.run(0.2)
    seqno = (old.seqno + 1) if persisted else 0
    mesh.speakers["c"] = mesh.start("c", 2, 0, 1.0, seqno=seqno)
    mesh.run(2.5)
    assert mesh.route("a", "c") is not None
    # Starting over from 0, c's routes were unfeasible until someone asked it
    # for a newer seqno; from the persisted one, nobody had to.
    requests = sum(s.stats.seqno_requests for s in mesh.speakers.values())
    assert (requests == 0) == persisted


def test_garbage_is_counted_not_raised() -> None:
    mesh = SimulatedMesh([("a", "b")])
    speaker = mesh.speakers["a"]
    speaker.receive("to-b", "fe80::2", b"\x2a\x02\x00\x04\x63\x02xx", 0.0)
    speaker.receive("to-b", "fe80::2", b"junk", 0.0)
    assert speaker.stats.dropped == {"unknown-tlv": 1}
    assert speaker.stats.rejected == {"magic": 1}


def test_a_route_goes_back_to_the_neighbor_it_goes_through_as_a_retraction() -> None:
    """Split horizon with poison reverse: a neighbor does not keep a route of
    ours that now goes through itself, heard before we chose that way (it
    would steer traffic into a bounce, priced as the route we gave up)."""
    mesh = SimulatedMesh([("x", "y"), ("y", "z"), ("z", "t"), ("x", "w"), ("w", "t")])
    mesh.cut.add(frozenset(("z", "t")))
    mesh.run(6)
    assert mesh.via("y", "t") == "x" and mesh.via("z", "t") == "y"
    mesh.cut.clear()
    # y takes the shorter way within a few Hellos: well before its old
    # Update would expire at z (3.5 Update intervals, 14 s).
    for _ in range(10):
        mesh.run(0.5)
        if mesh.via("y", "t") == "z":
            break
    mesh.run(0.5)
    assert mesh.via("y", "t") == "z" and mesh.via("z", "t") == "t"
    z = mesh.speakers["z"]
    through_y = [c for c in z.table.candidates(mesh.prefix["t"], z.costs(), {}, feasible_only=False)
                 if c.neighbor.startswith("to-y/")]
    assert through_y == []
