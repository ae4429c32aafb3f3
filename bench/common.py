"""Shared bits of the benchmarks: machine description and result files."""
from __future__ import annotations

import datetime
import json
import os
import platform

import torch


def machine() -> dict:
    info = {"date": datetime.date.today().isoformat(), "torch": torch.__version__, "python": platform.python_version(),
            "cpu_count": os.cpu_count()}
    if torch.cuda.is_available():
        info["gpus"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        info["nccl"] = ".".join(map(str, torch.cuda.nccl.version()))
    return info


def write_result(path: str | None, result: dict) -> None:
    text = json.dumps(result, indent=2)
    print(text)
    if path:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with open(path, "w") as f:
            f.write(text + "\n")


def pin_gpu(device: str) -> tuple[dict, str]:
    """Environment and --device for a service that should own exactly `device`: vLLM places its
    workers on the first visible GPUs, so a GPU service sees only its own (as cuda:0)."""
    if device.startswith("cuda:"):
        return {"CUDA_VISIBLE_DEVICES": device.split(":", 1)[1]}, "cuda:0"
    return {}, device
