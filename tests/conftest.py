"""Shared fixtures for the test tiers."""
from __future__ import annotations

import pytest

# 3 specials (<pad>=0, <eos>=1, <unk>=2) + 20 words: vocab_size 23.
TINY_WORDS = [f"w{i:02d}" for i in range(20)]
TINY_VOCAB_SIZE = 3 + len(TINY_WORDS)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> str:
    """A tiny Qwen3 model directory (tokenizer + config + safetensors weights), built once per session."""
    from services.common.tiny_model import build_tiny_model

    return build_tiny_model(str(tmp_path_factory.mktemp("tiny-qwen3")), TINY_WORDS, seed=0)
