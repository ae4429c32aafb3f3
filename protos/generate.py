"""Regenerate the Python stubs of protos/rlgrid/v1/*.proto next to the .proto files.

Pinned to grpcio-tools 1.80.0 (the `dev` extra): its gencode targets protobuf 6.31, which
imports under protobuf 6.x (vLLM pins protobuf < 7) and 7.x alike, and its gRPC stubs
accept any grpcio >= 1.80 (the GPU image has 1.84). tests/unit/test_protos.py fails
when the committed stubs differ from what this script produces.

Usage: python protos/generate.py [OUT_DIR]   (default: protos/)
"""
from __future__ import annotations

import pathlib
import sys

from grpc_tools import protoc

ROOT = pathlib.Path(__file__).resolve().parent
EXPECTED_TOOLS = "1.80.0"


def generate(out_dir: pathlib.Path = ROOT) -> list[pathlib.Path]:
    """Runs protoc for every .proto under protos/rlgrid; returns the generated files."""
    import grpc_tools

    version = getattr(grpc_tools, "__version__", None)
    if version is None:
        from importlib.metadata import version as dist_version

        version = dist_version("grpcio-tools")
    if version != EXPECTED_TOOLS:
        raise SystemExit(f"grpcio-tools {version} found; stubs are generated with {EXPECTED_TOOLS} "
                         f"(pip install grpcio-tools=={EXPECTED_TOOLS})")
    protos = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "rlgrid").rglob("*.proto"))
    out_dir.mkdir(parents=True, exist_ok=True)
    args = ["protoc", f"-I{ROOT}", f"-I{pathlib.Path(protoc.__file__).parent / '_proto'}",
            f"--python_out={out_dir}", f"--grpc_python_out={out_dir}", f"--pyi_out={out_dir}", *protos]
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed")
    return sorted(p for p in out_dir.rglob("*_pb2*.py*"))


if __name__ == "__main__":
    out = pathlib.Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT
    for path in generate(out):
        print(path)
