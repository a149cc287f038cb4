"""The decode step's fused Triton kernels in Triton's interpreter (CPU tensors): the residual
add + RMSNorm, SwiGLU's silu(gate) * up and the float KV-cache write, each against torch.

Allowed differences, stated once:
- add + RMSNorm: the sum s = x + delta equals torch's add (bfloat16 within one ulp: the
  interpreter converts float32 to bfloat16 by truncation, compiled Triton rounds to nearest
  even); the norm of s is within one output ulp (+ 1e-6 relative, the sum of squares' order)
  of the float64 norm of that s;
- silu * up: within eps(dtype) relative of the float64 product (two roundings, as torch's
  two kernels round; bfloat16 2 eps, the interpreter's two truncations), 2e-6 for float32;
- the KV write: bit for bit (a copy), and nothing outside the written positions changes.
Outputs are poisoned (NaN) before each call where the launcher takes one.
"""

from __future__ import annotations

import sys

import pytest
import torch

from tpquant.kernels import norm as norm_ref
from tpquant.layers.kv_cache import KVCache

DTYPES = (torch.float16, torch.bfloat16, torch.float32)
EPS = 1e-5
_MODULES = (
    "tpquant.kernels.triton_w8a8",
    "tpquant.kernels.triton_norm",
    "tpquant.kernels.triton_activation",
    "tpquant.kernels.triton_kv",
)


@pytest.fixture(scope="module")
def kernels():
    pytest.importorskip("triton")
    from triton_interpreter import interpreted  # tests/unit, beside this file

    with interpreted(*_MODULES) as (_, tn, ta, tk):
        interp = sys.modules["triton.runtime.interpreter"]
        assert isinstance(tk._kv_write_kernel, interp.InterpretedFunction)
        yield tn, ta, tk


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _ulp_close(got: torch.Tensor, want: torch.Tensor, dtype: torch.dtype, extra: float = 0.0):
    bound = (torch.finfo(dtype).eps + extra) * want.double().abs() + torch.finfo(dtype).tiny
    err = (got.double() - want.double()).abs()
    assert not got.isnan().any() and (err <= bound).all(), (err / bound).max().item()


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("rows,k", [(1, 96), (3, 200), (17, 64), (2, 17000)])
def test_add_rms_norm(kernels, dtype, rows, k) -> None:
    """k = 17000 spans five blocks of the row loop (the second pass recomputes the sum)."""
    tn, _, _ = kernels
    g = _gen(rows * 7 + k)
    x = (torch.randn(rows, k, generator=g) * 3).to(dtype)
    delta = torch.randn(rows, 2 * k, generator=g).to(dtype)[:, ::2]  # strided rows and columns
    w = (0.5 + torch.rand(k, generator=g)).to(dtype)
    s, y = tn.add_rms_norm(x, delta.contiguous(), w, EPS)
    s_ref = x + delta
    if dtype == torch.bfloat16:
        _ulp_close(s, s_ref, dtype)
    else:
        assert torch.equal(s, s_ref)
    _ulp_close(y, norm_ref.rms_norm_f32(s.double(), w.double(), EPS), dtype, 1e-6)
    # the residual read before the wait (one block, read once; k = 17000 keeps the passes):
    # the same sums, the norm within the same bound
    s1, y1 = tn.add_rms_norm(x, delta.contiguous(), w, EPS, early_residual=True)
    assert torch.equal(s1, s)
    _ulp_close(y1, norm_ref.rms_norm_f32(s.double(), w.double(), EPS), dtype, 1e-6)
    # the dispatcher's torch path gives the same pair, the unfused add then norm
    s2, y2 = norm_ref.add_rms_norm(x, delta, w, EPS, path="reference")
    assert torch.equal(s2, s_ref)
    assert torch.equal(y2, norm_ref.rms_norm(s_ref, w, EPS, path="reference"))


def test_norm_reads_once_early_only_where_asked_and_safe(kernels) -> None:
    """The early read: asked for, a delta to wait for, a decode step's rows (<= 64) of up to
    4096 features (one block); and never for a copy that add_rms_norm made itself (the copy
    is the kernel just before), which gives the same numbers through the passes."""
    tn, _, _ = kernels
    assert tn.reads_once_early(True, True, 1, 4096) and tn.reads_once_early(True, True, 64, 576)
    assert not tn.reads_once_early(False, True, 1, 4096)
    assert not tn.reads_once_early(True, False, 1, 4096)
    assert not tn.reads_once_early(True, True, 65, 4096)
    assert not tn.reads_once_early(True, True, 1, 4097)
    g = _gen(3)
    x = torch.randn(2, 96, generator=g)
    delta, w = torch.randn(2, 96, generator=g), 0.5 + torch.rand(96, generator=g)
    calls = []
    real = tn._rms_norm_kernel

    class Spy:
        def __getitem__(self, grid):
            def launch(*args, **kw):
                calls.append(kw["EARLY"])
                return real[grid](*args, **kw)
            return launch

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(tn, "_rms_norm_kernel", Spy())
        s, y = tn.add_rms_norm(x, delta, w, EPS, early_residual=True)
        s_copy, y_copy = tn.add_rms_norm(x.t().contiguous().t(), delta, w, EPS, early_residual=True)
        tn.add_rms_norm(x, delta, w.repeat(2)[::2], EPS, early_residual=True)
    assert calls == [True, False, False]
    assert torch.equal(s_copy, s)
    _ulp_close(y_copy, norm_ref.rms_norm_f32(s.double(), w.double(), EPS), torch.float32, 1e-6)


def test_add_rms_norm_rejects_mismatched_delta(kernels) -> None:
    tn, _, _ = kernels
    x = torch.randn(2, 8)
    with pytest.raises(ValueError, match="delta must match x"):
        tn.add_rms_norm(x, torch.randn(2, 9), torch.ones(8), EPS)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape,i", [((1, 1), 1376), ((3, 2), 100), ((5,), 2048)])
def test_silu_mul(kernels, dtype, shape, i) -> None:
    """i = 1376: a partial second block; rows strided (a slice of a wider output)."""
    _, ta, _ = kernels
    g = _gen(i)
    wide = (torch.randn(*shape, 2 * i + 8, generator=g) * 4).to(dtype)
    gate_up = wide[..., : 2 * i]
    out = torch.full((wide[..., 0].numel(), i), float("nan"), dtype=dtype)
    y = ta.silu_mul(gate_up, out=out)
    assert y.shape == (*shape, i) and y.data_ptr() == out.data_ptr()
    gate, up = gate_up.double().chunk(2, dim=-1)
    want = torch.nn.functional.silu(gate) * up
    extra = {torch.float32: 2e-6, torch.bfloat16: torch.finfo(dtype).eps}.get(dtype, 0.0)
    _ulp_close(y, want, dtype, extra)


def test_silu_mul_reference_path() -> None:
    """The dispatcher's torch path is torch's two ops on the two halves."""
    from tpquant.kernels.activation import silu_mul

    x = torch.randn(3, 10, generator=_gen(1))
    want = torch.nn.functional.silu(x[:, :5]) * x[:, 5:]
    assert torch.equal(silu_mul(x, path="reference"), want)
    with pytest.raises(ValueError, match="even number"):
        silu_mul(torch.randn(2, 7))


@pytest.mark.parametrize("cache_dtype,src_dtype", [
    (torch.bfloat16, torch.bfloat16), (torch.float16, torch.float32), (torch.float32, torch.float32),
], ids=str)
@pytest.mark.parametrize("B,T", [(1, 1), (3, 1), (2, 5)])
def test_kv_write(kernels, cache_dtype, src_dtype, B, T) -> None:
    """Against KVCache.write's index_copy_ path: k and v as slices of one fused qkv row, pos
    a strided view, rows 0..B-1 of a larger cache."""
    _, _, tk = kernels
    MB, S, Hkv, hd, H = 4, 12, 3, 16, 6
    g = _gen(B * 10 + T)
    qkv = torch.randn(B, T, (H + 2 * Hkv) * hd, generator=g).to(src_dtype)
    k = qkv[..., H * hd: (H + Hkv) * hd].view(B, T, Hkv, hd)
    v = qkv[..., (H + Hkv) * hd:].view(B, T, Hkv, hd)
    pos = torch.stack([torch.randperm(S, generator=g)[:T] for _ in range(B)])  # distinct per row
    pos = torch.cat([pos, pos], dim=1)[:, ::2]  # strided
    ref, got = (KVCache(MB, S, Hkv, hd, cache_dtype) for _ in range(2))
    for c in (ref, got):
        c.k.normal_(generator=_gen(5))
        c.v.normal_(generator=_gen(6))
    ref.write(pos, k, v)  # CPU: the index_copy_ path
    tk.write_kv(got.k, got.v, pos, k, v)
    assert torch.equal(got.k, ref.k) and torch.equal(got.v, ref.v)


def test_kv_write_rejects_bad_shapes(kernels) -> None:
    _, _, tk = kernels
    c = KVCache(2, 8, 2, 16, torch.float32)
    with pytest.raises(ValueError, match="do not fit"):
        tk.write_kv(c.k, c.v, torch.zeros(3, 1, dtype=torch.long), torch.randn(3, 1, 2, 16),
                    torch.randn(3, 1, 2, 16))
