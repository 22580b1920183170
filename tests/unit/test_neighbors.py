"""discovery's neighbor table and link's projection, without sockets or kernel."""

from __future__ import annotations

from pathlib import Path

import pytest
from google.protobuf import timestamp_pb2
from mesh.discovery.v1 import discovery_pb2
from mesh.link.v1 import link_pb2

from services.common.config import ConfigError
from services.common.envelope import Event
from services.common.identity import Identity
from services.discovery.hello import HelloInfo
from services.discovery.service import DiscoverySettings
from services.discovery.table import (
    NeighborTable,
    RateLimited,
    Replayed,
    TableFull,
    unicast_targets,
)
from services.link import handlers as link
from services.link.service import endpoint


def hello(identity: Identity, node: str, sent_at: int, port: int = 7387) -> HelloInfo:
    return HelloInfo(node, identity.identity_key, identity.chain_address,
                     identity.wireguard_public, port, 1000, sent_at)


@pytest.fixture
def alice(tmp_path: Path) -> Identity:
    return Identity.load_or_create(tmp_path / "alice")


def test_first_hello_is_news_repeats_are_not(alice: Identity) -> None:
    table = NeighborTable()
    seen = table.heard(hello(alice, "a", 1000), "v-a", "fe80::1", 1000)
    assert seen is not None and seen.reason == discovery_pb2.NEIGHBOR_SEEN_REASON_FIRST
    assert table.heard(hello(alice, "a", 2000), "v-a", "fe80::1", 2000) is None
    moved = table.heard(hello(alice, "a", 3000, port=7999), "v-a", "fe80::1", 3000)
    assert moved is not None and moved.reason == discovery_pb2.NEIGHBOR_SEEN_REASON_CHANGED


def test_a_gateway_hellos_its_exits_and_an_exit_answers_whoever_helloed_it(
        alice: Identity) -> None:
    """Over an uplink hellos go unicast: a gateway to its configured
    internet_peers, an exit (answering) back to the routers heard there."""
    table = NeighborTable()
    table.heard(hello(alice, "gw", 1000), "up0", "2001:db8:ff:6::1", 1000)
    heard = table.sources_on("up0")
    assert heard == ["2001:db8:ff:6::1"] and table.sources_on("v-a") == []
    assert unicast_targets(("2001:db8:ff:9::1",), False, heard) == ["2001:db8:ff:9::1"]
    assert unicast_targets((), True, heard) == ["2001:db8:ff:6::1"]
    assert unicast_targets((), False, heard) == []
    with pytest.raises(ConfigError, match=r"internet_peers: 'exit\.example' is not an IPv6"):
        DiscoverySettings(internet_peers=("exit.example",))
    assert DiscoverySettings(internet_peers=("2001:DB8:0::9",)).internet_peers == ("2001:db8::9",)
    # WireGuard needs a link-local endpoint's interface; a global one is routed.
    assert endpoint("fe80::1", "v-a", 20000) == "[fe80::1%v-a]:20000"
    assert endpoint("2001:db8:ff:6::1", "up0", 20000) == "[2001:db8:ff:6::1]:20000"


def test_a_hello_replayed_on_another_interface_is_refused(alice: Identity) -> None:
    table = NeighborTable()
    table.heard(hello(alice, "a", 5000), "v-a", "fe80::1", 5000)
    with pytest.raises(Replayed):
        table.heard(hello(alice, "a", 5000), "v-x", "fe80::66", 5001)
    assert table.heard(hello(alice, "a", 5001), "v-x", "fe80::1", 5002) is not None


def test_silence_loses_a_neighbor_after_the_dead_interval(alice: Identity) -> None:
    table = NeighborTable(dead_intervals=3.5)
    table.heard(hello(alice, "a", 0), "v-a", "fe80::1", 0)
    assert table.expire(3500) == []
    lost = table.expire(3501)
    assert [(x.neighbor_id, x.interface_name) for x in lost] == [("a", "v-a")]
    assert lost[0].reason == discovery_pb2.NEIGHBOR_LOST_REASON_HELLO_TIMEOUT


def test_a_source_is_rate_limited(alice: Identity) -> None:
    table = NeighborTable(max_hellos_per_second=5)
    for _ in range(5):
        table.admit("fe80::bad", 0)
    with pytest.raises(RateLimited):
        table.admit("fe80::bad", 0)
    table.admit("fe80::bad", 1000)  # tokens come back with time
    table.admit("fe80::good", 0)  # and other sources are unaffected


def test_an_interface_holds_a_bounded_number_of_neighbors(tmp_path: Path) -> None:
    table = NeighborTable(max_per_interface=2)
    ids = [Identity.load_or_create(tmp_path / str(i)) for i in range(3)]
    table.heard(hello(ids[0], "n0", 1), "v-a", "fe80::1", 1)
    table.heard(hello(ids[1], "n1", 1), "v-a", "fe80::2", 1)
    with pytest.raises(TableFull):
        table.heard(hello(ids[2], "n2", 1), "v-a", "fe80::3", 1)
    assert table.heard(hello(ids[2], "n2", 1), "v-b", "fe80::3", 1) is not None


def event(payload: object, seq: int = 1) -> Event:
    from mesh.common.v1 import envelope_pb2

    env = envelope_pb2.Envelope(event_id=f"e{seq}",
                                occurred_at=timestamp_pb2.Timestamp(seconds=seq))
    return Event(envelope=env, payload=payload, subject="s", sequence=seq)  # type: ignore[arg-type]


def test_losing_the_neighbor_decides_link_down() -> None:
    state = link_pb2.LinkState()
    link.on_neighbor_seen(state, event(discovery_pb2.NeighborSeen(
        neighbor_id="b", interface_name="v-b")))
    up = link_pb2.LinkUp(neighbor_id="b", tunnel_interface="mw1", physical_interface="v-b")
    link.on_link_up(state, event(up, 2))
    # lost on another interface: the link's interface still hears it
    assert link.on_neighbor_lost(state, event(discovery_pb2.NeighborLost(
        neighbor_id="b", interface_name="v-other"), 3)) == []
    decided = link.on_neighbor_lost(state, event(discovery_pb2.NeighborLost(
        neighbor_id="b", interface_name="v-b"), 4))
    assert [(d.kind, d.aggregate_id, d.payload.reason) for d in decided] == [
        ("down", "b", link_pb2.LINK_DOWN_REASON_NEIGHBOR_LOST)]
    link.on_link_down(state, event(decided[0].payload, 5))
    assert state.links["b"].status == link_pb2.LINK_STATUS_DOWN
    assert state.links["b"].downs == 1


def test_a_late_down_for_a_replaced_tunnel_is_ignored() -> None:
    state = link_pb2.LinkState()
    link.on_link_up(state, event(link_pb2.LinkUp(neighbor_id="b", tunnel_interface="mw2")))
    link.on_link_down(state, event(link_pb2.LinkDown(neighbor_id="b", tunnel_interface="mw1"), 2))
    assert state.links["b"].status == link_pb2.LINK_STATUS_UP
    assert link.summarize(state)["up"] == "b"
