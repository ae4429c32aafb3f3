"""The one mapping between HF and Megatron-core parameters: a table, one line per parameter family.

Each family says which HF tensors (checkpoint names) make one Megatron-core tensor, how they are
fused (`SAME`, `QKV`: q/k/v interleaved per query group, `GATE_UP`: [gate; up] stacked) and how
that Megatron tensor is split over tensor-parallel ranks (`REPLICATED`, `COLUMN`: dim 0, `ROW`:
dim 1, `GATED`: each half of [gate; up] split on dim 0, `VOCAB`: dim 0 of a vocabulary padded to a
multiple of TP). Expert families carry `{expert}`: the expert-parallel rank owning the expert holds
it, split over expert-tensor-parallel ranks. The same table drives conversion
(`python -m services.trainer.convert`), loading an HF directory into the trainer, weight sync to the
rollout engines and `save_hf`; a model whose parameters it does not cover is refused by name.

Megatron names are global (layer and expert indices of the whole model); `local_name` maps them to a
rank's own module names under pipeline and expert parallelism.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from functools import cached_property

# how HF tensors become one Megatron-core tensor
SAME, QKV, GATE_UP = "same", "qkv", "gate_up"
# how that tensor is split over (expert-)tensor-parallel ranks
REPLICATED, COLUMN, ROW, GATED, VOCAB = "replicated", "column", "row", "gated", "vocab"

L, A, M = "model.layers.{layer}.", "model.layers.{layer}.self_attn.", "model.layers.{layer}.mlp."
D, S, E = "decoder.layers.{layer}.", "decoder.layers.{layer}.self_attention.", "decoder.layers.{layer}.mlp."
X = "experts.{expert}."


@dataclass(frozen=True)
class Family:
    hf: tuple[str, ...]
    mcore: str
    fuse: str
    split: str

    @property
    def expert(self) -> bool:
        return "{expert}" in self.mcore

    @property
    def layer(self) -> bool:
        return "{layer}" in self.mcore


FAMILIES: list[Family] = [
    # HF checkpoint name(s)                                   Megatron-core name                               fuse     split
    Family(("model.embed_tokens.weight",),                    "embedding.word_embeddings.weight",              SAME,    VOCAB),
    Family((L + "input_layernorm.weight",),                   D + "input_layernorm.weight",                    SAME,    REPLICATED),
    Family((A + "q_proj.weight", A + "k_proj.weight", A + "v_proj.weight"), S + "linear_qkv.weight",           QKV,     COLUMN),
    Family((A + "q_norm.weight",),                            S + "q_layernorm.weight",                        SAME,    REPLICATED),
    Family((A + "k_norm.weight",),                            S + "k_layernorm.weight",                        SAME,    REPLICATED),
    Family((A + "o_proj.weight",),                            S + "linear_proj.weight",                        SAME,    ROW),
    Family((L + "post_attention_layernorm.weight",),          D + "pre_mlp_layernorm.weight",                  SAME,    REPLICATED),
    Family((M + "gate_proj.weight", M + "up_proj.weight"),    E + "linear_fc1.weight",                         GATE_UP, GATED),
    Family((M + "down_proj.weight",),                         E + "linear_fc2.weight",                         SAME,    ROW),
    Family((M + "gate.weight",),                              E + "router.weight",                             SAME,    REPLICATED),
    Family((M + X + "gate_proj.weight", M + X + "up_proj.weight"), E + "experts.local_experts.{expert}.linear_fc1.weight", GATE_UP, GATED),
    Family((M + X + "down_proj.weight",),                     E + "experts.local_experts.{expert}.linear_fc2.weight", SAME, ROW),
    Family(("model.norm.weight",),                            "decoder.final_layernorm.weight",                SAME,    REPLICATED),
    Family(("lm_head.weight",),                               "output_layer.weight",                           SAME,    VOCAB),
]

# transformers keeps MoE experts fused in memory (what the rollout engines name on the weight-sync wire):
# one [experts, ...] tensor per layer and projection, the expert family's Megatron tensors stacked.
FUSED_EXPERTS: dict[str, str] = {
    M + "experts.gate_up_proj": E + "experts.local_experts.{expert}.linear_fc1.weight",   # [E, 2I, H] = [gate; up]
    M + "experts.down_proj": E + "experts.local_experts.{expert}.linear_fc2.weight",      # [E, H, I]
}


def _regex(pattern: str) -> re.Pattern:
    escaped = re.escape(pattern).replace(r"\{layer\}", r"(?P<layer>\d+)").replace(r"\{expert\}", r"(?P<expert>\d+)")
    return re.compile(escaped + "$")


@dataclass(frozen=True)
class Item:
    """One family at one layer (and expert): the unit every conversion step works on."""
    family: Family
    layer: int | None = None
    expert: int | None = None

    def _fill(self, pattern: str) -> str:
        return pattern.format(layer=self.layer, expert=self.expert)

    @cached_property
    def mcore(self) -> str:
        return self._fill(self.family.mcore)

    @cached_property
    def hf(self) -> tuple[str, ...]:
        return tuple(self._fill(p) for p in self.family.hf)


class UnmappedParameter(KeyError):
    """A parameter no family of the table covers (a model the megatron backend does not support)."""


_MCORE = [(f, _regex(f.mcore)) for f in FAMILIES]
_HF = [(f, i, _regex(p)) for f in FAMILIES for i, p in enumerate(f.hf)]
_FUSED = [(name, _regex(name), mcore) for name, mcore in FUSED_EXPERTS.items()]


def _item(family: Family, match: re.Match) -> Item:
    groups = match.groupdict()
    return Item(family, int(groups["layer"]) if "layer" in groups else None,
                int(groups["expert"]) if "expert" in groups else None)


def item_of_mcore(name: str) -> Item:
    """The item of a global Megatron-core parameter name."""
    for family, regex in _MCORE:
        m = regex.match(name)
        if m:
            return _item(family, m)
    raise UnmappedParameter(f"Megatron-core parameter {name!r} is not in the conversion table")


def item_of_hf(name: str) -> Item:
    """The item an HF checkpoint tensor belongs to."""
    for family, _, regex in _HF:
        m = regex.match(name)
        if m:
            return _item(family, m)
    raise UnmappedParameter(f"HF tensor {name!r} is not in the conversion table")


def fused_experts_of(name: str) -> tuple[str, int] | None:
    """For transformers' in-memory fused expert tensor `name`: (the per-expert Megatron pattern with
    {expert} left open, the layer). None for any other name."""
    for _, regex, mcore in _FUSED:
        m = regex.match(name)
        if m:
            layer = int(m.group("layer"))
            return mcore.replace("{layer}", str(layer)), layer
    return None


def local_name(name: str, layer_offset: int, expert_offset: int) -> str:
    """A rank's own module name of global Megatron name `name` (pipeline stages number their layers
    from 0, expert-parallel ranks their experts)."""
    item = item_of_mcore(name)
    layer = item.layer - layer_offset if item.layer is not None else None
    expert = item.expert - expert_offset if item.expert is not None else None
    return item.family.mcore.format(layer=layer, expert=expert)


def global_name(local: str, layer_offset: int, expert_offset: int) -> str:
    """Inverse of local_name."""
    item = item_of_mcore(local)
    layer = item.layer + layer_offset if item.layer is not None else None
    expert = item.expert + expert_offset if item.expert is not None else None
    return item.family.mcore.format(layer=layer, expert=expert)
