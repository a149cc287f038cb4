"""The CUTLASS mixed-input GEMM (cpp/mixed_input_gemm.cu, tpquant.kernels.cutlass_gemm) against
float64 references built from the stored (untiled) layouts.

One command (one H100 / H200; the libraries build at first use into $TPQUANT_CACHE):
    python3 -m pytest -q tests/gpu/test_kernels_cutlass.py

int4 per channel and groupwise (zeros or symmetric, groups of 64 and 128) and int8 per channel,
all on the tiles; float16 and bfloat16; N and K not multiples of 128; M from 1 to 1030
(several M tiles, partial ones); with and without bias; every configuration forced; through
the public op both forced and automatic (which must agree bitwise with the path
`cutlass_range` names); a CUDA-graph capture replayed on fresh inputs; an unaligned x; x's
permutation for either tile width. Outputs are poisoned with NaN first. The W8A8 GEMM is tested in
test_kernels_w8a8.py (bitwise against the reference).
Tolerance: `weight_only_checks.TOL` (max |y - ref| <= TOL[dtype] * max |ref|).
"""

from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.gpu

if not torch.cuda.is_available():
    pytest.skip("needs CUDA", allow_module_level=True)

from tpquant.kernels import cuda_weight_only as cw  # noqa: E402
from tpquant.kernels import cutlass_gemm  # noqa: E402
from tpquant.kernels import triton_weight_only as tw  # noqa: E402
from tpquant.kernels import weight_only as ref  # noqa: E402
from tpquant.kernels.tiles import tile  # noqa: E402
from tpquant.parallel.mapping import Mapping  # noqa: E402
from tpquant.quantization.schemes import Groupwise, WeightOnly  # noqa: E402

from .weight_only_checks import check, poison  # noqa: E402

if not cutlass_gemm.available(torch.cuda.current_device()):
    pytest.skip("needs a compute capability 9.0 GPU, nvcc and CUTLASS headers",
                allow_module_level=True)

DTYPES = [torch.float16, torch.bfloat16]
MS = [1, 17, 65, 128, 129, 300, 1030]
# (scheme name, N, K, group)
CASES = [("int4", 208, 320, 0), ("int4", 4096, 1024, 0), ("gw_zeros", 960, 576, 64),
         ("gw_zeros", 4096, 1024, 128), ("gw_sym", 208, 320, 64), ("gw_sym", 4096, 1024, 128),
         ("int8", 208, 320, 0), ("int8", 4096, 1024, 0)]


@pytest.fixture(scope="module")
def device() -> torch.device:
    dev = Mapping.from_env().device()
    torch.cuda.set_device(dev)
    return dev


def _weights(name: str, n: int, k: int, group: int, device: torch.device,
             seed: int) -> dict[str, torch.Tensor]:
    """A random weight's stored tensors, plus its tiles, as the schemes make them."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) * torch.rand(n, 1, generator=g).add(0.1)
    scheme = {"int4": lambda: WeightOnly(4), "int8": lambda: WeightOnly(8),
              "gw_zeros": lambda: Groupwise(group, True),
              "gw_sym": lambda: Groupwise(group, False)}[name]()
    t = {key: v.to(device) for key, v in scheme.quantize(w).items()}
    t["tiles"] = tile(t["qweight"], 8 if name == "int8" else 4)
    return t


def _reference(name: str, t: dict[str, torch.Tensor], group: int, x: torch.Tensor,
               bias: torch.Tensor | None) -> torch.Tensor:
    if name in ("int4", "int8"):
        w = ref.dequantize_weight_only(t["qweight"], t["scale"], 4 if name == "int4" else 8)
    else:
        w = ref.dequantize_groupwise(t["qweight"], t["scales"], t.get("zeros"), group)
    y = x.double() @ w.double().t()
    return y if bias is None else y + bias.double()


def _op(name: str, t: dict[str, torch.Tensor], group: int, x: torch.Tensor,
        bias: torch.Tensor | None, path: str | None) -> torch.Tensor:
    """The public op a layer calls, on the tensors the layer keeps (the tiles)."""
    if name in ("int4", "int8"):
        bits = 8 if name == "int8" else 4
        return tw.weight_only_matmul(x, t["tiles"], t["scale"], bits, bias, path=path,
                                     tiled=True)
    return tw.groupwise_matmul(x, t["tiles"], t["scales"], t.get("zeros"), group, None, bias,
                               path=path, tiled=True)


def _inputs(m: int, k: int, n: int, dtype: torch.dtype, device: torch.device, seed: int):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=g).to(device=device, dtype=dtype)
    bias = torch.randn(n, generator=g).to(device=device, dtype=dtype)
    return x, bias


@pytest.mark.parametrize("m", MS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name,n,k,group", CASES)
def test_forced_path_matches_reference(device, name: str, n: int, k: int, group: int,
                                       dtype: torch.dtype, m: int) -> None:
    t = _weights(name, n, k, group, device, seed=n + k + group)
    x, bias = _inputs(m, k, n, dtype, device, seed=m)
    for b in (None, bias):
        poison((m, n), dtype, device)
        y = _op(name, t, group, x, b, "cutlass")
        check(y, _reference(name, t, group, x, b), dtype, (name, n, k, group, m, b is None))


def _tile_cases() -> list:
    """(case, tile) for each tile the dispatch builds for the case's scheme (bfloat16)."""
    built = [v for v in cutlass_gemm.all_variants()
             if isinstance(v, cutlass_gemm.Variant) and not v.fp16]
    cases = []
    for name, n, k, group in (CASES[1], CASES[3], CASES[5], CASES[7]):
        probe = cutlass_gemm.variant_for(8 if name == "int8" else 4, group, name == "gw_zeros",
                                         torch.bfloat16, cutlass_gemm.MixedTile(64))
        cases += [pytest.param(name, n, k, group, v.tile, id=f"{name}-{v.tile.label}")
                  for v in built if (v.quant, v.mode) == (probe.quant, probe.mode)]
    return cases


@pytest.mark.parametrize("name,n,k,group,tile", _tile_cases())
def test_every_tile(device, name: str, n: int, k: int, group: int,
                    tile: cutlass_gemm.MixedTile) -> None:
    """Each tile the dispatch uses, forced, on a partial last tile and on whole ones."""
    t = _weights(name, n, k, group, device, seed=7)
    scale = t["scale"] if name in ("int4", "int8") else t["scales"]
    for m in (tile.tokens - 1, 3 * tile.tokens):
        x, bias = _inputs(m, k, n, torch.bfloat16, device, seed=m)
        out = torch.full((m, n), float("nan"), dtype=torch.bfloat16, device=device)
        cutlass_gemm.gemm(x, t["tiles"], scale, t.get("zeros"), 8 if name == "int8" else 4,
                          group, bias, out, tile)
        check(out, _reference(name, t, group, x, bias), torch.bfloat16, (name, tile.label, m))


@pytest.mark.parametrize("m", [65, 256, 1024])
@pytest.mark.parametrize("name,n,k,group", [CASES[1], CASES[3], CASES[5], CASES[7]])
def test_automatic_dispatch_takes_cutlass_in_its_range(device, name: str, n: int, k: int,
                                                       group: int, m: int) -> None:
    """Above the small-M kernels the dispatch gives exactly the forced CUTLASS result where
    `cutlass_range` gives it the call, else exactly dequantize + cuBLAS's."""
    t = _weights(name, n, k, group, device, seed=3)
    x, bias = _inputs(m, k, n, torch.bfloat16, device, seed=m)
    bits = 8 if name == "int8" else 4
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    expected = "cutlass" if tw.cutlass_range(m, n, bits, group, sms) else "dequant"
    assert torch.equal(_op(name, t, group, x, bias, None), _op(name, t, group, x, bias, expected))


@pytest.mark.parametrize("m", [31, 32, 33, 64])
@pytest.mark.parametrize("name,group", [("int4", 0), ("gw_zeros", 64), ("int8", 0)])
def test_small_m_follows_cutlass_range(device, name: str, group: int, m: int) -> None:
    """At M = 31-64 a weight whose 128-row tiles fill half the SMs and a 4096-row one go to
    CUTLASS where `cutlass_range` says (wide per channel from 32, wide groupwise and narrow
    int8 from 33), else to the tiled GEMV, and match the reference."""
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    k = 320
    for n in (128 * -(-sms // 2), 4096):
        t = _weights(name, n, k, group, device, seed=n)
        x, bias = _inputs(m, k, n, torch.bfloat16, device, seed=m)
        bits = 8 if name == "int8" else 4
        expected = "cutlass" if tw.cutlass_range(m, n, bits, group, sms) else "cuda"
        y = _op(name, t, group, x, bias, None)
        assert torch.equal(y, _op(name, t, group, x, bias, expected)), (n, m)
        check(y, _reference(name, t, group, x, bias), torch.bfloat16, (name, n, m))
    assert tw.cutlass_range(32, 128 * -(-sms // 2), 4, 0, sms)  # the rule reaches 32


@pytest.mark.parametrize("case,m", [(3, 300), (7, 64), (1, 300)],
                         ids=["gw-c128x256", "int8-p64x64", "int4-p64x128"])
def test_cuda_graph_replays_on_fresh_inputs(device, case: int, m: int) -> None:
    """Captured and replayed on new x: a cooperative tile (groupwise) and the pingpong tiles of
    narrow weights (int8 at M = 64, as a batch-64 decode step runs it; int4 at 300)."""
    name, n, k, group = CASES[case]
    t = _weights(name, n, k, group, device, seed=5)
    x, bias = _inputs(m, k, n, torch.bfloat16, device, seed=1)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        eager = _op(name, t, group, x, bias, "cutlass")  # loads the library outside the capture
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y_static = _op(name, t, group, x, bias, "cutlass")
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(y_static, eager)
    for seed in (11, 12):
        fresh, _ = _inputs(m, k, n, torch.bfloat16, device, seed)
        x.copy_(fresh)
        y_static.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        check(y_static, _reference(name, t, group, x, bias), torch.bfloat16, ("graph", seed))


def test_unaligned_x_and_strided_rows(device) -> None:
    """x as a view starting 2 bytes in, with strided rows: the gather into the tiles' K order
    reads it as given."""
    name, n, k, group = CASES[6]
    t = _weights(name, n, k, group, device, seed=9)
    base, _ = _inputs(200, k + 8, n, torch.bfloat16, device, seed=2)
    x = base[:, 1:k + 1]
    y = _op(name, t, group, x, None, "cutlass")
    check(y, _reference(name, t, group, x, None), torch.bfloat16, "strided")


def test_forced_path_refuses_what_it_cannot_read(device) -> None:
    for name, bits in (("int4", 4), ("int8", 8)):
        t = _weights(name, 208, 320, 0, device, seed=1)
        x, _ = _inputs(100, 320, 208, torch.bfloat16, device, seed=1)
        with pytest.raises(ValueError, match="path 'cutlass' takes tiled"):
            tw.weight_only_matmul(x, t["qweight"], t["scale"], bits, path="cutlass")  # untiled
    gw = _weights("gw_zeros", 960, 576, 64, device, seed=1)
    x, _ = _inputs(100, 576, 960, torch.bfloat16, device, seed=1)
    pqs = torch.rand(576, device=device) + 0.5
    with pytest.raises(ValueError, match="path 'cutlass' takes tiled"):
        tw.groupwise_matmul(x, gw["tiles"], gw["scales"], gw["zeros"], 64, pqs, path="cutlass",
                            tiled=True)


@pytest.mark.parametrize("bits", [4, 8])
def test_tiles_order_kernel_equals_the_permutation(device, bits: int) -> None:
    """The Triton gather against torch's view / permute of the same formula (on the CPU)."""
    x = torch.randn(37, 320 + 8, device=device).to(torch.bfloat16)[:, :320]  # strided rows
    expected = cutlass_gemm.tiles_order(x.cpu().contiguous(), bits)
    assert torch.equal(cutlass_gemm.tiles_order(x, bits).cpu(), expected)


@pytest.mark.parametrize("bits", [4, 8])
def test_tiles_order_is_the_layout_cutlass_reads(device, bits: int) -> None:
    """Direct check of the permutation: a tiled weight with one nonzero code per row picks out
    exactly the x feature it multiplies."""
    n, k = 16, 128
    q = torch.zeros(n, k, dtype=torch.int8)
    features = torch.randperm(k)[:n]
    q[torch.arange(n), features] = 1
    stored = q if bits == 8 else ((q[:, 0::2] & 0xF) | ((q[:, 1::2] & 0xF) << 4)).to(torch.uint8)
    tiles = tile(stored.to(device), bits)
    scale = torch.ones(n, device=device)
    x = torch.randn(130, k, device=device).to(torch.bfloat16)
    out = torch.empty(130, n, dtype=torch.bfloat16, device=device)
    cutlass_gemm.gemm(x, tiles, scale, None, bits, 0, None, out)
    assert torch.equal(out, x[:, features.to(device)])
    assert cw.aligned(out)
