"""The event schemas under proto/: a reproducible build, the naming rules of
STYLE.md section 2, one subject per event kind, and money never as a float.

No network and no nats-server: protoc runs in process (grpc_tools) and the
rest walks the generated descriptors.
"""

from __future__ import annotations

import importlib
import importlib.util
import re
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest
from google.protobuf import descriptor_pb2
from google.protobuf.descriptor import Descriptor, EnumDescriptor, FieldDescriptor

ROOT = Path(__file__).resolve().parents[2]
ROLES = ("discovery", "link", "meter", "pay", "route", "verify", "exit")
# A subject line in a schema's leading comment: "//   evt.link.up.<neighbor_id>   LinkUp".
SUBJECT_LINE = re.compile(r"^//\s+(evt\.(\S+?)\.(\S+?)\.<([a-z_]+)>)\s+([A-Z]\w*)\s*$")
PAST_TENSE = re.compile(r"(ed|Seen|Lost|Set|Sent|Paid|Up|Down)$")
MONEY_NAME = re.compile(
    r"amount|price|balance|debt|cost|fee|paid|deposit|charge|credit|refund|money|cumulative"
)
FLOATS = (FieldDescriptor.TYPE_FLOAT, FieldDescriptor.TYPE_DOUBLE)


def _load_build() -> ModuleType:
    # By path, so the test does not depend on the working directory (there is
    # no installed `proto` package).
    spec = importlib.util.spec_from_file_location("_mesh_proto_build", ROOT / "proto" / "build.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


build = _load_build()


def _module_name(schema: Path) -> str:
    rel = schema.relative_to(build.PROTO_ROOT).with_suffix("")
    return ".".join(rel.parts) + "_pb2"


def _import(name: str) -> ModuleType:
    # proto.build installs a .pth for proto/gen; fall back to it directly.
    if importlib.util.find_spec("mesh") is None:
        sys.path.append(str(build.GEN_ROOT))
    return importlib.import_module(name)


def _role_module(role: str) -> ModuleType:
    return _import(f"mesh.{role}.v1.{role}_pb2")


def _all_modules() -> list[ModuleType]:
    return [_import(_module_name(p)) for p in build.schema_files()]


def _messages(module: ModuleType) -> Iterator[Descriptor]:
    stack = list(module.DESCRIPTOR.message_types_by_name.values())
    while stack:
        message = stack.pop()
        yield message
        stack.extend(message.nested_types)


def _enums(module: ModuleType) -> Iterator[EnumDescriptor]:
    yield from module.DESCRIPTOR.enum_types_by_name.values()
    for message in _messages(module):
        yield from message.enum_types


def _upper_snake(name: str) -> str:
    return re.sub(r"(?<!^)(?=[A-Z])", "_", name).upper()


def _tree(root: Path) -> dict[str, bytes]:
    return {
        p.relative_to(root).as_posix(): p.read_bytes()
        for p in sorted(root.rglob("*"))
        if p.is_file() and "__pycache__" not in p.parts
    }


def _subjects(role: str) -> list[tuple[str, str, str, str]]:
    """(subject, kind, aggregate, message) for each subject line of a role's schema."""
    text = (build.PROTO_ROOT / "mesh" / role / "v1" / f"{role}.proto").read_text()
    rows = []
    for line in text.splitlines():
        m = SUBJECT_LINE.match(line.strip())
        if m:
            subject, subject_role, kind, aggregate, message = m.groups()
            assert subject_role == role, f"{subject} is not under evt.{role}."
            rows.append((subject, kind, aggregate, message))
    return rows


def test_generate_is_reproducible(tmp_path: Path) -> None:
    out = tmp_path / "gen"
    written = build.generate(out)
    first = _tree(out)
    assert sorted(first) == sorted(p.relative_to(out).as_posix() for p in written)
    for role in ROLES:
        for suffix in ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py"):
            assert f"mesh/{role}/v1/{role}{suffix}" in first
    build.generate(out)
    assert _tree(out) == first
    other = tmp_path / "elsewhere"
    build.generate(other)
    assert _tree(other) == first, "output depends on the output directory"


def test_generated_code_is_current(tmp_path: Path) -> None:
    fresh = tmp_path / "gen"
    build.generate(fresh)
    installed = _tree(build.GEN_ROOT) if build.GEN_ROOT.is_dir() else {}
    stale = [name for name, data in _tree(fresh).items() if installed.get(name) != data]
    assert not stale, f"proto/gen is out of date, run `python -m proto.build`: {stale}"


@pytest.mark.parametrize("role", ROLES)
def test_role_schema_file(role: str) -> None:
    module = _role_module(role)
    fd = module.DESCRIPTOR
    assert fd.name == f"mesh/{role}/v1/{role}.proto"
    assert fd.package == f"mesh.{role}.v1"
    assert descriptor_pb2.FileDescriptorProto.FromString(fd.serialized_pb).syntax == "proto3"
    assert f"{role.capitalize()}State" in fd.message_types_by_name, "no projection message"


@pytest.mark.parametrize("role", ROLES)
def test_one_subject_per_event_kind(role: str) -> None:
    rows = _subjects(role)
    assert rows, f"{role}.proto lists no subjects in its leading comment"
    kinds = [kind for _, kind, _, _ in rows]
    assert len(set(kinds)) == len(kinds), f"a kind is listed twice: {kinds}"
    for subject, kind, _, message in rows:
        assert subject == subject.lower(), subject
        assert re.fullmatch(r"[a-z][a-z_]*", kind), subject
        assert PAST_TENSE.search(message), f"{message} is not named in the past tense"
    # Every top-level message but the projection is an event with a subject,
    # and every subject names one of them.
    top = set(_role_module(role).DESCRIPTOR.message_types_by_name)
    events = top - {f"{role.capitalize()}State"}
    assert {message for *_, message in rows} == events


@pytest.mark.parametrize("module", _all_modules(), ids=lambda m: m.__name__)
def test_enum_zero_values_are_unspecified(module: ModuleType) -> None:
    for enum in _enums(module):
        prefix = _upper_snake(enum.name)
        zero = enum.values_by_number[0].name
        assert zero == f"{prefix}_UNSPECIFIED", f"{enum.full_name}: zero value {zero}"
        for value in enum.values:
            assert value.name.startswith(f"{prefix}_"), f"{enum.full_name}.{value.name}"


@pytest.mark.parametrize("module", _all_modules(), ids=lambda m: m.__name__)
def test_money_is_never_a_float(module: ModuleType) -> None:
    for message in _messages(module):
        if message.GetOptions().map_entry:
            continue  # checked through the map field that owns it
        for field in message.fields:
            ftype = field.type
            if field.message_type is not None and field.message_type.GetOptions().map_entry:
                ftype = field.message_type.fields_by_name["value"].type
            if ftype in FLOATS:
                assert not MONEY_NAME.search(field.name), (
                    f"{field.full_name} is a float; money is mesh.common.v1.Money"
                )


def test_money_type_is_integral() -> None:
    money = _import("mesh.common.v1.envelope_pb2").Money.DESCRIPTOR
    assert money.fields_by_name["amount"].type == FieldDescriptor.TYPE_BYTES
