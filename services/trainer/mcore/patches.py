"""The one place where rlgrid changes megatron-core's behaviour, written for megatron-core 0.19.2.
tests/unit/test_mcore_patches.py fails when the patched code changes upstream (source digest and
signature), so a version bump is a deliberate review of each patch.

Patch 1: the accumulation dtype of MoE `unpermute` (`models.policy_trainer.moe_unpermute_dtype`).
  After the experts, megatron's token dispatchers put every token's top-k expert outputs back in
  place with `unpermute`, a scatter-add in the dtype of the expert outputs: bf16 under bf16
  training. A bf16 running sum rounds after every addition, so with top-k > 2 the result depends on
  the order the additions land in (on GPUs, the order atomics happen to run): the same batch gives
  different outputs from one forward to the next, and precision is lost. megatron-core 0.19 has no
  option for it (`moe_router_dtype` promotes only the probabilities; 0.19's experts apply them
  before `unpermute`), so the dispatchers' `unpermute` is wrapped to add in float32 and round once.
  `moe_permute_fusion=True` (Transformer Engine's fused kernel) is not touched: it needs TE, which
  the backend refuses without.

Patch 2: the router's gate under autocast (`models.policy_trainer.moe_router_dtype`).
  `TopKRouter.gating` computes the router logits with `router_gating_linear`, an autograd Function
  that casts input and weight to the router dtype (float32 by default) and multiplies them with
  `torch.mm`. Inside an autocast region (bf16 training without Transformer Engine) autocast casts
  that `mm` to bf16: the "float32 router" is silently a bf16 one, and its backward, which the CUDA
  autograd engine runs outside autocast, multiplies the bf16 gradient by the float32 weight and fails
  ("expected mat1 and mat2 to have the same dtype", seen on an H200). `gating` is wrapped to run with
  autocast off, so the router dtype decides the precision as the key says: float32 / float64 logits,
  or for `native` the autocast dtype (the input is cast to it first, as the bf16 gate matmul of the
  HF and vLLM forwards computes it).
"""
from __future__ import annotations

import torch

VERSION = "0.19.2"
_accumulate: torch.dtype | None = None
_installed = False


def _wrap(original):
    def unpermute(permuted_tokens, *args, **kwargs):
        dtype = _accumulate
        if dtype is None or kwargs.get("fused") or permuted_tokens.dtype == dtype:
            return original(permuted_tokens, *args, **kwargs)
        return original(permuted_tokens.to(dtype), *args, **kwargs).to(permuted_tokens.dtype)

    unpermute.__wrapped__ = original
    return unpermute


def _gating_outside_autocast(original):
    def gating(self, input: torch.Tensor):
        device = input.device.type
        if not torch.is_autocast_enabled(device):
            return original(self, input)
        with torch.autocast(device, enabled=False):
            if self.config.moe_router_dtype is None:   # native: the compute dtype
                input = input.to(torch.get_autocast_dtype(device))
            return original(self, input)

    gating.__wrapped__ = original
    return gating


def install_router_patch() -> None:
    """Patch 2 (idempotent): the router's gate honours moe_router_dtype under autocast."""
    from megatron.core.transformer.moe.router import TopKRouter

    if not hasattr(TopKRouter.gating, "__wrapped__"):
        TopKRouter.gating = _gating_outside_autocast(TopKRouter.gating)


def set_unpermute_dtype(dtype: torch.dtype | None) -> None:
    """float32: accumulate in float32 (the default of the key); None: megatron's own (the activations' dtype)."""
    global _accumulate, _installed
    from megatron.core.transformer.moe import token_dispatcher

    if not _installed:
        token_dispatcher.unpermute = _wrap(token_dispatcher.unpermute)
        _installed = True
    _accumulate = dtype
