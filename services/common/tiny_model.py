"""Tiny HF model directories for tests, the demo and benchmarks: a word-level tokenizer trained on
the fly with `tokenizers`, and a Qwen3 / Qwen3-MoE / Llama config (optionally random weights).

    python -m services.common.tiny_model OUT_DIR [--arch qwen3] [--words echo a b c] [--no-weights]
"""
from __future__ import annotations

import argparse
import os

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    AutoModelForCausalLM,
    LlamaConfig,
    PreTrainedTokenizerFast,
    Qwen3Config,
    Qwen3MoeConfig,
)

SPECIALS = ["<pad>", "<eos>", "<unk>"]


def build_tokenizer(words: list[str]) -> PreTrainedTokenizerFast:
    """A word-level tokenizer over `words` (whitespace-split), trained with `tokenizers`."""
    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=False)  # joins words with single spaces
    tok.train_from_iterator([" ".join(words)], trainers.WordLevelTrainer(special_tokens=SPECIALS, min_frequency=1))
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>")


def tiny_config(arch: str, vocab_size: int, *, hidden: int = 64, layers: int = 2, heads: int = 4,
                kv_heads: int = 2, head_dim: int = 16, intermediate: int = 128, experts: int = 4,
                eos_token_id: int = 1, pad_token_id: int = 0):
    common = dict(vocab_size=vocab_size, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                  num_key_value_heads=kv_heads, head_dim=head_dim, intermediate_size=intermediate,
                  max_position_embeddings=512, eos_token_id=eos_token_id, pad_token_id=pad_token_id,
                  bos_token_id=None, tie_word_embeddings=True)
    if arch == "qwen3":
        return Qwen3Config(**common)
    if arch == "qwen3_moe":
        return Qwen3MoeConfig(**common, num_experts=experts, num_experts_per_tok=2, moe_intermediate_size=intermediate,
                              decoder_sparse_step=1, norm_topk_prob=True)
    if arch == "llama":
        return LlamaConfig(**common)
    raise ValueError(f"unknown tiny arch {arch!r}; choose qwen3, qwen3_moe or llama")


def build_tiny_model(out_dir: str, words: list[str], *, arch: str = "qwen3", with_weights: bool = True,
                     seed: int = 0, **config_kw) -> str:
    """Writes tokenizer + config (+ safetensors weights when `with_weights`) to `out_dir`."""
    os.makedirs(out_dir, exist_ok=True)
    tokenizer = build_tokenizer(words)
    config = tiny_config(arch, len(tokenizer), eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id, **config_kw)
    tokenizer.save_pretrained(out_dir)
    config.save_pretrained(out_dir)
    if with_weights:
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        model.save_pretrained(out_dir)
    return out_dir


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out_dir")
    parser.add_argument("--arch", default="qwen3", choices=["qwen3", "qwen3_moe", "llama"])
    parser.add_argument("--words", nargs="*", default=None, help="vocabulary (default: the toy task's)")
    parser.add_argument("--no-weights", action="store_true", help="config only: services random-init from it")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if args.words is None:
        from services.coordinator.data import toy_vocabulary
        args.words = toy_vocabulary()
    print(build_tiny_model(args.out_dir, args.words, arch=args.arch, with_weights=not args.no_weights, seed=args.seed))


if __name__ == "__main__":
    main()
