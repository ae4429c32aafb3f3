"""Loading causal LMs and tokenizers from an HF directory, the same way in every service.

A directory with safetensors weights loads them; a directory with only config.json (and a
tokenizer) builds a randomly initialised model from the config, seeded, which is how tests and
timing runs make models without a hub. Either way the coordinator syncs the trainer's weights to
every rollout replica before the first generation, so all start from the same weights.
"""
from __future__ import annotations

import glob
import os

import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    PreTrainedModel,
)

from services.common.tensors import dtype_from_name


class ModelLoadError(ValueError):
    """The model directory named by a config key cannot be loaded."""


def resolve_device(local_rank: int | None = None) -> torch.device:
    """The GPU of this process (LOCAL_RANK) when CUDA is available, else the CPU."""
    if torch.cuda.is_available():
        rank = int(os.environ.get("LOCAL_RANK", "0")) if local_rank is None else local_rank
        return torch.device("cuda", rank % torch.cuda.device_count())
    return torch.device("cpu")


def native_bf16_cpu() -> bool:
    """Whether this CPU multiplies bf16 natively (AVX512-BF16 or AMX). Without, torch emulates bf16:
    on an AVX2-only EPYC generation ran ~4x slower than float32, and FSDP training far slower still."""
    return any(getattr(torch.cpu, name, lambda: False)() for name in ("_is_avx512_bf16_supported",
                                                                         "_is_amx_tile_supported"))


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """'auto' is bfloat16 on GPU and float32 on CPU (CPU kernels are fastest and exact in fp32)."""
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return dtype_from_name(name)


def has_weights(path: str) -> bool:
    return bool(glob.glob(os.path.join(path, "*.safetensors")) or glob.glob(os.path.join(path, "*.bin")))


def load_causal_lm(path: str, *, dtype: torch.dtype, device: torch.device | str = "cpu", seed: int = 0,
                   key: str = "models.policy.load", **kwargs) -> PreTrainedModel:
    """Loads weights from `path`, or random-initialises from its config.json when it has none.
    `kwargs` go to transformers (e.g. experts_implementation)."""
    if not path or not os.path.isfile(os.path.join(path, "config.json")):
        raise ModelLoadError(f"{key}={path!r} is not a model directory (no config.json); "
                             f"point it at an HF model directory")
    try:
        if has_weights(path):
            model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation="sdpa", **kwargs)
        else:
            config = AutoConfig.from_pretrained(path)
            with torch.random.fork_rng(devices=[]), torch.device(device):   # init where it will live
                torch.manual_seed(seed)
                model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation="sdpa", **kwargs)
    except (OSError, ValueError, KeyError) as exc:
        raise ModelLoadError(f"{key}={path!r} could not be loaded: {exc}") from exc
    return model.to(device)


def load_tokenizer(path: str, key: str = "models.policy.load"):
    try:
        return AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"{key}={path!r}: no tokenizer could be loaded: {exc}") from exc


def hf_param_specs(path: str, dtype: torch.dtype) -> list[tuple[str, tuple[int, ...]]]:
    """(name, shape) of the HF model's parameters, in named_parameters order, without allocating
    (meta device). Engines that keep weights in their own layout (vLLM fuses qkv) still speak HF
    names on the weight-sync wire."""
    config = AutoConfig.from_pretrained(path)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    return [(n, tuple(p.shape)) for n, p in model.named_parameters()]
