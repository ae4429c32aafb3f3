"""The trainer's attention over packed rows (`models.policy_trainer.attn_implementation`).

- `sdpa` (default): transformers' own sdpa; it derives a block-diagonal causal mask from the
  position ids (which restart per sequence) and hands sdpa a dense [S, S] mask, so no fused
  flash kernel runs and the cost grows with S^2 whatever the sequences' lengths.
- `flex_attention`: torch's flex_attention with a BlockMask built once per micro-batch from the
  sequence lengths: only the blocks on the diagonal of each sequence are computed. On CUDA it
  runs compiled (Triton); every row is padded with a zero-loss filler sequence to a multiple of
  PAD_MULTIPLE tokens so the static-shape kernel compiles for a few lengths only, not one per row.
  torch has no flex backward on CPU: there the same BlockMask's mask runs through sdpa as a dense
  mask (the padding, filler and masking are the same code; the kernel is GPU-only).

Ulysses sequence parallelism (ulysses.py) runs the same kernel on the gathered heads when the key
says `flex_attention`.
"""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch.nn.attention.flex_attention import BlockMask, create_block_mask, create_mask, flex_attention
from transformers import AttentionInterface

FLEX = "rlgrid_flex"
PAD_MULTIPLE = 1024   # compiled row lengths: 1024, 2048, ... (a few kernels per max_token_in_packing)


def pad_multiple(device: torch.device) -> int:
    """Rows run at a multiple of this length (1: as they are)."""
    return PAD_MULTIPLE if device.type == "cuda" else 1


def padded_lens(seq_lens: list[int], multiple: int) -> list[int]:
    """The row's sequences plus a filler sequence up to the next multiple (none when it fits)."""
    pad = -sum(seq_lens) % multiple
    return list(seq_lens) + [pad] * (pad > 0)


def _same_sequence_causal(seq_lens: list[int], device: torch.device):
    """The packed row's mask as a flex mask_mod: causal inside each sequence, nothing across."""
    doc = torch.repeat_interleave(torch.arange(len(seq_lens), device=device), torch.tensor(seq_lens, device=device))
    return lambda b, h, q, kv: (doc[q] == doc[kv]) & (q >= kv)


def block_mask(seq_lens: list[int], device: torch.device) -> BlockMask:
    """The mask for flex_attention: only the blocks it touches are computed."""
    n = sum(seq_lens)
    return create_block_mask(_same_sequence_causal(seq_lens, device), None, None, n, n, device=device,
                             _compile=False)


def dense_mask(seq_lens: list[int], device: torch.device) -> torch.Tensor:
    """The same mask as [1, 1, S, S] booleans, for sdpa (S*S bytes: a 32k-token row takes 1 GiB)."""
    n = sum(seq_lens)
    return create_mask(_same_sequence_causal(seq_lens, device), None, None, n, n, device=device)


@functools.cache
def _compiled():
    # one static-shape kernel per row length and grad mode; the padded rows keep that count small
    allow_recompiles()
    return torch.compile(flex_attention, dynamic=False)


def allow_recompiles() -> None:
    """Raises dynamo's per-code recompile limit (8): every decoder layer compiles the same code, and
    new row lengths add variants; past the limit torch falls back to eager without an error."""
    limits = torch._dynamo.config
    name = "recompile_limit" if hasattr(limits, "recompile_limit") else "cache_size_limit"
    setattr(limits, name, max(getattr(limits, name), 64))


def flex(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: BlockMask,
         scaling: float | None) -> torch.Tensor:
    """q [B, H, S, D], k/v [B, KV, S, D] (grouped-query heads shared) -> [B, S, H, D]."""
    gqa = key.shape[1] != query.shape[1]
    if query.is_cuda:   # inside a compiled layer (torch_compile=True) dynamo traces flex_attention itself
        fn = flex_attention if torch.compiler.is_compiling() else _compiled()
        out = fn(query, key, value, block_mask=mask, scale=scaling, enable_gqa=gqa)
    else:
        n = query.shape[2]
        dense = create_mask(mask.mask_mod, None, None, n, n, device=query.device)
        out = F.scaled_dot_product_attention(query, key, value, attn_mask=dense, scale=scaling, enable_gqa=gqa)
    return out.transpose(1, 2).contiguous()


def _attention(module, query, key, value, attention_mask, *, packed: BlockMask | None = None,
               scaling: float | None = None, **kwargs):
    if packed is None:
        raise RuntimeError(f"attention {FLEX!r} runs only on packed rows with their BlockMask (FSDPBackend)")
    return flex(query, key, value, packed, scaling), None


# No AttentionMaskInterface entry: transformers then builds no mask (attention_mask=None); the
# BlockMask comes as the `packed` forward kwarg, which transformers hands to every attention call,
# also when gradient checkpointing recomputes a layer.
AttentionInterface.register(FLEX, _attention)
