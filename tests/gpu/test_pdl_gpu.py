"""Programmatic dependent launch (tpquant.kernels.pdl) on a GPU.

    python -m pytest -q tests/gpu/test_pdl_gpu.py        (also run by tests/gpu/run_on_device.sh)

Chains of the decode step's kernels, each reading what the one before it wrote, 4 layers at
Llama-2-7B widths, batch 1 and 8, and 64 and 1024 as a prefill's (there CUTLASS's GEMMs: the
weight-only one launched with PDL after x's gather on its 64-token tile, the W8A8 one at 1024;
design note 51): weight-only int4 (add + RMSNorm -> int4 GEMV -> silu * up ->
int4 GEMV -> the next layer's add + RMSNorm) and SmoothQuant per token (RMSNorm + quantize ->
W8A8 GEMM -> per-token quantize -> W8A8 GEMM -> residual add). With PDL every kernel may start
before the one before it ends, so a kernel that read too early would change the result (the
add + RMSNorm reads its residual before its wait, as in the model). Each
chain must give the same bits with PDL as without, eagerly and replayed from a CUDA graph, and
stay within 1e-2 (batch 1 and 8) or 2e-2 (64 and 1024) of the largest value of the torch
references run on the same bfloat16 inputs (float32 math, rounded where the kernels round; what
is left is summation order and, through it, an occasional int8 code one step off, over 4 layers:
the more rows, the larger the largest such deviation; 1.1-1.2e-2 measured at batch 256).
"""

from __future__ import annotations

import pytest
import torch

if not torch.cuda.is_available():
    pytest.skip("needs a CUDA device", allow_module_level=True)

from tpquant.kernels import activation, norm, pdl  # noqa: E402
from tpquant.kernels import w8a8  # noqa: E402
from tpquant.kernels import weight_only as wo  # noqa: E402
from tpquant.parallel.mapping import Mapping  # noqa: E402
from tpquant.quantization.schemes import WeightOnly  # noqa: E402

HIDDEN, INTER, LAYERS, EPS = 4096, 11008, 4, 1e-5


@pytest.fixture(scope="module")
def device() -> torch.device:
    dev = torch.device("cuda", Mapping.from_env().local_rank % torch.cuda.device_count())
    torch.cuda.set_device(dev)
    if torch.cuda.get_device_capability(dev)[0] < 9:
        pytest.skip("PDL needs compute capability 9.0 or later")
    return dev


def _layers(device: torch.device, kind: str) -> list[dict]:
    g = torch.Generator().manual_seed(7)
    layers = []
    for _ in range(LAYERS):
        up = torch.randn(2 * INTER, HIDDEN, generator=g) / HIDDEN**0.5
        down = torch.randn(HIDDEN, INTER, generator=g) / INTER**0.5
        layer = {"norm": (0.5 + torch.rand(HIDDEN, generator=g)).to(device, torch.bfloat16)}
        for name, w in (("up", up), ("down", down)):
            if kind == "int4":
                t = WeightOnly(4).quantize(w)
                layer[name] = [t["qweight"].to(device), t["scale"].to(device)]
            else:  # int8 codes and per-channel scales
                scale = w.abs().amax(dim=1) / 127
                q = torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8)
                layer[name] = [q.to(device), scale.to(device)]
        layers.append(layer)
    return layers


def _int4_chain(x: torch.Tensor, layers, path: str | None = None) -> torch.Tensor:
    delta = torch.zeros_like(x)
    for layer in layers:
        # as in the model: the residual x was written before the down GEMV, which wrote delta
        x, y = norm.add_rms_norm(x, delta, layer["norm"], EPS, path=path, early_residual=True)
        z = wo.weight_only_matmul(y, *layer["up"], 4, path=path)
        a = activation.silu_mul(z, path=path)
        delta = wo.weight_only_matmul(a, *layer["down"], 4, path=path)
    return x + delta


def _w8a8_chain(x: torch.Tensor, layers, path: str | None = None) -> torch.Tensor:
    for layer in layers:
        q, sx = w8a8.rms_norm_quantize(x, layer["norm"], EPS, path=path)
        z = w8a8.w8a8_matmul(q, sx, *layer["up"], out_dtype=x.dtype, path=path)
        q, sx = w8a8.quantize_per_token(z[..., :INTER], path=path)
        x = x + w8a8.w8a8_matmul(q, sx, *layer["down"], out_dtype=x.dtype, path=path)
    return x


CHAINS = {"int4": _int4_chain, "w8a8": _w8a8_chain}


@pytest.mark.parametrize("kind", list(CHAINS))
@pytest.mark.parametrize("batch", [1, 8, 64, 1024])
def test_pdl_chain_same_bits_as_without(device, kind, batch) -> None:
    layers, chain = _layers(device, kind), CHAINS[kind]
    g = torch.Generator().manual_seed(batch)
    x = torch.randn(batch, HIDDEN, generator=g).to(device, torch.bfloat16)
    results = {}
    try:
        for on in (False, True):
            pdl.set_enabled(on)
            results[f"eager pdl={on}"] = chain(x, layers)
            chain(x, layers)  # warm-up outside capture (compiles, allocates)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                out = chain(x, layers)
            out.fill_(float("nan"))
            graph.replay()
            results[f"graph pdl={on}"] = out.clone()
    finally:
        pdl.set_enabled(True)
    torch.cuda.synchronize()
    base = results["eager pdl=False"]
    assert not base.isnan().any()
    differing = [name for name, r in results.items() if not torch.equal(r, base)]
    assert not differing, f"differ from the chain without PDL: {differing}"
    want = chain(x, layers, path="reference").float()
    err = (base.float() - want).abs().max() / want.abs().max()
    tolerance = 1e-2 if batch <= 8 else 2e-2
    assert err < tolerance, f"chain against the torch references: {err:.3g} of the largest value"
