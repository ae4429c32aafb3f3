"""The one place where rlgrid changes megatron-core's behaviour, written for megatron-core 0.19.2.
tests/unit/test_mcore_parts.py fails when the patched code changes upstream (source digest and
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

Patch 3: rotary embeddings of a packed (THD) row, one pass instead of one per sequence.
  megatron-core's unfused THD path (`rope_utils._apply_rotary_pos_emb_thd`; the fused one needs
  Transformer Engine) splits the row into its sequences and applies RoPE to each in a Python loop,
  with a host sync (`.tolist()`) first: for q and k in every layer, forward and backward, a few
  kernels per sequence. A GRPO micro-batch packs a hundred or more short sequences, so on a GPU the
  step is bound by those launches (bench/megatron.py's `short` part, 256 samples of SmolLM2's shape
  on an H200: 7.5 s per step with the loop, 0.40 s without it). Without context parallelism (the
  backend refuses it) the same result comes from one gather of each token's position in its own
  sequence (computed on the device from `cu_seqlens`, no host sync) and one application over the row:
  the same elementwise arithmetic per token, so bit for bit the same values and gradients
  (tests/unit/test_mcore_parts.py). With context parallelism the original runs.
"""
from __future__ import annotations

import torch

from services.common.packing import positions_from_cu_seqlens

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


def _rope_thd_in_one_pass(original):
    from megatron.core.models.common.embeddings import rope_utils

    def apply(t, cu_seqlens, freqs, rotary_interleaved=False, mla_rotary_interleaved=False, mscale=1.0,
              cp_group=None, multi_latent_attention=None):
        if cp_group is None or cp_group.size() != 1 or multi_latent_attention is not None:
            return original(t, cu_seqlens, freqs, rotary_interleaved, mla_rotary_interleaved, mscale, cp_group,
                            multi_latent_attention)
        n = t.size(0)
        if freqs.size(0) != n:   # positions restart at 0 in every sequence (else freqs are per token already)
            freqs = freqs[positions_from_cu_seqlens(cu_seqlens.to(freqs.device), n)]
        return rope_utils._apply_rotary_pos_emb_bshd(t.unsqueeze(1), freqs, rotary_interleaved=rotary_interleaved,
                                                     mla_rotary_interleaved=mla_rotary_interleaved,
                                                     mscale=mscale).squeeze(1)

    apply.__wrapped__ = original
    return apply


def install_rope_patch() -> None:
    """Patch 3 (idempotent): packed rows' rotary embeddings in one pass."""
    from megatron.core.models.common.embeddings import rope_utils

    if not hasattr(rope_utils._apply_rotary_pos_emb_thd, "__wrapped__"):
        rope_utils._apply_rotary_pos_emb_thd = _rope_thd_in_one_pass(rope_utils._apply_rotary_pos_emb_thd)


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
