"""What each kind in the table means for tensors: HF tensors <-> one global Megatron-core tensor
(`fuse` / `unfuse`), and that tensor <-> one rank's shard (`shard` / `gather`, and the checkpoint's
layout-free view `ckpt_view`). Pure tensor arithmetic; nothing here talks to other ranks.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from services.trainer.convert.table import (
    COLUMN,
    FAMILIES,
    GATE_UP,
    GATED,
    QKV,
    REPLICATED,
    ROW,
    SAME,
    VOCAB,
    Item,
)


class UnsupportedModel(ValueError):
    """An HF config the megatron backend cannot build; the message names the field."""


@dataclass(frozen=True)
class Dims:
    """The model's sizes the conversion needs, read from an HF config."""
    model_type: str
    vocab: int
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    dense_ffn: int           # intermediate_size of dense MLP layers (0: none)
    experts: int             # 0 for a dense model
    expert_ffn: int
    topk: int
    moe_layers: tuple[int, ...]
    tied: bool
    qk_norm: bool
    eps: float
    rope_theta: float
    norm_topk_prob: bool

    @classmethod
    def from_hf(cls, config) -> "Dims":
        kind = config.model_type
        if kind not in ("qwen3", "qwen3_moe", "llama"):
            raise UnsupportedModel(f"model_type {kind!r} is not supported by backend=megatron (qwen3, qwen3_moe, "
                                   f"llama); use models.policy_trainer.backend=fsdp")
        rope = getattr(config, "rope_parameters", None) or {}
        if rope.get("rope_type", "default") != "default":
            raise UnsupportedModel(f"rope_type {rope.get('rope_type')!r} (rope scaling) is not supported by "
                                   f"backend=megatron; use models.policy_trainer.backend=fsdp")
        for flag in ("attention_bias", "mlp_bias"):
            if getattr(config, flag, False):
                raise UnsupportedModel(f"{flag}=True is not supported by backend=megatron; use backend=fsdp")
        heads = config.num_attention_heads
        experts = getattr(config, "num_experts", 0) or 0
        layers = config.num_hidden_layers
        moe_layers: tuple[int, ...] = ()
        if experts:
            step = getattr(config, "decoder_sparse_step", 1) or 1
            dense = set(getattr(config, "mlp_only_layers", []) or [])
            moe_layers = tuple(i for i in range(layers) if i not in dense and (i + 1) % step == 0)
        return cls(model_type=kind, vocab=config.vocab_size, hidden=config.hidden_size, layers=layers, heads=heads,
                   kv_heads=config.num_key_value_heads or heads,
                   head_dim=getattr(config, "head_dim", None) or config.hidden_size // heads,
                   dense_ffn=config.intermediate_size if len(moe_layers) < layers else 0,
                   experts=experts, expert_ffn=getattr(config, "moe_intermediate_size", 0) or 0,
                   topk=getattr(config, "num_experts_per_tok", 0) or 0, moe_layers=moe_layers,
                   tied=bool(getattr(config, "tie_word_embeddings", False)), qk_norm=kind.startswith("qwen3"),
                   eps=config.rms_norm_eps, rope_theta=float(rope.get("rope_theta", 10000.0)),
                   norm_topk_prob=bool(getattr(config, "norm_topk_prob", True)))


def padded_vocab(vocab: int, tp: int) -> int:
    """Megatron's vocabulary split needs a multiple of TP; the padding rows are never read (input ids
    stay below `vocab`, logits are cut to `vocab` before the loss)."""
    return -(-vocab // tp) * tp


# ---- HF tensors <-> one global Megatron tensor ----------------------------------------------------
def fuse(item: Item, tensors: list[torch.Tensor], dims: Dims) -> torch.Tensor:
    kind = item.family.fuse
    if kind == SAME:
        return tensors[0]
    if kind == GATE_UP:
        return torch.cat(tensors, 0)
    if kind == QKV:   # per query group: its query heads, then its key head, then its value head
        q, k, v = tensors
        g, d = dims.kv_heads, dims.head_dim
        return torch.cat([q.reshape(g, -1, *q.shape[1:]), k.reshape(g, d, *k.shape[1:]),
                          v.reshape(g, d, *v.shape[1:])], 1).reshape(-1, *q.shape[1:])
    raise ValueError(f"unknown fuse kind {kind!r}")


def unfuse(item: Item, tensor: torch.Tensor, dims: Dims) -> list[torch.Tensor]:
    kind = item.family.fuse
    if kind == SAME:
        return [tensor]
    if kind == GATE_UP:
        return list(tensor.chunk(2, 0))
    if kind == QKV:
        g, d = dims.kv_heads, dims.head_dim
        per_group = tensor.reshape(g, -1, *tensor.shape[1:])
        q, k, v = per_group.split([dims.heads // g * d, d, d], 1)
        return [x.reshape(-1, *tensor.shape[1:]) for x in (q, k, v)]
    raise ValueError(f"unknown fuse kind {kind!r}")


# ---- one global Megatron tensor <-> one rank's shard ------------------------------------------------
def shard(item: Item, tensor: torch.Tensor, size: int, rank: int) -> torch.Tensor:
    """Rank `rank`'s shard of the global tensor over `size` (expert-)tensor-parallel ranks."""
    kind = item.family.split
    if kind == REPLICATED or size == 1 and kind != VOCAB:
        return tensor
    if kind == COLUMN:
        return tensor.chunk(size, 0)[rank]
    if kind == ROW:
        return tensor.chunk(size, 1)[rank]
    if kind == GATED:
        halves = tensor.reshape(2, -1, *tensor.shape[1:])
        return halves.chunk(size, 1)[rank].reshape(-1, *tensor.shape[1:])
    if kind == VOCAB:
        rows = padded_vocab(tensor.shape[0], size) // size
        out = tensor.new_zeros(rows, *tensor.shape[1:])
        valid = tensor[rank * rows: (rank + 1) * rows]
        out[: len(valid)] = valid
        return out
    raise ValueError(f"unknown split kind {kind!r}")


def gather(item: Item, shards: list[torch.Tensor], vocab: int) -> torch.Tensor:
    """The global tensor from every rank's shard, in rank order."""
    kind = item.family.split
    if kind == REPLICATED or len(shards) == 1 and kind != VOCAB:
        return shards[0]
    if kind == COLUMN:
        return torch.cat(shards, 0)
    if kind == ROW:
        return torch.cat(shards, 1)
    if kind == GATED:
        halves = [s.reshape(2, -1, *s.shape[1:]) for s in shards]
        return torch.cat(halves, 1).reshape(-1, *shards[0].shape[1:])
    if kind == VOCAB:
        return torch.cat(shards, 0)[:vocab]
    raise ValueError(f"unknown split kind {kind!r}")


def ckpt_view(item: Item, local: torch.Tensor, size: int, rank: int, vocab: int
              ) -> tuple[torch.Tensor, int | None, tuple[int, ...]]:
    """The shard as a piece of a layout-free global tensor, for checkpoints that reshard:
    (piece, dim it is split on or None, global shape). Pieces of one rank's view are contiguous
    chunks in torch.chunk order, which is what DTensor's Shard(dim) describes; `GATED` is viewed as
    [2, I, H] (split on dim 1) and `VOCAB` drops its padding rows."""
    kind = item.family.split
    if kind == REPLICATED:
        return local, None, tuple(local.shape)
    if kind == COLUMN:
        return local, 0, (local.shape[0] * size, *local.shape[1:])
    if kind == ROW:
        return local, 1, (local.shape[0], local.shape[1] * size, *local.shape[2:])
    if kind == GATED:
        piece = local.reshape(2, -1, *local.shape[1:])
        return piece, 1, (2, piece.shape[1] * size, *piece.shape[2:])
    if kind == VOCAB:
        rows = local.shape[0]
        return local[: max(0, min(rows, vocab - rank * rows))], 0, (vocab, *local.shape[1:])
    raise ValueError(f"unknown split kind {kind!r}")


def hf_shapes(item: Item, dims: Dims) -> list[tuple[int, ...]]:
    """Shapes of the item's HF tensors (checkpoint layout)."""
    h, d = dims.hidden, dims.head_dim
    name = item.family.mcore
    if name.endswith("linear_qkv.weight"):
        return [(dims.heads * d, h), (dims.kv_heads * d, h), (dims.kv_heads * d, h)]
    if name.endswith(("q_layernorm.weight", "k_layernorm.weight")):
        return [(d,)]
    if name.endswith("linear_proj.weight"):
        return [(h, dims.heads * d)]
    ffn = dims.expert_ffn if item.family.expert else dims.dense_ffn
    if name.endswith("linear_fc1.weight"):
        return [(ffn, h), (ffn, h)]
    if name.endswith("linear_fc2.weight"):
        return [(h, ffn)]
    if name.endswith("router.weight"):
        return [(dims.experts, h)]
    if item.family.split == VOCAB:
        return [(dims.vocab, h)]
    return [(h,)]


def model_items(dims: Dims) -> list[Item]:
    """Every global item of the model, in layer order (embedding first, head last)."""
    by_name = {f.mcore: f for f in FAMILIES}

    def item(name: str, layer: int | None = None, expert: int | None = None) -> Item:
        return Item(by_name[name], layer, expert)

    out = [item("embedding.word_embeddings.weight")]
    d, s, m = "decoder.layers.{layer}.", "decoder.layers.{layer}.self_attention.", "decoder.layers.{layer}.mlp."
    for layer in range(dims.layers):
        names = [d + "input_layernorm.weight", s + "linear_qkv.weight"]
        names += [s + "q_layernorm.weight", s + "k_layernorm.weight"] if dims.qk_norm else []
        names += [s + "linear_proj.weight", d + "pre_mlp_layernorm.weight"]
        out += [item(n, layer) for n in names]
        if layer in dims.moe_layers:
            out.append(item(m + "router.weight", layer))
            for e in range(dims.experts):
                out += [item(m + "experts.local_experts.{expert}.linear_fc1.weight", layer, e),
                        item(m + "experts.local_experts.{expert}.linear_fc2.weight", layer, e)]
        else:
            out += [item(m + "linear_fc1.weight", layer), item(m + "linear_fc2.weight", layer)]
    out.append(item("decoder.final_layernorm.weight"))
    if not dims.tied:
        out.append(item("output_layer.weight"))
    return out


def from_ckpt_view(item: Item, tensor: torch.Tensor) -> torch.Tensor:
    """The global Megatron tensor from its layout-free checkpoint view (inverse of `ckpt_view` at TP=1)."""
    if item.family.split == GATED:
        return tensor.reshape(-1, *tensor.shape[2:])
    return tensor
