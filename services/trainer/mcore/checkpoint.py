"""Checkpoints of the megatron backend: torch DCP, not megatron's dist_checkpointing.

Every rank saves its shards as DTensor pieces of layout-free global tensors (the conversion table's
`ckpt_view`: keys are global Megatron-core names, a tensor-parallel shard is a `Shard(dim)` of its
group), so DCP's planner reassembles them for whatever layout loads them: TP 2 -> 1, another EP,
more or fewer data-parallel ranks. Why DCP: the FSDP backend already checkpoints with it (one format
and one loader for the project), it reads and writes only the bytes each rank owns, and the layout-free
views come from the same table as conversion and weight sync; megatron's dist_checkpointing would
need megatron's optimizer wrappers for the optimizer state, which this backend does not use.

Layout of a checkpoint: `model.<name>` (parameters), `optim.<name>.{exp_avg,exp_avg_sq,step}` (AdamW),
`scheduler`; plus `config.json` and the tokenizer (so `convert mcore-to-hf` turns it into an HF directory).
"""
from __future__ import annotations

import torch
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Shard

from services.trainer.convert.shards import ckpt_view
from services.trainer.mcore.weights import Slot

_STATE = ("exp_avg", "exp_avg_sq")


def _contiguous_stride(shape: tuple[int, ...]) -> tuple[int, ...]:
    stride, acc = [], 1
    for s in reversed(shape):
        stride.append(acc)
        acc *= s
    return tuple(reversed(stride))


class Views:
    """Builds the DTensor (or plain) views of this rank's slots."""

    def __init__(self, table: dict[str, Slot], vocab: int, device: torch.device):
        from megatron.core import parallel_state as ps

        self.table = table
        self.vocab = vocab
        self.groups = {False: ps.get_tensor_model_parallel_group(), True: ps.get_expert_tensor_parallel_group()}
        self.meshes: dict[bool, DeviceMesh] = {}
        self.device_type = device.type

    def _mesh(self, expert: bool) -> DeviceMesh:
        if expert not in self.meshes:
            self.meshes[expert] = DeviceMesh.from_group(self.groups[expert], self.device_type)
        return self.meshes[expert]

    def view(self, slot: Slot, tensor: torch.Tensor):
        piece, dim, shape = ckpt_view(slot.item, tensor, slot.size, slot.rank, self.vocab)
        if dim is None or slot.size == 1:
            return piece
        return DTensor.from_local(piece, self._mesh(slot.item.family.expert), [Shard(dim)], run_check=False,
                                  shape=torch.Size(shape), stride=_contiguous_stride(shape))

    def model(self) -> dict:
        return {name: self.view(slot, slot.tensor.data) for name, slot in self.table.items()}

    def optim(self, optimizer: torch.optim.Optimizer) -> dict:
        """AdamW's state per slot (created empty for parameters that have not stepped yet)."""
        out = {}
        # fused (and capturable) AdamW keeps `step` beside the parameter, torch's others on the host
        beside = any(g.get("fused") or g.get("capturable") for g in optimizer.param_groups)
        for name, slot in self.table.items():
            state = optimizer.state[slot.param]
            if not state:
                step = torch.zeros((), dtype=torch.float32, device=slot.param.device if beside else "cpu")
                state.update(step=step, exp_avg=torch.zeros_like(slot.param), exp_avg_sq=torch.zeros_like(slot.param))
            out[name] = {k: self.view(slot, slot.of(state[k])) for k in _STATE}
            out[name]["step"] = state["step"]
        return out
