"""Tests for vvtq.export.packing: exact layout, pack/unpack round trip (hypothesis), input validation."""
from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from vvtq.export import code_range, pack, packed_nbytes, unpack


def reference_bytes(values: list[int], bits: int) -> bytes:
    """Independent layout reference: a Python big integer with value i at bit offset i*bits, little-endian."""
    acc = 0
    for i, v in enumerate(values):
        acc |= v << (i * bits)
    return acc.to_bytes((len(values) * bits + 7) // 8, "little")


def test_known_layouts():
    p, meta = pack(torch.tensor([1, 2, 3]), 4, signed=False)
    assert p.tolist() == [0x21, 0x03]
    assert meta == {"bits": 4, "signed": False, "shape": [3], "numel": 3, "offset": 0, "layout": "dense-le"}
    p, meta = pack(torch.tensor([-2, -1, 0, 1]), 2, signed=True)  # stored 0, 1, 2, 3
    assert p.tolist() == [0b11100100] and meta["offset"] == 2
    p, _ = pack(torch.tensor([1, 2, 3, 4, 5, 6, 7, 0]), 3, signed=False)
    assert bytes(p.tolist()) == reference_bytes([1, 2, 3, 4, 5, 6, 7, 0], 3)
    p, _ = pack(torch.tensor([-128, 127, 0], dtype=torch.int8), 8, signed=True)
    assert p.tolist() == [0, 255, 128]


@settings(max_examples=150, deadline=None)
@given(
    bits=st.integers(1, 8),
    signed=st.booleans(),
    shape=st.lists(st.integers(0, 7), min_size=0, max_size=3),
    data=st.data(),
)
def test_roundtrip_property(bits, signed, shape, data):
    lo, hi = code_range(bits, signed)
    n = math.prod(shape)
    values = data.draw(st.lists(st.integers(lo, hi), min_size=n, max_size=n))
    dtype = data.draw(st.sampled_from([torch.int16, torch.int32, torch.int64]))
    codes = torch.tensor(values, dtype=dtype).reshape(shape)
    packed, meta = pack(codes, bits, signed)
    assert packed.dtype == torch.uint8 and packed.ndim == 1
    assert packed.numel() == (n * bits + 7) // 8 == packed_nbytes(n, bits)
    assert bytes(packed.tolist()) == reference_bytes([v - lo for v in values], bits)
    out = unpack(packed, bits, signed, meta["shape"])
    assert out.dtype == torch.int32 and tuple(out.shape) == tuple(shape)
    assert torch.equal(out, codes.to(torch.int32))


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_roundtrip_large_odd(bits):
    torch.manual_seed(bits)
    lo, hi = code_range(bits, True)
    codes = torch.randint(lo, hi + 1, (37, 101), dtype=torch.int32)
    packed, meta = pack(codes, bits, True)
    assert packed.numel() == math.ceil(37 * 101 * bits / 8)
    assert torch.equal(unpack(packed, bits, True, codes.shape), codes)


def test_scalar_and_empty():
    p, meta = pack(torch.tensor(5), 3, signed=False)
    assert meta["shape"] == [] and p.numel() == 1
    assert unpack(p, 3, False, ()).item() == 5
    p, meta = pack(torch.zeros(0, 3, dtype=torch.int64), 4, signed=True)
    assert p.numel() == 0 and unpack(p, 4, True, (0, 3)).shape == (0, 3)


def test_validation():
    with pytest.raises(ValueError, match="out of range"):
        pack(torch.tensor([0, 8]), 3, signed=True)
    with pytest.raises(ValueError, match="out of range"):
        pack(torch.tensor([-1, 2]), 3, signed=False)
    with pytest.raises(ValueError, match="out of range"):
        pack(torch.tensor([0, 16]), 4, signed=False)
    with pytest.raises(ValueError, match="integer dtype"):
        pack(torch.tensor([0.0, 1.0]), 4, signed=False)
    for bad in (0, 9, 2.0, True):
        with pytest.raises(ValueError, match="bits"):
            pack(torch.tensor([0]), bad, signed=False)
    packed, _ = pack(torch.arange(10), 4, signed=False)  # 5 bytes
    with pytest.raises(ValueError, match="too short"):
        unpack(packed[:4], 4, False, (10,))
    with pytest.raises(ValueError, match="too short"):
        unpack(packed, 4, False, (11,))
    with pytest.raises(ValueError, match="too long"):
        unpack(packed, 4, False, (8,))
    with pytest.raises(ValueError, match="uint8"):
        unpack(packed.to(torch.int32), 4, False, (10,))
    with pytest.raises(ValueError, match="shape"):
        unpack(packed, 4, False, (-1,))
