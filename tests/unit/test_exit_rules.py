"""exit's pure rules: what an exit admits, which address a client gets, how a
client picks an exit, the projection, and the settings' errors (the live
tests are in tests/netns/test_exit.py)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from google.protobuf.message import Message
from mesh.exit.v1 import exit_pb2, registration_pb2
from mesh.pay.v1 import pay_pb2
from mesh.route.v1 import route_pb2

from services.common.config import ConfigError
from services.common.identity import Identity
from services.common.money import amount, money
from services.exit.effects import render_enforcement
from services.exit.handlers import make_handlers
from services.exit.registration import (
    Candidate,
    Usage,
    addresses_for,
    check_answer,
    check_offer,
    check_request,
    choose,
    client_access,
    offer_message,
    peer_address,
    registration_message,
    repriced,
    response_price,
    usage_since,
)
from services.exit.service import ExitAddress, ExitSettings
from tests.unit.events import event

NOW = 1_800_000_000_000
WINDOW = 300_000
POOL = "fd64:0:0:1::/126"  # room for two clients


def signed(identity: Identity, **fields: object) -> registration_pb2.RegisterRequest:
    request = registration_pb2.RegisterRequest(
        exit_id="ex", client_id="c", identity_key=identity.identity_key,
        wireguard_key=identity.wireguard_public, timestamp_ms=NOW)
    for name, value in fields.items():
        setattr(request, name, value)
    request.signature = identity.sign(registration_message(request))
    return request


@pytest.fixture
def identity(tmp_path: Path) -> Identity:
    return Identity.load_or_create(tmp_path / "keys")


def reason(request: registration_pb2.RegisterRequest) -> str:
    refusal = check_request(request, "ex", NOW, WINDOW)
    return "admitted" if refusal is None else exit_pb2.RefusalReason.Name(refusal.reason)


def test_a_signed_fresh_request_for_this_exit_is_admitted(identity: Identity) -> None:
    assert reason(signed(identity)) == "admitted"
    assert reason(signed(identity, timestamp_ms=NOW - WINDOW + 1)) == "admitted"


def test_bad_requests_are_refused_with_what_was_wrong(identity: Identity, tmp_path: Path) -> None:
    tampered = signed(identity)
    tampered.client_id = "someone-else"
    assert reason(tampered) == "REFUSAL_REASON_BAD_SIGNATURE"
    other = Identity.load_or_create(tmp_path / "other")
    forged = signed(identity)
    forged.signature = other.sign(registration_message(forged))
    assert reason(forged) == "REFUSAL_REASON_BAD_SIGNATURE"
    assert reason(signed(identity, timestamp_ms=NOW - WINDOW - 1)) == "REFUSAL_REASON_STALE"
    assert reason(signed(identity, exit_id="other-exit")) == "REFUSAL_REASON_MALFORMED"
    short = signed(identity, wireguard_key=b"\x01" * 5)
    refusal = check_request(short, "ex", NOW, WINDOW)
    assert refusal is not None and refusal.detail == "wireguard_key is 5 bytes, not 32"
    assert reason(signed(identity, client_id="")) == "REFUSAL_REASON_MALFORMED"


def registered(client_id: str, key: bytes, addresses: list[str]) -> exit_pb2.ExitRegistered:
    return exit_pb2.ExitRegistered(role=exit_pb2.EXIT_ROLE_EXIT, exit_id="ex", client_id=client_id,
                                   client_identity_key=key, client_addresses=addresses)


def test_a_client_takes_only_an_offer_signed_by_the_exit_it_first_registered_with(
        tmp_path: Path) -> None:
    exit_keys = Identity.load_or_create(tmp_path / "exit")
    impostor = Identity.load_or_create(tmp_path / "impostor")

    def offer(keys: Identity, **fields: object) -> registration_pb2.ExitOffer:
        made = registration_pb2.ExitOffer(
            exit_id="ex", wireguard_key=keys.wireguard_public, tunnel_port=51820,
            price_up=money(1), price_down=money(2), identity_key=keys.identity_key)
        made.signature = keys.sign(offer_message(made))
        for name, value in fields.items():
            if isinstance(value, Message):
                getattr(made, name).CopyFrom(value)
            else:
                setattr(made, name, value)
        return made

    genuine = offer(exit_keys)
    assert check_offer(genuine, "ex", pinned=b"") is None
    assert check_offer(genuine, "ex", pinned=exit_keys.identity_key) is None
    # Someone on the way swaps in its own WireGuard key: the signature breaks.
    swapped = offer(exit_keys, wireguard_key=impostor.wireguard_public)
    unsigned = "the offer is not signed by the identity key it carries"
    assert check_offer(swapped, "ex", b"") == unsigned
    # ... or its prices.
    assert check_offer(offer(exit_keys, price_down=money(3)), "ex", b"") == unsigned
    # ... or offers itself, signed: not the identity pinned at the first registration.
    assert "is not the pinned" in str(check_offer(offer(impostor), "ex", exit_keys.identity_key))
    assert "not 'ex'" in str(check_offer(offer(exit_keys, exit_id="ex2"), "ex", b""))
    answer = exit_pb2.ExitRegistered(exit_wireguard_key=exit_keys.wireguard_public,
                                     exit_chain_address=exit_keys.chain_address,
                                     client_addresses=["fd64:0:0:1::2/128"])
    assert check_answer(answer, genuine) is None
    answer.price_down.CopyFrom(money(3))  # dearer than offered
    assert check_answer(answer, genuine) == "the answer's price_down 3 is above the offer's 2"
    answer.price_down.CopyFrom(money(2))
    answer.exit_chain_address = impostor.chain_address  # the money would go elsewhere
    assert check_answer(answer, genuine) == "the answer's chain address is not the exit identity's"


def test_an_exit_prices_response_traffic_at_its_route_to_the_client() -> None:
    """An exit keeps every route; a client's response traffic costs it the
    path price of the longest prefix holding the client's address."""
    handlers = make_handlers({}, serving=True)
    state = exit_pb2.ExitState()
    for prefix, price in (("2001:db8::/64", 5), ("2001:db8::1/128", 4_000_000)):
        handlers[route_pb2.RouteChanged](state, event(route_pb2.RouteChanged(
            prefix=prefix, metric=192, next_hop_id="g2", path_price=money(price),
            change=route_pb2.ROUTE_CHANGE_SELECTED)))
    assert response_price(state.mesh_routes, "2001:db8::1") == 4_000_000
    assert response_price(state.mesh_routes, "2001:db8::2") == 5
    # A client on the internet is answered over the uplink: the mesh bills nothing.
    assert response_price(state.mesh_routes, "2001:db9::1") == 0
    assert response_price(state.mesh_routes, "") == 0
    handlers[route_pb2.RouteChanged](state, event(route_pb2.RouteChanged(
        prefix="2001:db8::1/128", change=route_pb2.ROUTE_CHANGE_RETRACTED)))
    assert response_price(state.mesh_routes, "2001:db8::1") == 5
    # Anyone but an exit keeps only the routes to its exits.
    client_state = exit_pb2.ExitState()
    make_handlers({})[route_pb2.RouteChanged](client_state, event(route_pb2.RouteChanged(
        prefix="2001:db8::1/128", change=route_pb2.ROUTE_CHANGE_SELECTED)))
    assert not client_state.mesh_routes


def test_a_client_registers_again_only_when_a_price_moved_by_five_percent() -> None:
    registered = exit_pb2.ExitRegistered(price_up=money(10**6), price_down=money(5 * 10**6))

    def offer(up: int, down: int) -> registration_pb2.ExitOffer:
        return registration_pb2.ExitOffer(price_up=money(up), price_down=money(down))

    assert not repriced(registered, offer(10**6, 5 * 10**6))
    assert not repriced(registered, offer(10**6, 5_200_000))  # 4%: noise
    assert repriced(registered, offer(10**6, 7 * 10**6))  # a relay raised its price
    assert repriced(registered, offer(10**6, 4 * 10**6))  # ... or lowered it
    assert repriced(registered, offer(2 * 10**6, 5 * 10**6))
    assert repriced(exit_pb2.ExitRegistered(), offer(0, 1))  # free, then not


def test_the_callers_address_is_read_from_grpcs_peer_string() -> None:
    assert peer_address("ipv6:[2001:db8:0:1::1]:43210") == "2001:db8:0:1::1"
    assert peer_address("ipv6:%5B2001:db8:0:1::1%5D:43210") == "2001:db8:0:1::1"
    assert peer_address("ipv4:192.0.2.7:5000") == "192.0.2.7"
    assert peer_address("unix:/run/x.sock") == ""


def test_clients_get_the_lowest_free_address_and_keep_it() -> None:
    handlers = make_handlers({})
    state = exit_pb2.ExitState()
    first = addresses_for(state, "a", b"A", POOL)
    assert first == ["fd64:0:0:1::2/128"]
    handlers[exit_pb2.ExitRegistered](state, event(registered("a", b"A", first)))
    assert addresses_for(state, "a", b"A", POOL) == first  # registering again
    assert addresses_for(state, "a", b"someone else", POOL) is None  # the id is taken
    second = addresses_for(state, "b", b"B", POOL)
    assert second == ["fd64:0:0:1::3/128"]
    handlers[exit_pb2.ExitRegistered](state, event(registered("b", b"B", second)))
    assert addresses_for(state, "c", b"C", POOL) is None  # the pool is full


def test_the_exit_is_chosen_by_route_quality_then_price() -> None:
    near_dear = Candidate("near", metric=288, price=9)
    near_cheap = Candidate("cheap", metric=288 + 96, price=3)
    far_cheapest = Candidate("far", metric=288 + 200, price=1)
    assert choose([near_dear, near_cheap, far_cheapest], set()).exit_id == "cheap"
    # An exit that just failed is used only when nothing else is left.
    assert choose([near_dear, near_cheap], {"cheap"}).exit_id == "near"
    assert choose([near_cheap], {"cheap"}).exit_id == "cheap"
    assert choose([], set()) is None


def test_the_client_projection_follows_routes_selection_and_tunnels() -> None:
    handlers = make_handlers({"2001:db8::8/128": "ex"})
    state = exit_pb2.ExitState()
    handlers[route_pb2.RouteChanged](state, event(route_pb2.RouteChanged(
        prefix="2001:db8::8/128", metric=300, next_hop_id="r1", path_price=money(7),
        change=route_pb2.ROUTE_CHANGE_SELECTED)))
    handlers[route_pb2.RouteChanged](state, event(route_pb2.RouteChanged(
        prefix="2001:db8::9/128", metric=96, change=route_pb2.ROUTE_CHANGE_SELECTED)))
    assert list(state.exits) == ["ex"] and state.exits["ex"].route.metric == 300
    handlers[exit_pb2.ExitSelected](state, event(exit_pb2.ExitSelected(exit_id="ex")))
    handlers[exit_pb2.ExitTunnelUp](state, event(exit_pb2.ExitTunnelUp(
        role=exit_pb2.EXIT_ROLE_CLIENT, peer_id="ex")))
    assert state.exits["ex"].tunnel_up
    handlers[exit_pb2.ExitTunnelDown](state, event(exit_pb2.ExitTunnelDown(
        role=exit_pb2.EXIT_ROLE_CLIENT, peer_id="ex")))
    assert not state.exits["ex"].tunnel_up and state.selected_exit_id == ""
    handlers[route_pb2.RouteChanged](state, event(route_pb2.RouteChanged(
        prefix="2001:db8::8/128", change=route_pb2.ROUTE_CHANGE_RETRACTED)))
    assert not state.exits["ex"].HasField("route")


def test_exit_addresses_parse_and_bad_ones_say_why() -> None:
    assert ExitAddress.parse("ex=[2001:db8::8]:6000", 50080) == ExitAddress(
        "ex", "2001:db8::8", 6000)
    assert ExitAddress.parse("ex=[2001:db8::8]", 50080).port == 50080
    for spec, words in (("2001:db8::8", "want NAME=[ADDRESS]:PORT"),
                        ("ex=[not-an-address]", "is not an IPv6 address"),
                        ("ex=[2001:db8::8]x", "bad port"),
                        ("ex=[2001:db8::8]:70000", "out of range")):
        with pytest.raises(ConfigError, match=re.escape(words)):
            ExitAddress.parse(spec, 50080)
    with pytest.raises(ConfigError, match="client_pool"):
        ExitSettings(client_pool="fd64::/200")
    with pytest.raises(ConfigError, match="liveness_seconds"):
        ExitSettings(liveness_seconds=1)
    with pytest.raises(ConfigError, match="throttle_debt must be between 0 and cut_off_debt"):
        ExitSettings(throttle_debt=10**15, cut_off_debt=10**14)
    with pytest.raises(ConfigError, match="throttle_rate_bps must be at least 8000"):
        ExitSettings(throttle_rate_bps=100)


def test_a_client_owing_too_much_is_throttled_then_cut_off_like_a_neighbor() -> None:
    access = [client_access(debt, usage=1000, throttle_debt=100, cut_off_debt=500,
                            tolerance=0.1) for debt in (0, 200, 201, 600, 601)]
    assert access == [exit_pb2.CLIENT_ACCESS_OPEN, exit_pb2.CLIENT_ACCESS_OPEN,
                      exit_pb2.CLIENT_ACCESS_THROTTLED, exit_pb2.CLIENT_ACCESS_THROTTLED,
                      exit_pb2.CLIENT_ACCESS_BLOCKED]
    rules = render_enforcement(125_000)
    # Each throttled client gets the rate on its own, each way.
    assert ("ip6 daddr @throttled update @down_rates { ip6 daddr limit rate over "
            "125000 bytes/second } drop") in rules
    assert ("ip6 saddr @throttled update @up_rates { ip6 saddr limit rate over "
            "125000 bytes/second } drop") in rules
    assert rules.index("@blocked drop") < rules.index("@throttled")


def test_usage_is_billed_from_counter_deltas_at_both_prices() -> None:
    assert usage_since((100, 1000), (150, 1400), (2, 3)) == Usage(50, 400, 50 * 2 + 400 * 3,
                                                                  reset=False)
    # The tunnel was made again: its counters start over.
    assert usage_since((100, 1000), (30, 40), (2, 3)) == Usage(30, 40, 180, reset=True)


def test_a_clients_usage_adds_up_to_its_debt_on_either_side() -> None:
    handlers = make_handlers({})
    state = exit_pb2.ExitState()
    for role in (exit_pb2.EXIT_ROLE_EXIT, exit_pb2.EXIT_ROLE_CLIENT):
        for charged in (500, 700):
            handlers[exit_pb2.ClientUsageMetered](state, event(exit_pb2.ClientUsageMetered(
                role=role, exit_id="ex", client_id="c", bytes_up=10, bytes_down=20,
                charged=money(charged), bytes_up_counter=99, bytes_down_counter=199)))
    for record in (state.clients["c"], state.exits["ex"]):
        assert (record.bytes_up, record.bytes_down) == (20, 40)
        assert (record.up_counter, record.down_counter) == (99, 199)
        assert amount(record.balance.usage_charged) == 1200
        assert amount(record.balance.debt) == 1200


def test_exit_payments_lower_the_debt_and_forwarding_ones_are_not_ours() -> None:
    handlers = make_handlers({})
    state = exit_pb2.ExitState()
    handlers[exit_pb2.ExitRegistered](state, event(registered("c", b"C", ["fd64::2/128"])))
    handlers[exit_pb2.ClientUsageMetered](state, event(exit_pb2.ClientUsageMetered(
        role=exit_pb2.EXIT_ROLE_EXIT, exit_id="ex", client_id="c", charged=money(1_000))))
    exit_payment = pay_pb2.PAYMENT_PURPOSE_EXIT
    handlers[pay_pb2.PaymentReceived](state, event(pay_pb2.PaymentReceived(
        counterparty_id="client:c", amount=money(600), purpose=exit_payment)))
    handlers[pay_pb2.PaymentReceived](state, event(pay_pb2.PaymentReceived(
        counterparty_id="c", amount=money(999), purpose=pay_pb2.PAYMENT_PURPOSE_FORWARDING)))
    balance = state.clients["c"].balance
    assert (amount(balance.payments), amount(balance.debt)) == (600, 400)
    handlers[pay_pb2.PaymentReverted](state, event(pay_pb2.PaymentReverted(
        counterparty_id="client:c", amount=money(100), purpose=exit_payment)))
    assert amount(state.clients["c"].balance.debt) == 500
    handlers[exit_pb2.ClientEnforcementChanged](state, event(exit_pb2.ClientEnforcementChanged(
        client_id="c", access=exit_pb2.CLIENT_ACCESS_BLOCKED)))
    assert state.clients["c"].access == exit_pb2.CLIENT_ACCESS_BLOCKED
