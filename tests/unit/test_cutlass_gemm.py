"""The pure parts of tpquant.kernels.cutlass_gemm: x's permutation for the tiled layout, the
instantiation a scheme takes, the shape rules, the configuration by M, the cache key (no GPU,
no nvcc)."""

from __future__ import annotations

import pytest
import torch

from tpquant.kernels import cutlass_gemm as cg


@pytest.mark.parametrize("bits", [4, 8])
def test_tiles_order_moves_each_feature_to_cutlass_k(bits: int) -> None:
    """x'[k'] = x[f]: within each tile of TK = 64 (int4) / 32 (int8) features, k' = 16 s + 8 c
    + 2 t + h holds the tile's feature f = TK/4 t + 4 s + 2 c + h (design notes 34, 35), built
    here element by element."""
    k, tk = 192, 64 if bits == 4 else 32
    x = torch.arange(3 * k, dtype=torch.float64).reshape(3, k)
    expected = torch.empty_like(x)
    for block in range(k // tk):
        for t in range(4):
            for s in range(tk // 16):
                for c in range(2):
                    for h in range(2):
                        f = tk * block + tk // 4 * t + 4 * s + 2 * c + h
                        k_cutlass = tk * block + 16 * s + 8 * c + 2 * t + h
                        expected[:, k_cutlass] = x[:, f]
    assert torch.equal(cg.tiles_order(x, bits), expected)


@pytest.mark.parametrize("bits,group,zeros,quant,mode", [
    (4, 0, False, cg.QUANT_INT4, cg.CONVERT),
    (4, 128, True, cg.QUANT_UINT4, cg.SCALE_ZERO),
    (4, 64, False, cg.QUANT_INT4, cg.SCALE),
    (8, 0, False, cg.QUANT_INT8, cg.CONVERT),
])
def test_variant_for_each_scheme(bits: int, group: int, zeros: bool, quant: int,
                                 mode: int) -> None:
    tile = cg.MixedTile(128, streamk=True)
    v = cg.variant_for(bits, group, zeros, torch.bfloat16, tile)
    assert (v.quant, v.mode, v.tile, v.fp16) == (quant, mode, tile, False)
    assert "-DTPQ_FP16" in cg.variant_for(bits, group, zeros, torch.float16,
                                          cg.MixedTile(256)).defines()


def test_tile_macros_and_labels() -> None:
    """Each field of a tile is one macro of the .cu; the label names every field that is not
    the default; tiles CUTLASS cannot schedule are refused."""
    default = cg.MixedTile(128)
    assert default.defines() == ("-DTPQ_TILE_TOKENS=128", "-DTPQ_TILE_ROWS=128",
                                 "-DTPQ_TILE_K=64", "-DTPQ_CLUSTER=1")
    assert default.label == "c128x128"
    tile = cg.MixedTile(64, streamk=True, k=128, cluster=2)
    assert {"-DTPQ_STREAMK", "-DTPQ_TILE_K=128", "-DTPQ_CLUSTER=2"} <= set(tile.defines())
    assert tile.label == "c128x64k128sk2c"
    pingpong = cg.MixedTile(64, rows=64, pingpong=True)
    assert "-DTPQ_PINGPONG" in pingpong.defines() and pingpong.label == "p64x64"
    with pytest.raises(ValueError, match="data-parallel"):
        cg.MixedTile(64, streamk=True, rows=64, pingpong=True)
    with pytest.raises(ValueError, match="128 rows"):
        cg.MixedTile(64, rows=64)


def test_int8_groupwise_is_refused() -> None:
    with pytest.raises(ValueError, match="per channel"):
        cg.variant_for(8, 128, False, torch.bfloat16, cg.MixedTile(128))


def test_takes_shape_rules() -> None:
    assert cg.takes(4096, 4096, 4, 0) and cg.takes(200, 320, 8, 0) and cg.takes(960, 576, 4, 64)
    assert not cg.takes(4100, 4096, 4, 0)  # N % 8
    assert not cg.takes(4096, 4000, 4, 0)  # K % 64
    assert not cg.takes(4096, 4096, 4, 96)  # a group is not whole K steps
    assert not cg.takes(4096, 4096, 8, 128)  # int8 groupwise
    assert not cg.takes(4096, 4096, 2, 0)


def test_wide_weights_fill_half_the_sms() -> None:
    """66 tiles of 128 rows fill half of 132 SMs: 8448 rows are wide, 8320 are not."""
    assert cg.wide(8448, 132) and cg.wide(22016, 132)
    assert not cg.wide(8320, 132) and not cg.wide(4096, 132)


T = cg.MixedTile
PP = dict(rows=64, pingpong=True)


@pytest.mark.parametrize("m,wide,groupwise,expected", [
    (1, True, False, T(32, streamk=True)), (32, True, False, T(32, streamk=True)),
    (33, True, False, T(64)), (64, True, True, T(64)), (65, True, False, T(128, streamk=True)),
    (128, True, True, T(128, streamk=True)), (129, True, False, T(256, **PP)),
    (4096, True, False, T(256, **PP)), (129, True, True, T(256)), (1024, True, True, T(256)),
    (33, False, False, T(64, **PP)), (128, False, False, T(64, **PP)),
    (129, False, False, T(128, **PP)), (1023, False, False, T(128, **PP)),
    (1024, False, False, T(256)), (4096, False, False, T(256)), (1, False, True, T(64)),
    (128, False, True, T(128, streamk=True)), (129, False, True, T(256))])
def test_tiles_by_m_and_width(m: int, wide: bool, groupwise: bool,
                              expected: cg.MixedTile) -> None:
    """Per channel, wide weights: the cooperative tile that holds M to 128 tokens, then 64 x
    256 pingpong; narrow: 64-row pingpong tiles, 64 then 128 tokens, 128 x 256 cooperative
    from LARGE_M. Groupwise: the cooperative 64-, 128- (stream-K) and 256-token tiles."""
    assert cg.mixed_config(m, wide, groupwise) == expected


def test_every_tile_the_dispatch_takes_is_prebuilt() -> None:
    """For each scheme, dtype and weight width, every M the dispatch gives CUTLASS, and every M
    of a forced call, has its library among `all_variants` (what `python -m
    tpquant.kernels.cutlass_gemm` builds), and no more: nothing is built that no call takes."""
    from tpquant.kernels.triton_weight_only import cutlass_range

    built = cg.all_variants()
    taken = set()
    for bits, group, zeros in ((4, 0, False), (8, 0, False), (4, 128, True), (4, 128, False)):
        for n in (4096, 22016):
            for m in sorted({*range(1, 4100, 7), 32, 33, 64, 65, 128, 129, 1023, 1024}):
                if cutlass_range(m, n, bits, group, 132) or m % 5 == 0:  # or forced
                    for dtype in (torch.bfloat16, torch.float16):
                        tile = cg.mixed_config(m, cg.wide(n, 132), bool(group))
                        taken.add(cg.variant_for(bits, group, zeros, dtype, tile))
    assert taken == {v for v in built if isinstance(v, cg.Variant)}
    for m in (1, cg.W8A8_WIDE_FROM_M):
        assert cg.w8a8_variant(m, torch.float16) in built
        assert cg.w8a8_variant(m, torch.bfloat16).tile_n == (
            256 if m >= cg.W8A8_WIDE_FROM_M else 128)


def test_library_path_keys_the_variant_and_the_cache_dir(monkeypatch, tmp_path) -> None:
    monkeypatch.setattr(cg, "_nvcc", lambda: "/usr/bin/nvcc")
    monkeypatch.setattr(cg, "_nvcc_release", lambda nvcc: "13.0")
    include = tmp_path / "include" / "cutlass"
    include.mkdir(parents=True)
    (include / "version.h").write_text("#define CUTLASS_MAJOR 4\n#define CUTLASS_MINOR 2\n")
    monkeypatch.setattr(cg, "_cutlass_include", lambda: tmp_path / "include")
    monkeypatch.setenv(cg.CACHE_ENV, str(tmp_path / "cache"))
    T = cg.MixedTile
    a = cg.library_path(cg.Variant(0, 0, T(128)))
    assert a.parent == tmp_path / "cache" / "cutlass" and a.suffix == ".so"
    wide, wide_fp16 = cg.Variant(0, 0, T(256)), cg.Variant(0, 0, T(256), True)
    assert a != cg.library_path(wide) != cg.library_path(wide_fp16)
    assert cg.library_path(cg.Variant(0, 0, T(128, streamk=True))) != a
    assert cg.library_path(cg.Variant(0, 0, T(128, k=128))) != a
    assert cg.library_path(cg.Variant(0, 0, T(128, rows=64, pingpong=True))) != a
    monkeypatch.setattr(cg, "_nvcc_release", lambda nvcc: "13.1")
    assert cg.library_path(cg.Variant(0, 0, T(128))) != a


def test_library_path_without_tools_says_what_is_missing(monkeypatch) -> None:
    monkeypatch.setattr(cg, "_nvcc", lambda: None)
    with pytest.raises(RuntimeError, match="needs nvcc and CUTLASS headers"):
        cg.library_path(cg.Variant(0, 0, cg.MixedTile(128)))


def test_w8a8_takes_shape_rules() -> None:
    assert cg.w8a8_takes(4096, 4000, torch.bfloat16) and cg.w8a8_takes(1000, 4000, torch.float16)
    assert not cg.w8a8_takes(4096, 4000, torch.float32)  # half outputs only
    assert not cg.w8a8_takes(4096, 4008, torch.bfloat16)  # K % 16
    assert not cg.w8a8_takes(4100, 4000, torch.bfloat16)  # N % 8


def test_w8a8_variants_build_without_fused_multiply_add() -> None:
    """The epilogue's multiply and add must round separately, as the reference's."""
    v = cg.W8A8Variant(256, streamk=True, fp16=True)
    assert "-fmad=false" in v.defines() and "-DTPQ_STREAMK" in v.defines()
    assert v.source.name == "w8a8_gemm.cu" and v.source.is_file()
    assert cg.Variant(0, 0, cg.MixedTile(128)).source.name == "mixed_input_gemm.cu"


def test_forced_cutlass_w8a8_without_cuda_is_a_clear_error() -> None:
    from tpquant.kernels import w8a8

    qx = torch.zeros(4, 32, dtype=torch.int8)
    qw = torch.zeros(16, 32, dtype=torch.int8)
    with pytest.raises(ValueError, match="path 'cutlass' needs CUDA tensors"):
        w8a8.w8a8_matmul(qx, torch.ones(4, 1), qw, torch.ones(16), None, torch.bfloat16,
                         path="cutlass")
