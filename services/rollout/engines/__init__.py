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
                             max_num_seqs=p.max_num_seqs, seed=cfg.runtime_args.seed)
    raise ValueError(f"models.policy.engine={p.engine!r} is not available in this rollout service")
