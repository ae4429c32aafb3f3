"""torch.Tensor <-> rlgrid.v1.Tensor (raw bytes + dtype + shape), and validation of wire tensors."""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from rlgrid.v1 import common_pb2 as pb

_TO_WIRE = {
    torch.float32: pb.FLOAT32, torch.float16: pb.FLOAT16, torch.bfloat16: pb.BFLOAT16,
    torch.float64: pb.FLOAT64, torch.int64: pb.INT64, torch.int32: pb.INT32, torch.int16: pb.INT16,
    torch.int8: pb.INT8, torch.uint8: pb.UINT8, torch.bool: pb.BOOL,
}
_FROM_WIRE = {v: k for k, v in _TO_WIRE.items()}
# Upper bound on elements of one decoded tensor; guards against absurd shapes before allocating.
MAX_ELEMENTS = 1 << 34


class TensorError(ValueError):
    """A wire tensor that cannot be decoded; the message names the field."""


def wire_dtype(dtype: torch.dtype) -> int:
    try:
        return _TO_WIRE[dtype]
    except KeyError:
        raise TensorError(f"dtype {dtype} has no wire encoding; supported: {sorted(map(str, _TO_WIRE))}") from None


def torch_dtype(wire: int) -> torch.dtype:
    try:
        return _FROM_WIRE[wire]
    except KeyError:
        raise TensorError(f"unknown wire dtype {wire}") from None


def dtype_from_name(name: str) -> torch.dtype:
    """'float32' / 'bfloat16' / ... -> torch dtype."""
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype):
        raise TensorError(f"unknown dtype name {name!r}")
    return dtype


def to_wire(tensor: torch.Tensor) -> pb.Tensor:
    """Encodes a tensor as raw little-endian bytes (copies to CPU if needed)."""
    t = tensor.detach().contiguous().cpu()
    raw = t.reshape(-1).view(torch.uint8) if t.dtype != torch.bool and t.numel() else t.to(torch.uint8)
    return pb.Tensor(dtype=wire_dtype(t.dtype), shape=list(t.shape), data=raw.numpy().tobytes())


def from_wire(msg: pb.Tensor, field: str = "tensor", *, dtype: torch.dtype | None = None,
              ndim: int | None = None) -> torch.Tensor:
    """Decodes a wire tensor, checking dtype, rank, and that the bytes match the shape.

    Raises TensorError naming `field` on any inconsistency.
    """
    if msg.dtype == pb.DTYPE_UNSPECIFIED:
        raise TensorError(f"{field}: dtype is unset")
    try:
        t_dtype = torch_dtype(msg.dtype)
    except TensorError as exc:
        raise TensorError(f"{field}: {exc}") from None
    if dtype is not None and t_dtype != dtype:
        raise TensorError(f"{field}: expected dtype {dtype}, got {t_dtype}")
    shape = tuple(msg.shape)
    if ndim is not None and len(shape) != ndim:
        raise TensorError(f"{field}: expected {ndim}-d tensor, got shape {list(shape)}")
    if any(s < 0 for s in shape):
        raise TensorError(f"{field}: negative size in shape {list(shape)}")
    numel = int(np.prod(shape, dtype=np.float64)) if shape else 1
    if numel > MAX_ELEMENTS:
        raise TensorError(f"{field}: shape {list(shape)} is too large")
    itemsize = torch.empty((), dtype=t_dtype).element_size()
    if len(msg.data) != numel * itemsize:
        raise TensorError(f"{field}: {len(msg.data)} bytes do not match shape {list(shape)} of {t_dtype} "
                          f"({numel * itemsize} bytes expected)")
    if numel == 0:
        return torch.empty(shape, dtype=t_dtype)
    raw = torch.frombuffer(bytearray(msg.data), dtype=torch.uint8)
    if t_dtype == torch.bool:
        return raw.to(torch.bool).reshape(shape)
    return raw.view(t_dtype).reshape(shape)


def ids_to_wire(ids: Sequence[int]) -> pb.Tensor:
    return to_wire(torch.as_tensor(list(ids), dtype=torch.int32))
