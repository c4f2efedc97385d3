"""Generate the gRPC Python stubs from proto/ into this package.

The package build runs it (setup.py's build_py); by hand: `python -m facepq_proto.build
[--force]` in a source checkout after editing a .proto. Imports in the
generated files are rewritten from `facepq.v1` to `facepq_proto.facepq.v1` so the
stubs live inside this package.
"""
from __future__ import annotations

import argparse
import pathlib
import sys

PACKAGE_DIR = pathlib.Path(__file__).resolve().parent
PROTO_ROOT = PACKAGE_DIR.parent / "proto"


def proto_files() -> list[pathlib.Path]:
    return sorted(PROTO_ROOT.rglob("*.proto"))


def stale(protos: list[pathlib.Path]) -> bool:
    for proto in protos:
        rel = proto.relative_to(PROTO_ROOT).with_suffix("")
        stub = PACKAGE_DIR / rel.parent / f"{rel.name}_pb2.py"
        if not stub.exists() or stub.stat().st_mtime < proto.stat().st_mtime:
            return True
    return False


def build(force: bool = False, quiet: bool = False) -> int:
    import grpc_tools
    from grpc_tools import protoc

    protos = proto_files()
    if not protos:
        return 0
    if not force and not stale(protos):
        return 0
    include = pathlib.Path(grpc_tools.__file__).parent / "_proto"
    args = [
        "grpc_tools.protoc",
        f"-I{PROTO_ROOT}",
        f"-I{include}",
        f"--python_out={PACKAGE_DIR}",
        f"--pyi_out={PACKAGE_DIR}",
        f"--grpc_python_out={PACKAGE_DIR}",
        *[str(p) for p in protos],
    ]
    rc = protoc.main(args)
    if rc != 0:
        print("protoc failed", file=sys.stderr)
        return rc
    for generated in PACKAGE_DIR.rglob("*_pb2*.py*"):
        text = generated.read_text()
        fixed = text.replace("from facepq.v1 import", "from facepq_proto.facepq.v1 import")
        if fixed != text:
            generated.write_text(fixed)
    for folder in {g.parent for g in PACKAGE_DIR.rglob("*_pb2.py")}:
        d = folder
        while d != PACKAGE_DIR:
            (d / "__init__.py").touch(exist_ok=True)
            d = d.parent
    if not quiet:
        print(f"generated stubs for {len(protos)} proto file(s)")
    return 0


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--force", action="store_true")
    ap.add_argument("--quiet", action="store_true")
    a = ap.parse_args()
    sys.exit(build(force=a.force, quiet=a.quiet))
