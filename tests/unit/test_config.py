"""The node file and its environment overrides."""

from __future__ import annotations

from pathlib import Path

import pytest

from deploy.node import init_node
from services.common.config import ConfigError, NodeSettings, describe, load
from services.route.service import RouteSettings


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "node.toml"
    path.write_text(text)
    return path


def test_generated_node_file_loads_back(tmp_path: Path) -> None:
    layout = init_node(tmp_path / "n", "r7", services=("sharp",), nats_port=4999,
                       netns="mesh-r7", runtime={"snapshot_every": 7})
    cfg = load(layout.node_file, env={})
    assert cfg.node.id == "r7"
    assert cfg.node.nats_url == "nats://127.0.0.1:4999"
    assert cfg.node.socket_path("sharp") == layout.socket("sharp")
    assert cfg.node.netns == "mesh-r7"
    assert cfg.runtime.snapshot_every == 7
    assert cfg.runtime.ack_wait == 30.0  # untouched keys keep their defaults


def test_service_sections_keep_lists(tmp_path: Path) -> None:
    """A topology's per-node [route] interfaces reach the service as a list."""
    layout = init_node(tmp_path / "n", "r7", services=("route",), nats_port=4999,
                       sections={"route": {"tunnels": False, "interfaces": ["v-b1", "v-b2"]}})
    cfg = load(layout.node_file, env={})
    settings = cfg.section("route", RouteSettings)
    assert settings.interfaces == ("v-b1", "v-b2")
    assert settings.tunnels is False


def test_environment_overrides_the_file(tmp_path: Path) -> None:
    path = write(tmp_path, '[node]\nid = "a"\nlog_level = "info"\n[runtime]\nsnapshot_every = 5\n')
    cfg = load(path, env={"MESH_NODE_LOG_LEVEL": "debug", "MESH_RUNTIME_SNAPSHOT_EVERY": "9",
                          "MESH_NODE_SERVICES": "sharp, route"})
    assert cfg.node.log_level == "debug"
    assert cfg.runtime.snapshot_every == 9
    assert cfg.node.services == ("sharp", "route")


def test_missing_file_means_defaults(tmp_path: Path) -> None:
    cfg = load(tmp_path / "absent.toml", env={})
    assert cfg.node == NodeSettings()


@pytest.mark.parametrize(
    ("text", "env", "message"),
    [
        ("[node]\nidd = 'x'\n", {}, r"\[node\]: unknown key\(s\) idd; known: "),
        ("[node]\nnats_port = 'many'\n", {}, r"\[node\] nats_port: expected int, got 'many'"),
        ("[node]\nnats_port = 1.5\n", {}, r"expected int, got 1.5"),
        ("[node]\nservices = [1, 2]\n", {}, r"expected a list of strings"),
        ("", {"MESH_RUNTIME_ACK_WAIT": "soon"}, r"MESH_RUNTIME_ACK_WAIT: expected float"),
        ("[node\n", {}, r"not valid TOML"),
        ("id = 'x'\n", {}, r"top-level key 'id' must be a \[section\]"),
    ],
)
def test_bad_config_says_what_is_wrong(
    tmp_path: Path, text: str, env: dict[str, str], message: str
) -> None:
    with pytest.raises(ConfigError, match=message):
        load(write(tmp_path, text), env=env)


def test_named_but_missing_file_is_an_error(tmp_path: Path) -> None:
    missing = tmp_path / "nope.toml"
    with pytest.raises(ConfigError, match="no such node file"):
        load(None, env={"MESH_CONFIG": str(missing)})


def test_every_setting_has_help() -> None:
    assert all(help_text for _key, _default, help_text in describe(NodeSettings))
