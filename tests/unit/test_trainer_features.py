"""Trainer features on CPU (gloo, a world of one): meta_init, GroupGEMM for Qwen3-MoE, the LR schedule,
and the scheduler and RNG in checkpoints. Two-rank versions live in tests/integration/test_trainer_ranks.py."""
from __future__ import annotations

import math
import os
import shutil

import pytest
import torch
from safetensors import safe_open
from torch.distributed.tensor import DTensor
from transformers import AutoModelForCausalLM, Qwen3MoeConfig
from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeSparseMoeBlock

from services.common.batches import TrainSequence, make_micro_batch
from services.common.config import load_config
from services.common.tiny_model import build_tiny_model
from services.trainer.backends.fsdp import FSDPBackend
from services.trainer.optim import lr_factor
from tests.conftest import TINY_VOCAB_SIZE, TINY_WORDS

CPU = torch.device("cpu")


def _cfg(model_dir: str, *extra: str):
    return load_config(overrides=[f"models.policy.load={model_dir}", "models.policy_trainer.dtype=float32",
                                  "models.policy_trainer.optimizer.lr=1e-2",
                                  "models.policy_trainer.optimizer.weight_decay=0.0",
                                  "models.policy.max_prompt_tokens_length=8", "models.policy.max_response_tokens_length=8",
                                  *([] if "models.policy_trainer.packing=False" in extra
                                    else ["models.policy_trainer.max_token_in_packing=64"]), *extra])


def _step(seed: int) -> list:
    g = torch.Generator().manual_seed(seed)
    seqs = [TrainSequence(torch.randint(3, TINY_VOCAB_SIZE, (4,), generator=g).tolist(),
                          torch.randint(3, TINY_VOCAB_SIZE, (int(torch.randint(2, 8, (), generator=g)),),
                                        generator=g).tolist(), [], float(torch.randn((), generator=g)), 0)
            for _ in range(6)]
    for s in seqs:
        s.response_logprobs = (-torch.rand(len(s.response_ids), generator=g) - 1).tolist()
    total = sum(len(s.response_ids) for s in seqs)
    return [make_micro_batch(seqs[i: i + 3], num_global_tokens=total, temperature=1.0) for i in (0, 3)]


# Adam divides each gradient element by its own magnitude (+ adam_eps): where a gradient is near the
# default eps of 1e-8, float rounding of ~1e-9 between two equal computations becomes a parameter
# difference of order lr. Comparing parameters after a step needs an eps well above that rounding.
WELL_CONDITIONED_ADAM = "models.policy_trainer.optimizer.adam_eps=1e-4"


def _params(backend) -> dict[str, torch.Tensor]:
    return {n: t.detach().clone() for n, t in backend.full_params()}


@pytest.fixture(scope="module")
def moe_dir(tmp_path_factory) -> str:
    return build_tiny_model(str(tmp_path_factory.mktemp("tiny-moe")), TINY_WORDS, arch="qwen3_moe", seed=0)


# ---- meta_init ------------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ["qwen3", "qwen3_moe"])
def test_meta_init_loads_the_same_weights_as_a_full_load(tiny_model_dir, moe_dir, arch):
    path = tiny_model_dir if arch == "qwen3" else moe_dir
    full = FSDPBackend(_cfg(path, "models.policy_trainer.kl_coef=0.1"), CPU)
    meta = FSDPBackend(_cfg(path, "models.policy_trainer.kl_coef=0.1", "models.policy_trainer.meta_init=True"), CPU)
    a, b = _params(full), _params(meta)
    assert list(a) == list(b)
    for name in a:
        assert torch.equal(a[name], b[name]), name
    for (name, x), (_, y) in zip(full.model.named_buffers(), meta.model.named_buffers()):
        assert torch.equal(x, y), name   # rotary inv_freq is not in the safetensors: it is recomputed
    # the reference copy was built the same way: same step, same KL
    step = _step(0)
    one, two = full.train_step(step), meta.train_step(step)
    for key in ("loss", "kl", "grad_norm"):
        assert abs(one[key] - two[key]) < 1e-6, key


def test_meta_init_without_weights_initialises_like_transformers(tiny_model_dir, tmp_path):
    config_only = tmp_path / "config-only"
    config_only.mkdir()
    for name in os.listdir(tiny_model_dir):
        if not name.endswith(".safetensors"):
            shutil.copy(os.path.join(tiny_model_dir, name), config_only)
    meta = FSDPBackend(_cfg(str(config_only), "models.policy_trainer.meta_init=True"), CPU)
    ref = FSDPBackend(_cfg(str(config_only)), CPU)
    a, b = _params(meta), _params(ref)
    for name, t in a.items():
        assert torch.isfinite(t).all(), name
        if name.endswith("norm.weight"):
            assert torch.equal(t, torch.ones_like(t)), name
        else:   # transformers' normal(0, initializer_range) init, not leftover memory
            assert float(t.std()) == pytest.approx(float(b[name].std()), rel=0.3), name
    assert meta.train_step(_step(1))["grad_norm"] > 0


# ---- GroupGEMM -----------------------------------------------------------------------------------
def test_grouped_mm_experts_match_the_per_expert_loop():
    config = Qwen3MoeConfig(hidden_size=32, moe_intermediate_size=24, num_experts=6, num_experts_per_tok=2,
                            norm_topk_prob=True)
    torch.manual_seed(0)
    layers = {}
    for impl in ("eager", "grouped_mm"):
        config._experts_implementation = impl
        layers[impl] = Qwen3MoeSparseMoeBlock(config)
        torch.nn.init.normal_(layers[impl].experts.gate_up_proj, std=0.1)
        torch.nn.init.normal_(layers[impl].experts.down_proj, std=0.1)
        torch.nn.init.normal_(layers[impl].gate.weight, std=0.1)
    layers["grouped_mm"].load_state_dict(layers["eager"].state_dict())
    x = torch.randn(2, 37, 32)
    outs = {impl: layer(x) for impl, layer in layers.items()}
    torch.testing.assert_close(outs["grouped_mm"], outs["eager"], atol=1e-5, rtol=1e-5)
    for out in outs.values():
        (out ** 2).sum().backward()
    for (name, p), (_, q) in zip(layers["eager"].named_parameters(), layers["grouped_mm"].named_parameters()):
        assert p.grad is not None and p.grad.abs().sum() > 0, name
        torch.testing.assert_close(q.grad, p.grad, atol=1e-5, rtol=1e-4)


def test_groupgemm_trainer_matches_the_loop_and_exports_hf(moe_dir, tmp_path):
    loop = FSDPBackend(_cfg(moe_dir, WELL_CONDITIONED_ADAM), CPU)
    grouped = FSDPBackend(_cfg(moe_dir, WELL_CONDITIONED_ADAM, "models.policy_trainer.groupgemm=True"), CPU)
    assert loop.model.config._experts_implementation == "eager"
    assert grouped.model.config._experts_implementation == "grouped_mm"
    probe = _step(5)[0]
    torch.testing.assert_close(grouped.compute_logprobs(probe), loop.compute_logprobs(probe), atol=1e-5, rtol=0)
    step = _step(6)
    one, two = loop.train_step(step), grouped.train_step(step)
    assert abs(one["grad_norm"] - two["grad_norm"]) < 1e-5 * max(1.0, one["grad_norm"])
    a, b = _params(loop), _params(grouped)
    assert any(n.endswith("experts.gate_up_proj") for n in a)   # HF's own layout, nothing renamed
    for name in a:
        torch.testing.assert_close(b[name], a[name], atol=1e-5, rtol=1e-5)
    # the export is an HF directory transformers loads, with the trainer's logprobs
    grouped.export_hf(str(tmp_path / "hf"))
    with safe_open(str(tmp_path / "hf" / "model.safetensors"), framework="pt") as f:   # HF's per-expert layout
        assert "model.layers.0.mlp.experts.3.up_proj.weight" in f.keys()
    hf = AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf"), dtype=torch.float32).eval()
    with torch.no_grad():
        logits = hf(input_ids=probe.input_ids[None, : probe.seq_lens[0]]).logits[0]
    lp = torch.log_softmax(logits[:-1], -1).gather(-1, probe.input_ids[1: probe.seq_lens[0], None])[:, 0]
    torch.testing.assert_close(lp, grouped.compute_logprobs(probe)[1: probe.seq_lens[0]], atol=1e-5, rtol=0)


# ---- LR schedule ---------------------------------------------------------------------------------
def test_lr_schedule_shapes(tiny_model_dir):
    def factors(*extra: str, steps: int = 12) -> list[float]:
        cfg = _cfg(tiny_model_dir, "runtime_args.num_episode=4", "runtime_args.sample_per_episode=24",
                   "runtime_args.train_global_batch_size=8", "runtime_args.num_inference_per_prompt=4", *extra)
        return [lr_factor(s, cfg) for s in range(steps)]   # 4 episodes x 3 steps = 12 steps

    o = "models.policy_trainer.optimizer."
    assert factors() == [1.0] * 12
    assert factors(f"{o}lr_warmup_iters=4")[:5] == [0.25, 0.5, 0.75, 1.0, 1.0]
    linear = factors(f"{o}lr_decay_style=linear", f"{o}min_lr=1e-3")   # lr 1e-2: floor 0.1
    assert linear[0] == 1.0 and linear[-1] == pytest.approx(0.1 + 0.9 / 12) and linear == sorted(linear, reverse=True)
    cosine = factors(f"{o}lr_decay_style=cosine", f"{o}lr_warmup_iters=2", f"{o}lr_decay_iters=6")
    assert cosine[:2] == [0.5, 1.0] and cosine[4] == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.5)))
    assert cosine[6:] == [0.0] * 6   # decayed to min_lr 0 at step 6 and held


def test_scheduler_and_rng_are_checkpointed(tiny_model_dir, tmp_path):
    extra = ("models.policy_trainer.optimizer.lr_warmup_iters=3",)
    a = FSDPBackend(_cfg(tiny_model_dir, *extra), CPU)
    lrs = [a.train_step(_step(s))["lr"] for s in range(2)]
    assert lrs == pytest.approx([1e-2 / 3, 2e-2 / 3])
    a.save_checkpoint(str(tmp_path / "ckpt"), {})
    rng = torch.get_rng_state()
    next_lr, next_draw = a.train_step(_step(2))["lr"], torch.rand(3)
    b = FSDPBackend(_cfg(tiny_model_dir, *extra), CPU)
    torch.manual_seed(123)   # the restored RNG replaces this
    b.load_checkpoint(str(tmp_path / "ckpt"))
    assert torch.equal(torch.get_rng_state(), rng)
    assert b.train_step(_step(2))["lr"] == pytest.approx(next_lr) == pytest.approx(1e-2)
    assert torch.equal(torch.rand(3), next_draw)


# ---- the LM head only where the loss reads ---------------------------------------------------------
def test_training_on_loss_positions_only_equals_the_full_forward(tiny_model_dir, monkeypatch):
    """train_step runs the LM head and the vocab-wide float32 work only for response tokens
    (logits_to_keep); the step must equal one that computes every position."""
    extra = ("models.policy_trainer.kl_coef=0.1", "models.policy_trainer.entropy_coef=0.01", WELL_CONDITIONED_ADAM)
    sparse, full = FSDPBackend(_cfg(tiny_model_dir, *extra), CPU), FSDPBackend(_cfg(tiny_model_dir, *extra), CPU)
    everything = full._logprobs
    monkeypatch.setattr(full, "_logprobs", lambda model, mb, with_entropy, only_loss=False:
                        everything(model, mb, with_entropy, only_loss=False))
    for seed in (0, 1):   # the second step has a non-zero KL
        one, two = sparse.train_step(_step(seed)), full.train_step(_step(seed))
        for key in ("loss", "pg_loss", "kl", "entropy", "grad_norm"):
            assert one[key] == pytest.approx(two[key], rel=1e-5, abs=1e-7), key
    assert one["kl"] > 0
    a, b = _params(sparse), _params(full)
    for name in a:
        torch.testing.assert_close(a[name], b[name], atol=1e-6, rtol=1e-5)


def test_reference_holds_only_its_shards_between_uses(tiny_model_dir):
    """FSDP leaves a root unit gathered after forward (for backward); the frozen reference has no
    backward, so the trainer reshards it after each use: between steps only shards stay allocated."""
    backend = FSDPBackend(_cfg(tiny_model_dir, "models.policy_trainer.kl_coef=0.1"), CPU)
    backend.train_step(_step(3))
    assert all(isinstance(p, DTensor) for p in backend.ref.parameters())


# ---- flex_attention over packed rows ----------------------------------------------------------------
def test_block_mask_is_causal_inside_each_sequence_only():
    from torch.nn.attention.flex_attention import create_mask

    from services.trainer import attention
    lens = attention.padded_lens([3, 5, 2], 16)
    assert lens == [3, 5, 2, 6] and attention.padded_lens([8, 8], 16) == [8, 8]
    mask = attention.block_mask(lens, CPU)
    dense = create_mask(mask.mask_mod, None, None, 16, 16, device=CPU)[0, 0]
    doc = torch.repeat_interleave(torch.arange(len(lens)), torch.tensor(lens))
    expected = (doc[:, None] == doc[None, :]) & torch.ones(16, 16, dtype=torch.bool).tril()
    assert torch.equal(dense, expected)
    assert torch.equal(attention.dense_mask(lens, CPU)[0, 0], expected)   # sdpa's form (Ulysses without flex)
    assert not dense[3, 2] and dense[4, 3] and not dense[3, 4]   # the second sequence starts at 3


@pytest.mark.parametrize("packing", [True, False])
def test_flex_attention_trainer_matches_sdpa(tiny_model_dir, monkeypatch, packing):
    """attn_implementation=flex_attention (rows padded with a filler sequence, as on GPUs) trains and
    scores exactly like sdpa, packed and with padded micro-batches (which flex runs packed)."""
    from services.trainer import attention
    monkeypatch.setattr(attention, "pad_multiple", lambda device: 16)
    extra = ("models.policy_trainer.kl_coef=0.1", "models.policy_trainer.entropy_coef=0.01",
             f"models.policy_trainer.packing={packing}", *(() if packing else ("runtime_args.train_micro_batch_size=2",)))
    sdpa = FSDPBackend(_cfg(tiny_model_dir, *extra), CPU)
    flex = FSDPBackend(_cfg(tiny_model_dir, *extra, "models.policy_trainer.attn_implementation=flex_attention"), CPU)
    assert flex.model.config._attn_implementation == attention.FLEX
    for seed in (0, 1):
        mbs = _step(seed)
        for mb in mbs:
            mb.padded = not packing
            assert mb.num_tokens % 16, "the row needs a filler"
            torch.testing.assert_close(flex.compute_logprobs(mb), sdpa.compute_logprobs(mb), atol=1e-4, rtol=0)
        one, two = flex.train_step(mbs), sdpa.train_step(mbs)
        for key in ("loss", "pg_loss", "kl", "entropy", "grad_norm"):
            assert one[key] == pytest.approx(two[key], rel=1e-5, abs=1e-7), key
    assert one["kl"] > 0
    # two AdamW steps of lr 1e-2 move each weight by up to 2e-2; Adam's normalisation magnifies float32
    # noise where a gradient is near 0, so a few weights differ by ~1e-4
    a, b = _params(flex), _params(sdpa)
    for name in a:
        torch.testing.assert_close(a[name], b[name], atol=1e-3, rtol=0)


def test_torch_compile_trains_like_eager(tiny_model_dir):
    """torch_compile=True compiles each decoder layer's forward (FSDP's hooks stay outside); the steps,
    with gradient checkpointing and rows of new lengths, equal the eager trainer's."""
    from torch._dynamo.utils import counters
    extra = ("models.policy_trainer.kl_coef=0.1", "models.policy_trainer.gradient_checkpointing=True")
    eager = FSDPBackend(_cfg(tiny_model_dir, *extra), CPU)
    compiled = FSDPBackend(_cfg(tiny_model_dir, *extra, "models.policy_trainer.torch_compile=True"), CPU)
    layers = [m for m in compiled.model.modules() if type(m).__name__.endswith("DecoderLayer")]
    assert layers and all(hasattr(m.forward, "_torchdynamo_orig_callable") for m in layers)
    before = counters["stats"]["unique_graphs"]
    for seed in (0, 1):   # the second step's rows have other lengths
        one, two = compiled.train_step(_step(seed)), eager.train_step(_step(seed))
        for key in ("loss", "pg_loss", "kl", "grad_norm"):
            assert one[key] == pytest.approx(two[key], rel=1e-4, abs=1e-6), key
    assert counters["stats"]["unique_graphs"] > before, "nothing was compiled"
    assert one["kl"] > 0
