"""Generate the Python code for every schema under proto/ into proto/gen/.

Run as `python -m proto.build` (the install script does). The output depends
only on the .proto files and the pinned grpcio-tools version, so a second run
writes the same bytes. It also drops a .pth file into the running interpreter's
site-packages so that the generated `mesh` package imports from anywhere.
"""

from __future__ import annotations

import shutil
import sys
import sysconfig
from importlib import resources
from pathlib import Path

from grpc_tools import protoc

PROTO_ROOT = Path(__file__).resolve().parent
GEN_ROOT = PROTO_ROOT / "gen"


def schema_files() -> list[Path]:
    return sorted(PROTO_ROOT.joinpath("mesh").rglob("*.proto"))


def generate(out_dir: Path = GEN_ROOT) -> list[Path]:
    """Compile every schema into out_dir; return the files written."""
    if out_dir.exists():
        shutil.rmtree(out_dir)
    out_dir.mkdir(parents=True)
    well_known = resources.files("grpc_tools") / "_proto"
    args = [
        "protoc",
        f"-I{PROTO_ROOT}",
        f"-I{well_known}",
        f"--python_out={out_dir}",
        f"--pyi_out={out_dir}",
        f"--grpc_python_out={out_dir}",
        *(str(p.relative_to(PROTO_ROOT)) for p in schema_files()),
    ]
    if protoc.main(args) != 0:
        raise SystemExit("proto.build: protoc failed (see the message above)")
    for package in [out_dir, *(p for p in out_dir.rglob("*") if p.is_dir())]:
        package.joinpath("__init__.py").touch()
    return sorted(p for p in out_dir.rglob("*") if p.is_file())


def install_path_file() -> Path:
    pth = Path(sysconfig.get_paths()["purelib"]) / "mesh-router-proto.pth"
    pth.write_text(f"{GEN_ROOT}\n")
    return pth


def main() -> None:
    written = generate()
    pth = install_path_file()
    print(f"proto.build: {len(schema_files())} schemas -> {len(written)} files in {GEN_ROOT}")
    print(f"proto.build: {pth}")


if __name__ == "__main__":
    sys.exit(main())
