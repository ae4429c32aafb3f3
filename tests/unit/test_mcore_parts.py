"""The megatron backend's parts that stand alone: layout arithmetic against megatron's own rank
generator, the CPU shims, the patches (and that they still fit megatron-core's code), layout errors."""
from __future__ import annotations

import hashlib
import inspect

import pytest
import torch
from megatron.core.parallel_state import RankGenerator

from services.trainer.convert.shards import Dims
from services.trainer.mcore import cpu_shims, patches
from services.trainer.mcore.layout import Layout, LayoutError


@pytest.mark.parametrize("world,tp,ep,etp", [(8, 2, 2, 1), (8, 1, 4, 2), (4, 2, 1, 2), (8, 4, 2, 2), (2, 1, 2, 1)])
def test_rank_coords_match_megatrons_rank_generator(world, tp, ep, etp):
    layout = Layout(world=world, tp=tp, ep=ep, etp=etp)
    dense = RankGenerator(tp=tp, ep=1, dp=layout.dp, pp=1, cp=1, order="tp-cp-ep-dp-pp")
    expert = RankGenerator(tp=etp, ep=ep, dp=layout.edp, pp=1, cp=1, order="tp-cp-ep-dp-pp")
    for kind, gen, field in (("tp", dense, "tp"), ("dp", dense, "dp"), ("tp", expert, "etp"), ("ep", expert, "ep"),
                             ("dp", expert, "edp")):
        for group in gen.get_ranks(kind):
            # the position of a rank inside its megatron group is its coordinate along that axis
            assert [getattr(layout.coords(r), field) for r in group] == list(range(len(group))), (field, group)
    groups = layout.data_parallel_ranks()
    for group in dense.get_ranks("tp"):   # a tensor-parallel group trains one replica's micro-batches
        assert len({groups[r] for r in group}) == 1


def _dims(**kw) -> Dims:
    base = dict(model_type="qwen3_moe", vocab=23, hidden=64, layers=4, heads=8, kv_heads=2, head_dim=8, dense_ffn=0,
                experts=6, expert_ffn=32, topk=2, moe_layers=(0, 1, 2, 3), tied=False, qk_norm=True, eps=1e-6,
                rope_theta=1e6, norm_topk_prob=True)
    return Dims(**{**base, **kw})


@pytest.mark.parametrize("layout,needle", [
    (Layout(world=4, tp=4), "tensor_model_parallel_size=4 does not divide the model's 2 key/value heads"),
    (Layout(world=3, tp=3), "tensor_model_parallel_size=3 does not divide the model's 8 attention heads"),
    (Layout(world=4, ep=4), "expert_model_parallel_size=4 does not divide the model's 6 experts"),
    (Layout(world=3, pp=3), "pipeline_model_parallel_size=3 does not divide the model's 4 layers"),
    (Layout(world=3, etp=3, tp=1), "expert_tensor_parallel_size=3 does not divide the model's 32 expert MLP width"),
])
def test_layouts_that_do_not_divide_the_model_say_which(layout, needle):
    with pytest.raises(LayoutError, match=needle):
        layout.check_model(_dims())


def test_layouts_that_do_not_divide_the_ranks_are_refused():
    with pytest.raises(LayoutError, match="tensor_model_parallel_size=2 x pipeline_model_parallel_size=1 does not "
                                          "divide the trainer's 3 rank"):
        Layout(world=3, tp=2).check_world()
    with pytest.raises(LayoutError, match="tensor_model_parallel_size=1 x pipeline_model_parallel_size=2 does not "
                                          "divide the trainer's 1 rank"):
        Layout(world=1, pp=2).check_world()   # PP=2 on a one-rank trainer: run it with two ranks (torchrun)
    with pytest.raises(LayoutError, match="expert_tensor_parallel_size=1 x expert_model_parallel_size=2 x "
                                          "pipeline_model_parallel_size=2 does not divide the trainer's 2 rank"):
        Layout(world=2, pp=2, ep=2).check_world()
    with pytest.raises(LayoutError, match="has no experts"):
        Layout(world=2, ep=2).check_model(_dims(experts=0, moe_layers=(), dense_ffn=64))


def test_cpu_shims_put_megatrons_cuda_assumptions_on_the_cpu():
    assert cpu_shims.install()   # this host has no CUDA
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import get_cuda_rng_tracker
    from megatron.core.utils import GlobalMemoryBuffer

    # megatron's global memory buffer (and every allocation naming torch.cuda.current_device()) lands on the CPU
    buf = GlobalMemoryBuffer().get_tensor((3, 4), torch.float32, "mpu")
    assert buf.device.type == "cpu" and buf.shape == (3, 4)
    assert parallel_state.get_global_memory_buffer.__module__ == "megatron.core.parallel_state"
    tracker = get_cuda_rng_tracker()
    assert isinstance(tracker, cpu_shims.CPURNGStatesTracker)
    # the forked stream is reproducible and leaves the default stream untouched
    tracker.reset()
    tracker.add("model-parallel-rng", 1234)
    outside = torch.get_rng_state()
    with tracker.fork():
        first = torch.rand(4)
    assert torch.equal(torch.get_rng_state(), outside)
    tracker.reset()
    tracker.add("model-parallel-rng", 1234)
    with tracker.fork():
        assert torch.equal(torch.rand(4), first)
    with pytest.raises(ValueError, match="already exists"):
        tracker.add("other", 1234)
    # the shim covers the tracker's whole interface, and recompute's save/restore of the CUDA generator
    from megatron.core.tensor_parallel import random as mrandom
    public = {n for n in vars(mrandom.CudaRNGStatesTracker) if not n.startswith("_")}
    assert public <= set(dir(cpu_shims.CPURNGStatesTracker)), public
    assert mrandom._get_cuda_rng_state is cpu_shims._no_cuda_rng_state
    assert mrandom._set_cuda_rng_state is cpu_shims._restore_nothing
    # megatron's pipeline schedule: its p2p layer's torch.cuda.synchronize() and its token counter's
    # literal device="cuda" (both would raise here)
    torch.cuda.synchronize()
    with cpu_shims.cuda_factories_on_cpu():
        assert torch.zeros([], dtype=torch.int, device="cuda").device.type == "cpu"
        assert torch.ones(2, device=torch.device("cuda", 0)).device.type == "cpu"
        assert torch.empty(1).device.type == "cpu"
    from megatron.core.pipeline_parallel import p2p_communication, schedules
    assert 'device="cuda"' in inspect.getsource(schedules.forward_backward_pipelining_without_interleaving)
    assert "torch.cuda.synchronize()" in inspect.getsource(p2p_communication.P2PCommunicator._communicate_shapes)


# ---- the unpermute patch ----------------------------------------------------------------------------
UNPERMUTE_DIGEST = "4d8528cacba9887b"   # megatron-core 0.19.2


def test_patched_code_is_the_code_the_patch_was_written_for():
    """Fails when megatron-core's unpermute or its use by the dispatchers changes: review patches.py."""
    import megatron.core
    from megatron.core.transformer.moe import moe_utils, token_dispatcher

    assert megatron.core.__version__.split("+")[0] == patches.VERSION
    source = inspect.getsource(moe_utils.unpermute)
    assert hashlib.sha256(source.encode()).hexdigest()[:16] == UNPERMUTE_DIGEST
    assert list(inspect.signature(moe_utils.unpermute).parameters)[:3] == [
        "permuted_tokens", "sorted_indices", "restore_shape"]
    assert "unpermute(" in inspect.getsource(token_dispatcher.MoEAllGatherTokenDispatcher.combine_preprocess)
    patches.set_unpermute_dtype(torch.float32)
    assert token_dispatcher.unpermute.__wrapped__ is moe_utils.unpermute


GATING_DIGEST = "0fe8ae411d8e3ba8"   # megatron-core 0.19.2: TopKRouter.gating and router_gating_linear's Function


def _gating_source() -> str:
    from megatron.core.transformer.moe import moe_utils, router
    return inspect.getsource(router.TopKRouter.gating) + inspect.getsource(moe_utils.RouterGatingLinearFunction)


def test_router_patch_is_written_for_this_gating_code():
    """Fails when megatron-core's router gating changes: review patch 2 in patches.py."""
    from megatron.core.transformer.moe import router

    assert hashlib.sha256(_gating_source().encode()).hexdigest()[:16] == GATING_DIGEST
    assert "router_gating_linear(input, self.weight, self.bias, router_dtype)" in inspect.getsource(
        router.TopKRouter.gating)
    patches.install_router_patch()
    patches.install_router_patch()   # idempotent
    assert not hasattr(router.TopKRouter.gating.__wrapped__, "__wrapped__")


def _router(dtype: str | None):
    """What TopKRouter.gating reads: its weight, bias and config (megatron's own gate function runs)."""
    from types import SimpleNamespace
    weight = torch.randn(4, 16, generator=torch.Generator().manual_seed(1), requires_grad=True)
    return SimpleNamespace(weight=weight, bias=None, config=SimpleNamespace(moe_router_dtype=dtype))


@pytest.mark.parametrize("dtype,logits_dtype", [("fp32", torch.float32), (None, torch.bfloat16)])
def test_router_gate_under_autocast_keeps_its_dtype_and_backward_runs(dtype, logits_dtype):
    """The H200 failure on CPU: float32 activations (megatron's norms keep them float32) reach the gate
    inside autocast, and backward runs outside it, as the CUDA autograd engine runs it. Unpatched, the
    float32 router multiplies in bf16 and its backward mixes dtypes; patched, the logits are float32 for
    fp32 (bf16 for native) and backward runs."""
    from megatron.core.transformer.moe.router import TopKRouter

    patches.install_router_patch()
    inp = torch.randn(8, 16, generator=torch.Generator().manual_seed(0), requires_grad=True)
    module = _router(dtype)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        unpatched = TopKRouter.gating.__wrapped__(module, inp)
    assert unpatched.dtype == torch.bfloat16          # what megatron computes, whatever the key says
    with pytest.raises(RuntimeError, match="same dtype"):
        unpatched.sum().backward()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = TopKRouter.gating(module, inp)
    assert logits.dtype == logits_dtype
    if dtype == "fp32":
        torch.testing.assert_close(logits, inp @ module.weight.t(), rtol=0, atol=0)
    logits.float().sum().backward()
    assert inp.grad.dtype == torch.float32 and module.weight.grad.dtype == torch.float32


def _scatter_case(seed: int, topk: int = 4, tokens: int = 64, hidden: int = 32):
    g = torch.Generator().manual_seed(seed)
    # every token's top-k expert outputs, as the dispatcher holds them before unpermute (bf16 activations)
    permuted = (torch.randn(tokens * topk, hidden, generator=g) * 3).to(torch.bfloat16)
    index = torch.arange(tokens).repeat_interleave(topk)
    return permuted, index


def test_fp32_accumulation_is_independent_of_the_order_of_additions():
    """GPU atomics add a token's top-k outputs in no fixed order; with the patch the additions run in
    float32 and the sum is rounded once, so every order gives the same bits: the exact sum, rounded.
    (CPU kernels happen to accumulate bf16 scatter-adds in float32 as well; the GPU disagreement of
    megatron's own bf16 accumulation is measured by bench/megatron.py.)"""
    from megatron.core.transformer.moe import token_dispatcher

    permuted, index = _scatter_case(0)
    shape = torch.Size([64, permuted.shape[1]])
    seen = []
    for dtype in (torch.float32, None):
        patches.set_unpermute_dtype(dtype)
        outs = []
        for seed in range(4):   # the same additions in different orders
            order = torch.randperm(len(index), generator=torch.Generator().manual_seed(seed))
            outs.append(token_dispatcher.unpermute(permuted[order], index[order], restore_shape=shape))
        seen.append(outs)
    patches.set_unpermute_dtype(torch.float32)
    fp32, native = seen
    assert all(o.dtype == torch.bfloat16 for o in fp32 + native)   # the layer's dtype either way
    assert all(torch.equal(o, fp32[0]) for o in fp32)
    exact = torch.zeros(shape, dtype=torch.float64).index_add_(0, index, permuted.double()).to(torch.bfloat16)
    assert torch.equal(fp32[0], exact)   # one rounding of the exact sum
    sequential = torch.zeros(shape, dtype=torch.bfloat16)
    for i in range(len(index)):   # what a bf16 accumulator that rounds after each addition gives
        sequential[index[i]] += permuted[i]
    assert not torch.equal(sequential, exact)


def test_the_patch_hands_megatron_float32_tokens(monkeypatch):
    from megatron.core.transformer.moe import token_dispatcher

    dtypes = []
    inner = token_dispatcher.unpermute.__wrapped__

    def spy(tokens, *args, **kwargs):
        dtypes.append(tokens.dtype)
        return inner(tokens, *args, **kwargs)

    monkeypatch.setattr(token_dispatcher, "unpermute", patches._wrap(spy))
    permuted, index = _scatter_case(1)
    for dtype in (torch.float32, None):
        patches.set_unpermute_dtype(dtype)
        token_dispatcher.unpermute(permuted, index, restore_shape=torch.Size([64, permuted.shape[1]]))
    patches.set_unpermute_dtype(torch.float32)
    assert dtypes == [torch.float32, torch.bfloat16]


# ---- the packed-RoPE patch --------------------------------------------------------------------------
ROPE_THD_DIGEST = "99798acffbb2e50c"  # megatron-core 0.19.2: rope_utils._apply_rotary_pos_emb_thd


def test_rope_patch_is_written_for_this_rope_code():
    """Fails when megatron-core's THD rotary embedding changes: review patch 3 in patches.py."""
    from megatron.core.models.common.embeddings import rope_utils

    patches.install_rope_patch()
    patches.install_rope_patch()   # idempotent
    original = rope_utils._apply_rotary_pos_emb_thd.__wrapped__
    assert not hasattr(original, "__wrapped__")
    assert hashlib.sha256(inspect.getsource(original).encode()).hexdigest()[:16] == ROPE_THD_DIGEST
    # the attention layers reach it through apply_rotary_pos_emb, by its module-level name
    assert "_apply_rotary_pos_emb_thd(" in inspect.getsource(rope_utils.apply_rotary_pos_emb)


class _OneRank:
    """A context-parallel group of one, as the THD rotary embedding asks it (size and rank)."""

    @staticmethod
    def size() -> int:
        return 1

    @staticmethod
    def rank() -> int:
        return 0


@pytest.mark.parametrize("interleaved,percent,lens", [(False, 1.0, [5, 1, 17, 3, 9]), (True, 1.0, [2, 30]),
                                                      (False, 0.5, [7, 7, 7]), (False, 1.0, [12])])
def test_rope_in_one_pass_equals_megatrons_loop_bit_for_bit(interleaved, percent, lens):
    """Values and gradients of the patched THD rotary embedding equal megatron's per-sequence loop exactly:
    positions restart in every sequence (freqs as long as the longest), or follow the row (one sequence, or
    freqs given per token)."""
    from megatron.core.models.common.embeddings import rope_utils
    from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding

    cpu_shims.install()   # RotaryEmbedding moves its inverse frequencies to torch.cuda.current_device()
    patches.install_rope_patch()
    patched = rope_utils._apply_rotary_pos_emb_thd
    g = torch.Generator().manual_seed(len(lens))
    cu = torch.tensor([0, *lens]).cumsum(0).to(torch.int32)
    rope = RotaryEmbedding(kv_channels=16, rotary_percent=percent, rotary_interleaved=interleaved, rotary_base=1000,
                           use_cpu_initialization=True)
    for freqs in (rope(max(lens)), rope(sum(lens))):
        out = {}
        for name, fn in (("loop", patched.__wrapped__), ("one pass", patched)):
            t = torch.randn(sum(lens), 3, 16, generator=torch.Generator().manual_seed(1), requires_grad=True)
            y = fn(t, cu, freqs, rotary_interleaved=interleaved, cp_group=_OneRank())
            y.backward(torch.randn(y.shape, generator=torch.Generator().manual_seed(2)))
            out[name] = (y.detach(), t.grad)
        assert torch.equal(out["one pass"][0], out["loop"][0])
        assert torch.equal(out["one pass"][1], out["loop"][1])
    # and it is RoPE: the second sequence's first token is not rotated (position 0), whatever precedes it
    if len(lens) > 1 and percent == 1.0:
        t = torch.randn(sum(lens), 3, 16, generator=g)
        y = patched(t, cu, rope(max(lens)), rotary_interleaved=interleaved, cp_group=_OneRank())
        assert torch.equal(y[lens[0]], t[lens[0]]) and not torch.equal(y[1], t[1])


def test_weight_gathers_stay_under_the_bucket_budget():
    """Weight sync and save_hf gather families into full tensors bucket by bucket: a bucket holds at
    most the budget, or one family larger than it; every family comes exactly once, in order."""
    from services.trainer.mcore.weights import Unit, _buckets

    sizes = [40, 10, 30, 100, 5, 5, 60, 1]
    units = [Unit([f"t{i}"], [], lambda g: [], n, [(n,)]) for i, n in enumerate(sizes)]
    buckets = list(_buckets(units, budget=64))
    assert [u for b in buckets for u in b] == units
    for b in buckets:
        assert sum(u.nbytes for u in b) <= 64 or len(b) == 1
    assert [[u.nbytes for u in b] for b in buckets] == [[40, 10], [30], [100], [5, 5], [60, 1]]
