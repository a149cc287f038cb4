"""The tiled int4 and int8 layouts (`tpquant.kernels.tiles`) and WeightOnly's and Groupwise's
use of them, on CPU.

The layouts are checked code by code against the formulas the docstring (and the kernel's
header) states, the inverse against the original bytes, and the scheme's tiled tensors against
float64 math on the untiled weight (tolerance: float32 math, 1e-5 relative).
"""

from __future__ import annotations

import itertools
import json

import pytest
import torch

from tpquant.collectives import SingleProcessCommunicator
from tpquant.kernels.tiles import can_tile, groups_tile, tile, tile_int4, untile, untile_int4
from tpquant.kernels.weight_only import (
    dequantize_groupwise, dequantize_weight_only, weight_only_matmul,
)
from tpquant.layers.column import ColumnLinear
from tpquant.layers.row import RowLinear
from tpquant.parallel.mapping import Mapping
from tpquant.quantization.schemes import Groupwise, WeightOnly


def _bytes(n: int, k: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, k // 2), generator=g, dtype=torch.uint8)


@pytest.mark.parametrize("n,k", [(16, 64), (48, 320), (208, 576)])
def test_untile_inverts_tile(n: int, k: int) -> None:
    packed = _bytes(n, k, seed=n + k)
    tiled = tile_int4(packed)
    assert tiled.shape == packed.shape and tiled.dtype == torch.uint8
    assert not torch.equal(tiled, packed)  # it does reorder
    assert torch.equal(untile_int4(tiled), packed)


def test_every_nibble_where_the_layout_says() -> None:
    n, k = 32, 128
    packed = _bytes(n, k, seed=1)
    codes = torch.stack((packed & 0xF, packed >> 4), dim=-1).reshape(n, k)  # [N, K], k order
    flat = tile_int4(packed).flatten()
    for big_r, big_t, lane, s, j in itertools.product(range(n // 16), range(k // 64), range(32),
                                                      range(4), range(8)):
        g, t = lane >> 2, lane & 3
        byte = (big_r * (k // 64) + big_t) * 512 + 16 * lane + 4 * s + j // 2
        nibble = (int(flat[byte]) >> (4 * (j & 1))) & 0xF
        row = 16 * big_r + g + 8 * (j & 1)
        feature = 64 * big_t + 16 * t + 4 * s + 2 * ((j >> 1) & 1) + (j >> 2)
        assert nibble == int(codes[row, feature]), (big_r, big_t, lane, s, j)


@pytest.mark.parametrize("n,k", [(16, 32), (48, 96), (208, 576)])
def test_int8_untile_inverts_tile(n: int, k: int) -> None:
    g = torch.Generator().manual_seed(n + k)
    q = torch.randint(-128, 128, (n, k), generator=g, dtype=torch.int8)
    tiled = tile(q, 8)
    assert tiled.shape == q.shape and tiled.dtype == torch.int8
    assert not torch.equal(tiled, q)
    assert torch.equal(untile(tiled, 8), q)


def test_every_int8_code_where_the_layout_says() -> None:
    n, k = 32, 96
    q = torch.randint(-128, 128, (n, k), generator=torch.Generator().manual_seed(2),
                      dtype=torch.int8)
    flat = tile(q, 8).flatten()
    for big_r, big_t, lane, b in itertools.product(range(n // 16), range(k // 32), range(32),
                                                   range(16)):
        g, t = lane >> 2, lane & 3
        byte = (big_r * (k // 32) + big_t) * 512 + 16 * lane + b
        row = 16 * big_r + g + 8 * (b & 1)
        feature = 32 * big_t + 8 * t + 2 * (b >> 2) + ((b >> 1) & 1)
        assert int(flat[byte]) == int(q[row, feature]), (big_r, big_t, lane, b)


def test_int8_refuses_what_does_not_tile() -> None:
    with pytest.raises(ValueError, match="N % 16 == 0 and K % 32 == 0"):
        tile(torch.zeros(16, 48, dtype=torch.int8), 8)
    assert can_tile(16, 96, 8) and not can_tile(16, 96, 4)
    with pytest.raises(TypeError, match="int8 \\[N, K\\]"):
        tile(torch.zeros(16, 32, dtype=torch.uint8), 8)


@pytest.mark.parametrize("shape,error", [
    ((24, 32), ValueError),     # N not a multiple of 16
    ((16, 48), ValueError),     # K = 96 not a multiple of 64
])
def test_refuses_what_does_not_tile(shape, error) -> None:
    with pytest.raises(error, match="N % 16 == 0 and K % 64 == 0"):
        tile_int4(torch.zeros(shape, dtype=torch.uint8))
    assert not can_tile(shape[0], 2 * shape[1])


def test_refuses_other_dtypes() -> None:
    with pytest.raises(TypeError, match="packed uint8"):
        tile_int4(torch.zeros(16, 32, dtype=torch.int8))


def _weight(n: int, k: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, k, generator=g) * torch.rand(n, 1, generator=g).add(0.1)


@pytest.mark.parametrize("bits", [4, 8])
def test_scheme_packs_tiles_and_reads_them(bits: int) -> None:
    scheme = WeightOnly(bits, dtype=torch.float32)
    stored = scheme.quantize(_weight(48, 192, seed=2))
    packed = scheme.pack(stored)
    assert set(packed) == {"qweight_tiles", "scale"}
    assert set(scheme.specs(packed)) == {"qweight_tiles", "scale"}
    assert torch.equal(scheme.dequantize(packed), scheme.dequantize(stored))
    g = torch.Generator().manual_seed(3)
    x = torch.randn(5, 192, generator=g)
    bias = torch.randn(48, generator=g)
    expected = x.double() @ dequantize_weight_only(stored["qweight"], stored["scale"],
                                                   bits).double().t()
    expected += bias.double()
    y = scheme.forward(x, packed, bias)
    assert (y.double() - expected).abs().max() <= 1e-5 * expected.abs().max()


def test_groups_tile_whole_power_of_two_k_tiles() -> None:
    """Per channel (0) and groups of 1, 2, 4, 8 k-tiles; not 3 or 5, nor parts of one."""
    groups = (0, 64, 128, 256, 512, 192, 320, 96, 32)
    assert [groups_tile(g) for g in groups] == [True] * 5 + [False] * 4
    # the tiled GEMV itself refuses other groups before it launches anything
    from tpquant.kernels.cuda_weight_only import tiles_gemv

    x, out = torch.zeros(1, 384, dtype=torch.bfloat16), torch.empty(1, 16, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="groups of 64 x 2"):
        tiles_gemv(x, torch.zeros(16, 192, dtype=torch.uint8), torch.ones(2, 16), None, out,
                   zeros=torch.zeros(2, 16), group=192)


@pytest.mark.parametrize("scheme,shape", [
    (WeightOnly(4, tiles=False), (48, 192)),            # tiles off
    (WeightOnly(8, tiles=False), (48, 192)),            # tiles off
    (WeightOnly(8), (48, 208)),                         # int8 K % 32
    (WeightOnly(4), (40, 192)),                         # N % 16
    (WeightOnly(4), (48, 160)),                         # K % 64
    (Groupwise(128, tiles=False), (48, 256)),           # tiles off
    (Groupwise(128, pre_quant_scale=True), (48, 256)),  # the tiled GEMV does not scale x
    (Groupwise(32), (48, 256)),                         # groups smaller than a k-tile
    (Groupwise(96), (48, 192)),                         # groups across k-tiles
    (Groupwise(192), (48, 384)),                        # 3 k-tiles a group: not a power of 2
    (Groupwise(64), (40, 256)),                         # N % 16
])
def test_scheme_keeps_rows_where_tiles_do_not_apply(scheme, shape) -> None:
    stored = scheme.quantize(_weight(*shape, seed=4))
    packed = scheme.pack(stored)
    assert set(packed) == set(stored)
    assert all(torch.equal(packed[k], stored[k]) for k in stored)


def test_tiled_flag_on_a_weight_that_does_not_tile_is_refused_on_cuda_shapes() -> None:
    """The reference checks the tiled bytes' shape as tile_int4 does."""
    with pytest.raises(ValueError, match="N % 16 == 0 and K % 64 == 0"):
        weight_only_matmul(torch.randn(1, 96), torch.zeros(16, 48, dtype=torch.uint8),
                           torch.ones(16), 4, tiled=True)


@pytest.mark.parametrize("zeros", [True, False])
@pytest.mark.parametrize("group", [64, 128])
def test_groupwise_scheme_packs_tiles_and_reads_them(zeros: bool, group: int) -> None:
    scheme = Groupwise(group, zeros, dtype=torch.float32)
    stored = scheme.quantize(_weight(48, 256, seed=7))
    packed = scheme.pack(stored)
    names = {"qweight_tiles", "scales"} | ({"zeros"} if zeros else set())
    assert set(packed) == names and set(scheme.specs(packed)) == names
    assert torch.equal(scheme.dequantize(packed), scheme.dequantize(stored))
    g = torch.Generator().manual_seed(8)
    x = torch.randn(5, 256, generator=g)
    bias = torch.randn(48, generator=g)
    w = dequantize_groupwise(stored["qweight"], stored["scales"], stored.get("zeros"), group)
    expected = x.double() @ w.double().t() + bias.double()
    y = scheme.forward(x, packed, bias)
    assert (y.double() - expected).abs().max() <= 1e-5 * expected.abs().max()


@pytest.mark.parametrize("make", [lambda **kw: WeightOnly(4, **kw),
                                  lambda **kw: Groupwise(64, zeros=True, **kw),
                                  lambda **kw: WeightOnly(8, **kw)],
                         ids=["per_channel", "groupwise", "int8"])
@pytest.mark.parametrize("style", ["column", "row"])
def test_sharded_linear_tiles_each_ranks_shard(style: str, make) -> None:
    """Tiles are made after sharding: each rank's tiled shard equals the tiles of its stored
    shard, and the rank's output equals float64 math on its slice of the weight."""
    tp, out_f, in_f = 2, 64, 256
    w = _weight(out_f, in_f, seed=5)
    layer_type = ColumnLinear if style == "column" else RowLinear
    g = torch.Generator().manual_seed(6)
    x = torch.randn(3, in_f if style == "column" else in_f // tp, generator=g)
    for rank in range(tp):
        mapping = Mapping(world_size=tp, rank=rank, tp_size=tp)
        args = (in_f, out_f, make(dtype=torch.float32), mapping, SingleProcessCommunicator())
        tiled = layer_type(*args).load_full(w)
        rows = layer_type(in_f, out_f, make(dtype=torch.float32, tiles=False), mapping,
                          SingleProcessCommunicator()).load_full(w)
        bits = tiled.scheme.bits if isinstance(tiled.scheme, WeightOnly) else 4
        assert torch.equal(tiled.tensors["qweight_tiles"], tile(rows.tensors["qweight"], bits))
        y = tiled.scheme.forward(x, tiled.tensors)
        expected = x.double() @ rows.scheme.dequantize(rows.tensors).double().t()
        assert (y.double() - expected).abs().max() <= 1e-5 * expected.abs().max()


def test_shape_rule_prefers_one_wave_with_most_loads_in_flight() -> None:
    from tpquant.kernels.cuda_weight_only import pick_tiles_shape

    # 4096 rows: 256 single-row-tile blocks or 128 double ones, on 132 SMs.
    resident = {(1, 4, 1, 1): 8, (1, 8, 1, 2): 2, (2, 8, 1, 2): 2, (1, 8, 1, 4): 1}
    # (1, 8, 1, 4) holds 132 blocks at once: two waves; of the rest, (1, 8, 1, 2) and (2, 8, 1,
    # 2) keep 4096 k-tile loads in flight, (1, 4, 1, 1) 1024; the tie goes to the fuller wave.
    assert pick_tiles_shape(4096, 1, 132, resident) == (1, 8, 1, 2)
    # Nothing fits in one wave: the fewest waves (4 against 3)...
    assert pick_tiles_shape(65536, 1, 132, {(1, 4, 1, 1): 8, (2, 4, 1, 1): 6}) == (2, 4, 1, 1)
    # ... then the fullest: groupwise 70B gate/up at TP 4 (896 row tiles; an H200 sweep's
    # occupancies), 448 blocks in 2 waves of 264 (85% full) against 2 of 396 (57%) or 896 in 2
    # of 660 (68%); 3 and more waves lose.
    resident = {(1, 4, 1, 2): 5, (1, 4, 1, 4): 3, (1, 8, 1, 2): 2, (1, 8, 1, 4): 1,
                (2, 4, 1, 2): 3, (2, 8, 1, 2): 2}
    assert pick_tiles_shape(14336, 1, 132, resident, grouped=True) == (2, 8, 1, 2)
    # Equal loads in flight and equal waves: the smaller unroll.
    assert pick_tiles_shape(2048, 1, 132, {(1, 4, 1, 2): 2, (1, 8, 1, 1): 2}) == (1, 8, 1, 1)
    # Row warps share a block: two of them need 128 blocks for 4096 rows, one wave at one
    # block per SM, where one row warp's 256 blocks take two.
    assert pick_tiles_shape(4096, 1, 132, {(1, 4, 1, 1): 1, (1, 4, 2, 1): 1}) == (1, 4, 2, 1)
    # At 8 token tiles, unrolling one row tile twice loads x as it goes: no more loads in
    # flight than once, and the fuller wave (x a round ahead) wins; at 4 tiles the unroll counts.
    wide = {(1, 4, 1, 1): 2, (1, 4, 1, 2): 3}
    assert pick_tiles_shape(4096, 8, 132, wide) == (1, 4, 1, 1)
    assert pick_tiles_shape(4096, 4, 132, wide) == (1, 4, 1, 2)
    # Groupwise at one token tile: unrolled shapes only (a warp of unroll 1 folds every k-tile),
    # unless there are none; from two token tiles on, as per channel. (7B gate/up at TP 1 with
    # an H200's occupancies: 688 blocks, one wave of (2, 4, 1, 1).)
    assert pick_tiles_shape(22016, 1, 132, {(2, 4, 1, 1): 6, (2, 4, 1, 2): 3}) == (2, 4, 1, 1)
    grouped = dict(n=22016, sm_count=132, grouped=True)
    assert pick_tiles_shape(nt=1, resident={(2, 4, 1, 1): 6, (2, 4, 1, 2): 3},
                            **grouped) == (2, 4, 1, 2)
    assert pick_tiles_shape(nt=1, resident={(2, 4, 1, 1): 6}, **grouped) == (2, 4, 1, 1)
    assert pick_tiles_shape(nt=2, resident={(2, 4, 1, 1): 6, (2, 4, 1, 2): 3},
                            **grouped) == (2, 4, 1, 1)


def test_late_x_follows_the_kernels_plan() -> None:
    """x is loaded as it goes in the wide plan (8 token tiles) past one row tile unrolled once,
    and always there groupwise (the .cu's TilesPlan)."""
    from tpquant.kernels.cuda_weight_only import tiles_late_x

    assert not tiles_late_x(8, 1, 1) and tiles_late_x(8, 1, 2) and tiles_late_x(8, 2, 1)
    assert tiles_late_x(8, 1, 1, grouped=True)
    assert not any(tiles_late_x(nt, 2, 2, grouped) for nt in (1, 2, 4) for grouped in (0, 1))


def test_tiles_shared_bytes_counts_the_k_warps_that_hand_sums_over() -> None:
    from tpquant.kernels.cuda_weight_only import tiles_shared_bytes

    # NT = 4, RT = 2: 32 C-fragment values and 8 sums of x per lane; K warps 1..3 of each of
    # 2 row warps hand them over (warp 0 keeps its own).
    assert tiles_shared_bytes(4, 2, 4, 2) == 2 * 3 * (32 + 8) * 32 * 4
    # The wide plan (NT = 8) keeps no sums of x; one K warp needs no shared memory.
    assert tiles_shared_bytes(8, 1, 2, 4) == 4 * 1 * 32 * 32 * 4
    assert tiles_shared_bytes(8, 2, 1, 4) == 0
    # Groupwise folds the sums of x in as it goes: only the outputs' sums are handed over.
    assert tiles_shared_bytes(4, 2, 4, 2, grouped=True) == 2 * 3 * 32 * 32 * 4
    # bfloat16 int8 multiplies q itself: no sums of x either.
    assert tiles_shared_bytes(4, 2, 4, 2, q_in_a=True) == 2 * 3 * 32 * 32 * 4
    # int4 per channel copies its rows' channel scales ahead, 2 per row tile per lane of each
    # row warp's first K warp; wide, it does not.
    scales = 2 * 2 * 2 * 32 * 4
    assert tiles_shared_bytes(4, 2, 4, 2, scale_copy=True) == 2 * 3 * 40 * 32 * 4 + scales
    assert tiles_shared_bytes(1, 2, 1, 2, scale_copy=True) == scales  # one K warp: scales only
    assert tiles_shared_bytes(8, 2, 1, 4, scale_copy=True) == 0


def test_engine_metadata_names_each_tiled_layout() -> None:
    """The engine's layouts say which tiles a tensor holds (int8 16 x 32, int4 16 x 64)."""
    from tpquant.engine.build import _layout

    assert _layout("mlp.down.qweight_tiles", torch.zeros(16, 32, dtype=torch.int8)) == "tiles16x32"
    assert _layout("mlp.down.qweight_tiles", torch.zeros(16, 32, dtype=torch.uint8)) == "tiles16x64"
    assert _layout("mlp.down.qweight", torch.zeros(16, 32, dtype=torch.int8)) == "int8"


@pytest.mark.parametrize("quant", ["int8_wo", "int4_wo", "int4_gw"])
def test_cpu_load_puts_tiles_back_in_the_stored_layout(quant: str) -> None:
    """`load_tensors(tiled=False)` (what `load_engine` does off the GPU) reads a tiled state dict
    into untiled schemes: no tiled tensor is kept, and the logits equal the tiled model's (the
    same codes and float32 math; 1e-6 of the largest logit)."""
    from tpquant.engine.session import load_tensors
    from tpquant.layers.linear import ShardedLinear
    from tpquant.models.config import LlamaConfig
    from tpquant.models.llama import Llama, LlamaSchemes

    config = LlamaConfig(vocab_size=50, hidden_size=128, intermediate_size=256, num_layers=2,
                         num_heads=4, num_kv_heads=2, rms_norm_eps=1e-5)
    mapping, comm = Mapping(world_size=1, rank=0, tp_size=1), SingleProcessCommunicator()
    schemes = LlamaSchemes.from_name(quant, torch.float32, group_size=64)
    torch.manual_seed(0)
    tiled = Llama(config, mapping, comm, schemes, torch.float32)
    for module in tiled.modules():
        if isinstance(module, ShardedLinear):
            w = torch.randn(module.out_features, module.in_features) / module.in_features**0.5
            module.load_shards(module.scheme.quantize(w))
    state = tiled.state_dict()
    assert any(name.endswith("qweight_tiles") for name in state)
    stored = Llama(config, mapping, comm, schemes.untiled(), torch.float32)
    load_tensors(stored, state, tiled=False)
    assert not any(name.endswith("qweight_tiles") for name in stored.state_dict())
    ids = torch.randint(0, 50, (2, 7), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        tiled.setup_caches(2, 8)
        stored.setup_caches(2, 8)
        want, got = tiled(ids, 0), stored(ids, 0)
    assert (got - want).abs().max() <= 1e-6 * want.abs().max()


def test_tuned_table_names_shapes_the_kernels_have() -> None:
    """Every entry of the shipped table (tpquant/kernels/tiles_tuned.json) is a candidate shape
    of the tiled kernel at its M, within the shared memory the rule allows."""
    from tpquant.kernels import cuda_weight_only as cw

    table = cw.tuned_table(cw.TUNED_PATH)
    assert len(table) >= 400 and any(key[0] == "NVIDIA H200" for key in table)
    for (_, dtype, mode, m, n, k), shape in table.items():
        nt = cw.tiles_nt(m)
        assert dtype == "bfloat16" and mode in (0, 1, 2, 3) and m <= cw.TILES_MAX_M
        assert shape in cw.TILES_CANDIDATES[nt]
        sums = cw._sums(mode, torch.bfloat16)
        assert cw.tiles_shared_bytes(nt, *shape[:3], **sums) <= cw.TILES_SHARED_BYTES


def test_tiles_plan_takes_the_table_before_the_rule(tmp_path, monkeypatch) -> None:
    """A table entry for the device, dtype, mode, M, N and K is the plan; TPQUANT_TILES_TUNED
    names another table or turns it off (the rule's shape then)."""
    from tpquant.kernels import cuda_weight_only as cw

    path = tmp_path / "tuned.json"
    entry = dict(dtype="bfloat16", mode=1, m=1, n=4096, k=11008, shape=[1, 8, 1, 2])
    path.write_text(json.dumps({"devices": {"GPU X": [entry]}}))
    monkeypatch.setattr(cw, "device_name", lambda device: "GPU X")
    monkeypatch.setattr(cw, "tiles_shape", lambda *args: (1, 2, 4, 1, 1))  # the rule's
    monkeypatch.setenv("TPQUANT_TILES_TUNED", str(path))
    cw.tuned_table.cache_clear()
    cuda = torch.device("cuda", 0)
    try:
        assert cw.tuned_table() == {("GPU X", "bfloat16", 1, 1, 4096, 11008): (1, 8, 1, 2)}
        assert cw.tiles_plan(1, 4096, 11008, cuda, torch.bfloat16, 1) == (1, 1, 8, 1, 2)
        assert cw.tiles_plan(2, 4096, 11008, cuda, torch.bfloat16, 1) == (1, 2, 4, 1, 1)
        assert cw.tiles_plan(1, 4096, 11008, cuda, torch.float16, 1) == (1, 2, 4, 1, 1)
        monkeypatch.setenv("TPQUANT_TILES_TUNED", "off")
        cw.tuned_table.cache_clear()
        assert cw.tuned_table() == {}
        assert cw.tiles_plan(1, 4096, 11008, cuda, torch.bfloat16, 1) == (1, 2, 4, 1, 1)
    finally:
        cw.tuned_table.cache_clear()
