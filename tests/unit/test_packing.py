"""INT4 packing: exact round trips, the documented nibble order, and the error paths."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tpquant.quantization.packing import pack_int4, unpack_int4

RANGES = {True: (-8, 7), False: (0, 15)}  # signed -> int8, unsigned -> uint8


@st.composite
def int4_arrays(draw, signed: bool):
    """A tensor of random shape [*lead, even width] whose values hypothesis picks
    (its integer strategy favours the boundaries -8, 7, 0, 15)."""
    lead = draw(st.lists(st.integers(1, 4), min_size=0, max_size=2))
    width = 2 * draw(st.integers(1, 24))
    lo, hi = RANGES[signed]
    n = math.prod(lead) * width
    values = draw(st.lists(st.integers(lo, hi), min_size=n, max_size=n))
    dtype = torch.int8 if signed else torch.uint8
    return torch.tensor(values, dtype=dtype).reshape(*lead, width)


@settings(max_examples=60, deadline=None)
@given(st.booleans().flatmap(lambda s: st.tuples(st.just(s), int4_arrays(s))))
def test_round_trip_is_exact(case):
    signed, q = case
    p = pack_int4(q)
    assert p.dtype == torch.uint8
    assert p.shape == (*q.shape[:-1], q.shape[-1] // 2)
    back = unpack_int4(p, signed=signed)
    assert back.dtype == q.dtype
    assert torch.equal(back, q)


@settings(max_examples=30, deadline=None)
@given(signed=st.booleans(), seed=st.integers(0, 2**31 - 1), rows=st.integers(1, 5),
       half_width=st.integers(1, 20))
def test_nibble_order_matches_formula(signed, seed, rows, half_width):
    """byte j = (v[2j] & 0xF) | ((v[2j+1] & 0xF) << 4), evaluated on plain Python ints."""
    lo, hi = RANGES[signed]
    gen = torch.Generator().manual_seed(seed)
    q = torch.randint(lo, hi + 1, (rows, 2 * half_width), generator=gen,
                      dtype=torch.int8 if signed else torch.uint8)
    packed = pack_int4(q).tolist()
    values = q.tolist()
    for r in range(rows):
        expected = [(values[r][2 * j] & 0xF) | ((values[r][2 * j + 1] & 0xF) << 4)
                    for j in range(half_width)]
        assert packed[r] == expected


def test_every_byte_unpacks_and_repacks():
    """All 256 bytes (every pair of nibbles) survive unpack -> pack, signed and unsigned."""
    every = torch.arange(256, dtype=torch.int32).to(torch.uint8)[None, :]
    for signed in (True, False):
        v = unpack_int4(every, signed=signed)
        lo, hi = RANGES[signed]
        # Independent decode: low nibble first, two's complement for signed.
        nib = [[b & 0xF, b >> 4] for b in range(256)]
        flat = [x - 16 if signed and x >= 8 else x for pair in nib for x in pair]
        assert v[0].tolist() == flat
        assert int(v.min()) == lo and int(v.max()) == hi
        assert torch.equal(pack_int4(v), every)


def test_odd_width_is_refused():
    with pytest.raises(ValueError, match="even"):
        pack_int4(torch.zeros(3, 5, dtype=torch.int8))


@pytest.mark.parametrize("dtype,bad", [(torch.int8, 8), (torch.int8, -9), (torch.uint8, 16)])
def test_out_of_range_is_refused(dtype, bad):
    gen = torch.Generator().manual_seed(0)
    lo, hi = RANGES[dtype == torch.int8]
    q = torch.randint(lo, hi + 1, (4, 8), generator=gen).to(dtype)
    q[2, 5] = bad
    with pytest.raises(ValueError, match="range|lie in"):
        pack_int4(q)


def test_wrong_dtypes_are_refused():
    with pytest.raises(TypeError):
        pack_int4(torch.zeros(2, 4, dtype=torch.int32))
    with pytest.raises(TypeError):
        unpack_int4(torch.zeros(2, 4, dtype=torch.int8), signed=True)
