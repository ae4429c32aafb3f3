"""Pip inputs for the images, so the base image's CUDA torch is never replaced.

    python requirements.py project-deps pyproject.toml   # [project.dependencies] minus torch & co.
    python requirements.py project-extra pyproject.toml megatron   # one optional-dependency group, minus torch
    python requirements.py torch-constraints             # the installed torch stack, pinned

pyproject.toml pins torch==2.13.0 (the CPU build dev machines install); the GPU image brings
its own torch, so the project is installed with `pip install --no-deps` and its other
dependencies from `project-deps`. `torch-constraints` goes into PIP_CONSTRAINT: any later pip
install that wants another torch (e.g. a vLLM built for a different one) fails instead of
silently swapping the image's torch.
"""
from __future__ import annotations

import re
import sys

# Provided by the base image; never installed from pyproject.
TORCH_STACK = ("torch", "torchvision", "torchaudio", "triton")


def _name(requirement: str) -> str:
    match = re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)", requirement)
    if not match:
        raise ValueError(f"cannot read a package name from {requirement!r}")
    return re.sub(r"[-_.]+", "-", match.group(1)).lower()


def project_deps(pyproject_path: str) -> list[str]:
    import tomllib

    with open(pyproject_path, "rb") as f:
        deps = tomllib.load(f)["project"]["dependencies"]
    return [d for d in deps if _name(d) not in TORCH_STACK]


def project_extra(pyproject_path: str, extra: str) -> list[str]:
    import tomllib

    with open(pyproject_path, "rb") as f:
        deps = tomllib.load(f)["project"]["optional-dependencies"][extra]
    return [d for d in deps if _name(d) not in TORCH_STACK]


def torch_constraints() -> list[str]:
    from importlib.metadata import PackageNotFoundError, version

    pins = []
    for name in TORCH_STACK:
        try:
            pins.append(f"{name}=={version(name)}")
        except PackageNotFoundError:
            pass
    if not pins or not pins[0].startswith("torch=="):
        raise SystemExit("torch is not installed in this image: use a PyTorch base image")
    return pins


def main(argv: list[str]) -> None:
    if argv[:1] == ["project-deps"] and len(argv) == 2:
        lines = project_deps(argv[1])
    elif argv[:1] == ["project-extra"] and len(argv) == 3:
        lines = project_extra(argv[1], argv[2])
    elif argv == ["torch-constraints"]:
        lines = torch_constraints()
    else:
        raise SystemExit(__doc__)
    print("\n".join(lines))


if __name__ == "__main__":
    main(sys.argv[1:])
