"""HF model directories, one tensor at a time: a lazy reader over the safetensors files (or an
in-memory state dict) and a streaming safetensors writer that never holds more than one tensor.

The writer knows every tensor's name, shape and dtype before the first byte (from the table), so
each file's header is written first and the tensors follow as they arrive. The files are plain
safetensors that transformers and vLLM load (`model.safetensors`, or `model-0000i-of-0000n` with
`model.safetensors.index.json` beyond one file).
"""
from __future__ import annotations

import glob
import json
import os
import shutil
from contextlib import ExitStack
from typing import Iterable

import torch
from safetensors import safe_open

# files that travel with the weights: tokenizer, generation config, the model config itself
EXTRAS = ("config.json", "tokenizer", "special_tokens", "chat_template", "generation_config", "vocab", "merges")
SHARD_BYTES = 4 << 30   # most bytes per safetensors file

_DTYPES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16", torch.float64: "F64",
           torch.int64: "I64", torch.int32: "I32", torch.uint8: "U8", torch.bool: "BOOL"}


def copy_extras(src: str, dst: str) -> None:
    """Config, tokenizer and generation config from one model directory to another."""
    os.makedirs(dst, exist_ok=True)
    for name in os.listdir(src):
        if name.startswith(EXTRAS) and os.path.isfile(os.path.join(src, name)):
            shutil.copy(os.path.join(src, name), dst)


class HFReader:
    """Tensors of an HF directory by checkpoint name, read lazily (one at a time) from its safetensors."""

    def __init__(self, path: str):
        self.path = path
        self._stack = ExitStack()
        files = sorted(glob.glob(os.path.join(path, "*.safetensors")))
        opened = [self._stack.enter_context(safe_open(f, framework="pt")) for f in files]
        self._where = {key: f for f in opened for key in f.keys()}

    def names(self) -> list[str]:
        return list(self._where)

    def get(self, name: str) -> torch.Tensor:
        if name not in self._where:
            raise KeyError(f"{self.path}: no tensor {name!r} in its safetensors")
        return self._where[name].get_tensor(name)

    def dtype(self, name: str) -> torch.dtype:
        code = self._where[name].get_slice(name).get_dtype()
        return next(t for t, c in _DTYPES.items() if c == code)

    def close(self) -> None:
        self._stack.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class StateDictReader:
    """The same interface over a transformers state dict (in-memory names: experts fused per layer)."""

    def __init__(self, state: dict[str, torch.Tensor]):
        self.state = state

    def get(self, name: str) -> torch.Tensor:
        if name in self.state:
            return self.state[name]
        # experts.{e}.gate_proj / up_proj / down_proj from the fused [E, ...] tensors
        prefix, _, rest = name.rpartition(".experts.")
        expert, proj = rest.split(".")[0], rest.split(".")[1]
        fused = self.state[f"{prefix}.experts.{'down_proj' if proj == 'down_proj' else 'gate_up_proj'}"][int(expert)]
        if proj == "down_proj":
            return fused
        return fused.chunk(2, 0)[0 if proj == "gate_proj" else 1]

    def close(self) -> None:
        pass


def write_safetensors(path: str, specs: list[tuple[str, tuple[int, ...], torch.dtype]],
                      tensors: Iterable[tuple[str, torch.Tensor]], metadata: dict | None = None) -> None:
    """Writes one safetensors file: the header from `specs`, then each tensor as it is yielded (in
    `specs` order). Only one tensor is in memory at a time."""
    header, offset = {}, 0
    for name, shape, dtype in specs:
        n = torch.Size(shape).numel() * torch.empty((), dtype=dtype).element_size()
        header[name] = {"dtype": _DTYPES[dtype], "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    if metadata:
        header["__metadata__"] = metadata
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)   # the data starts 8-byte aligned
    with open(path, "wb") as f:
        f.write(len(raw).to_bytes(8, "little"))
        f.write(raw)
        for (want, shape, dtype), (name, tensor) in zip(specs, tensors, strict=True):
            if name != want or tuple(tensor.shape) != tuple(shape) or tensor.dtype != dtype:
                raise ValueError(f"safetensors writer: expected {want} {list(shape)} {dtype}, got {name} "
                                 f"{list(tensor.shape)} {tensor.dtype}")
            f.write(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())


def write_hf_weights(path: str, specs: list[tuple[str, tuple[int, ...], torch.dtype]],
                     tensors: Iterable[tuple[str, torch.Tensor]], shard_bytes: int = SHARD_BYTES) -> None:
    """The weights of an HF directory from a stream of (checkpoint name, tensor) in `specs` order,
    split into files of at most `shard_bytes` (a larger tensor gets a file of its own)."""
    files: list[list] = [[]]
    size = 0
    for spec in specs:
        n = torch.Size(spec[1]).numel() * torch.empty((), dtype=spec[2]).element_size()
        if files[-1] and size + n > shard_bytes:
            files.append([])
            size = 0
        files[-1].append(spec)
        size += n
    os.makedirs(path, exist_ok=True)
    stream = iter(tensors)
    names = ["model.safetensors"] if len(files) == 1 else [
        f"model-{i + 1:05d}-of-{len(files):05d}.safetensors" for i in range(len(files))]
    for name, chunk in zip(names, files):
        write_safetensors(os.path.join(path, name), chunk, (next(stream) for _ in chunk), {"format": "pt"})
    if len(files) > 1:
        total = sum(torch.Size(s[1]).numel() * torch.empty((), dtype=s[2]).element_size() for s in specs)
        index = {"metadata": {"total_size": total},
                 "weight_map": {spec[0]: name for name, chunk in zip(names, files) for spec in chunk}}
        with open(os.path.join(path, "model.safetensors.index.json"), "w") as f:
            json.dump(index, f, indent=2)
