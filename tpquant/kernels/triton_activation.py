"""SwiGLU's silu(gate) * up in one Triton kernel: `tpquant.kernels.activation.silu_mul` on CUDA.

torch runs it as two kernels (silu, then the product) and writes silu(gate) in between; here
one program reads a block of gate and up from the fused gate|up output and writes the product.
Rounding as torch's: silu(gate) in float32, rounded to the input dtype, times up in float32,
rounded again. Rows may be strided; each row's features are contiguous.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

from tpquant.kernels import pdl

_BLOCK = 1024


@triton.jit
def _silu_mul_kernel(GU, OUT, I, stride_gu, stride_out, BLOCK: tl.constexpr, PDL: tl.constexpr):
    if PDL:  # tpquant.kernels.pdl: wait for the kernel before, then let the next one start
        gdc_wait()
        gdc_launch_dependents()
    row = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < I
    g = tl.load(GU + row * stride_gu + offs, mask=mask, other=0.0)
    u = tl.load(GU + row * stride_gu + I + offs, mask=mask, other=0.0)
    gf = g.to(tl.float32)
    a = tl.math.div_rn(gf, 1.0 + tl.exp(-gf)).to(g.dtype)  # torch's silu, rounded as torch does
    y = a.to(tl.float32) * u.to(tl.float32)
    tl.store(OUT + row * stride_out + offs, y.to(OUT.dtype.element_ty), mask=mask)


def silu_mul(gate_up: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """gate_up [..., 2I] (gate first) -> silu(gate) * up [..., I] in gate_up's dtype."""
    two_i = gate_up.shape[-1]
    rows = gate_up.reshape(-1, two_i)
    if rows.stride(-1) != 1:
        rows = rows.contiguous()
    n, i = rows.shape[0], two_i // 2
    if out is None:
        out = torch.empty(n, i, dtype=gate_up.dtype, device=gate_up.device)
    elif out.shape != (n, i) or out.dtype != gate_up.dtype or not out.is_contiguous():
        raise ValueError(f"out must be a contiguous [{n}, {i}] {gate_up.dtype} tensor")
    if n:
        _silu_mul_kernel[(n, triton.cdiv(i, _BLOCK))](
            rows, out, i, rows.stride(0), out.stride(0), BLOCK=_BLOCK, num_warps=4,
            **pdl.triton_args(rows.device),
        )
    return out.reshape(*gate_up.shape[:-1], i)
