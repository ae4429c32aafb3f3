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

Patch 2: the router's gating linear under autocast (`models.policy_trainer.moe_router_dtype`).
  `TopKRouter.gating` computes the router logits with `router_gating_linear`, an autograd Function
  that casts input and weight to the router dtype (float32 by default) and multiplies them with
  `torch.mm`. Inside a CUDA autocast region (bf16 training without Transformer Engine) autocast casts
  that `mm` back to bf16: the "float32 router" is silently a bf16 one, and its backward, which runs
  outside autocast, then multiplies the bf16 gradient by the float32 weight and fails ("expected mat1
  and mat2 to have the same dtype", seen on an H200). The router's module-level reference to the
  function is wrapped to run it with autocast off whenever the router dtype is wider than the
  activations, so the logits really are float32 (or float64), as the key says.
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


def _router_outside_autocast(original):
    def router_gating_linear(inp, weight, bias, router_dtype):
        if router_dtype == inp.dtype or not torch.is_autocast_enabled(inp.device.type):
            return original(inp, weight, bias, router_dtype)
        with torch.autocast(inp.device.type, enabled=False):
            return original(inp, weight, bias, router_dtype)

    router_gating_linear.__wrapped__ = original
    return router_gating_linear


def install_router_patch() -> None:
    """Patch 2 (idempotent): the router's gating linear honours moe_router_dtype under autocast."""
    from megatron.core.transformer.moe import router

    if not hasattr(router.router_gating_linear, "__wrapped__"):
        router.router_gating_linear = _router_outside_autocast(router.router_gating_linear)


def set_unpermute_dtype(dtype: torch.dtype | None) -> None:
    """float32: accumulate in float32 (the default of the key); None: megatron's own (the activations' dtype)."""
    global _accumulate, _installed
    from megatron.core.transformer.moe import token_dispatcher

    if not _installed:
        token_dispatcher.unpermute = _wrap(token_dispatcher.unpermute)
        _installed = True
    _accumulate = dtype
