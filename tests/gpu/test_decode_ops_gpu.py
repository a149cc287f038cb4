"""The decode step's fused kernels on CUDA against torch on the same GPU.

    python -m pytest -q tests/gpu/test_decode_ops_gpu.py   (run_on_device.sh stage `kernels`)

Allowed differences (compiled Triton rounds to nearest even, as torch does):
- add + RMSNorm: the sum bit for bit; the norm rtol eps(dtype) + 1e-6 (sum-of-squares order);
- silu * up: within two ulps of torch's silu-then-multiply, relative: Triton's exp differs
  from torch's in the last float32 bits, which can move the rounding of silu(gate) by one ulp
  and so the product's by one more. float32: 4e-6 relative (~34 ulps): Triton's exp is
  2^(x log2 e), and rounding x log2 e costs about |x| ulps (|gate| < 20 here);
- the KV write: bit for bit against the index_copy_ path (run on CPU copies).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from tpquant.kernels import norm as norm_ops
from tpquant.layers.kv_cache import KVCache

pytestmark = [pytest.mark.gpu]

if not torch.cuda.is_available():
    pytest.skip("needs CUDA", allow_module_level=True)
pytest.importorskip("triton", reason="needs Triton")
from tpquant.kernels import triton_activation, triton_norm  # noqa: E402

DTYPES = (torch.float16, torch.bfloat16, torch.float32)
EPS = 1e-5


def _rand(shape, seed, scale=1.0):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)) * scale


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("rows,k", [(1, 4096), (8, 8192), (3, 576), (64, 5120), (5, 20000)])
def test_add_rms_norm(dtype, rows, k):
    x = _rand((rows, k), k, 3).to("cuda", dtype)
    d = _rand((rows, k), k + 1).to("cuda", dtype)
    w = (0.5 + _rand((k,), k + 2).abs()).to("cuda", dtype)
    s, y = triton_norm.add_rms_norm(x, d, w, EPS)
    assert torch.equal(s, x + d)
    want = norm_ops.rms_norm(x + d, w, EPS, path="reference")
    rtol = torch.finfo(dtype).eps + 1e-6
    torch.testing.assert_close(y.double(), want.double(), rtol=rtol, atol=0)
    # the residual read before the PDL wait (rows of up to 4096, read once): the same sums,
    # the norm within the same bound (its sum of squares may add up in another order)
    s1, y1 = triton_norm.add_rms_norm(x, d, w, EPS, early_residual=True)
    assert torch.equal(s1, s)
    torch.testing.assert_close(y1.double(), want.double(), rtol=rtol, atol=0)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("rows,i", [(1, 11008), (8, 5504), (3, 1536), (64, 14336)])
def test_silu_mul(dtype, rows, i):
    gu = _rand((rows, 2 * i), i, 4).to("cuda", dtype)
    y = triton_activation.silu_mul(gu)
    want = F.silu(gu[:, :i]) * gu[:, i:]
    rtol = 4e-6 if dtype == torch.float32 else 2 * torch.finfo(dtype).eps
    bound = rtol * want.double().abs() + torch.finfo(dtype).tiny
    err = (y.double() - want.double()).abs()
    assert (err <= bound).all(), (err / bound).max().item()


@pytest.mark.parametrize("dtype", (torch.float16, torch.bfloat16), ids=str)
@pytest.mark.parametrize("B,T", [(1, 1), (8, 1), (2, 300)])
def test_kv_write(dtype, B, T):
    MB, S, Hkv, hd, H = 8, 512, 8, 128, 32
    g = torch.Generator().manual_seed(B * 1000 + T)
    qkv = torch.randn(B, T, (H + 2 * Hkv) * hd, generator=g).to(dtype)
    pos = torch.stack([torch.randperm(S, generator=g)[:T] for _ in range(B)])
    ref = KVCache(MB, S, Hkv, hd, dtype)  # CPU: index_copy_
    got = KVCache(MB, S, Hkv, hd, dtype, "cuda")
    for c in (ref, got):
        c.k.fill_(7.0)
        c.v.fill_(-7.0)
    k = qkv[..., H * hd: (H + Hkv) * hd].view(B, T, Hkv, hd)
    v = qkv[..., (H + Hkv) * hd:].view(B, T, Hkv, hd)
    ref.write(pos, k, v)
    qkv_d = qkv.cuda()
    got.write(pos.cuda(), qkv_d[..., H * hd: (H + Hkv) * hd].view(B, T, Hkv, hd),
              qkv_d[..., (H + Hkv) * hd:].view(B, T, Hkv, hd))  # the Triton kernel
    assert torch.equal(got.k.cpu(), ref.k) and torch.equal(got.v.cpu(), ref.v)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("B,V", [(1, 32000), (8, 128256), (64, 1000)])
def test_greedy_advance(dtype, B, V):
    """The greedy choice that ends the decode graph: torch.argmax's index exactly (ties to
    the first, here across blocks), positions + 1 clamped."""
    from tpquant.kernels.triton_greedy import greedy_advance

    logits = (_rand((B, V), V, 4)).to("cuda", dtype)
    logits[0, [V - 1, 5]] = 1e3  # a tie across the row's blocks: 5 wins
    pos = torch.arange(B, device="cuda") * 7
    tokens = torch.full((B,), -7, dtype=torch.long, device="cuda")
    got = pos.clone()
    greedy_advance(logits, tokens, got, 20)
    assert torch.equal(tokens, logits.argmax(-1))
    assert torch.equal(got, (pos + 1).clamp(max=20))
