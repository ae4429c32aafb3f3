"""Megatron-core's process groups for a layout, and what the backend does with gradients across ranks
(megatron's own DDP and optimizer wrappers are not used: the backend keeps plain `.grad` and the
project's AdamW, `services/trainer/optim.py`, like the FSDP backend).

After the backward passes of a step:
1. tensor-parallel sum of the replicated parameters whose gradient is partial per TP rank: those
   marked `sequence_parallel` (each rank saw part of the sequence) and the q/k layernorms (each rank
   saw its own heads), as megatron's `finalize_model_grads` does;
2. data-parallel sum: dense parameters over the data-parallel group, experts over the
   expert-data-parallel group. The loss is already each micro-batch's share of the step's token mean,
   so sums (not means) give the gradient of the global mean.
The global gradient norm counts every element once: each rank sums the squares of what it owns
(skipping tensor-parallel duplicates), the sums go over all ranks (every pipeline stage adds its own
layers), and each part is divided by how many replicas hold it.

A tied embedding and LM head under pipeline parallelism: the first stage holds the embedding, the
last stage megatron's copy of it in the head. Only the embedding is a parameter of the optimizer (and
of checkpoints and weight sync); before the step the copy's gradient is added to it over megatron's
embedding group (`sum_tied_grads`, what megatron's finalize_model_grads does), after the step and
after every load the copy takes the embedding's values again (`retie`). So the norm counts it once.
"""
from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

from services.trainer.mcore.layout import Layout

_current: Layout | None = None


def init_parallel(layout: Layout, seed: int) -> None:
    """(Re)initialises megatron's parallel_state for `layout` (every rank calls it) and seeds the
    tensor- and expert-parallel RNG streams."""
    global _current
    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    if ps.model_parallel_is_initialized() and _current != layout:
        ps.destroy_model_parallel()
    if not ps.model_parallel_is_initialized():
        ps.initialize_model_parallel(layout.tp, layout.pp, expert_model_parallel_size=layout.ep,
                                     expert_tensor_parallel_size=layout.etp, create_gloo_process_groups=False)
        _current = layout
    model_parallel_cuda_manual_seed(seed)


def is_expert(name: str) -> bool:
    return ".mlp.experts." in name


def _all_reduce(grads: list[torch.Tensor], group) -> None:
    if not grads or dist.get_world_size(group) == 1:
        return
    flat = _flatten_dense_tensors(grads)
    dist.all_reduce(flat, group=group)
    for g, synced in zip(grads, _unflatten_dense_tensors(flat, grads)):
        g.copy_(synced)


def finish_grads(named: list[tuple[str, torch.nn.Parameter]], sequence_parallel: bool) -> None:
    """Steps 1 and 2 above. A parameter without a gradient gets zeros, so collectives line up."""
    from megatron.core import parallel_state as ps

    for _, p in named:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    partial_tp = [p.grad for n, p in named
                  if (sequence_parallel and getattr(p, "sequence_parallel", False))
                  or n.endswith(("q_layernorm.weight", "k_layernorm.weight"))]
    _all_reduce(partial_tp, ps.get_tensor_model_parallel_group())
    _all_reduce([p.grad for n, p in named if not is_expert(n)], ps.get_data_parallel_group())
    _all_reduce([p.grad for n, p in named if is_expert(n)], ps.get_expert_data_parallel_group())


def clip_grads(named: list[tuple[str, torch.nn.Parameter]], layout: Layout, max_norm: float) -> float:
    """Global L2 norm of the gradients; scales them like torch.nn.utils.clip_grad_norm_ when above
    `max_norm` (inf: never). Returns the norm before clipping."""
    from megatron.core import parallel_state as ps

    tp_rank = ps.get_tensor_model_parallel_rank()
    etp_rank = ps.get_expert_tensor_parallel_rank()
    sums = torch.zeros(2, dtype=torch.float64, device=named[0][1].device)
    for name, p in named:
        expert = is_expert(name)
        owner = getattr(p, "tensor_model_parallel", False) or (etp_rank if expert else tp_rank) == 0
        if owner:
            sums[int(expert)] += p.grad.detach().double().pow(2).sum()
    if dist.get_world_size() > 1:
        dist.all_reduce(sums)
    norm = math.sqrt(float(sums[0]) / layout.dp + float(sums[1]) / layout.edp)
    coef = min(max_norm / (norm + 1e-6), 1.0)
    for _, p in named:
        p.grad.mul_(coef)
    return norm


def tied_embedding(model) -> torch.nn.Parameter | None:
    """This stage's side of a tied embedding split over pipeline stages (the first stage's embedding,
    the last stage's copy in the head), else None."""
    if model.config.pipeline_model_parallel_size == 1 or not model.share_embeddings_and_output_weights:
        return None
    return model.shared_embedding_or_output_weight() if model.pre_process or model.post_process else None


def sum_tied_grads(weight: torch.nn.Parameter | None) -> None:
    """Both sides of a tied embedding get the sum of their gradients (every rank calls it)."""
    from megatron.core import parallel_state as ps

    if weight is None:
        return
    if weight.grad is None:
        weight.grad = torch.zeros_like(weight)
    dist.all_reduce(weight.grad, group=ps.get_embedding_group())


@torch.no_grad()
def retie(weight: torch.nn.Parameter | None) -> None:
    """The last stage's copy of a tied embedding takes the first stage's values (every rank calls it)."""
    from megatron.core import parallel_state as ps

    if weight is None:
        return
    group = ps.get_embedding_group()
    dist.broadcast(weight.data, src=dist.get_global_rank(group, 0), group=group)
