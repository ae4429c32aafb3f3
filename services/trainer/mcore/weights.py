"""This rank's Megatron-core tensors seen through the conversion table: loading them from an HF
directory or a Megatron-core checkpoint (each rank reads one family at a time and keeps its shard),
and gathering them into full HF tensors for weight sync and `save_hf` (in buckets under a byte budget,
one all-gather per process group and bucket: no rank ever holds the whole model). Under pipeline
parallelism each stage gathers the bucket's tensors of its own layers, and the stages of rank 0's
pipeline send theirs to rank 0 (one message per stage and bucket), which yields the bucket in order.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterator

import torch
import torch.distributed as dist

from services.trainer.convert import mcore_io
from services.trainer.convert.shards import Dims, from_ckpt_view, fuse, gather, hf_shapes, shard, unfuse
from services.trainer.convert.table import REPLICATED, Item, fused_experts_of, global_name, item_of_hf, item_of_mcore
from services.trainer.mcore.layout import Coords, Layout
from services.trainer.mcore.model import local_tensors


@dataclass
class Slot:
    """One local tensor: its global item, where it lives (`param`, or expert `index` of a stacked
    parameter) and how it is split here (over `size` ranks, this one `rank`)."""
    item: Item
    param: torch.nn.Parameter
    index: int | None
    size: int
    rank: int

    @property
    def tensor(self) -> torch.Tensor:
        return self.of(self.param)

    def of(self, tensor: torch.Tensor) -> torch.Tensor:
        """The slot's part of a tensor shaped like its parameter (the parameter, a gradient, optimizer state)."""
        return tensor if self.index is None else tensor[self.index]


def slots(model, dims: Dims, layout: Layout, coords: Coords) -> dict[str, Slot]:
    """Global Megatron name -> this rank's slot, for every parameter of `model`."""
    layer_offset = coords.pp * (dims.layers // layout.pp)
    expert_offset = coords.ep * (dims.experts // layout.ep) if dims.experts else 0
    out = {}
    for local, (param, index) in local_tensors(model).items():
        if dims.tied and local == "output_layer.weight":
            continue   # the last stage's copy of a tied embedding (PP > 1): the embedding's slot is the one
        name = global_name(local, layer_offset, expert_offset)
        item = item_of_mcore(name)
        size, rank = (layout.etp, coords.etp) if item.family.expert else (layout.tp, coords.tp)
        out[name] = Slot(item, param, index, size, rank)
    return out


@torch.no_grad()
def load_from_hf(table: dict[str, Slot], read: Callable[[str], torch.Tensor], dims: Dims) -> None:
    """Fills every slot from HF checkpoint tensors `read(name)`, one family at a time."""
    for slot in table.values():
        whole = fuse(slot.item, [read(n) for n in slot.item.hf], dims)
        slot.tensor.copy_(shard(slot.item, whole, slot.size, slot.rank))


@torch.no_grad()
def load_from_mcore(table: dict[str, Slot], path: str) -> None:
    """Fills every slot from a Megatron-core checkpoint (convert's output or a trainer checkpoint)."""
    keys = mcore_io.model_keys(path)
    missing = [n for n in table if n not in keys]
    if missing:
        raise KeyError(f"{path}: the checkpoint lacks {missing[:5]}")
    by_layer: dict = {}
    for name, slot in table.items():
        by_layer.setdefault(slot.item.layer, []).append(name)
    for names in by_layer.values():
        tensors = mcore_io.read_tensors(path, {n: keys[n] for n in names})
        for n in names:
            slot = table[n]
            slot.tensor.copy_(shard(slot.item, from_ckpt_view(slot.item, tensors.pop(n)), slot.size, slot.rank))


# ---- gathering into HF tensors ---------------------------------------------------------------------
@dataclass
class Unit:
    """HF tensors made from some global items: `names` (with their `shapes`) in yield order,
    `build(globals) -> tensors`."""
    names: list[str]
    items: list[Item]
    build: Callable[[dict[str, torch.Tensor]], list[torch.Tensor]]
    nbytes: int
    shapes: list[tuple[int, ...]]


def stage_of(item: Item, dims: Dims, pp: int) -> int:
    """The pipeline stage holding `item`: its layer's, the embedding's first, the final norm's and head's last."""
    if item.layer is not None:
        return item.layer // (dims.layers // pp)
    return 0 if item.family.mcore.startswith("embedding.") else pp - 1


def sync_units(hf_names: list[tuple[str, tuple[int, ...]]], dims: Dims, dtype: torch.dtype) -> list[Unit]:
    """Units for transformers' in-memory parameters (`hf_param_specs` order: what rollouts load):
    dense families as in checkpoints, MoE experts fused per layer and projection."""
    size = torch.empty((), dtype=dtype).element_size()
    units, seen = [], set()
    for name, shape in hf_names:
        if name in seen:
            continue
        fused = fused_experts_of(name)
        if fused is not None:
            pattern, _ = fused
            items = [item_of_mcore(pattern.format(expert=e)) for e in range(dims.experts)]
            units.append(Unit([name], items, lambda g, its=items: [torch.stack([g[i.mcore] for i in its])],
                              torch.Size(shape).numel() * size, [tuple(shape)]))
            seen.add(name)
            continue
        item = item_of_hf(name)
        names = list(item.hf)
        shapes = hf_shapes(item, dims)
        units.append(Unit(names, [item], lambda g, it=item: unfuse(it, g[it.mcore], dims),
                          sum(torch.Size(s).numel() for s in shapes) * size, shapes))
        seen.update(names)
    return units


def checkpoint_units(items: list[Item], dims: Dims, dtype: torch.dtype) -> list[Unit]:
    """Units in HF checkpoint layout (per-expert tensors), for save_hf."""
    size = torch.empty((), dtype=dtype).element_size()
    return [Unit(list(it.hf), [it], lambda g, it=it: unfuse(it, g[it.mcore], dims),
                 sum(torch.Size(s).numel() for s in hf_shapes(it, dims)) * size, hf_shapes(it, dims)) for it in items]


def _buckets(units: list[Unit], budget: int) -> Iterator[list[Unit]]:
    bucket, size = [], 0
    for unit in units:
        if bucket and size + unit.nbytes > budget:
            yield bucket
            bucket, size = [], 0
        bucket.append(unit)
        size += unit.nbytes
    if bucket:
        yield bucket


def _gather_group(slot_list: list[Slot], group, dtype: torch.dtype, vocab: int) -> list[torch.Tensor]:
    """Global tensors of slots split over `group`: one all_gather of all their shards."""
    world = dist.get_world_size(group)
    flat = torch.cat([s.tensor.detach().to(dtype).reshape(-1) for s in slot_list])
    out = flat.new_empty(world * flat.numel())
    dist.all_gather_into_tensor(out, flat, group=group)
    per_rank = out.view(world, -1)
    results, offset = [], 0
    for s in slot_list:
        n = s.tensor.numel()
        pieces = [per_rank[r, offset: offset + n].view(s.tensor.shape) for r in range(world)]
        results.append(gather(s.item, pieces, vocab))
        offset += n
    return results


def gather_units(units: list[Unit], table: dict[str, Slot], dims: Dims, dtype: torch.dtype, budget: int
                 ) -> Iterator[tuple[str, torch.Tensor]]:
    """Every rank calls it and iterates to the end (it runs collectives); rank 0 yields (HF name, full
    tensor) for every unit, in order (under PP > 1 the other ranks yield those of their own stage).
    Experts come from every expert-parallel rank: their shards travel in one all-gather over the
    expert tensor-and-model-parallel group (local experts in order, ranks in megatron's order)."""
    from megatron.core import parallel_state as ps

    pp, stage = ps.get_pipeline_model_parallel_world_size(), ps.get_pipeline_model_parallel_rank()
    for bucket in _buckets(units, budget):
        mine = [u for u in bucket if stage_of(u.items[0], dims, pp) == stage]
        full = _gather_local({it.mcore for u in mine for it in u.items}, table, dims, dtype)
        local = {name: tensor for u in mine for name, tensor in zip(u.names, u.build(full))}
        del full
        if pp > 1:
            local = _to_first_stage(bucket, local, dims, dtype, stage, pp)
        for unit in bucket:
            for name in unit.names:
                if name in local:
                    yield name, local.pop(name)


def _gather_local(wanted: set[str], table: dict[str, Slot], dims: Dims, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Global tensors of this stage's `wanted` Megatron names: TP shards and other ranks' experts gathered."""
    from megatron.core import parallel_state as ps

    dense = [n for n in wanted if not item_of_mcore(n).family.expert]
    local_experts = [n for n in wanted if item_of_mcore(n).family.expert and n in table]
    full: dict[str, torch.Tensor] = {}
    split = sorted(n for n in dense if table[n].size > 1 and table[n].item.family.split != REPLICATED)
    for n in dense:   # whole here (a vocabulary still drops its padding rows)
        if n not in split:
            full[n] = gather(table[n].item, [table[n].tensor.detach().to(dtype)], dims.vocab)
    if split:
        full.update(zip(split, _gather_group([table[n] for n in split], ps.get_tensor_model_parallel_group(), dtype,
                                             dims.vocab)))
    if local_experts:
        full.update(_gather_experts(local_experts, table, ps.get_expert_tensor_and_model_parallel_group(),
                                    ps.get_expert_model_parallel_world_size(),
                                    ps.get_expert_tensor_parallel_world_size(), dtype, dims))
    return full


def _to_first_stage(bucket: list[Unit], local: dict[str, torch.Tensor], dims: Dims, dtype: torch.dtype, stage: int,
                    pp: int) -> dict[str, torch.Tensor]:
    """In rank 0's pipeline (its TP and data-parallel coordinates are 0, so every stage there holds the
    full tensors after the gathers), each later stage sends its part of the bucket to rank 0 as one
    flat tensor, whose layout both sides know from the units' shapes. Returns what this rank holds."""
    from megatron.core import parallel_state as ps

    group = ps.get_pipeline_model_parallel_group()
    if dist.get_global_rank(group, 0) != 0:
        return local
    if stage > 0:
        if local:
            dist.send(torch.cat([t.reshape(-1).to(dtype) for t in local.values()]), dst=0)
        return {}
    device = next(iter(local.values())).device if local else _device()
    for other in range(1, pp):
        names, shapes = [], []
        for unit in bucket:
            if stage_of(unit.items[0], dims, pp) == other:
                names += unit.names
                shapes += [torch.Size(s) for s in unit.shapes]
        if not names:
            continue
        flat = torch.empty(sum(s.numel() for s in shapes), dtype=dtype, device=device)
        dist.recv(flat, src=dist.get_global_rank(group, other))
        local.update(zip(names, (piece.view(s) for piece, s in zip(flat.split([s.numel() for s in shapes]),
                                                                      shapes))))
    return local


def _device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def _gather_experts(names: list[str], table: dict[str, Slot], group, ep: int, etp: int, dtype: torch.dtype,
                    dims: Dims) -> dict[str, torch.Tensor]:
    """Experts of this bucket that this EP rank holds; every EP rank holds the same number of the
    bucket's experts (a unit always asks for all experts of a layer), so the all-gather lines up."""
    names = sorted(names, key=lambda n: (item_of_mcore(n).layer, item_of_mcore(n).family.mcore,
                                         item_of_mcore(n).expert))
    world = dist.get_world_size(group)
    flat = torch.cat([table[n].tensor.detach().to(dtype).reshape(-1) for n in names])
    out = flat.new_empty(world * flat.numel())
    dist.all_gather_into_tensor(out, flat, group=group)
    per_rank = out.view(world, -1)
    per_ep = dims.experts // ep
    result, offset = {}, 0
    for n in names:
        slot, numel = table[n], table[n].tensor.numel()
        item = slot.item
        local_index = item.expert % per_ep
        for ep_rank in range(ep):
            pieces = [per_rank[ep_rank * etp + r, offset: offset + numel].view(slot.tensor.shape) for r in range(etp)]
            expert = ep_rank * per_ep + local_index
            other = Item(item.family, item.layer, expert)
            result[other.mcore] = gather(other, pieces, dims.vocab)
        offset += numel
    return result
