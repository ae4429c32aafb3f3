"""A fixed-shape KV cache for the built-in engine, and the attention that reads it.

Why fixed shapes: on a GPU, decoding a small model with transformers' eager forward is bound by
launching hundreds of small kernels from Python per token, not by the GPU. With every buffer a
decode step touches allocated once, the step can be captured as a CUDA graph and replayed per
token (services/rollout/engines/builtin.py). transformers' own StaticCache could hold the keys
too, but we need what it does not give: views of a prefix of the rows (finished rows dropped,
smaller graphs) and of the positions (attention over the filled part only).

What this relies on in transformers (checked on 5.17 and 5.19; tests/unit/test_builtin_engine.py
compares against a plain forward and fails when it changes):
- attention layers call `cache.update(key_states, value_states, layer_idx)` and attend over what
  it returns;
- a 4-D attention mask is passed to attention as it is (masking_utils' early exit);
- attention functions registered with `AttentionInterface` are picked by `config._attn_implementation`.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers import AttentionInterface, PreTrainedModel
from transformers.integrations.sdpa_attention import sdpa_attention_forward

ATTENTION = "rlgrid_grouped_decode"


def grouped_decode_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """transformers' sdpa attention, except for a one-token query with fewer KV heads than query
    heads: that runs as (KV heads) x (query heads per KV head) queries against the cache as it is.
    sdpa with a mask (ours always has one) would first copy K and V once per query head, which
    for a decode step means copying the whole cache, every layer, every token."""
    b, heads, q_len, dim = query.shape
    kv_heads = key.shape[1]
    if q_len != 1 or heads == kv_heads:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    # query head h reads KV head h // (heads // kv_heads), as transformers' repeat_kv lays them out
    out = F.scaled_dot_product_attention(query.reshape(b, kv_heads, heads // kv_heads, dim), key, value,
                                         attn_mask=attention_mask, scale=scaling)
    return out.reshape(b, heads, 1, dim).transpose(1, 2).contiguous(), None


AttentionInterface.register(ATTENTION, grouped_decode_attention)


def use_grouped_decode_attention(model: PreTrainedModel) -> None:
    """Routes the model's attention through grouped_decode_attention (sdpa otherwise)."""
    layer_types = set(getattr(model.config, "layer_types", None) or ["full_attention"])
    if layer_types != {"full_attention"}:
        raise ValueError(f"models.policy.engine=builtin decodes full-attention models only; this model has "
                         f"layer types {sorted(layer_types)}: use models.policy.engine=vllm")
    model.set_attn_implementation(ATTENTION)


class StaticKVCache:
    """Keys and values of every layer in buffers of [rows, kv heads, length, head dim], allocated on
    the first write. Before each forward the caller sets what attention sees: `rows` (a prefix of
    the batch), `write_pos` (the positions this forward's tokens take, a device tensor, so a graph
    replay writes wherever it points) and `kv_len` (attention reads positions [0, kv_len))."""

    def __init__(self, rows: int, length: int):
        self.capacity = (rows, length)
        self.keys: list[torch.Tensor | None] = []
        self.values: list[torch.Tensor | None] = []
        self.rows, self.kv_len = rows, length
        self.write_pos: torch.Tensor | None = None

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        while len(self.keys) <= layer_idx:
            self.keys.append(None)
            self.values.append(None)
        if self.keys[layer_idx] is None:
            rows, length = self.capacity
            shape = (rows, key_states.shape[1], length, key_states.shape[-1])
            self.keys[layer_idx] = key_states.new_zeros(shape)
            self.values[layer_idx] = value_states.new_zeros(shape[:3] + value_states.shape[-1:])
        keys, values = self.keys[layer_idx][: self.rows], self.values[layer_idx][: self.rows]
        keys.index_copy_(2, self.write_pos, key_states)
        values.index_copy_(2, self.write_pos, value_states)
        return keys[:, :, : self.kv_len], values[:, :, : self.kv_len]

    def keep_rows(self, index: torch.Tensor) -> None:
        """Moves rows `index` (of the first `self.rows`) to the front, positions [0, kv_len) only."""
        for buffers in (self.keys, self.values):
            for t in buffers:
                if t is not None:
                    t[: len(index), :, : self.kv_len] = t[: self.rows, :, : self.kv_len].index_select(0, index)
