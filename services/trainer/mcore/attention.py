"""Packed (THD) attention for megatron-core's local layer spec.

The local spec's `DotProductAttention` refuses `packed_seq_params` (THD needs Transformer Engine's
attention), and our GPU image has no Transformer Engine. This module takes its place in the spec
(`SelfAttentionSubmodules.core_attention`), so megatron keeps doing everything else of THD itself
(the QKV projection, per-sequence rotary embeddings from `cu_seqlens`, the output projection):

- CUDA in bf16/fp16: torch's `varlen_attn` (FlashAttention over `cu_seqlens`, causal, grouped-query
  heads): attention never crosses a sequence and costs only each sequence's own causal blocks.
- CPU, fp32, or a torch without it: sdpa with the block-diagonal causal mask of the row
  (`services.trainer.attention.dense_mask`, the FSDP backend's own definition of the mask): the same
  result, dense cost.
"""
from __future__ import annotations

import inspect

import torch
import torch.nn.functional as F
from megatron.core.transformer.module import MegatronModule

from services.trainer.attention import dense_mask

try:   # torch >= 2.9 on CUDA
    from torch.nn.attention.varlen import varlen_attn
    _VARLEN = inspect.signature(varlen_attn).parameters
except ImportError:   # pragma: no cover - older torch
    varlen_attn, _VARLEN = None, {}


def _varlen(q, k, v, cu, max_len, scale):
    kwargs = {"scale": scale}
    if "window_size" in _VARLEN:   # torch >= 2.11: causal is the window (-1, 0)
        kwargs["window_size"] = (-1, 0)
    else:
        kwargs["is_causal"] = True
    if k.shape[1] != q.shape[1]:
        if "enable_gqa" in _VARLEN:
            kwargs["enable_gqa"] = True
        else:
            k, v = (x.repeat_interleave(q.shape[1] // k.shape[1], dim=1) for x in (k, v))
    return varlen_attn(q, k, v, cu, cu, max_len, max_len, **kwargs)


class PackedAttention(MegatronModule):
    """`core_attention` over a packed row: q [T, heads, d], k/v [T, kv_heads, d] (THD) and
    `packed_seq_params.cu_seqlens_q` -> [T, heads * d]."""

    def __init__(self, config, layer_number: int, attn_mask_type, attention_type: str,
                 attention_dropout: float | None = None, softmax_scale: float | None = None,
                 cp_comm_type: str | None = None, pg_collection=None):
        super().__init__(config=config)
        if config.context_parallel_size != 1:
            raise ValueError("context parallelism is not supported by the megatron backend's packed attention")
        self.scale = softmax_scale if softmax_scale is not None else config.kv_channels ** -0.5

    def forward(self, query, key, value, attention_mask, attn_mask_type=None, attention_bias=None,
                packed_seq_params=None):
        if packed_seq_params is None or packed_seq_params.qkv_format != "thd":
            raise RuntimeError("PackedAttention runs packed rows only (packed_seq_params in THD format)")
        cu = packed_seq_params.cu_seqlens_q
        if torch.is_autocast_enabled(query.device.type):   # rotary embeddings come back in float32
            dtype = torch.get_autocast_dtype(query.device.type)
            query, key, value = (x.to(dtype) for x in (query, key, value))
        if query.is_cuda and varlen_attn is not None and query.dtype in (torch.bfloat16, torch.float16):
            query, key, value = (x.contiguous() for x in (query, key, value))
            out = _varlen(query, key, value, cu.to(torch.int32), packed_seq_params.max_seqlen_q, self.scale)
        else:
            lens = (cu[1:] - cu[:-1]).tolist()
            mask = dense_mask(lens, query.device)
            q, k, v = (x.transpose(0, 1)[None] for x in (query, key, value))
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=self.scale,
                                                 enable_gqa=k.shape[1] != q.shape[1])[0].transpose(0, 1)
        return out.reshape(out.shape[0], -1)
