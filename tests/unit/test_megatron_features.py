"""The megatron backend's checkpoints, HF export, loading converted checkpoints, initialisation, config
errors and MoE determinism, on CPU (a world of one). Two ranks: tests/integration/test_megatron_ranks.py."""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM

from services.common.config import ConfigError, load_config
from services.common.models import ModelLoadError
from services.common.tiny_model import build_tiny_model
from services.trainer.backends.fsdp import FSDPBackend, OutOfMemoryGuidance
from services.trainer.backends.megatron import MegatronBackend
from tests.conftest import TINY_WORDS
from tests.unit.test_megatron_backend import _overrides, step_batches

CPU = torch.device("cpu")
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def megatron(model_dir: str, *extra: str) -> MegatronBackend:
    return MegatronBackend(load_config(overrides=_overrides(model_dir, "models.policy_trainer.backend=megatron", *extra)),
                           CPU)


@pytest.fixture(scope="module")
def moe_dir(tmp_path_factory) -> str:
    return build_tiny_model(str(tmp_path_factory.mktemp("moe")), TINY_WORDS, arch="qwen3_moe", seed=6)


def _params(backend) -> dict[str, torch.Tensor]:
    return {n: t.clone() for n, t in backend.full_params()}


def test_checkpoint_restores_weights_optimizer_schedule_and_rng(tiny_model_dir, tmp_path):
    extra = ("models.policy_trainer.optimizer.lr_warmup_iters=3", "models.policy_trainer.kl_coef=0.1")
    a = megatron(tiny_model_dir, *extra)
    lrs = [a.train_step(step_batches(s))["lr"] for s in range(2)]
    assert lrs == pytest.approx([1e-2 / 3, 2e-2 / 3])
    a.save_checkpoint(str(tmp_path / "ckpt"), {"episode": 2})
    assert os.path.isfile(tmp_path / "ckpt" / "config.json")   # convert mcore-to-hf can read it
    rng = torch.get_rng_state()
    nxt, draw = a.train_step(step_batches(2)), torch.rand(3)
    b = megatron(tiny_model_dir, *extra)
    torch.manual_seed(123)
    assert b.load_checkpoint(str(tmp_path / "ckpt")) == {"episode": 2}
    assert b.step == 2 and torch.equal(torch.get_rng_state(), rng)
    again = b.train_step(step_batches(2))   # same weights, same AdamW moments, same schedule
    for key in ("lr", "loss", "kl", "grad_norm"):
        assert again[key] == pytest.approx(nxt[key], rel=1e-6, abs=1e-9), key
    assert torch.equal(torch.rand(3), draw)
    mine = _params(b)
    for name, tensor in a.full_params():
        torch.testing.assert_close(mine[name], tensor, atol=1e-7, rtol=1e-6, msg=name)


def test_a_checkpoint_of_the_other_backend_is_refused_by_name(tiny_model_dir, tmp_path):
    fsdp = FSDPBackend(load_config(overrides=_overrides(tiny_model_dir)), CPU)
    fsdp.save_checkpoint(str(tmp_path / "fsdp"), {})
    mcore = megatron(tiny_model_dir)
    with pytest.raises(ValueError, match="backend=fsdp"):
        mcore.load_checkpoint(str(tmp_path / "fsdp"))
    mcore.save_checkpoint(str(tmp_path / "mcore"), {})
    with pytest.raises(ValueError, match="backend=megatron"):
        fsdp.load_checkpoint(str(tmp_path / "mcore"))


def test_export_hf_and_convert_a_trainer_checkpoint(moe_dir, tmp_path):
    """save_hf writes HF's checkpoint layout (per-expert tensors) that transformers loads with the
    trainer's logprobs; `convert mcore-to-hf` turns the trainer's checkpoint into the same tensors."""
    backend = megatron(moe_dir, "models.policy_trainer.groupgemm=True")
    backend.train_step(step_batches(3))
    backend.export_hf(str(tmp_path / "hf"))
    with safe_open(str(tmp_path / "hf" / "model.safetensors"), framework="pt") as f:
        exported = {k: f.get_tensor(k) for k in f.keys()}
    assert "model.layers.0.mlp.experts.3.up_proj.weight" in exported
    model = AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf"), dtype=torch.float32).eval()
    probe = step_batches(4)[0]
    n = probe.seq_lens[0]
    with torch.no_grad():
        logits = model(input_ids=probe.input_ids[None, :n]).logits[0]
    lp = torch.log_softmax(logits[:-1], -1).gather(-1, probe.input_ids[1:n, None])[:, 0]
    torch.testing.assert_close(lp, backend.compute_logprobs(probe)[1:n], atol=1e-5, rtol=0)

    backend.save_checkpoint(str(tmp_path / "ckpt"), {})
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([ROOT, os.path.join(ROOT, "protos")]))
    subprocess.run([sys.executable, "-m", "services.trainer.convert", "mcore-to-hf", str(tmp_path / "ckpt"),
                    str(tmp_path / "converted")], check=True, env=env, capture_output=True, timeout=300)
    with safe_open(str(tmp_path / "converted" / "model.safetensors"), framework="pt") as f:
        assert sorted(f.keys()) == sorted(exported)
        for k in f.keys():
            assert torch.equal(f.get_tensor(k), exported[k]), k


def test_the_trainer_starts_from_a_converted_checkpoint(moe_dir, tmp_path):
    from services.trainer.convert.engine import hf_to_mcore

    hf_to_mcore(moe_dir, str(tmp_path / "mcore"))
    from_hf, from_mcore = megatron(moe_dir), megatron(str(tmp_path / "mcore"))
    probe = step_batches(5)[0]
    assert torch.equal(from_mcore.compute_logprobs(probe), from_hf.compute_logprobs(probe))
    assert [p.name for p in from_mcore.param_specs()] == [p.name for p in from_hf.param_specs()]


def test_config_only_directory_starts_from_the_fsdp_backends_weights(tiny_model_dir, tmp_path):
    """Without weights the model is transformers' seeded initialisation, as on the FSDP backend; with
    meta_init, megatron's own initialisation on each shard (no full model in memory)."""
    config_only = tmp_path / "config-only"
    config_only.mkdir()
    for name in os.listdir(tiny_model_dir):
        if not name.endswith(".safetensors"):
            shutil.copy(os.path.join(tiny_model_dir, name), config_only)
    fsdp = FSDPBackend(load_config(overrides=_overrides(str(config_only))), CPU)
    theirs, mine = dict(fsdp.full_params()), _params(megatron(str(config_only)))
    assert all(torch.equal(mine[n], theirs[n]) for n in theirs)
    own = _params(megatron(str(config_only), "models.policy_trainer.meta_init=True"))
    layers = fsdp.model.config.num_hidden_layers
    for name, t in own.items():
        assert torch.isfinite(t).all(), name
        if name.endswith("norm.weight"):
            assert torch.equal(t, torch.ones_like(t)), name
        else:   # normal(0, initializer_range), output projections scaled by 1/sqrt(2 layers): not leftover memory
            scale = (2 * layers) ** -0.5 if name.endswith(("o_proj.weight", "down_proj.weight")) else 1.0
            assert float(t.std()) == pytest.approx(float(theirs[name].std()) * scale, rel=0.3), name


@pytest.mark.parametrize("extra,message", [
    (("models.policy_trainer.moe_permute_fusion=True",), "moe_permute_fusion=True needs Transformer Engine"),
    (("models.policy_trainer.moe_router_bias_update_rate=0.001",), "no router expert bias"),
    (("models.policy_trainer.tensor_model_parallel_size=2",), "needs models.policy_trainer.sequence_parallel=True"),
])
def test_moe_stability_keys_that_cannot_apply_say_why(moe_dir, extra, message):
    with pytest.raises(ValueError, match=message):
        megatron(moe_dir, *extra)


def test_moe_keys_on_a_dense_model_and_unsupported_models_are_refused(tiny_model_dir, tmp_path):
    with pytest.raises(ValueError, match="no experts"):
        megatron(tiny_model_dir, "models.policy_trainer.groupgemm=True")
    other = tmp_path / "gpt2"
    other.mkdir()
    (other / "config.json").write_text('{"model_type": "gpt2", "n_layer": 2}')
    with pytest.raises(ModelLoadError, match="model_type 'gpt2' is not supported by backend=megatron"):
        megatron(str(other))


@pytest.mark.parametrize("overrides,message", [
    (["models.policy_trainer.tensor_model_parallel_size=2"], "applies only with models.policy_trainer.backend=megatron"),
    (["models.policy_trainer.moe_router_dtype=fp64"], "applies only with models.policy_trainer.backend=megatron"),
    (["models.policy_trainer.recompute_granularity=full"], "gradient_checkpointing=True"),
    (["models.policy_trainer.backend=megatron", "models.policy_trainer.gradient_checkpointing=True"],
     "recompute_granularity=full"),
    (["models.policy_trainer.backend=megatron", "models.policy_trainer.ulysses_sequence_parallel_size=2"],
     "applies only with models.policy_trainer.backend=fsdp"),
    (["models.policy_trainer.backend=megatron", "models.policy_trainer.attn_implementation=flex_attention"],
     "applies only with models.policy_trainer.backend=fsdp"),
    (["models.policy_trainer.backend=megatron", "models.policy_trainer.sequence_parallel=True"],
     "needs models.policy_trainer.tensor_model_parallel_size > 1"),
    (["models.policy_trainer.backend=megatron", "models.policy_trainer.moe_unpermute_dtype=bf16"],
     "moe_unpermute_dtype is invalid; must be one of fp32, native"),
])
def test_backend_only_keys_error_for_the_other_backend(overrides, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_config(overrides=overrides)


def test_a_layout_that_does_not_divide_the_model_names_it(tiny_model_dir, monkeypatch):
    from services.trainer.mcore.layout import Layout, LayoutError

    backend = megatron(tiny_model_dir)
    with pytest.raises(LayoutError, match="tensor_model_parallel_size=4 does not divide the model's 2 key/value"):
        Layout(world=4, tp=4).check_model(backend.dims)


def test_oom_names_the_keys_to_change(tiny_model_dir, monkeypatch):
    backend = megatron(tiny_model_dir, "models.policy_trainer.max_token_in_packing=4321")

    def oom(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory")

    monkeypatch.setattr(backend, "_forward", oom)
    before, step = _params(backend), backend.step
    with pytest.raises(OutOfMemoryGuidance) as info:
        backend.train_step(step_batches(1))
    message = str(info.value)
    for needle in ("max_token_in_packing (now 4321)", "tensor_model_parallel_size (now 1)",
                   "pipeline_model_parallel_size (now 1)",
                   "recompute_granularity=full"):
        assert needle in message, message
    assert backend.step == step and all(torch.equal(before[n], t) for n, t in _params(backend).items())


def test_bf16_compute_trains_like_fsdp(tiny_model_dir):
    """bf16 compute over fp32 parameters (torch.autocast, the GPU path) against the FSDP backend's bf16
    mixed precision on the same weights: logprobs within 1e-2 (bf16 rounds differently along the two
    paths; measured 1.9e-3), loss within 5e-3, gradient norm within 2e-2 relative."""
    extra = ("models.policy_trainer.dtype=bfloat16", "models.policy_trainer.kl_coef=0.1")
    backend = megatron(tiny_model_dir, *extra)
    fsdp = FSDPBackend(load_config(overrides=_overrides(tiny_model_dir, *extra)), CPU)
    probe = step_batches(6, n=8)[0]
    torch.testing.assert_close(backend.compute_logprobs(probe), fsdp.compute_logprobs(probe), atol=1e-2, rtol=0)
    for seed in (1, 2):
        one, two = fsdp.train_step(step_batches(seed)), backend.train_step(step_batches(seed))
        for key in ("loss", "grad_norm"):
            assert two[key] == pytest.approx(one[key], rel=2e-2, abs=5e-3), (key, one[key], two[key])
    assert all(p.dtype == torch.float32 for p in backend.model.parameters())   # fp32 master weights


def test_two_forwards_of_a_moe_batch_agree_bit_for_bit_in_bf16(moe_dir):
    backend = megatron(moe_dir, "models.policy_trainer.dtype=bfloat16", "models.policy_trainer.groupgemm=True")
    backend.train_step(step_batches(3))   # the bf16 backward runs too
    probe = step_batches(6, n=8)[0]
    assert torch.equal(backend.compute_logprobs(probe), backend.compute_logprobs(probe))


def test_recompute_gives_the_same_step(tiny_model_dir):
    plain, full = megatron(tiny_model_dir), megatron(tiny_model_dir, "models.policy_trainer.recompute_granularity=full")
    selective = megatron(tiny_model_dir, "models.policy_trainer.recompute_granularity=selective")
    one = plain.train_step(step_batches(7))
    for other in (full, selective):
        two = other.train_step(step_batches(7))
        assert two["grad_norm"] == pytest.approx(one["grad_norm"], rel=1e-6)
