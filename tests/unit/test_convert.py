"""HF <-> Megatron-core conversion: the table at every TP/PP/EP/ETP layout, the two commands, and the
trainer loading what they write. Every round trip is compared bit for bit, tensor by tensor."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoConfig, AutoModelForCausalLM

from services.common.tiny_model import build_tiny_model
from services.trainer.convert.engine import hf_to_mcore
from services.trainer.convert.hf_io import HFReader
from services.trainer.convert.shards import Dims, fuse, gather, model_items, shard, unfuse
from services.trainer.convert.table import UnmappedParameter, local_name
from services.trainer.mcore.layout import Layout
from tests.conftest import TINY_WORDS

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, str]:
    d = tmp_path_factory.mktemp("convert")
    moe = dict(heads=4, kv_heads=2, experts=4, layers=2)
    return {"qwen3": build_tiny_model(str(d / "qwen3"), TINY_WORDS, arch="qwen3", seed=3, heads=4, kv_heads=2),
            "qwen3_moe": build_tiny_model(str(d / "moe"), TINY_WORDS, arch="qwen3_moe", seed=4, **moe),
            "llama": build_tiny_model(str(d / "llama"), TINY_WORDS, arch="llama", seed=5)}


def _hf(path: str) -> dict[str, torch.Tensor]:
    return load_file(os.path.join(path, "model.safetensors"))


def _local_states(hf: dict, dims: Dims, layout: Layout) -> list[dict[str, torch.Tensor]]:
    """Every rank's Megatron-core tensors under its own module names, from the HF tensors (the table only)."""
    states = []
    for rank in range(layout.world):
        c = layout.coords(rank)
        layers = layout.layers_of(c.pp, dims.layers)
        experts = layout.experts_of(c.ep, dims.experts) if dims.experts else range(0)
        state = {}
        for item in model_items(dims):
            if item.layer is not None and item.layer not in layers or item.expert is not None and item.expert not in experts:
                continue
            if item.layer is None and ("embedding" in item.mcore and c.pp != 0 or
                                       item.mcore.startswith(("output_layer", "decoder.final")) and c.pp != layout.pp - 1):
                continue
            size, r = (layout.etp, c.etp) if item.family.expert else (layout.tp, c.tp)
            name = local_name(item.mcore, layers.start, experts.start if dims.experts else 0)
            state[name] = shard(item, fuse(item, [hf[n] for n in item.hf], dims), size, r).clone()
        states.append(state)
    return states


def _back_to_hf(states: list[dict], dims: Dims, layout: Layout) -> dict[str, torch.Tensor]:
    out = {}
    for item in model_items(dims):
        pieces = {}
        for rank, state in enumerate(states):
            c = layout.coords(rank)
            layers = layout.layers_of(c.pp, dims.layers)
            experts = layout.experts_of(c.ep, dims.experts) if dims.experts else range(0)
            name = local_name(item.mcore, layers.start, experts.start if dims.experts else 0)
            if name in state:
                pieces.setdefault(c.etp if item.family.expert else c.tp, state[name])
        ordered = [pieces[r] for r in sorted(pieces)]
        out.update(zip(item.hf, unfuse(item, gather(item, ordered, dims.vocab), dims)))
    return out


LAYOUTS = [Layout(world=1), Layout(world=2, tp=2), Layout(world=2, pp=2), Layout(world=4, tp=2, pp=2),
           Layout(world=4, tp=4, etp=1, ep=4), Layout(world=4, tp=2, ep=2, etp=2), Layout(world=8, tp=2, pp=2, ep=2, etp=1),
           Layout(world=4, tp=1, ep=2, etp=2)]


@pytest.mark.parametrize("arch", ["qwen3", "qwen3_moe", "llama"])
@pytest.mark.parametrize("layout", LAYOUTS, ids=lambda lay: lay.describe().replace(" ", "_"))
def test_round_trip_through_any_layout_is_bit_exact(models, arch, layout):
    dims = Dims.from_hf(AutoConfig.from_pretrained(models[arch]))
    if not dims.experts and (layout.ep > 1 or layout.etp != layout.tp):
        pytest.skip("expert layouts need experts")
    if dims.heads % layout.tp or dims.kv_heads % layout.tp:
        pytest.skip("heads not divisible")
    hf = _hf(models[arch])
    states = _local_states(hf, dims, layout)
    if layout.tp > 1:   # the vocabulary is split (and padded) over TP ranks
        assert all(s["embedding.word_embeddings.weight"].shape[0] == -(-dims.vocab // layout.tp)
                   for s in states if "embedding.word_embeddings.weight" in s)
    back = _back_to_hf(states, dims, layout)
    assert sorted(back) == sorted(hf)
    for name, tensor in hf.items():
        assert back[name].dtype == tensor.dtype and torch.equal(back[name], tensor), name


def test_the_table_names_exactly_megatrons_parameters(models):
    """At TP=1 the table's local names and shapes are those of the GPTModel the backend builds."""
    from services.common.config import load_config
    from services.trainer.backends.megatron import MegatronBackend
    from services.trainer.mcore.model import local_tensors

    for arch in ("qwen3", "qwen3_moe"):
        cfg = load_config(overrides=[f"models.policy.load={models[arch]}", "models.policy_trainer.backend=megatron",
                                     "models.policy_trainer.dtype=float32"])
        backend = MegatronBackend(cfg, torch.device("cpu"))
        mine = {n: tuple((p if i is None else p[i]).shape) for n, (p, i) in local_tensors(backend.model).items()}
        states = _local_states(_hf(models[arch]), backend.dims, Layout())
        assert {n: tuple(t.shape) for n, t in states[0].items()} == mine


def _run(*args: str) -> dict:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([ROOT, os.path.join(ROOT, "protos")]))
    out = subprocess.run([sys.executable, "-m", "services.trainer.convert", *args], capture_output=True, text=True,
                         env=env, timeout=300, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


@pytest.mark.parametrize("arch", ["qwen3", "qwen3_moe"])
def test_commands_round_trip_bit_exact_and_report_memory(models, arch, tmp_path):
    src = models[arch]
    there = _run("hf-to-mcore", src, str(tmp_path / "mcore"))
    back = _run("mcore-to-hf", str(tmp_path / "mcore"), str(tmp_path / "hf"))
    for stats in (there, back):
        assert stats["bytes"] > 0 and stats["seconds"] > 0 and stats["peak_rss_bytes"] > 0
        assert stats["peak_rss_x_model"] == pytest.approx(stats["peak_rss_bytes"] / stats["bytes"], rel=1e-2)
        assert stats["peak_extra_anon_x_model"] >= 0 and stats["cuda_initialized"] is False
    a, b = _hf(src), _hf(str(tmp_path / "hf"))
    assert sorted(a) == sorted(b)
    for name in a:
        assert a[name].dtype == b[name].dtype and torch.equal(a[name], b[name]), name
    if arch == "qwen3_moe":   # HF's own per-expert layout on the way out
        assert "model.layers.1.mlp.experts.3.down_proj.weight" in b
    model = AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf"), dtype=torch.float32)
    assert type(model).__name__.startswith("Qwen3")
    with open(tmp_path / "mcore" / "rlgrid_mcore.json") as f:
        assert json.load(f)["tensors"] == there["tensors"]


def test_tensors_outside_the_table_are_refused_by_name(models, tmp_path):
    src = tmp_path / "extra"
    src.mkdir()
    for name in os.listdir(models["qwen3"]):
        if not name.endswith(".safetensors"):
            shutil.copy(os.path.join(models["qwen3"], name), src)
    tensors = _hf(models["qwen3"])
    tensors["model.layers.0.self_attn.q_proj.bias"] = torch.zeros(4)
    save_file(tensors, str(src / "model.safetensors"))
    with pytest.raises(UnmappedParameter, match="q_proj.bias"):
        hf_to_mcore(str(src), str(tmp_path / "out"))
    with HFReader(str(src)) as reader:
        assert "model.layers.0.self_attn.q_proj.bias" in reader.names()


def test_conversion_stays_off_the_gpu_where_cuda_is_available(models, tmp_path, monkeypatch):
    """DCP's writer stages tensors through a CUDA stream wherever CUDA is available (on an H200 this
    initialised CUDA in hf-to-mcore); conversion must not touch the device. This CPU build cannot
    create a stream, so a writer that tries fails here."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    hf_to_mcore(models["qwen3"], str(tmp_path / "mcore"))
    assert not torch.cuda.is_initialized()


def test_conversion_holds_a_tensor_family_at_a_time_not_the_model(tmp_path):
    """A 277 MB model of eight layers (a layer is 0.125x of it): hf-to-mcore holds (anonymous memory
    above its start) a few tensors' copies at a time, 0.21x here; mcore-to-hf reads a layer at a time,
    0.35x here. DCP's writer keeps every tensor of a file referenced until the file closes, and glibc
    keeps freed tensors' heap space: before both were handled, hf-to-mcore held 0.80x the model here
    (0.56x for a Qwen3-8B shape on an H200)."""
    src = build_tiny_model(str(tmp_path / "hf"), TINY_WORDS, arch="qwen3", seed=6, hidden=768, layers=8, heads=12,
                           kv_heads=4, head_dim=64, intermediate=3072)
    there = _run("hf-to-mcore", src, str(tmp_path / "mcore"))
    back = _run("mcore-to-hf", str(tmp_path / "mcore"), str(tmp_path / "back"))
    assert there["bytes"] > 250e6
    assert there["peak_extra_anon_x_model"] < 0.35, there
    assert back["peak_extra_anon_x_model"] < 0.5, back
    a, b = _hf(src), _hf(str(tmp_path / "back"))
    assert sorted(a) == sorted(b) and all(torch.equal(a[n], b[n]) for n in a)
