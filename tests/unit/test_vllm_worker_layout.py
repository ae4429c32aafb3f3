"""The names and shapes the vLLM worker hands vLLM's loader are an HF checkpoint's (importable without vLLM)."""
import glob

import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from services.common.tiny_model import build_tiny_model
from services.rollout.engines.vllm_worker import _checkpoint_layout
from tests.conftest import TINY_WORDS


def test_fused_moe_experts_become_the_checkpoint_tensors(tmp_path):
    path = build_tiny_model(str(tmp_path / "moe"), TINY_WORDS, arch="qwen3_moe", seed=2)
    on_disk = {k: v for f in glob.glob(f"{path}/*.safetensors") for k, v in load_file(f).items()}
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    fused = dict(model.named_parameters())
    assert "model.layers.0.mlp.experts.gate_up_proj" in fused and "model.layers.0.mlp.experts.0.up_proj.weight" in on_disk
    converted = dict(_checkpoint_layout(fused.items()))
    if "lm_head.weight" not in on_disk:   # tied to the embedding: stored once
        converted.pop("lm_head.weight", None)
    assert converted.keys() == on_disk.keys()
    for name, tensor in on_disk.items():
        assert torch.equal(converted[name], tensor.float()), name
