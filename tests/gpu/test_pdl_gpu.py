"""Programmatic dependent launch (tpquant.kernels.pdl) on a GPU.

    python -m pytest -q tests/gpu/test_pdl_gpu.py        (also run by tests/gpu/run_on_device.sh)

A chain of the decode step's kernels, each reading what the one before it wrote (add + RMSNorm
-> int4 GEMV -> silu * up -> int4 GEMV -> the next layer's add + RMSNorm, 4 layers at
Llama-2-7B widths, batch 1 and 8): with PDL every kernel may start before the one before it
ends, so a kernel that read too early would change the result. The chain must give the same
bits with PDL as without, eagerly and replayed from a CUDA graph, and stay within bfloat16
rounding (rtol 2e-2 of the largest value, after 4 layers) of the torch references (float32
math on dequantized weights) run on the same inputs.
"""

from __future__ import annotations

import pytest
import torch

if not torch.cuda.is_available():
    pytest.skip("needs a CUDA device", allow_module_level=True)

from tpquant.kernels import activation, norm, pdl  # noqa: E402
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


def _layers(device: torch.device) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(7)
    scheme = WeightOnly(4)
    layers = []
    for _ in range(LAYERS):
        gate_up = scheme.quantize(torch.randn(2 * INTER, HIDDEN, generator=g) / HIDDEN**0.5)
        down = scheme.quantize(torch.randn(HIDDEN, INTER, generator=g) / INTER**0.5)
        layers.append({
            "norm": (0.5 + torch.rand(HIDDEN, generator=g)).to(device, torch.bfloat16),
            "gate_up": [gate_up["qweight"].to(device), gate_up["scale"].to(device)],
            "down": [down["qweight"].to(device), down["scale"].to(device)],
        })
    return layers


def _chain(x: torch.Tensor, layers, path: str | None = None) -> torch.Tensor:
    delta = torch.zeros_like(x)
    for layer in layers:
        x, y = norm.add_rms_norm(x, delta, layer["norm"], EPS, path=path)
        z = wo.weight_only_matmul(y, *layer["gate_up"], 4, path=path)
        a = activation.silu_mul(z, path=path)
        delta = wo.weight_only_matmul(a, *layer["down"], 4, path=path)
    return x + delta


@pytest.mark.parametrize("batch", [1, 8])
def test_pdl_chain_same_bits_as_without(device, batch) -> None:
    layers = _layers(device)
    g = torch.Generator().manual_seed(batch)
    x = torch.randn(batch, HIDDEN, generator=g).to(device, torch.bfloat16)
    results = {}
    try:
        for on in (False, True):
            pdl.set_enabled(on)
            results[f"eager pdl={on}"] = _chain(x, layers)
            _chain(x, layers)  # warm-up outside capture (compiles, allocates)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                out = _chain(x, layers)
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
    want = _chain(x.float(), layers, path="reference").float()
    err = (base.float() - want).abs().max() / want.abs().max()
    assert err < 2e-2, f"chain against the torch references: {err:.3g} of the largest value"
