"""MoE experts as grouped GEMMs (`models.policy_trainer.groupgemm=True` -> megatron's `moe_grouped_gemm`).

In megatron-core 0.19 the local (non-Transformer-Engine) spec has only `SequentialMLP`, a loop over
the local experts whatever `moe_grouped_gemm` says; its grouped path is `TEGroupedMLP`, which our GPU
image cannot run. This module is the experts' slot of the MoE layer (`MoESubmodules.experts`) with
the same contract as `SequentialMLP`: tokens arrive permuted (grouped by local expert, counts in
`tokens_per_expert`) and leave in the same order; the token dispatcher around it does the rest
(expert parallel exchange, expert-tensor-parallel reductions, unpermute). The local experts' weights
are two stacked parameters, `weight1` [experts, 2 * ffn, hidden] ([gate; up] like `linear_fc1`) and
`weight2` [experts, hidden, ffn]; `expert_views` names each expert's slice as `SequentialMLP` names
its parameters, so conversion, weight sync and checkpoints see the same per-expert tensors.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from megatron.core.transformer.module import MegatronModule


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    # grouped_mm is not autocast-aware: follow the autocast region by hand
    return torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else x.dtype


class GroupedExperts(MegatronModule):
    def __init__(self, num_local_experts: int, config, submodules=None, pg_collection=None, name: str | None = None):
        super().__init__(config=config)
        if not hasattr(F, "grouped_mm"):
            raise RuntimeError("models.policy_trainer.groupgemm=True needs torch >= 2.10 (torch.nn.functional."
                               "grouped_mm); set groupgemm=False")
        self.num_local_experts = num_local_experts
        etp = pg_collection.expt_tp.size() if pg_collection is not None else 1
        ffn = config.moe_ffn_hidden_size // etp
        self.weight1 = torch.nn.Parameter(torch.empty(num_local_experts, 2 * ffn, config.hidden_size,
                                                      dtype=config.params_dtype))
        self.weight2 = torch.nn.Parameter(torch.empty(num_local_experts, config.hidden_size, ffn,
                                                      dtype=config.params_dtype))
        for p in (self.weight1, self.weight2):
            # megatron's markers: split over expert-tensor-parallel ranks, reduced over expert-data-parallel
            p.tensor_model_parallel = etp > 1
            p.partition_dim = 1 if p is self.weight1 else 2
            p.allreduce = False
        if config.perform_initialization:
            with torch.no_grad():
                for e in range(num_local_experts):
                    config.init_method(self.weight1[e])
                    config.output_layer_init_method(self.weight2[e])

    def expert_views(self, prefix: str) -> dict[str, tuple[torch.nn.Parameter, int]]:
        """Local expert e's tensors under SequentialMLP's names: (stacked parameter, e)."""
        out = {}
        for e in range(self.num_local_experts):
            out[f"{prefix}local_experts.{e}.linear_fc1.weight"] = (self.weight1, e)
            out[f"{prefix}local_experts.{e}.linear_fc2.weight"] = (self.weight2, e)
        return out

    def forward(self, permuted_local_hidden_states: torch.Tensor, tokens_per_expert: torch.Tensor,
                permuted_probs: torch.Tensor):
        x = permuted_local_hidden_states
        dtype = _compute_dtype(x)
        offs = torch.cumsum(tokens_per_expert.to(x.device), 0).to(torch.int32)
        h = F.grouped_mm(x.to(dtype), self.weight1.to(dtype).transpose(1, 2), offs=offs)
        gate, up = h.chunk(2, dim=-1)
        h = F.silu(gate) * up
        h = (h * permuted_probs.unsqueeze(-1)).to(dtype)
        return F.grouped_mm(h, self.weight2.to(dtype).transpose(1, 2), offs=offs), None

    def backward_dw(self):
        pass
