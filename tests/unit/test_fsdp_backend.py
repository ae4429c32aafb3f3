"""Tests for services.trainer.backends.fsdp.FSDPBackend on CPU (gloo, world of one) with a tiny Qwen3."""
from __future__ import annotations

import json
import os
import re

import pytest
import torch
from transformers import AutoModelForCausalLM

from services.common.batches import TrainSequence, make_micro_batch
from services.common.config import load_config
from services.trainer.backends.fsdp import FSDPBackend, OutOfMemoryGuidance
from services.trainer.checkpoint import metadata_digest
from tests.conftest import TINY_VOCAB_SIZE

CPU = torch.device("cpu")
LR = 1e-3


def _overrides(model_dir: str, *extra: str) -> list[str]:
    return [f"models.policy.load={model_dir}", "models.policy_trainer.dtype=float32",
            f"models.policy_trainer.optimizer.lr={LR}", "models.policy_trainer.optimizer.weight_decay=0.0",
            "models.policy.max_prompt_tokens_length=8", "models.policy.max_response_tokens_length=8",
            *([] if "models.policy_trainer.packing=False" in extra else ["models.policy_trainer.max_token_in_packing=64"]),
            *extra]


@pytest.fixture(scope="module")
def backend(tiny_model_dir) -> FSDPBackend:
    # init_distributed makes a world-of-one default group once per process: one backend per module.
    return FSDPBackend(load_config(overrides=_overrides(tiny_model_dir)), CPU)


@pytest.fixture(scope="module")
def kl_backend(tiny_model_dir, backend) -> FSDPBackend:
    cfg = load_config(overrides=_overrides(tiny_model_dir, "models.policy_trainer.kl_coef=0.5"))
    return FSDPBackend(cfg, CPU)


def _seqs(n=8, seed=0, adv=1.0, max_prompt=6, max_response=8) -> list[TrainSequence]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        p = torch.randint(3, TINY_VOCAB_SIZE, (int(torch.randint(1, max_prompt + 1, (1,), generator=g)),),
                          generator=g).tolist()
        r = torch.randint(0, TINY_VOCAB_SIZE, (int(torch.randint(1, max_response + 1, (1,), generator=g)),),
                          generator=g).tolist()
        out.append(TrainSequence(p, r, [-3.0] * len(r), adv, 0))
    assert len({s.length for s in out}) > 2  # sequences of different lengths
    return out


def _mb(seqs, padded=False, temperature=1.0, num_global_tokens=None):
    n = num_global_tokens or sum(len(s.response_ids) for s in seqs)
    return make_micro_batch(seqs, num_global_tokens=n, temperature=temperature, padded=padded)


def _params(backend) -> dict[str, torch.Tensor]:
    return {n: t.detach().clone() for n, t in backend.full_params()}


def _hf_copy(backend, model_dir):
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    missing, unexpected = model.load_state_dict(_params(backend), strict=False)
    assert not unexpected
    assert set(missing) <= {"lm_head.weight"}  # tied to the embedding
    model.tie_weights()
    return model


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_packed_padded_and_single_sequence_logprobs_agree(backend, temperature):
    seqs = _seqs(seed=1)
    packed = backend.compute_logprobs(_mb(seqs, temperature=temperature))
    padded = backend.compute_logprobs(_mb(seqs, padded=True, temperature=temperature))
    single = torch.cat([backend.compute_logprobs(_mb([s], temperature=temperature)) for s in seqs])
    total = sum(s.length for s in seqs)
    assert packed.shape == padded.shape == single.shape == (total,)
    assert packed.dtype == torch.float32
    torch.testing.assert_close(packed, single, atol=1e-5, rtol=0)
    torch.testing.assert_close(padded, single, atol=1e-5, rtol=0)
    starts = torch.tensor([0] + [s.length for s in seqs]).cumsum(0)[:-1]
    assert torch.all(packed[starts] == 0)  # no prediction for a sequence's first token
    others = torch.ones(total, dtype=torch.bool)
    others[starts] = False
    assert torch.all(packed[others] < 0)


def test_compute_logprobs_matches_independent_hf_forward(backend, tiny_model_dir):
    seqs = _seqs(seed=2)
    temperature = 0.8
    got = backend.compute_logprobs(_mb(seqs, temperature=temperature))
    model = _hf_copy(backend, tiny_model_dir)
    expected = []
    for s in seqs:
        ids = torch.tensor([s.prompt_ids + s.response_ids])
        with torch.no_grad():
            logp = torch.log_softmax(model(input_ids=ids).logits[0].float() / temperature, -1)
        expected.append(torch.cat([torch.zeros(1), logp[:-1].gather(-1, ids[0, 1:, None])[:, 0]]))
    torch.testing.assert_close(got, torch.cat(expected), atol=1e-5, rtol=0)


def test_train_step_metrics_and_weights_change(backend):
    before, step = _params(backend), backend.step
    seqs = _seqs(seed=3)
    metrics = backend.train_step([_mb(seqs[:4], num_global_tokens=sum(len(s.response_ids) for s in seqs)),
                                  _mb(seqs[4:], num_global_tokens=sum(len(s.response_ids) for s in seqs))])
    for key in ("loss", "pg_loss", "kl", "entropy", "clip_frac", "grad_norm", "tokens", "seconds"):
        assert key in metrics and isinstance(metrics[key], float), key
        assert metrics[key] == metrics[key], f"{key} is nan"
    assert metrics["tokens"] == sum(s.length for s in seqs)
    assert metrics["grad_norm"] > 0 and metrics["entropy"] > 0 and metrics["seconds"] > 0
    assert metrics["kl"] == 0.0  # no reference model
    assert backend.step == step + 1
    after = _params(backend)
    assert any(not torch.equal(before[n], after[n]) for n in before)


@pytest.mark.parametrize("sign", [1.0, -1.0], ids=["positive", "negative"])
def test_advantage_moves_the_logprobs_of_its_tokens(backend, sign):
    seqs = _seqs(seed=4, adv=sign)
    mb = _mb(seqs)
    old = backend.compute_logprobs(mb)
    mask = mb.loss_mask
    # on-policy: the samples' logprobs are the current policy's
    on_policy, offset = [], 0
    for s in seqs:
        start = offset + len(s.prompt_ids)
        on_policy.append(TrainSequence(s.prompt_ids, s.response_ids, old[start: start + len(s.response_ids)].tolist(),
                                       sign, 0))
        offset += s.length
    metrics = backend.train_step([_mb(on_policy)])
    assert metrics["clip_frac"] == 0.0  # ratio 1 everywhere: nothing clipped
    new = backend.compute_logprobs(mb)
    delta = (new - old)[mask]
    assert sign * delta.mean() > 0
    assert (sign * delta > 0).float().mean() > 0.5


def test_failed_step_changes_nothing(backend):
    before, step = _params(backend), backend.step
    seqs = _seqs(seed=5)

    def batches():
        yield _mb(seqs[:4], num_global_tokens=100)
        raise RuntimeError("data source died")

    with pytest.raises(RuntimeError, match="data source died"):
        backend.train_step(batches())
    assert backend.step == step
    after = _params(backend)
    assert all(torch.equal(before[n], after[n]) for n in before)
    assert all(p.grad is None for p in backend.model.parameters())


def test_train_step_with_no_micro_batches_raises(backend):
    step = backend.step
    with pytest.raises(ValueError):
        backend.train_step([])
    assert backend.step == step


def test_full_params_match_param_specs(backend, tiny_model_dir):
    specs = backend.param_specs()
    full = list(backend.full_params())
    assert [n for n, _ in full] == [s.name for s in specs]
    assert [tuple(t.shape) for _, t in full] == [s.shape for s in specs]
    assert all(s.dtype == torch.float32 for s in specs)  # compute dtype of this config
    assert all(type(t) is torch.Tensor for _, t in full)  # full tensors, not DTensor shards
    hf = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    assert [s.name for s in specs] == [n for n, _ in hf.named_parameters()]
    assert backend.vocab_size == TINY_VOCAB_SIZE


def test_kl_reference_model(kl_backend):
    assert kl_backend.ref is not None
    seqs = _seqs(seed=6)
    first = kl_backend.train_step([_mb(seqs)])
    assert abs(first["kl"]) < 1e-7  # policy == reference before any update
    second = kl_backend.train_step([_mb(seqs)])
    assert second["kl"] > 0


# ---- OOM guidance -----------------------------------------------------------------------------------

def _raise_oom(*args, **kwargs):
    raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")


@pytest.mark.parametrize("extra,seq_len,expected", [
    (["models.policy_trainer.packing=True", "models.policy_trainer.max_token_in_packing=4321"], 12,
     [r"models\.policy_trainer\.max_token_in_packing\D{0,12}4321\b"]),
    (["models.policy_trainer.packing=False", "runtime_args.train_micro_batch_size=16"], 12,
     [r"runtime_args\.train_micro_batch_size\D{0,12}16\b"]),
    (["models.policy_trainer.packing=True", "models.policy_trainer.max_token_in_packing=16"], 16,
     [r"ulysses_sequence_parallel_size", r"max_token_in_packing\D{0,12}16\b"]),
    (["models.policy_trainer.packing=False", "runtime_args.train_micro_batch_size=1"], 12,
     [r"ulysses_sequence_parallel_size", r"train_micro_batch_size\D{0,12}1\b"]),
], ids=["packing", "padded", "bin-holds-one-sequence", "padded-one-per-batch"])
def test_oom_guidance_names_the_config_keys(backend, tiny_model_dir, monkeypatch, extra, seq_len, expected):
    cfg = load_config(overrides=_overrides(tiny_model_dir, *extra))
    monkeypatch.setattr(backend, "cfg", cfg)
    monkeypatch.setattr(backend, "_logprobs", _raise_oom)
    before, step = _params(backend), backend.step
    seq = TrainSequence(list(range(3, 3 + seq_len - 4)), [5, 6, 7, 8], [-1.0] * 4, 1.0, 0)
    assert seq.length == seq_len
    with pytest.raises(OutOfMemoryGuidance) as info:
        backend.train_step([_mb([seq], padded=not cfg.models.policy_trainer.packing)])
    message = str(info.value)
    for pattern in expected:
        assert re.search(pattern, message), (pattern, message)
    assert isinstance(info.value.__cause__, torch.OutOfMemoryError)
    assert backend.step == step
    assert all(torch.equal(before[n], t) for n, t in _params(backend).items())


def test_oom_in_the_optimizer_step_says_how_much_each_rank_holds(backend, monkeypatch):
    monkeypatch.setattr(backend.optimizer, "step", _raise_oom)
    params = sum(p.numel() for p in backend.model.parameters())
    before, step = _params(backend), backend.step
    with pytest.raises(OutOfMemoryGuidance) as info:
        backend.train_step([_mb(_seqs(seed=3))])
    message = str(info.value)
    assert "optimizer step" in message and "--nproc-per-node" in message
    assert f"{16 * params / 2**30:.1f} GiB on each of the 1 trainer rank(s)" in message
    assert backend.step == step and all(torch.equal(before[n], t) for n, t in _params(backend).items())


# ---- checkpoint -------------------------------------------------------------------------------------

def test_save_checkpoint(backend, tmp_path):
    path = tmp_path / "ckpt-1"
    backend.save_checkpoint(str(path), {"episode": 3, "run": "unit"})
    assert (path / ".metadata").is_file()
    assert any(name.endswith(".distcp") for name in os.listdir(path))
    meta = json.loads((path / "rlgrid_meta.json").read_text())
    digest = meta.pop("metadata_hmac_sha256")
    assert meta == {"step": backend.step, "backend": "fsdp", "episode": 3, "run": "unit"}
    assert len(digest) == 64 and digest == metadata_digest(str(path))


def _held(backend) -> int:
    """Bytes under the backend's parameter shards, gradients and optimizer state."""
    from torch.distributed.tensor import DTensor
    local = [t.to_local() if isinstance(t, DTensor) else t for t in backend.state_tensors()]
    return sum({t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in local}.values())


def test_offload_frees_every_shard_and_state_and_onload_restores_them_exactly(tiny_model_dir, backend):
    """Offload/Onload (colocated placement) run the same on the CPU as on a GPU: storages are freed in place
    and refilled, so every object FSDP and AdamW hold stays valid. A twin that never offloads takes the
    same steps."""
    from services.trainer.ranks import TrainerRanks
    cfg = load_config(overrides=_overrides(tiny_model_dir, "models.policy_trainer.kl_coef=0.5"))
    moved, twin = FSDPBackend(cfg, CPU), FSDPBackend(cfg, CPU)
    first, second = [_mb(_seqs(seed=11))], [_mb(_seqs(seed=12, adv=-1.0))]
    assert moved.train_step(first)["loss"] == twin.train_step(first)["loss"]
    probe = _mb(_seqs(seed=13))
    held = _held(moved)
    assert held > 0 and any(moved.optimizer.state.values())
    ranks = TrainerRanks(CPU)
    ranks.backend = moved
    ranks.run("offload")
    ranks.run("offload")   # idempotent
    assert moved.offloaded and _held(moved) == 0
    assert all(p.to_local().untyped_storage().nbytes() == 0 for p in moved.ref.parameters())
    # anything that needs the state brings it back first
    assert torch.equal(ranks.run("logprobs", probe), twin.compute_logprobs(probe)) and not moved.offloaded
    assert _held(moved) == held
    ranks.run("offload")
    ranks.run("onload")
    ranks.run("onload")
    a, b = ranks.run("train", payload=second), twin.train_step(second)
    for key in ("loss", "grad_norm", "kl"):
        assert a[key] == b[key], key
    assert all(torch.equal(x, y) for (_, x), (_, y) in zip(moved.full_params(), twin.full_params()))


@pytest.mark.parametrize(("dtype", "tol"), [("float32", 1e-5), ("bfloat16", 1e-2)])
def test_the_fused_lm_head_gives_the_unfused_logprobs_and_step(tiny_model_dir, backend, dtype, tol):
    """The FSDP backend runs the LM head fused with the logprobs (never [tokens, vocab] logits); twins with
    it on and off compute the same logprobs and take the same step (float32: to 1e-5; bf16 compute under
    FSDP's mixed precision, whose unsharded head the fused loss reads: to 1e-2)."""
    overrides = [o for o in _overrides(tiny_model_dir, "models.policy_trainer.entropy_coef=0.01",
                                       "models.policy_trainer.kl_coef=0.1") if "dtype=" not in o]
    cfg = load_config(overrides=overrides + [f"models.policy_trainer.dtype={dtype}"])
    fused, plain = FSDPBackend(cfg, CPU), FSDPBackend(cfg, CPU)
    assert fused.fused_head and plain.fused_head   # a Qwen3: its logits are exactly lm_head(hidden)
    plain.fused_head = False
    probe = _mb(_seqs(seed=21), temperature=0.8)
    torch.testing.assert_close(fused.compute_logprobs(probe), plain.compute_logprobs(probe), atol=tol, rtol=0)
    step = [_mb(_seqs(seed=22), temperature=0.8), _mb(_seqs(seed=23, adv=-1.0), temperature=0.8)]
    a, b = fused.train_step(step), plain.train_step(step)
    for key in ("loss", "pg_loss", "entropy", "kl", "grad_norm"):
        assert a[key] == pytest.approx(b[key], rel=tol, abs=1e-7), key
    for (name, x), (_, y) in zip(fused.full_params(), plain.full_params()):
        torch.testing.assert_close(x, y, atol=tol / 10, rtol=tol, msg=name)


def test_fused_and_foreach_adamw_take_the_same_steps(tiny_model_dir, backend):
    from services.trainer.optim import build_optimizer
    cfg = load_config(overrides=_overrides(tiny_model_dir))
    fused, foreach = FSDPBackend(cfg, CPU), FSDPBackend(cfg, CPU)
    assert fused.optimizer.defaults["fused"] and not fused.optimizer.defaults["foreach"]   # the default
    foreach.optimizer, foreach.scheduler = build_optimizer(foreach.model.parameters(), cfg, "foreach")
    for seed in (31, 32):
        step = [_mb(_seqs(seed=seed, adv=1.0 if seed % 2 else -1.0))]
        assert fused.train_step(step)["loss"] == pytest.approx(foreach.train_step(step)["loss"], rel=1e-6)
    for (name, x), (_, y) in zip(fused.full_params(), foreach.full_params()):
        torch.testing.assert_close(x, y, atol=1e-6, rtol=1e-6, msg=name)
    assert all(float(s["step"]) == 2 for s in fused.optimizer.state.values())
    with pytest.raises(ValueError, match="fused"):
        build_optimizer(fused.model.parameters(), cfg, "sgd")
