"""The two conversions, one tensor family at a time (the whole model is never in memory):

    hf-to-mcore SRC DST   an HF directory -> this project's Megatron-core checkpoint (mcore_io.py)
    mcore-to-hf SRC DST   such a checkpoint, or a megatron-backend trainer checkpoint -> an HF directory

Tensors keep their dtype, so HF -> Megatron-core -> HF reproduces every tensor bit for bit.
"""
from __future__ import annotations

import itertools
import json
import os
from typing import Iterator

import torch
from transformers import AutoConfig

from services.trainer.convert import hf_io, mcore_io
from services.trainer.convert.shards import (
    Dims,
    ckpt_view,
    from_ckpt_view,
    fuse,
    hf_shapes,
    model_items,
    unfuse,
)
from services.trainer.convert.table import Item, UnmappedParameter

MARKER = "rlgrid_mcore.json"   # what wrote the directory, for people and for `mcore-to-hf`'s checks


def _by_layer(items: list[Item]) -> Iterator[list[Item]]:
    for _, group in itertools.groupby(items, key=lambda it: it.layer):
        yield list(group)


def check_covered(names: list[str], dims: Dims, items: list[Item], where: str) -> None:
    """Every tensor of an HF checkpoint must belong to an item of the model, and every item's tensors
    must be there: nothing is dropped or invented silently."""
    wanted = {n for it in items for n in it.hf}
    # (a tied head that a checkpoint stores anyway is the embedding again)
    extra = [n for n in names if n not in wanted and not (dims.tied and n == "lm_head.weight")]
    missing = sorted(wanted - set(names))
    if extra or missing:
        raise UnmappedParameter(f"{where}: tensors outside the conversion table {extra[:5]}, "
                                f"missing {missing[:5]}")


def hf_to_mcore(src: str, dst: str) -> dict:
    """Converts; returns {'tensors': n, 'bytes': model bytes}."""
    dims = Dims.from_hf(AutoConfig.from_pretrained(src))
    items = model_items(dims)
    by_name = {it.mcore: it for it in items}
    with hf_io.HFReader(src) as hf:
        check_covered(hf.names(), dims, items, src)
        specs = [(it.mcore, _view_shape(it, dims), hf.dtype(it.hf[0])) for it in items]

        def make(name: str) -> torch.Tensor:
            it = by_name[name]
            return ckpt_view(it, fuse(it, [hf.get(n) for n in it.hf], dims), 1, 0, dims.vocab)[0]

        mcore_io.write_model(dst, specs, make)
    hf_io.copy_extras(src, dst)
    total = sum(torch.Size(s).numel() * torch.empty((), dtype=d).element_size() for _, s, d in specs)
    with open(os.path.join(dst, MARKER), "w") as f:
        json.dump({"format": "rlgrid-mcore", "source": os.path.abspath(src), "tensors": len(specs)}, f)
    return {"tensors": len(specs), "bytes": total}


def _view_shape(item: Item, dims: Dims) -> tuple[int, ...]:
    """The shape of the item's layout-free checkpoint view."""
    parts = hf_shapes(item, dims)
    fused = (sum(p[0] for p in parts), *parts[0][1:])
    probe = torch.empty(fused, device="meta")
    return tuple(ckpt_view(item, probe, 1, 0, dims.vocab)[0].shape)


def mcore_to_hf(src: str, dst: str) -> dict:
    """Converts a model (or a trainer checkpoint's model) back to HF checkpoint layout."""
    if not os.path.isfile(os.path.join(src, "config.json")):
        raise FileNotFoundError(f"{src}: no config.json beside the checkpoint (the HF config of the model)")
    dims = Dims.from_hf(AutoConfig.from_pretrained(src))
    items = model_items(dims)
    keys = mcore_io.model_keys(src)
    missing = [it.mcore for it in items if it.mcore not in keys]
    if missing:
        raise UnmappedParameter(f"{src}: the checkpoint lacks {missing[:5]} for this model's config.json")
    specs = [(name, shape, keys[it.mcore][1]) for it in items for name, shape in zip(it.hf, hf_shapes(it, dims))]

    def stream() -> Iterator[tuple[str, torch.Tensor]]:
        for group in _by_layer(items):
            tensors = mcore_io.read_tensors(src, {it.mcore: keys[it.mcore] for it in group})
            for it in group:
                yield from zip(it.hf, unfuse(it, from_ckpt_view(it, tensors.pop(it.mcore)), dims))

    hf_io.write_hf_weights(dst, specs, stream())
    hf_io.copy_extras(src, dst)
    total = sum(torch.Size(s).numel() * torch.empty((), dtype=d).element_size() for _, s, d in specs)
    return {"tensors": len(specs), "bytes": total}
