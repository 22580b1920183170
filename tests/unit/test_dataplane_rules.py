"""The forwarding policy's nft script, checked as text (no kernel needed)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from dataplane import shim
from dataplane.policy import PolicySpec, policy_fingerprint, render_policy

SPEC = PolicySpec(physical=("v-r2", "eth0", "v-r1"), hello_port=6696, handshake_port=6697,
                  wg_port_min=20000, wg_port_max=20999)

GOLDEN = """\
table inet mesh {}
delete table inet mesh
table inet mesh {
	comment "meshdp policy FINGERPRINT"
	set tunnels {
		type ifname
		elements = { "wg-r1", "wg-r2" }
	}
	set physical {
		type ifname
		elements = { "eth0", "v-r1", "v-r2" }
	}
	set uplinks {
		type ifname
	}
	counter forward_refused {
	}
	counter input_refused {
	}
	chain forward {
		type filter hook forward priority filter; policy drop;
		iifname @tunnels accept
		iifname "mx*" oifname @uplinks accept comment "exit clients"
		iifname @uplinks ct state established,related accept comment "replies"
		counter name "forward_refused" drop
	}
	chain physical_in {
		icmpv6 type { nd-router-solicit, nd-router-advert, nd-neighbor-solicit, \
nd-neighbor-advert, mld-listener-query, mld-listener-report, mld-listener-done, \
mld2-listener-report } accept
		udp dport 6696 accept comment "discovery hello"
		udp dport 6697 accept comment "link handshake"
		udp dport 20000-20999 accept comment "wireguard"
		counter name "input_refused" drop
	}
	chain input {
		type filter hook input priority filter; policy accept;
		iifname @physical jump physical_in
	}
}
"""


def test_golden_ruleset() -> None:
    rendered = render_policy(SPEC, tunnels=["wg-r2", "wg-r1", "wg-r2"])
    assert rendered == GOLDEN.replace("FINGERPRINT", policy_fingerprint(SPEC))


def test_no_tunnels_and_a_single_wireguard_port() -> None:
    spec = PolicySpec(physical=["v-a"], hello_port=1, handshake_port=2,
                      wg_port_min=51820, wg_port_max=51820)
    rendered = render_policy(spec)
    assert "\tset tunnels {\n\t\ttype ifname\n\t}\n" in rendered
    assert 'udp dport 51820 accept comment "wireguard"' in rendered
    assert spec.physical == ("v-a",)


def test_no_keyword_names() -> None:
    # nft 1.0.6 parses these as keywords: a chain or set by these names breaks the script.
    names = re.findall(r"^\t(?:chain|set|counter) (\S+)", render_policy(SPEC), re.MULTILINE)
    assert names == ["tunnels", "physical", "uplinks", "forward_refused", "input_refused",
                     "forward", "physical_in", "input"]
    assert not {"fwd", "dst"} & set(names)


def test_fingerprint_follows_the_rules_not_the_tunnels() -> None:
    same = PolicySpec(physical=("v-r1", "v-r2", "eth0"), hello_port=6696, handshake_port=6697,
                      wg_port_min=20000, wg_port_max=20999)
    assert policy_fingerprint(same) == policy_fingerprint(SPEC)
    assert render_policy(SPEC, ["x"]).split("\n")[3] == render_policy(SPEC).split("\n")[3]
    other = PolicySpec(physical=SPEC.physical, hello_port=6698, handshake_port=6697,
                       wg_port_min=20000, wg_port_max=20999)
    assert policy_fingerprint(other) != policy_fingerprint(SPEC)
    assert re.fullmatch(r"[0-9a-f]{16}", policy_fingerprint(SPEC))


@pytest.mark.parametrize(("fields", "message"), [
    ({"hello_port": 0}, "hello_port must be a port number 1-65535, got 0"),
    ({"handshake_port": 70000}, "handshake_port must be a port number 1-65535, got 70000"),
    ({"wg_port_min": "20000"}, "wg_port_min must be a port number 1-65535, got '20000'"),
    ({"wg_port_max": True}, "wg_port_max must be a port number 1-65535, got True"),
    ({"wg_port_min": 30000}, r"wg_port_min \(30000\) is above wg_port_max \(20999\)"),
    ({"physical": ["eth0", 'x"; flush ruleset']}, "bad interface name 'x\"; flush ruleset'"),
    ({"physical": ["a-name-longer-than-15"]}, "bad interface name 'a-name-longer-than-15'"),
    ({"physical": [""]}, "bad interface name ''"),
])
def test_spec_refuses_bad_fields(fields: dict[str, object], message: str) -> None:
    base = {"physical": ["eth0"], "hello_port": 6696, "handshake_port": 6697,
            "wg_port_min": 20000, "wg_port_max": 20999}
    with pytest.raises(ValueError, match=message):
        PolicySpec(**{**base, **fields})


def test_bad_tunnel_name_is_refused() -> None:
    with pytest.raises(ValueError, match="bad interface name 'wg 1'"):
        render_policy(SPEC, ["wg 1"])


def test_missing_library_says_how_to_build_it(monkeypatch: pytest.MonkeyPatch,
                                              tmp_path: Path) -> None:
    monkeypatch.setattr(shim, "LIBRARY", tmp_path / "libmeshdp.so")
    shim._library.cache_clear()
    try:
        with pytest.raises(shim.ShimNotBuilt) as missing:
            shim.Nft()
    finally:
        shim._library.cache_clear()
    assert str(missing.value) == ("dataplane/libmeshdp.so is not built: run "
                                  "`bash deploy/install.sh` (or make -C dataplane)")
