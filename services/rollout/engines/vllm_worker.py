"""Runs inside each vLLM worker process (vLLM's `worker_extension_cls`): the worker joins rlgrid's
weight-sync group itself, receives into the transport's buffer (staging), and loads the staged
tensors into its model only on commit.

Why this API of vLLM's: vLLM also ships a weight-transfer engine (vllm.distributed.weight_transfer),
but that is a second data plane with its own NCCL setup and no gloo path, so the trainer would have
to speak two protocols depending on the engine behind a replica. With a worker extension reached
through `collective_rpc`, the worker runs rlgrid's own `weight_sync.connect(plan)`: the same
transport, plan and two-phase protocol as the built-in engine, over NCCL on GPU and gloo on CPU.
"""
from __future__ import annotations

from rlgrid.v1 import common_pb2 as pb
from services.common import weight_sync
from services.common.memory import free_cached, memory_report


def _reprocess_tied(model) -> None:
    """vLLM's in-place reload processes a tied parameter for only one of the modules sharing it
    (its documented limitation 2): with tie_word_embeddings, lm_head keeps the kernel it prepacked
    (vLLM CPU) from the old embedding. Re-run post-load processing for every module whose weight
    is shared. tests/vllm/test_vllm_engine.py fails if logprobs stop following new weights."""
    owners: dict[int, list] = {}
    for module in model.modules():
        weight = module._parameters.get("weight") if hasattr(module, "_parameters") else None
        if weight is not None and getattr(module, "quant_method", None) is not None:
            owners.setdefault(id(weight), []).append(module)
    for modules in owners.values():
        if len(modules) > 1:
            for module in modules:
                module.quant_method.process_weights_after_loading(module)


def _checkpoint_layout(tensors):
    """HF names and shapes as vLLM's loaders expect them: transformers >= 5 (the trainer, the wire) keeps
    MoE experts fused (`experts.gate_up_proj` [E, 2I, H], `experts.down_proj` [E, H, I]); HF
    checkpoints, which vLLM loads, hold one tensor per expert (`experts.<e>.gate_proj.weight` ...).
    Views, no copies. tests/vllm/test_vllm_engine.py fails if a MoE update stops reaching vLLM."""
    for name, t in tensors:
        if name.endswith("experts.gate_up_proj"):
            prefix, half = name.removesuffix("gate_up_proj"), t.shape[1] // 2
            for e in range(t.shape[0]):
                yield f"{prefix}{e}.gate_proj.weight", t[e, :half]
                yield f"{prefix}{e}.up_proj.weight", t[e, half:]
        elif name.endswith("experts.down_proj"):
            prefix = name.removesuffix("down_proj")
            for e in range(t.shape[0]):
                yield f"{prefix}{e}.down_proj.weight", t[e]
        else:
            yield name, t


class WeightSyncExtension:
    """Methods added to vLLM's Worker; called with LLM.collective_rpc("rlgrid_...")."""

    def rlgrid_gpu_uuids(self) -> list[str]:
        return weight_sync.gpu_uuids(self.device)

    def rlgrid_join(self, plan_bytes: bytes) -> int:
        from vllm.distributed import get_tensor_model_parallel_rank
        plan = pb.WeightSyncPlan.FromString(plan_bytes)
        plan.rank += get_tensor_model_parallel_rank()   # a replica's TP workers take consecutive ranks
        transport = weight_sync.connect(plan, self.device)   # the old group is left once this one is joined
        self.rlgrid_leave()
        self._rlgrid_transport = transport
        self._rlgrid_staged = None
        return plan.rank

    def rlgrid_leave(self) -> None:
        transport = getattr(self, "_rlgrid_transport", None)
        if transport is not None:
            transport.close()
        self._rlgrid_transport = None

    def rlgrid_receive(self, version: int) -> int:
        """Every bucket lands in the transport's buffer; the model is untouched until commit."""
        self._rlgrid_staged = None
        staged = list(self._rlgrid_transport.receive())   # views, valid until the next receive
        self._rlgrid_staged = (version, staged)
        return sum(t.numel() * t.element_size() for _, t in staged)

    def rlgrid_commit(self, version: int) -> int:
        staged = getattr(self, "_rlgrid_staged", None)
        if staged is None or staged[0] != version:
            raise ValueError(f"no staged weights for version {version}")
        runner = self.model_runner
        if hasattr(runner, "reload_weights"):   # vLLM >= 0.3x: re-runs post-load processing (CPU prepacking)
            runner.reload_weights(weights_iterator=_checkpoint_layout(staged[1]))
            _reprocess_tied(runner.model)
        else:                                   # older vLLM: the model's own loader (HF names in)
            runner.model.load_weights(weights=_checkpoint_layout(staged[1]))
        self._rlgrid_staged = None
        return version

    def rlgrid_abort(self) -> None:
        self._rlgrid_staged = None

    def rlgrid_release(self) -> None:
        """Before vLLM sleeps: drops the staging buffer (torch's allocator, outside vLLM's sleep pool)."""
        self._rlgrid_staged = None
        transport = getattr(self, "_rlgrid_transport", None)
        if transport is not None:
            transport.release()
        free_cached(self.device)

    def rlgrid_memory(self) -> dict[str, float]:
        return memory_report(self.device)

    def rlgrid_stage(self, version: int, safetensors_bytes: bytes) -> None:
        """Stages weights sent through collective_rpc itself (small updates, tests) as safetensors
        bytes; the weight-sync group is the data plane for real updates."""
        from safetensors.torch import load
        self._rlgrid_staged = (version, [(n, t.to(self.device)) for n, t in load(safetensors_bytes).items()])
