"""The megatron backend against the FSDP backend on CPU (gloo, a world of one), fp32, on the same
weights and the same packed micro-batches: logprobs, every loss term's gradient, and a few steps.

Tolerances: logprobs 1e-5 absolute (measured: 0 for Qwen3, 2.4e-7 for Qwen3-MoE: megatron's router
takes the top-k of the logits then a softmax over them, transformers a softmax, the top-k and a
renormalisation); loss metrics and gradients 1e-5 relative."""
from __future__ import annotations

import pytest
import torch

from services.common.batches import TrainSequence, make_micro_batch
from services.common.config import load_config
from services.common.tiny_model import build_tiny_model
from services.trainer.backends.fsdp import FSDPBackend
from services.trainer.backends.megatron import MegatronBackend
from services.trainer.loss import LossConfig
from services.trainer.mcore.weights import Slot, gather_units
from tests.conftest import TINY_VOCAB_SIZE, TINY_WORDS

CPU = torch.device("cpu")


def _overrides(model_dir: str, *extra: str) -> list[str]:
    return [f"models.policy.load={model_dir}", "models.policy_trainer.dtype=float32",
            "models.policy_trainer.optimizer.lr=1e-2", "models.policy_trainer.optimizer.weight_decay=0.0",
            "models.policy.max_prompt_tokens_length=8", "models.policy.max_response_tokens_length=8",
            "models.policy_trainer.max_token_in_packing=64", *extra]


def pair(model_dir: str, *extra: str, megatron: tuple[str, ...] = ()):
    fsdp = FSDPBackend(load_config(overrides=_overrides(model_dir, *extra)), CPU)
    mcore = MegatronBackend(load_config(overrides=_overrides(model_dir, *extra, "models.policy_trainer.backend=megatron",
                                                             *megatron)), CPU)
    return fsdp, mcore


def step_batches(seed: int, temperature: float = 1.0, n: int = 6) -> list:
    """Two packed micro-batches of random sequences with random advantages and old logprobs."""
    g = torch.Generator().manual_seed(seed)
    seqs = [TrainSequence(torch.randint(3, TINY_VOCAB_SIZE, (int(torch.randint(1, 6, (), generator=g)),),
                                        generator=g).tolist(),
                          torch.randint(3, TINY_VOCAB_SIZE, (int(torch.randint(2, 8, (), generator=g)),),
                                        generator=g).tolist(), [], float(torch.randn((), generator=g)), 0)
            for _ in range(n)]
    for s in seqs:
        s.response_logprobs = (-torch.rand(len(s.response_ids), generator=g) - 1).tolist()
    total = sum(len(s.response_ids) for s in seqs)
    half = n // 2
    return [make_micro_batch(seqs[i: i + half], num_global_tokens=total, temperature=temperature) for i in (0, half)]


@pytest.fixture(scope="module")
def moe_dir(tmp_path_factory) -> str:
    return build_tiny_model(str(tmp_path_factory.mktemp("tiny-moe")), TINY_WORDS, arch="qwen3_moe", seed=1)


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory) -> str:
    return build_tiny_model(str(tmp_path_factory.mktemp("tiny-llama")), TINY_WORDS, arch="llama", seed=2)


def _model_dir(arch, tiny_model_dir, moe_dir, llama_dir):
    return {"qwen3": tiny_model_dir, "qwen3_moe": moe_dir, "llama": llama_dir}[arch]


@pytest.mark.parametrize("arch", ["qwen3", "qwen3_moe", "llama"])
def test_logprobs_loss_and_steps_agree_with_fsdp(arch, tiny_model_dir, moe_dir, llama_dir):
    path = _model_dir(arch, tiny_model_dir, moe_dir, llama_dir)
    fsdp, mcore = pair(path, "models.policy_trainer.kl_coef=0.1", "models.policy_trainer.entropy_coef=0.01")
    probe = step_batches(9, temperature=0.7)[0]
    a, b = fsdp.compute_logprobs(probe), mcore.compute_logprobs(probe)
    assert b.shape == a.shape and b.dtype == torch.float32
    torch.testing.assert_close(b, a, atol=1e-5, rtol=0)
    starts = torch.tensor([0, *probe.seq_lens]).cumsum(0)[:-1]
    assert torch.all(b[starts] == 0)
    for seed in (1, 2):   # the second step sees a policy that moved away from the reference
        one, two = fsdp.train_step(step_batches(seed)), mcore.train_step(step_batches(seed))
        for key in ("loss", "pg_loss", "kl", "entropy", "clip_frac", "grad_norm", "tokens", "micro_batches"):
            assert two[key] == pytest.approx(one[key], rel=1e-5, abs=1e-7), (key, one[key], two[key])
    assert two["kl"] > 0
    torch.testing.assert_close(mcore.compute_logprobs(probe), fsdp.compute_logprobs(probe), atol=1e-4, rtol=0)
    # weight sync speaks the rollouts' names and shapes (transformers' own, MoE experts fused) with the same values
    assert [(p.name, p.shape) for p in mcore.param_specs()] == [(p.name, p.shape) for p in fsdp.param_specs()]
    theirs = dict(fsdp.full_params())
    for name, tensor in mcore.full_params():
        torch.testing.assert_close(tensor, theirs[name], atol=1e-4, rtol=1e-4, msg=name)


def test_packed_rows_equal_each_sequence_alone(tiny_model_dir):
    _, mcore = pair(tiny_model_dir)
    mb = step_batches(3, n=8)[0]
    packed = mcore.compute_logprobs(mb)
    alone = torch.cat([mcore.compute_logprobs(make_micro_batch([s], num_global_tokens=1, temperature=1.0))
                       for s in _sequences(mb)])
    torch.testing.assert_close(packed, alone, atol=1e-5, rtol=0)


def _sequences(mb):
    out, start = [], 0
    for n in mb.seq_lens:
        out.append(TrainSequence(mb.input_ids[start: start + 1].tolist(), mb.input_ids[start + 1: start + n].tolist(),
                                 [-1.0] * (n - 1), 0.0, 0))
        start += n
    return out


# ---- each loss term moves the gradient as on FSDP ------------------------------------------------------
def _grads(backend, batches, loss_cfg: LossConfig) -> dict[str, torch.Tensor]:
    """The step's gradient (before clipping, which is off) under `loss_cfg`, in the rollouts' HF names;
    the optimizer does not step."""
    captured = {}

    def capture():
        if isinstance(backend, MegatronBackend):
            table = {n: Slot(s.item, s.param.grad, s.index, s.size, s.rank) for n, s in backend.table.items()}
            captured.update(gather_units(backend._sync_units, table, backend.dims, torch.float32, 1 << 30))
        else:
            captured.update({n: p.grad.to_local().clone() for n, p in backend.model.named_parameters()})

    backend.loss_cfg = loss_cfg
    original = backend.optimizer.step
    backend.optimizer.step = capture
    try:
        backend.train_step(batches)
    finally:
        backend.optimizer.step = original
    return captured


@pytest.mark.parametrize("term", ["clip", "kl", "entropy"])
def test_each_loss_term_moves_the_gradient_as_on_fsdp(tiny_model_dir, term):
    fsdp, mcore = pair(tiny_model_dir, "models.policy_trainer.kl_coef=0.5", "models.policy_trainer.optimizer.clip_grad=0")
    for b in (fsdp, mcore):   # one real step, so the policy differs from the frozen reference
        b.train_step(step_batches(11))
    batches = step_batches(12)
    for mb in batches:   # old logprobs far from the policy's: ratios well outside the clip range
        mb.old_logprobs = mb.old_logprobs - 1.0
    base = dict(pos_clip_ratio=100.0, neg_clip_ratio=0.99, kl_coef=0.0, entropy_coef=0.0)
    with_term = {"clip": dict(base, pos_clip_ratio=0.1, neg_clip_ratio=0.1), "kl": dict(base, kl_coef=0.5),
                 "entropy": dict(base, entropy_coef=0.1)}[term]
    moved = {}
    for name, b in (("fsdp", fsdp), ("megatron", mcore)):
        off, on = _grads(b, batches, LossConfig(**base)), _grads(b, batches, LossConfig(**with_term))
        moved[name] = {k: on[k] - off[k] for k in off}
    total = sum(float(d.norm()) for d in moved["fsdp"].values())
    assert total > 1e-3, f"{term} did not move the gradient on FSDP"
    for k, d in moved["fsdp"].items():
        torch.testing.assert_close(moved["megatron"][k], d, atol=1e-6, rtol=1e-4, msg=f"{term}: {k}")


def test_a_failed_step_changes_nothing(tiny_model_dir):
    _, mcore = pair(tiny_model_dir)
    before, step = {n: t.clone() for n, t in mcore.full_params()}, mcore.step

    def batches():
        yield step_batches(5)[0]
        raise RuntimeError("data source died")

    with pytest.raises(RuntimeError, match="data source died"):
        mcore.train_step(batches())
    assert mcore.step == step
    assert all(torch.equal(before[n], t) for n, t in mcore.full_params())
    assert all(p.grad is None for p in mcore.model.parameters())


def test_meta_init_and_groupgemm_match_the_plain_build(moe_dir):
    """meta_init (built on the meta device, then filled from the safetensors) and grouped-GEMM experts
    (one stacked weight per projection) give the plain build's logprobs and steps."""
    base = load_config(overrides=_overrides(moe_dir, "models.policy_trainer.backend=megatron"))
    plain = MegatronBackend(base, CPU)
    other = MegatronBackend(load_config(overrides=_overrides(moe_dir, "models.policy_trainer.backend=megatron",
                                                             "models.policy_trainer.meta_init=True",
                                                             "models.policy_trainer.groupgemm=True")), CPU)
    assert any(n.endswith("experts.weight1") for n, _ in other.model.named_parameters())
    probe = step_batches(4)[0]
    torch.testing.assert_close(other.compute_logprobs(probe), plain.compute_logprobs(probe), atol=1e-6, rtol=0)
    one, two = plain.train_step(step_batches(5)), other.train_step(step_batches(5))
    assert two["grad_norm"] == pytest.approx(one["grad_norm"], rel=1e-5)
    mine = dict(other.full_params())
    for name, tensor in plain.full_params():
        torch.testing.assert_close(mine[name], tensor, atol=1e-6, rtol=1e-5, msg=name)


def _with_proximal(batches: list, seed: int) -> list:
    """The trainer's pre-episode logprobs as a later optimizer step receives them: the rollout's shifted
    per token by up to +-1, so the IS ratios exp(prox - old) spread over [1/e, e]."""
    g = torch.Generator().manual_seed(seed)
    for mb in batches:
        shifted = mb.old_logprobs + torch.rand(mb.num_tokens, generator=g) * 2 - 1
        mb.proximal_logprobs = torch.where(mb.loss_mask, shifted.clamp(max=0.0), torch.zeros_like(shifted))
    return batches


@pytest.mark.parametrize("mode", ["truncate", "mask"])
def test_tis_applies_on_both_backends_alike(tiny_model_dir, mode):
    """Truncated importance sampling through each backend's train step: the IS metrics are those of the
    batch (the ratios depend only on the proximal and rollout logprobs), and the weighting moves the
    gradient the same way on FSDP and megatron."""
    tis = ("models.policy_trainer.tis_cap=1.5", f"models.policy_trainer.tis_mode={mode}")
    fsdp, mcore = pair(tiny_model_dir, *tis, "models.policy_trainer.optimizer.clip_grad=0")
    batches = _with_proximal(step_batches(21), seed=21)
    mask = torch.cat([mb.loss_mask for mb in batches])
    ratio = torch.exp(torch.cat([mb.proximal_logprobs - mb.old_logprobs for mb in batches]))[mask]
    for backend in (fsdp, mcore):
        m = backend.train_step(_with_proximal(step_batches(21), seed=21))
        assert m["tis_ratio_mean"] == pytest.approx(float(ratio.mean()), rel=1e-5)
        assert m["tis_ratio_min"] == pytest.approx(float(ratio.min()), rel=1e-6)
        assert m["tis_ratio_max"] == pytest.approx(float(ratio.max()), rel=1e-6)
        assert m["tis_clip_frac"] == pytest.approx(float((ratio > 1.5).float().mean()), rel=1e-5)
    assert 0 < float((ratio > 1.5).float().mean()) < 1

    base = dict(pos_clip_ratio=100.0, neg_clip_ratio=0.99)   # no PPO clipping: the IS weight alone
    moved = {}
    for name, b in (("fsdp", fsdp), ("megatron", mcore)):
        off = _grads(b, step_batches(22), LossConfig(**base))
        on = _grads(b, _with_proximal(step_batches(22), seed=22), LossConfig(**base, tis_cap=1.5, tis_mode=mode))
        moved[name] = {k: on[k] - off[k] for k in off}
    assert sum(float(d.norm()) for d in moved["fsdp"].values()) > 1e-3, "TIS did not move the gradient"
    for k, d in moved["fsdp"].items():
        torch.testing.assert_close(moved["megatron"][k], d, atol=1e-6, rtol=1e-4, msg=f"tis: {k}")
