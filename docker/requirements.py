"""Pip inputs for the images, so the base image's CUDA torch is never replaced.

    python requirements.py project-deps pyproject.toml   # [project.dependencies] minus torch & co.
    python requirements.py project-extra pyproject.toml megatron   # one optional-dependency group, minus torch
    python requirements.py torch-constraints             # the installed torch stack, pinned
    python requirements.py torch cuda|cpu pyproject.toml [INDEX]   # the image's torch (below)
    python requirements.py torch cuda|cpu pyproject.toml --check   # ... is what the image needs

pyproject.toml pins torch==2.13.0 (the CPU build dev machines install); the GPU image brings
its own torch, so the project is installed with `pip install --no-deps` and its other
dependencies from `project-deps`. `torch-constraints` goes into PIP_CONSTRAINT: any later pip
install that wants another torch (e.g. a vLLM built for a different one) fails instead of
silently swapping the image's torch.
"""
from __future__ import annotations

import re
import subprocess
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


def torch_pin(pyproject_path: str) -> str:
    """pyproject's torch requirement (torch==X)."""
    import tomllib

    with open(pyproject_path, "rb") as f:
        deps = tomllib.load(f)["project"]["dependencies"]
    pins = [d.replace(" ", "") for d in deps if _name(d) == "torch"]
    if len(pins) != 1 or not re.fullmatch(r"torch==[\w.+]+", pins[0]):
        raise SystemExit(f"pyproject.toml must pin torch exactly once (torch==X), found {pins}")
    return pins[0]


def torch_install(device: str, pyproject_path: str, index: str = "") -> list[str] | None:
    """The pip command that gives a `device` image its torch, or None: a GPU image runs the CUDA torch
    its base image brings; a CPU image installs pyproject's pin (from `index` when given)."""
    if device == "cuda":
        return None
    if device != "cpu":
        raise SystemExit(f"DEVICE must be cuda or cpu, got {device!r}")
    return [sys.executable, "-m", "pip", "install", *(["--index-url", index] if index else []),
            torch_pin(pyproject_path)]


def check_torch(device: str, pyproject_path: str) -> str:
    """Raises SystemExit unless the installed torch is what a `device` image needs; returns its version."""
    try:
        import torch
    except ImportError:
        raise SystemExit("torch is not installed in this image") from None
    if device == "cuda" and not torch.version.cuda:
        raise SystemExit("BASE_IMAGE has a CPU-only torch: a GPU image needs a PyTorch CUDA base image")
    if device == "cpu" and torch.__version__.split("+")[0] != torch_pin(pyproject_path).split("==")[1]:
        raise SystemExit(f"the CPU image has torch {torch.__version__}, pyproject pins {torch_pin(pyproject_path)}")
    return f"torch {torch.__version__} (CUDA {torch.version.cuda or 'none'}) for {device} images"


def main(argv: list[str]) -> None:
    if argv[:1] == ["project-deps"] and len(argv) == 2:
        lines = project_deps(argv[1])
    elif argv[:1] == ["project-extra"] and len(argv) == 3:
        lines = project_extra(argv[1], argv[2])
    elif argv == ["torch-constraints"]:
        lines = torch_constraints()
    elif argv[:1] == ["torch"] and len(argv) in (3, 4):
        device, pyproject = argv[1], argv[2]
        command = None if argv[3:] == ["--check"] else torch_install(device, pyproject, *argv[3:])
        if command:
            print(" ".join(command), flush=True)
            subprocess.run(command, check=True)
        lines = [check_torch(device, pyproject)]
    else:
        raise SystemExit(__doc__)
    print("\n".join(lines))


if __name__ == "__main__":
    main(sys.argv[1:])
