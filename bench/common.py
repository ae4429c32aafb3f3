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


def start_workers(cluster, coordinator: str, trainer_device: str, rollout_devices: list[str],
                  trainer_ranks: int = 1) -> None:
    """A trainer and one rollout service per device, registered with the coordinator at `coordinator`,
    each pinned to its GPU (`pin_gpu`); with `trainer_ranks` > 1 the trainer runs rank r on cuda:r.
    Returns once every process serves."""
    if trainer_ranks > 1:
        cluster.start("trainer", "services.trainer", "--coordinator", coordinator, "--device", "cuda",
                      nproc=trainer_ranks)
    else:
        env, dev = pin_gpu(trainer_device)
        cluster.start("trainer", "services.trainer", "--coordinator", coordinator, "--device", dev, env=env)
    for i, device in enumerate(rollout_devices):
        env, dev = pin_gpu(device)
        cluster.start(f"rollout{i}", "services.rollout", "--coordinator", coordinator, "--device", dev, env=env)
    for proc in cluster.procs:
        cluster.wait_healthy(proc)


def toy_tokenizer_model(path: str, shape: str) -> str:
    """The demo's tiny model (shape "toy"), or a bench.gpu_trainer SHAPES config (random init, written as a
    config only) with the toy tokenizer: for timing runs, where the rewards mean nothing."""
    from transformers import AutoConfig

    from bench.gpu_trainer import SHAPES
    from services.common.tiny_model import build_tiny_model
    from services.coordinator.data import toy_vocabulary

    build_tiny_model(path, toy_vocabulary(), with_weights=False)
    if shape != "toy":
        tiny = AutoConfig.from_pretrained(path)
        spec = dict(SHAPES[shape])
        AutoConfig.for_model(spec.pop("model_type"), max_position_embeddings=8192, **spec,
                             eos_token_id=tiny.eos_token_id, pad_token_id=tiny.pad_token_id,
                             bos_token_id=tiny.bos_token_id).save_pretrained(path)
    return path
