"""Tests for services.common.tensors: torch.Tensor <-> rlgrid.v1.Tensor."""
from __future__ import annotations

import struct

import numpy as np
import pytest
import torch

from rlgrid.v1 import common_pb2 as pb
from services.common.tensors import (
    MAX_ELEMENTS,
    TensorError,
    from_wire,
    ids_to_wire,
    to_wire,
)

# Every dtype the DType enum names, with the wire enum value it must map to.
WIRE_DTYPES = [
    (torch.float32, pb.FLOAT32), (torch.float16, pb.FLOAT16), (torch.bfloat16, pb.BFLOAT16),
    (torch.float64, pb.FLOAT64), (torch.int64, pb.INT64), (torch.int32, pb.INT32), (torch.int16, pb.INT16),
    (torch.int8, pb.INT8), (torch.uint8, pb.UINT8), (torch.bool, pb.BOOL),
]
DTYPES = [d for d, _ in WIRE_DTYPES]
# numpy equivalents (explicitly little-endian) for an independent check of the byte layout.
NP_LE = {torch.float32: "<f4", torch.float16: "<f2", torch.float64: "<f8", torch.int64: "<i8",
         torch.int32: "<i4", torch.int16: "<i2", torch.int8: "i1", torch.uint8: "u1", torch.bool: "?"}


def _sample(dtype: torch.dtype, shape=(3, 5)) -> torch.Tensor:
    g = torch.Generator().manual_seed(1234)
    n = int(np.prod(shape))
    if dtype == torch.bool:
        t = torch.rand(n, generator=g) > 0.5
        t[0], t[1] = True, False
    elif dtype.is_floating_point:
        t = (torch.randn(n, generator=g) * 100).to(dtype)
        specials = torch.tensor([float("nan"), float("inf"), float("-inf"), -0.0, 0.0], dtype=dtype)
        t[: len(specials)] = specials
        t[5] = torch.finfo(dtype).tiny  # smallest normal
        t[6] = torch.finfo(dtype).max
    else:
        info = torch.iinfo(dtype)
        t = torch.randint(info.min, info.max, (n,), generator=g, dtype=torch.int64).to(dtype)
        t[0], t[1] = info.min, info.max
    return t.reshape(shape)


def _bits(t: torch.Tensor) -> bytes:
    """The raw bytes of a tensor (so NaN payloads and -0.0 compare exactly)."""
    flat = t.detach().contiguous().reshape(-1)
    return bytes(flat.view(torch.uint8).tolist()) if flat.numel() else b""


@pytest.mark.parametrize("dtype,wire", WIRE_DTYPES, ids=[str(d) for d in DTYPES])
def test_round_trip_is_bit_exact(dtype, wire):
    t = _sample(dtype)
    msg = to_wire(t)
    assert msg.dtype == wire
    assert list(msg.shape) == [3, 5]
    # Over the wire for real: serialize and parse the message.
    back = from_wire(pb.Tensor.FromString(msg.SerializeToString()), "x", dtype=dtype, ndim=2)
    assert back.dtype == dtype
    assert back.shape == t.shape
    assert _bits(back) == _bits(t)


@pytest.mark.parametrize("dtype", [d for d in DTYPES if d != torch.bfloat16], ids=str)
def test_wire_bytes_are_little_endian_c_order(dtype):
    t = _sample(dtype, shape=(3, 4))
    expected = np.asarray(t.tolist(), dtype=NP_LE[dtype]).tobytes(order="C")
    assert to_wire(t).data == expected


def test_bfloat16_wire_bytes_are_the_high_halves_of_float32():
    values = [1.0, -2.5, 0.15625, 2.0 ** 100]  # exactly representable in bfloat16
    t = torch.tensor(values, dtype=torch.bfloat16)
    expected = b"".join(struct.pack("<H", struct.unpack("<I", struct.pack("<f", v))[0] >> 16) for v in values)
    assert to_wire(t).data == expected


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_non_contiguous_input_round_trips(dtype):
    t = _sample(dtype, shape=(4, 6)).t()[1:, ::2]
    assert not t.is_contiguous()
    back = from_wire(to_wire(t), "x")
    assert back.shape == t.shape
    assert _bits(back) == _bits(t)


@pytest.mark.parametrize("shape", [(0,), (3, 0), (0, 4, 2)], ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_empty_tensors_round_trip(dtype, shape):
    t = torch.empty(shape, dtype=dtype)
    msg = to_wire(t)
    assert msg.data == b""
    assert list(msg.shape) == list(shape)
    back = from_wire(msg, "x", dtype=dtype, ndim=len(shape))
    assert back.dtype == dtype and tuple(back.shape) == shape


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_zero_d_tensors_round_trip(dtype):
    t = torch.tensor(True if dtype == torch.bool else (-1.5 if dtype.is_floating_point else 7), dtype=dtype)
    assert t.dim() == 0
    msg = to_wire(t)
    assert list(msg.shape) == []
    assert len(msg.data) == t.element_size()
    back = from_wire(msg, "x", dtype=dtype, ndim=0)
    assert back.dim() == 0 and back.dtype == dtype
    assert _bits(back) == _bits(t)


def test_decoded_tensor_owns_its_memory():
    msg = to_wire(torch.arange(4, dtype=torch.int32))
    back = from_wire(msg, "x")
    back += 10  # writable, and does not write into the message
    assert from_wire(msg, "x").tolist() == [0, 1, 2, 3]
    assert back.tolist() == [10, 11, 12, 13]


def test_ids_to_wire_is_int32():
    msg = ids_to_wire([5, 0, 7])
    assert msg.dtype == pb.INT32
    assert from_wire(msg, "ids", dtype=torch.int32, ndim=1).tolist() == [5, 0, 7]


# ---- rejection ------------------------------------------------------------------------------------

def _float_msg(n=6) -> pb.Tensor:
    return to_wire(torch.arange(n, dtype=torch.float32))


@pytest.mark.parametrize("delta", [-1, 1, -4, 4])
def test_rejects_wrong_byte_count(delta):
    msg = _float_msg()
    msg.data = msg.data[:delta] if delta < 0 else msg.data + b"\0" * delta
    with pytest.raises(ValueError, match=r"my_field\b.*bytes"):
        from_wire(msg, "my_field")


def test_rejects_negative_shape_even_when_the_product_matches_the_bytes():
    msg = pb.Tensor(dtype=pb.FLOAT32, shape=[-2, -2], data=b"\0" * 16)  # (-2)*(-2)*4 == 16
    with pytest.raises(ValueError, match=r"my_field\b.*negative"):
        from_wire(msg, "my_field")
    msg = pb.Tensor(dtype=pb.UINT8, shape=[-1], data=b"")
    with pytest.raises(ValueError, match=r"my_field\b.*negative"):
        from_wire(msg, "my_field")


def test_rejects_unset_dtype():
    msg = _float_msg()
    msg.dtype = pb.DTYPE_UNSPECIFIED
    with pytest.raises(ValueError, match=r"my_field\b.*dtype"):
        from_wire(msg, "my_field")
    with pytest.raises(ValueError, match=r"my_field\b"):
        from_wire(pb.Tensor(), "my_field")  # a field the sender never set


def test_rejects_unknown_dtype_naming_the_field():
    msg = pb.Tensor(dtype=99, shape=[1], data=b"\0")
    with pytest.raises(ValueError, match=r"my_field\b"):
        from_wire(msg, "my_field")


def test_rejects_wrong_expected_dtype():
    with pytest.raises(ValueError, match=r"my_field\b.*int32"):
        from_wire(_float_msg(), "my_field", dtype=torch.int32)
    bf = to_wire(torch.zeros(3, dtype=torch.bfloat16))
    with pytest.raises(ValueError, match=r"my_field\b"):
        from_wire(bf, "my_field", dtype=torch.float16)  # same element size, still a different dtype


def test_rejects_wrong_ndim():
    with pytest.raises(ValueError, match=r"my_field\b.*2-d"):
        from_wire(_float_msg(), "my_field", ndim=2)
    flat = to_wire(torch.zeros(2, 3))
    with pytest.raises(ValueError, match=r"my_field\b"):
        from_wire(flat, "my_field", ndim=1)
    assert from_wire(flat, "my_field", ndim=2).shape == (2, 3)


@pytest.mark.parametrize("shape", [[1 << 40], [1 << 20, 1 << 20, 1 << 20], [MAX_ELEMENTS + 1], [1 << 62, 1 << 62]],
                         ids=["2^40", "2^60", "max+1", "overflows-int64"])
def test_rejects_absurd_shape_without_allocating(shape):
    msg = pb.Tensor(dtype=pb.UINT8, shape=shape, data=b"\0" * 8)
    with pytest.raises(ValueError, match=r"my_field\b.*too large"):
        from_wire(msg, "my_field")


def test_errors_are_value_errors():
    assert issubclass(TensorError, ValueError)
    with pytest.raises(TensorError):
        from_wire(pb.Tensor(), "f")
    with pytest.raises(TensorError):
        to_wire(torch.zeros(2, dtype=torch.complex64))
