"""The parallel layout of the megatron backend: how many ranks split what, and where a rank sits.

Megatron-core orders ranks "tp-cp-ep-dp-pp" (tensor parallel fastest). Dense parameters see the grid
tp x dp x pp; expert parameters the grid etp x ep x edp x pp over the same ranks. Everything here is
arithmetic on the config (no process groups), so conversion and its tests can play every rank of a
layout in one process; the trainer checks it against parallel_state (tests/unit/test_mcore_layout.py).
"""
from __future__ import annotations

from dataclasses import dataclass

KEY = "models.policy_trainer"


class LayoutError(ValueError):
    """A parallel layout that does not fit the ranks or the model; the message names the key and the fix."""


@dataclass(frozen=True)
class Coords:
    """Where one rank sits in both grids."""
    tp: int
    pp: int
    dp: int
    ep: int
    etp: int
    edp: int


@dataclass(frozen=True)
class Layout:
    world: int = 1
    tp: int = 1
    pp: int = 1
    ep: int = 1
    etp: int = 1

    @property
    def dp(self) -> int:
        return self.world // (self.tp * self.pp)

    @property
    def edp(self) -> int:
        return self.world // (self.etp * self.ep * self.pp)

    @classmethod
    def from_config(cls, trainer_cfg, world: int) -> "Layout":
        t = trainer_cfg
        etp = t.expert_tensor_parallel_size if t.expert_tensor_parallel_size is not None else t.tensor_model_parallel_size
        layout = cls(world, t.tensor_model_parallel_size, t.pipeline_model_parallel_size,
                     t.expert_model_parallel_size, etp)
        layout.check_world()
        return layout

    def check_world(self) -> None:
        if self.world % (self.tp * self.pp):
            raise LayoutError(f"{KEY}.tensor_model_parallel_size={self.tp} x pipeline_model_parallel_size={self.pp} "
                              f"does not divide the trainer's {self.world} rank(s); choose sizes whose product divides it")
        if self.world % (self.etp * self.ep * self.pp):
            raise LayoutError(f"{KEY}.expert_tensor_parallel_size={self.etp} x expert_model_parallel_size={self.ep} x "
                              f"pipeline_model_parallel_size={self.pp} does not divide the trainer's {self.world} "
                              f"rank(s); choose sizes whose product divides it")

    def check_model(self, dims) -> None:
        """Every split must divide what it splits: names the key, the model's number and its config field."""
        splits = [("tensor_model_parallel_size", self.tp, dims.heads, "attention heads (num_attention_heads)"),
                  ("tensor_model_parallel_size", self.tp, dims.kv_heads, "key/value heads (num_key_value_heads)"),
                  ("pipeline_model_parallel_size", self.pp, dims.layers, "layers (num_hidden_layers)")]
        if dims.dense_ffn:
            splits.append(("tensor_model_parallel_size", self.tp, dims.dense_ffn, "MLP width (intermediate_size)"))
        if dims.experts:
            splits += [("expert_model_parallel_size", self.ep, dims.experts, "experts (num_experts)"),
                       ("expert_tensor_parallel_size", self.etp, dims.expert_ffn,
                        "expert MLP width (moe_intermediate_size)")]
        elif self.ep > 1:
            raise LayoutError(f"{KEY}.expert_model_parallel_size={self.ep} but the model has no experts; use 1")
        for key, size, count, what in splits:
            if count % size:
                raise LayoutError(f"{KEY}.{key}={size} does not divide the model's {count} {what}; "
                                  f"choose a divisor of {count}")

    # ---- rank arithmetic (megatron's order tp-cp-ep-dp-pp, cp = 1) ----------------------------------
    def coords(self, rank: int) -> Coords:
        tp, rest = rank % self.tp, rank // self.tp
        dp, pp = rest % self.dp, rest // self.dp
        etp, rest = rank % self.etp, rank // self.etp
        ep, rest = rest % self.ep, rest // self.ep
        edp = rest % self.edp
        return Coords(tp=tp, pp=pp, dp=dp, ep=ep, etp=etp, edp=edp)

    def data_parallel_ranks(self) -> list[int]:
        """The data-parallel index of every rank: ranks with the same index train the same micro-batches."""
        return [self.coords(r).dp for r in range(self.world)]

    def layers_of(self, pp_rank: int, num_layers: int) -> range:
        """Global decoder-layer indices held by pipeline stage `pp_rank` (megatron's even split)."""
        per = num_layers // self.pp
        return range(pp_rank * per, (pp_rank + 1) * per)

    def experts_of(self, ep_rank: int, num_experts: int) -> range:
        """Global expert indices held by expert-parallel rank `ep_rank`."""
        per = num_experts // self.ep
        return range(ep_rank * per, (ep_rank + 1) * per)

    def describe(self) -> str:
        return f"TP={self.tp} PP={self.pp} EP={self.ep} ETP={self.etp} DP={self.dp} on {self.world} rank(s)"
