"""The committed gRPC/protobuf stubs: up to date with protos/generate.py, and importable under
protobuf 6.x (the venv's, what vLLM allows) and 7.x without any warning."""
from __future__ import annotations

import importlib.util
import os
import pathlib
import subprocess
import sys
import textwrap

import pytest

REPO = pathlib.Path(__file__).resolve().parents[2]
PROTOS = REPO / "protos"
PROTOBUF_7 = "protobuf==7.36.2"


def _load_generate_module():
    spec = importlib.util.spec_from_file_location("rlgrid_protos_generate", PROTOS / "generate.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _stub_files(root: pathlib.Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*_pb2*.py*"))
            if "__pycache__" not in p.parts}   # bytecode of an import from protos/, not a stub


def test_committed_stubs_match_generate(tmp_path):
    generate = _load_generate_module().generate
    out = tmp_path / "gen"
    produced = generate(out)
    assert produced, "generate() produced no files"
    generated = _stub_files(out)
    committed = _stub_files(PROTOS)
    protos = sorted(str(p.relative_to(PROTOS)) for p in (PROTOS / "rlgrid").rglob("*.proto"))
    # every .proto yields _pb2.py, _pb2.pyi and _pb2_grpc.py
    for proto in protos:
        stem = proto[: -len(".proto")]
        for suffix in ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py"):
            assert stem + suffix in generated
    missing = sorted(set(generated) - set(committed))
    extra = sorted(set(committed) - set(generated))
    stale = sorted(name for name in set(generated) & set(committed) if generated[name] != committed[name])
    assert not (missing or extra or stale), (
        f"protos/ stubs are stale: missing {missing}, not generated {extra}, differing {stale}; "
        f"run: python protos/generate.py")


_IMPORT_SCRIPT = textwrap.dedent("""
    import importlib, pathlib, sys
    import google.protobuf
    expected_major, protobuf_dir = sys.argv[1], sys.argv[2]
    assert google.protobuf.__version__.startswith(expected_major + "."), google.protobuf.__version__
    if protobuf_dir:
        assert pathlib.Path(google.protobuf.__file__).resolve().is_relative_to(pathlib.Path(protobuf_dir).resolve()), \\
            google.protobuf.__file__
    import rlgrid
    stub_dir = pathlib.Path("protos/rlgrid/v1").resolve()
    assert pathlib.Path(rlgrid.__file__).resolve().parent == stub_dir.parent, rlgrid.__file__
    names = sorted(p.stem for p in stub_dir.glob("*_pb2*.py"))
    assert any(n.endswith("_pb2") for n in names) and any(n.endswith("_pb2_grpc") for n in names), names
    for name in names:
        importlib.import_module("rlgrid.v1." + name)
    # the runtime actually works with these descriptors
    from rlgrid.v1 import common_pb2 as pb, rollout_pb2_grpc
    msg = pb.Tensor(dtype=pb.BFLOAT16, shape=[2, 3], data=b"xy")
    back = pb.Tensor.FromString(msg.SerializeToString())
    assert back == msg and list(back.shape) == [2, 3] and back.dtype == pb.BFLOAT16
    assert hasattr(rollout_pb2_grpc, "RolloutServiceStub")
    print("IMPORTED", google.protobuf.__version__, len(names))
""")


def _run_import_check(expected_major: str, protobuf_dir: str | None) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([p for p in (protobuf_dir, str(PROTOS)) if p])
    env.pop("PYTHONWARNINGS", None)
    return subprocess.run([sys.executable, "-W", "error", "-c", _IMPORT_SCRIPT, expected_major, protobuf_dir or ""],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=120)


@pytest.fixture(scope="session")
def protobuf7_dir(tmp_path_factory) -> str:
    target = tmp_path_factory.mktemp("protobuf7")
    env = dict(os.environ, PIP_DISABLE_PIP_VERSION_CHECK="1")
    proc = subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--target", str(target),
                           PROTOBUF_7], env=env, capture_output=True, text=True, timeout=300)
    if proc.returncode != 0:
        pytest.fail(f"pip install {PROTOBUF_7} failed:\n{proc.stdout}\n{proc.stderr}")
    assert (target / "google" / "protobuf" / "__init__.py").is_file()
    return str(target)


def test_stubs_import_under_protobuf_7(protobuf7_dir):
    proc = _run_import_check("7", protobuf7_dir)
    assert proc.returncode == 0, f"stubs do not import cleanly under {PROTOBUF_7}:\n{proc.stdout}\n{proc.stderr}"
    assert "IMPORTED 7." in proc.stdout


def test_stubs_import_under_venv_protobuf_6():
    proc = _run_import_check("6", None)
    assert proc.returncode == 0, f"stubs do not import cleanly under the venv's protobuf:\n{proc.stdout}\n{proc.stderr}"
    assert "IMPORTED 6." in proc.stdout
