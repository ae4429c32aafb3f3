"""Ulysses sequence parallelism (`models.policy_trainer.ulysses_sequence_parallel_size`, "SP").

SP consecutive ranks share one packed row: each runs the model on a contiguous slice of it, and
attention swaps the split with two all-to-alls (DeepSpeed-Ulysses): a rank holds every position
of H/SP heads while attending, and its own slice of all heads everywhere else. FSDP still shards
over the whole world; each rank's loss is its slice's share of the global token sum, so the
gradients FSDP sums over all ranks are exactly the unsplit ones.
"""
from __future__ import annotations

import functools
import math
import os

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed import _functional_collectives as fc  # collectives with autograd; async, waited on use
from torch.nn.attention.flex_attention import BlockMask
from transformers import AttentionInterface, AutoConfig
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from services.common.models import ModelLoadError
from services.common.packing import position_ids_for
from services.trainer import attention
from services.trainer.loss import token_logprobs_and_entropy

# torch 2.13 renamed all_gather_tensor_autograd (2.11, the GPU image's torch) and deprecated the old name
_all_gather_autograd = getattr(fc, "all_gather_single_autograd", None) or fc.all_gather_tensor_autograd
KEY = "models.policy_trainer.ulysses_sequence_parallel_size"
ATTENTION = "rlgrid_ulysses"


def check_sp(sp: int, world_size: int, num_attention_heads: int, num_key_value_heads: int) -> None:
    """Raises ValueError naming the key when `sp` cannot split this model over this world."""
    where = f"{KEY}={sp}"
    if sp < 1 or sp & (sp - 1):
        raise ValueError(f"{where} must be a power of two (1, 2, 4, 8, ...)")
    if world_size % sp:
        raise ValueError(f"{where} must divide the trainer's world size {world_size} (SP groups are consecutive "
                         f"ranks); use a power of two <= {world_size} that divides it")
    local = int(os.environ.get("LOCAL_WORLD_SIZE", world_size))
    if local % sp:
        raise ValueError(f"{where} must divide the GPUs per node ({local}, LOCAL_WORLD_SIZE): an SP group's "
                         f"all-to-alls stay inside one node")
    for name, heads in (("num_attention_heads", num_attention_heads), ("num_key_value_heads", num_key_value_heads)):
        if heads % sp:
            raise ValueError(f"{where} must divide the model's {name}={heads} (each rank attends with "
                             f"{name}/SP heads); use a power of two that divides it")


@functools.cache   # one set of groups per process: NCCL communicators are not free
def _group(size: int) -> dist.ProcessGroup:
    return dist.new_subgroups(group_size=size)[0]   # consecutive ranks; every rank makes all of them


class SequenceParallel:
    """This rank's SP group; `create` returns None at size 1 (the unsplit code path)."""

    def __init__(self, size: int, flex: bool = False, device: torch.device = torch.device("cpu")):
        self.size = size
        self.group = _group(size)
        self.rank = dist.get_rank(self.group)
        self.flex = flex   # attention by flex_attention with a BlockMask (attention.py), else sdpa
        # every row (and every per-token tensor sharded with it) is padded to a multiple of this
        self.multiple = math.lcm(size, attention.pad_multiple(device) if flex else 1)

    @classmethod
    def create(cls, size: int, world_size: int, load: str, flex: bool = False,
               device: torch.device = torch.device("cpu")) -> SequenceParallel | None:
        if size == 1:
            return None
        try:
            config = AutoConfig.from_pretrained(load)
        except (OSError, ValueError) as exc:
            raise ModelLoadError(f"models.policy_trainer.load={load!r} has no readable config.json: {exc}") from exc
        check_sp(size, world_size, config.num_attention_heads, config.num_key_value_heads)
        return cls(size, flex, device)

    @staticmethod
    def use_in(*models: torch.nn.Module | None) -> None:
        """Switches the models' attention to the Ulysses one (SP=1 keeps transformers' sdpa)."""
        for model in models:
            if model is not None:
                model.set_attn_implementation(ATTENTION)

    def shard(self, x: torch.Tensor) -> torch.Tensor:
        """This rank's slice of a per-token [T] tensor, zero-padded as the rows are (`multiple`)."""
        x = F.pad(x, (0, -len(x) % self.multiple))
        n = len(x) // self.size
        return x[self.rank * n: (self.rank + 1) * n]

    def gather(self, local: torch.Tensor, total: int) -> torch.Tensor:
        """The whole [total] row from every rank's slice."""
        out = local.new_empty(self.size * len(local))
        dist.all_gather_into_tensor(out, local.contiguous(), group=self.group)
        return out[:total]

    def logprobs(self, model: torch.nn.Module, ids: torch.Tensor, seq_lens: list[int], temperature: float,
                 with_entropy: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        """This rank's slice of the packed row's token logprobs (and entropies): the same numbers the
        unsplit forward gives, 0 at sequence starts. The padding is a sequence of its own."""
        lens = attention.padded_lens(seq_lens, self.multiple)
        pad = sum(lens) - len(ids)
        mask = (attention.block_mask if self.flex else attention.dense_mask)(lens, ids.device)
        pos = self.shard(position_ids_for(lens).to(ids.device))
        local = self.shard(ids)
        # the mask travels as a forward kwarg: transformers hands those to the attention function, also
        # when gradient checkpointing recomputes a layer in backward
        logits = model(input_ids=local[None], position_ids=pos[None], use_cache=False, ulysses=(self, mask)).logits[0]
        lp, ent = token_logprobs_and_entropy(logits, local, temperature, with_entropy)
        # the slice's first token is predicted by the previous rank's last logits row: each rank scores
        # the next slice's first token and passes it on (rank 0's wraps around, a sequence start: zeroed)
        nxt = F.pad(ids, (0, pad))[(self.rank + 1) * len(local) % (len(ids) + pad)].expand(2)
        edge_lp, edge_ent = token_logprobs_and_entropy(logits[-1:].expand(2, -1), nxt, temperature, with_entropy)
        edge = torch.stack([edge_lp[1], edge_ent[1] if with_entropy else edge_lp[1]])
        prev = _all_gather_autograd(edge, 0, self.group).view(self.size, 2)[self.rank - 1]
        not_start = (pos != 0).to(lp.dtype)
        lp = torch.cat([prev[:1], lp[1:]]) * not_start
        return lp, (torch.cat([prev[1:], ent[1:]]) * not_start if with_entropy else None)

    # ---- the all-to-alls: [B, H, S/SP, D] (all heads, my slice) <-> [B, H/SP, S, D] (my heads, all positions)
    def _to_heads(self, x: torch.Tensor) -> torch.Tensor:
        b, h, s, d = x.shape
        x = x.reshape(b, self.size, h // self.size, s, d).transpose(0, 1).contiguous()   # chunk j -> rank j
        out = fc.all_to_all_single_autograd(x, None, None, self.group)                  # chunk i: rank i's slice
        return out.permute(1, 2, 0, 3, 4).reshape(b, h // self.size, self.size * s, d)

    def _to_slice(self, x: torch.Tensor) -> torch.Tensor:
        b, h, s, d = x.shape
        x = x.reshape(b, h, self.size, s // self.size, d).permute(2, 0, 1, 3, 4).contiguous()
        out = fc.all_to_all_single_autograd(x, None, None, self.group)                  # chunk i: rank i's heads
        return out.transpose(0, 1).reshape(b, self.size * h, s // self.size, d)


def _attention(module, query, key, value, attention_mask, *, ulysses=None, **kwargs):
    """q [B, H, S/SP, D], k/v [B, KV, S/SP, D] -> [B, S/SP, H, D], like transformers' sdpa path."""
    if ulysses is None:
        raise RuntimeError(f"attention {ATTENTION!r} runs only inside SequenceParallel.logprobs")
    sp, mask = ulysses
    q, k, v = (sp._to_heads(x) for x in (query, key, value))
    if isinstance(mask, BlockMask):
        out = attention.flex(q, k, v, mask, kwargs.get("scaling"))
    else:
        out, _ = sdpa_attention_forward(module, q, k, v, mask, **kwargs)   # repeats kv heads for GQA
    return sp._to_slice(out.transpose(1, 2)).transpose(1, 2), None


# No AttentionMaskInterface entry on purpose: for a name it lacks, transformers builds no mask at
# all (attention_mask=None), which is right here: the mask over the whole row comes with `ulysses`.
AttentionInterface.register(ATTENTION, _attention)
