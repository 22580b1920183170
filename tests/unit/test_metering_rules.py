"""The counters' and enforcement's nft scripts and the usage dump layout (no kernel)."""

from __future__ import annotations

import ipaddress
import re
import struct
from array import array

import pytest

from dataplane import counters, enforcement
from dataplane.counters import (
    OTHER,
    SETS,
    SHARDS,
    Usage,
    UsageKey,
    lengths_of,
    parse_destinations,
    parse_usage,
    render_destinations,
    render_skeleton,
    shard_rules,
)
from dataplane.enforcement import Mode, check_mode, limit_name, render_apply

# -- destinations --------------------------------------------------------------------


def test_destinations_are_canonical_deduplicated_and_sorted() -> None:
    networks = parse_destinations(["2001:DB8:b::/64", " 10.0.0.0/8", "2001:db8:b:0::/64",
                                   "2001:db8::/32", "192.0.2.7"])
    assert [str(n) for n in networks] == ["10.0.0.0/8", "192.0.2.7/32", "2001:db8::/32",
                                         "2001:db8:b::/64"]
    assert parse_destinations([]) == []


@pytest.mark.parametrize(("prefixes", "message"), [
    (["2001:db8::/32", "2001:db8::1/64"], r"bad destination prefix '2001:db8::1/64': .*host bits"),
    (["10.0.0.0/33"], "bad destination prefix '10.0.0.0/33'"),
    (["2001:db8::/129"], "bad destination prefix '2001:db8::/129'"),
    (["example.org"], "bad destination prefix 'example.org'"),
    ([""], "bad destination prefix ''"),
    ([None], "bad destination prefix None: not a string"),
    ("10.0.0.0/8", "not the string '10.0.0.0/8'"),
])
def test_bad_destinations_name_the_culprit(prefixes: object, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_destinations(prefixes)  # type: ignore[arg-type]


def test_lengths_match_longest_first_per_family() -> None:
    networks = parse_destinations(["10.0.0.0/8", "2001:db8::/32", "2001:db8:b::/64",
                                   "10.1.0.0/16", "2001:db8:c::/64", "::/0"])
    assert lengths_of(networks) == [(6, 64), (6, 32), (6, 0), (4, 16), (4, 8)]


def test_shard_rules_mask_look_up_and_count_longest_first() -> None:
    assert shard_rules(3, [(6, 64), (6, 0), (4, 24)]) == [
        "ip6 daddr & ffff:ffff:ffff:ffff:: @n6_64 "
        "update @u6_3 { iifname . oifname . ip6 daddr & ffff:ffff:ffff:ffff:: . 64 } return",
        "ip6 daddr & :: @n6_0 update @u6_3 { iifname . oifname . ip6 daddr & :: . 0 } return",
        "ip daddr & 255.255.255.0 @n4_24 "
        "update @u4_3 { iifname . oifname . ip daddr & 255.255.255.0 . 24 } return",
        "meta nfproto ipv6 update @u6_3 { iifname . oifname . :: . 255 }",
        "meta nfproto ipv4 update @u4_3 { iifname . oifname . 0.0.0.0 . 255 }",
    ]


# -- the table -------------------------------------------------------------------------


def test_skeleton_spreads_packets_over_the_shards() -> None:
    script = render_skeleton("epoch 0123")
    assert script.startswith("table inet mesh_meter {}\ndelete table inet mesh_meter\n")
    assert re.findall(r"^\tset (\S+) \{", script, re.MULTILINE) == list(SETS)
    assert len(SETS) == 2 * SHARDS
    assert "\t\ttype ifname . ifname . ipv6_addr . mark\n" in script
    assert "\t\ttype ifname . ifname . ipv4_addr . mark\n" in script
    chains = re.findall(r"^\tchain (\S+) \{", script, re.MULTILINE)
    # Forwarded traffic is the eBPF program's (dataplane/meshbpf.c): no forward hook.
    assert chains == [f"m{k}" for k in range(SHARDS)] + ["delivered", "originated", "expiring"]
    assert not {"meter", "fwd", "dst"} & set(chains + list(SETS))  # nft 1.0.6 keywords
    assert (f"jhash iifname . oifname mod {SHARDS} vmap {{ 0 : goto m0, 1 : goto m1, "
            in script)
    assert "hook forward" not in script
    # our own traffic counts on tunnels only, the links' own upkeep not at all
    assert script.count("\t\tip6 daddr { fe80::/10, ff00::/8 } return\n") == 3
    assert '\t\tiifname "mw*" jhash iifname . oifname' in script
    assert '\t\toifname "mw*" jhash iifname . oifname' in script
    # what dies here of its hop limit, before `forward`, counts as delivered
    assert "type filter hook prerouting priority filter + 10;" in script
    assert '\t\tiifname "mw*" ip6 hoplimit 1 fib daddr type != local jhash' in script
    assert '\t\tiifname "mw*" ip ttl 1 fib daddr type != local jhash' in script
    assert counters.skeleton_fingerprint("v-*") != counters.skeleton_fingerprint()
    assert script.endswith('add element inet mesh_meter u6_0 { ":label" . ":label" . :: . 255 '
                           'comment "epoch 0123" }\n')
    fingerprint = counters.skeleton_fingerprint()
    assert f'comment "meshdp counters {fingerprint}"' in script
    assert re.fullmatch(r"[0-9a-f]{16}", fingerprint)
    assert render_skeleton("epoch other").count(fingerprint) == 1


def test_destinations_from_nothing() -> None:
    wanted = parse_destinations(["2001:db8:b::/64", "198.51.100.0/24"])
    lines = render_destinations([], wanted).splitlines()
    assert lines[:4] == [
        "add set inet mesh_meter n6_64 { type ipv6_addr; }",
        "add set inet mesh_meter n4_24 { type ipv4_addr; }",
        'add element inet mesh_meter u4_0 { ":label" . ":label" . 198.51.100.0 . 24 '
        'comment "198.51.100.0/24" }',
        'add element inet mesh_meter u6_0 { ":label" . ":label" . 2001:db8:b:: . 64 '
        'comment "2001:db8:b::/64" }',
    ]
    assert "add element inet mesh_meter n4_24 { 198.51.100.0 }" in lines
    assert "add element inet mesh_meter n6_64 { 2001:db8:b:: }" in lines
    # New lengths: every shard chain gets the new rules, in one transaction.
    assert lines.count("flush chain inet mesh_meter m7") == 1
    assert lines[lines.index("flush chain inet mesh_meter m7") + 1:][:4] == [
        f"add rule inet mesh_meter m7 {rule}" for rule in shard_rules(7, [(6, 64), (4, 24)])]
    assert not any(line.startswith("delete") for line in lines)


def test_destinations_of_known_lengths_leave_the_rules_alone() -> None:
    have = parse_destinations(["2001:db8:b::/64", "2001:db8:c::/64"])
    wanted = parse_destinations(["2001:db8:b::/64", "2001:db8:d::/64"])
    assert render_destinations(have, wanted).splitlines() == [
        'delete element inet mesh_meter u6_0 { ":label" . ":label" . 2001:db8:c:: . 64 }',
        "delete element inet mesh_meter n6_64 { 2001:db8:c:: }",
        'add element inet mesh_meter u6_0 { ":label" . ":label" . 2001:db8:d:: . 64 '
        'comment "2001:db8:d::/64" }',
        "add element inet mesh_meter n6_64 { 2001:db8:d:: }",
    ]


def test_a_length_that_goes_takes_its_set_after_the_rules() -> None:
    have = parse_destinations(["2001:db8:b::/64", "2001:db8::/32"])
    lines = render_destinations(have, parse_destinations(["2001:db8::/32"])).splitlines()
    assert lines[0] == ('delete element inet mesh_meter u6_0 '
                        '{ ":label" . ":label" . 2001:db8:b:: . 64 }')
    assert "delete element inet mesh_meter n6_64 { 2001:db8:b:: }" not in lines
    assert lines[-1] == "delete set inet mesh_meter n6_64"
    assert lines.index("flush chain inet mesh_meter m31") < len(lines) - 1
    assert not any("@n6_64" in line for line in lines)


def test_many_destinations_go_in_pieces() -> None:
    wanted = [ipaddress.ip_network(f"2001:db8:1:{i:x}::/64") for i in range(1200)]
    adds = [line for line in render_destinations([], wanted).splitlines()
            if line.startswith("add element inet mesh_meter n6_64")]
    assert [line.count(",") + 1 for line in adds] == [500, 500, 200]


# -- the dump layout (meshdp_usage_dump) -------------------------------------------------


def _label(column: int, text: str) -> bytes:
    raw = text.encode()
    return struct.pack("=2I", column, len(raw)) + raw.ljust((len(raw) + 3) // 4 * 4, b"\0")


def _dump(labels: list[tuple[int, str]], names: list[str], rows: list[list[int]],
          keys: list[tuple[int, int, int, int, int, int, bytes]], n_stale: int = 0) -> bytes:
    label_bytes = b"".join(_label(c, t) for c, t in labels)
    n_dests = 1 + sum(1 for column, _ in labels if column)  # 0 is other, always there
    header = struct.pack("=8I", 2, len(names), n_dests, len(keys), n_stale,
                         len(label_bytes), 0, 0)
    return (header + b"".join(n.encode().ljust(16, b"\0") for n in names)
            + array("Q", [v for row in rows for v in row]).tobytes() + label_bytes
            + b"".join(struct.pack("=6I16s", *key) for key in keys))


B_NET = "2001:db8:b::/64"
B_ADDR = ipaddress.IPv6Address("2001:db8:b::").packed


def test_a_dump_reads_as_a_snapshot() -> None:
    # v-a sent 3 packets to b's prefix and 1 elsewhere, all out through v-b.
    buf = _dump(
        labels=[(0, "epoch 42"), (1, B_NET)],
        names=["v-a", "v-b"],
        rows=[[1, 100, 0, 0, 3, 3000, 0, 0],  # v-a: other, then B_NET
              [0, 0, 1, 100, 0, 0, 3, 3000]],  # v-b
        keys=[(0, 1, 5, 1, 6, 64, B_ADDR), (0, 1, 0, 0, 6, 255, bytes(16)),
              (0, 1, 32, 0xFFFFFFFF, 4, 24, bytes([198, 51, 100, 0]) + bytes(12))],
        n_stale=1,
    )
    snap = parse_usage(buf)
    assert snap.epoch == "epoch 42"
    assert snap.neighbors == ("v-a", "v-b")
    assert snap.destinations == (B_NET, OTHER)
    assert snap.usage("v-a", B_NET) == Usage(3, 3000, 0, 0)
    assert snap.usage("v-b", B_NET) == Usage(0, 0, 3, 3000)
    assert snap.usage("v-a", OTHER) == Usage(1, 100, 0, 0)
    assert snap.usage("v-z", B_NET) == Usage()
    with pytest.raises(KeyError):
        snap.usage("v-a", "2001:db8:c::/64")
    assert snap.total("v-a") == Usage(4, 3100, 0, 0)
    assert snap.total("v-b") == Usage(0, 0, 4, 3100)
    assert sorted(snap.items()) == [("v-a", B_NET, Usage(3, 3000, 0, 0)),
                                    ("v-a", OTHER, Usage(1, 100, 0, 0)),
                                    ("v-b", B_NET, Usage(0, 0, 3, 3000)),
                                    ("v-b", OTHER, Usage(0, 0, 1, 100))]
    assert snap.elements() == [
        UsageKey("v-a", "v-b", "u6_5", 6, "2001:db8:b::", 64, B_NET),
        UsageKey("v-a", "v-b", "u6_0", 6, "::", 255, OTHER),
        UsageKey("v-a", "v-b", "u4_0", 4, "198.51.100.0", 24, None),
    ]
    assert snap.stale() == [snap.elements()[2]]
    assert snap.elements("v-b") == snap.elements()  # every element went out to v-b
    assert snap.elements("v-z") == []


def test_an_empty_dump_is_an_empty_snapshot() -> None:
    snap = parse_usage(_dump(labels=[], names=[], rows=[], keys=[]))
    assert (snap.epoch, snap.neighbors, snap.destinations) == ("", (), (OTHER,))
    assert list(snap.items()) == [] and snap.elements() == [] and snap.stale() == []


def test_labels_that_do_not_add_up_are_refused() -> None:
    buf = bytearray(_dump(labels=[(0, "epoch 1"), (1, B_NET)], names=[], rows=[], keys=[]))
    struct.pack_into("=I", buf, 8, 3)  # claims three destinations
    with pytest.raises(ValueError, match="labels do not add up"):
        parse_usage(bytes(buf))


def test_usage_differences() -> None:
    assert Usage(5, 500, 2, 200) - Usage(1, 100, 2, 150) == Usage(4, 400, 0, 50)
    assert Usage(1, 2, 3, 4) - Usage() == Usage(1, 2, 3, 4)


# -- enforcement -------------------------------------------------------------------------


@pytest.mark.parametrize(("mode", "rate", "expected"), [
    ("open", 0, (Mode.OPEN, 0)),
    (Mode.BLOCKED, 0, (Mode.BLOCKED, 0)),
    ("throttled", 2_000_000, (Mode.THROTTLED, 2_000_000)),
    ("throttled", 1_000_007, (Mode.THROTTLED, 1_000_000)),
    ("throttled", 8, (Mode.THROTTLED, 8)),
])
def test_modes_and_rates(mode: str, rate: int, expected: tuple[Mode, int]) -> None:
    assert check_mode(mode, rate) == expected


@pytest.mark.parametrize(("mode", "rate", "message"), [
    ("closed", 0, "unknown enforcement mode 'closed': want one of open, throttled, blocked"),
    ("throttled", 0, "a throttle needs a rate of 8 to 100000000000 bits/s, got 0"),
    ("throttled", 7, "got 7"),
    ("throttled", -2_000_000, "got -2000000"),
    ("throttled", enforcement.MAX_RATE_BPS + 1, "got 100000000001"),
    ("throttled", 1e6, "rate_bps must be an integer number of bits/s, got 1000000.0"),
    ("throttled", True, "rate_bps must be an integer"),
    ("open", 5, "rate_bps applies to throttled only, got 5 for open"),
    ("blocked", -1, "rate_bps applies to throttled only, got -1 for blocked"),
])
def test_bad_modes_and_rates_say_what_is_wrong(mode: str, rate: object, message: str) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        check_mode(mode, rate)  # type: ignore[arg-type]


def test_limit_names_are_valid_whatever_the_interface_name() -> None:
    assert limit_name("v-a") == "t_762d61"
    assert re.fullmatch(r"t_[0-9a-f]+", limit_name("wg.0@x+y_z-1"))


REMOVE_ANY = [
    'add element inet mesh_enforce blocked { "v-a" }',
    'add limit inet mesh_enforce t_762d61 { rate over 1 bytes/second }',
    'add element inet mesh_enforce throttled { "v-a" : "t_762d61" }',
    'delete element inet mesh_enforce throttled { "v-a" }',
    "delete limit inet mesh_enforce t_762d61",
]


def test_apply_needs_no_read_of_the_current_state() -> None:
    # Each removal first adds what it deletes, so the batch works from any state.
    assert render_apply("v-a", Mode.OPEN, 0).splitlines() == [
        *REMOVE_ANY, 'delete element inet mesh_enforce blocked { "v-a" }']
    assert render_apply("v-a", Mode.BLOCKED, 0).splitlines() == REMOVE_ANY
    assert render_apply("v-a", Mode.THROTTLED, 2_000_000).splitlines() == [
        *REMOVE_ANY,
        'delete element inet mesh_enforce blocked { "v-a" }',
        "add limit inet mesh_enforce t_762d61 { rate over 250000 bytes/second }",
        'add element inet mesh_enforce throttled { "v-a" : "t_762d61" }',
    ]


def test_enforcement_skeleton_drops_before_the_policy_and_counts() -> None:
    script = enforcement.render_skeleton()
    assert "type filter hook forward priority filter - 10; policy accept;" in script
    assert "\t\tiifname @blocked update @dropped { iifname } drop\n" in script
    assert "\t\tlimit name iifname map @throttled update @dropped { iifname } drop\n" in script
    assert f'comment "meshdp enforcement {enforcement.skeleton_fingerprint()}"' in script
