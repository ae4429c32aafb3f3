"""The Megatron-core checkpoint format of this project: a torch DCP directory whose `model.*` keys are
the global Megatron-core parameter names (every layer and expert by its index in the whole model),
each tensor in its layout-free view (`shards.ckpt_view`: what one tensor-parallel rank would hold at
TP=1; gated MLP weights as [2, I, H]). Trainer checkpoints of the megatron backend hold the same keys
(plus `optim.*` and the schedule), saved by each rank as DTensor shards of those views, so any
layout loads them; `convert` writes and reads the same keys one tensor at a time.

Writing streams: DCP asks the planner for each tensor only when it writes it (`resolve_data`),
so the planner is handed shapes (meta tensors) and produces the data lazily.
"""
from __future__ import annotations

import os
from typing import Callable

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import DefaultSavePlanner, FileSystemWriter

from services.trainer import checkpoint

MODEL = "model"


class _LazyPlanner(DefaultSavePlanner):
    """Makes each tensor when DCP writes it, and frees the one before. DCP's file writer keeps a
    reference to every tensor of a file until the file is closed (torch 2.11-2.13,
    `_write_files_from_queue`), which would hold every fused tensor of the model at once (0.56x of a
    Qwen3-8B-shaped model's size, seen on an H200). With one writer thread and no copy-ahead DCP asks for
    a tensor only after writing the one before, so that one's memory can go. A tensor whose storage
    torch cannot free early (safetensors' `get_tensor` returns such copies) is copied into one it can:
    one tensor's copy more at a time instead of the whole model."""

    def __init__(self, make: Callable[[str], torch.Tensor]):
        super().__init__()
        self._make = make
        self._written: torch.Tensor | None = None

    def lookup_object(self, index):
        self.release()
        name = index.fqn.removeprefix(MODEL + ".")
        tensor = self._make(name)
        if not tensor.untyped_storage().resizable():
            tensor = tensor.clone()
        self._written = tensor
        return tensor

    def release(self) -> None:
        if self._written is not None:
            self._written.untyped_storage().resize_(0)
            self._written = None


def write_model(path: str, specs: list[tuple[str, tuple[int, ...], torch.dtype]],
                make: Callable[[str], torch.Tensor]) -> None:
    """A model-only checkpoint: `specs` lists (name, shape, dtype); `make(name)` is called once per
    tensor, while it is written, in one process (no process group needed), and returns a tensor of its
    own (not one the caller keeps): its memory is released once written."""
    os.makedirs(path, exist_ok=True)
    placeholders = {MODEL: {name: torch.empty(shape, dtype=dtype, device="meta") for name, shape, dtype in specs}}
    # per_thread_copy_ahead=0: DCP's writer otherwise stages tensors through a CUDA stream wherever CUDA is
    # available (initialising CUDA in a host-only tool, seen on an H200); these tensors are on the host
    writer = FileSystemWriter(path, thread_count=1, per_thread_copy_ahead=0)
    planner = _LazyPlanner(make)
    dcp.save(placeholders, storage_writer=writer, planner=planner, no_dist=True)
    planner.release()
    checkpoint.write_meta(path, {"format": "megatron-core"})   # readers unpickle only the .metadata written here


def model_keys(path: str) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """name -> (shape, dtype) of the `model.*` tensors of a checkpoint."""
    meta = checkpoint.verified_reader(path).read_metadata()
    out = {}
    for fqn, md in meta.state_dict_metadata.items():
        if fqn.startswith(MODEL + ".") and hasattr(md, "size"):
            out[fqn[len(MODEL) + 1:]] = (tuple(md.size), md.properties.dtype)
    return out


def read_tensors(path: str, wanted: dict[str, tuple[tuple[int, ...], torch.dtype]]) -> dict[str, torch.Tensor]:
    """Reads only the named `model.*` tensors (DCP reads just their bytes)."""
    state = {MODEL: {n: torch.empty(shape, dtype=dtype) for n, (shape, dtype) in wanted.items()}}
    dcp.load(state, storage_reader=checkpoint.verified_reader(path), no_dist=True)
    return state[MODEL]


def is_checkpoint(path: str) -> bool:
    return os.path.isfile(os.path.join(path, ".metadata"))
