"""The CUDA weight-only GEMV's pure rules: M tiles, shapes it takes, split-K.

The kernel itself runs only on a GPU (tests/gpu/test_kernels_weight_only.py).
"""

from __future__ import annotations

import pytest

from tpquant.kernels import cuda_weight_only as cw
from tpquant.kernels.tiles import groups_tile


@pytest.mark.parametrize("kernel, tiles", [(cw.FMA, cw.M_TILES), (cw.MMA, cw.MMA_TILES)])
def test_m_tile_is_the_smallest_compiled_tile_that_holds_m(kernel: str, tiles) -> None:
    for m in range(1, tiles[-1] + 1):
        tile = cw.m_tile(m, kernel)
        assert tile in tiles and tile >= m
        assert all(t < m for t in tiles if t < tile)


def test_m_past_the_largest_tile_is_refused() -> None:
    with pytest.raises(ValueError, match="fma GEMV takes M <= 16"):
        cw.m_tile(17, cw.FMA)
    with pytest.raises(ValueError, match="mma GEMV takes M <= 32"):
        cw.m_tile(cw.MAX_M + 1, cw.MMA)


@pytest.mark.parametrize(
    "m, bits, group, kernel",
    [
        (1, 8, 0, "fma"),
        (2, 8, 0, "mma"),
        (2, 4, 0, "fma"),  # int4 per channel: fma still ahead at M = 2
        (3, 4, 0, "mma"),
        (2, 4, 128, "mma"),
        (16, 4, 128, "mma"),
        (16, 4, 64, "fma"),  # a 4-chunk step (128 codes) would straddle two groups
        (32, 4, 256, "mma"),
    ],
)
def test_kernel_for(m: int, bits: int, group: int, kernel: str) -> None:
    assert cw.MMA_MIN_M == {0: 2, 1: 3, 2: 2, 3: 2}  # the thresholds this table is written for
    assert cw.kernel_for(m, bits, group) == kernel


@pytest.mark.parametrize(
    "m, k, bits, group, ok",
    [
        (1, 4096, 4, 0, True),
        (16, 4096, 8, 0, True),
        (32, 4096, 4, 0, True),  # the mma kernel's tiles
        (17, 4096, 4, 128, True),
        (17, 4096, 4, 64, False),  # past the fma tiles, and groups too small for mma
        (33, 4096, 4, 0, False),  # M past every tile
        (1, 4080, 4, 0, False),  # K not a whole number of 32-code chunks
        (1, 4080, 8, 0, True),  # int8 chunks are 16 codes
        (1, 4104, 8, 0, False),
        (4, 4096, 4, 128, True),
        (4, 4096, 4, 32, True),
        (4, 4096, 4, 48, False),  # a chunk would straddle two groups
    ],
)
def test_supports(m: int, k: int, bits: int, group: int, ok: bool) -> None:
    assert cw.supports(m, k, bits, group) is ok


@pytest.mark.parametrize("n", [64, 1024, 4096, 22016, 57344])
@pytest.mark.parametrize("k", [1024, 4096, 11008, 28672])
@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("tile", [1, 16])
def test_split_k_covers_k_with_a_chunk_per_lane(n: int, k: int, bits: int, tile: int) -> None:
    """Every chunk is in exactly one split, splits are within bounds, and each split gives
    every lane of a warp at least one chunk when K allows more than one split."""
    chunks = k // cw.chunk_elems(bits)
    splits, per_split = cw.split_k(n, k, bits, tile, sm_count=132)
    assert 1 <= splits <= cw.MAX_SPLITS
    assert (splits - 1) * per_split < chunks <= splits * per_split
    if splits > 1:
        assert per_split >= 32
    warps = -(-n // cw.rows_per_warp(tile)) * splits
    if splits < min(cw.MAX_SPLITS, chunks // 32):
        assert warps >= cw.WARPS_PER_SM * 132  # stopped splitting only once the SMs are full


def test_mode_names_the_kernel_variant() -> None:
    assert [cw.mode(8, 0, False), cw.mode(4, 0, False), cw.mode(4, 128, True),
            cw.mode(4, 128, False)] == [0, 1, 2, 3]


@pytest.mark.parametrize("n", [64, 4096, 22016])
@pytest.mark.parametrize("k", [1024, 4096, 11008, 28672])
@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("m", [2, 16, 32])
def test_mma_split_k_covers_k_within_its_caps(n: int, k: int, bits: int, m: int) -> None:
    """Every step is in exactly one split; the partials' traffic stays within half the
    weight's; each warp of a split has a load round; the SMs get the split count nearest
    MMA_WARPS_PER_SM warps each (or fewer, where whole steps per split round it down)."""
    steps = -(-k // (cw.STEP_CHUNKS * cw.chunk_elems(bits)))
    splits, per_split = cw.mma_split_k(m, n, k, bits, sm_count=132)
    unroll, row_tiles, k_warps = cw.MMA_SHAPE[cw.m_tile(m, cw.MMA)]
    assert 1 <= splits <= cw.MAX_SPLITS
    assert (splits - 1) * per_split < steps <= splits * per_split
    warps = -(-n // (cw.WARPS // k_warps * 16 * row_tiles)) * cw.WARPS
    want = round(cw.MMA_WARPS_PER_SM * 132 / warps)
    assert splits <= max(1, want)
    if splits > 1:
        assert 8 * splits * m <= k * bits / 8 / 2
        assert per_split >= unroll * k_warps
    # One step fewer per split would pass a cap or the wanted count.
    caps = (cw.MAX_SPLITS, k * bits // (128 * m), steps // (unroll * k_warps), want)
    if per_split > 1:
        assert -(-steps // (per_split - 1)) > min(caps)


@pytest.mark.parametrize(
    "m, bits, splits, kernel, tile",
    [(1, 4, None, "fma", 1), (2, 4, None, "fma", 2), (3, 4, None, "mma", 8),
     (8, 8, 3, "mma", 8), (16, 4, None, "mma", 16), (32, 4, 5, "mma", 32), (4, 8, 3, "mma", 8)],
)
def test_gemv_launch_geometry(monkeypatch, m: int, bits: int, splits, kernel: str,
                              tile: int) -> None:
    """What `gemv` launches, with the kernels and the device stubbed out (CPU tensors): the
    kernel and M tile `kernel_for` names, one warp per 2 rows (fma) or k_warps warps per
    16 * row tiles rows (mma), the split heuristic's splits (or the forced ones, made even),
    and the reduce kernel exactly when there is more than one split."""
    import torch

    launches = []
    monkeypatch.setattr(cw, "_kernels", lambda *a: ({key: key for key in (
        [(cw.FMA, t) for t in cw.M_TILES] + [(cw.MMA, t) for t in cw.MMA_TILES])}, "reduce"))
    monkeypatch.setattr(cw, "launch", lambda fn, grid, block, args, dev, pdl=False:
                        launches.append((fn, grid, block, args, pdl)))
    monkeypatch.setattr(torch.cuda, "get_device_properties",
                        lambda dev: type("P", (), {"multi_processor_count": 132})())
    n, k = 4096, 4096
    x = torch.zeros(m, k, dtype=torch.bfloat16)
    qweight = torch.zeros(n, k * bits // 8, dtype=torch.uint8 if bits == 4 else torch.int8)
    out = torch.empty(m, n, dtype=torch.bfloat16)
    cw.gemv(x, qweight, torch.ones(n), None, None, bits, 0, None, out, splits=splits)

    fn, grid, block, args, pdl = launches[0]
    assert fn == (kernel, tile) and block == (cw.WARPS * 32,)
    assert not pdl  # no PDL off CUDA
    if kernel == cw.MMA:
        units = -(-k // (cw.STEP_CHUNKS * cw.chunk_elems(bits)))
        _, row_tiles, k_warps = cw.MMA_SHAPE[tile]
        rows_per_warp = 16 * row_tiles / k_warps  # k_warps warps share each row tile
        auto = cw.mma_split_k(m, n, k, bits, 132)
    else:
        units = k // cw.chunk_elems(bits)
        rows_per_warp = cw.rows_per_warp(tile)
        auto = cw.split_k(n, k, bits, tile, 132)
    if splits is None:
        want_splits, per_split = auto
    else:
        per_split = -(-units // splits)
        want_splits = -(-units // per_split)
    assert grid == (-(-n // (cw.WARPS * rows_per_warp)), want_splits)
    assert int(args[-2]) == per_split and (want_splits - 1) * per_split < units
    assert int(args[-1]) == (want_splits > 1)  # write_partial
    assert len(launches) == (2 if want_splits > 1 else 1)
    if want_splits > 1:
        assert launches[1][0] == "reduce"


def test_gemv_with_pdl_launches_both_kernels_with_it(monkeypatch) -> None:
    """With PDL on, the GEMV and its split-K reduce launch as programmatic dependent launches
    (device stubbed, CPU tensors)."""
    import torch

    launches = []
    monkeypatch.setattr(cw, "_kernels", lambda *a: ({(cw.FMA, 1): "gemv"}, "reduce"))
    monkeypatch.setattr(cw, "launch", lambda fn, grid, block, args, dev, pdl=False:
                        launches.append((fn, args, pdl)))
    monkeypatch.setattr(cw.pdl, "enabled", lambda dev: True)
    monkeypatch.setattr(torch.cuda, "get_device_properties",
                        lambda dev: type("P", (), {"multi_processor_count": 132})())
    n, k = 4096, 4096
    qweight = torch.zeros(n, k // 2, dtype=torch.uint8)
    out = torch.empty(1, n, dtype=torch.bfloat16)
    cw.gemv(torch.zeros(1, k, dtype=torch.bfloat16), qweight, torch.ones(n), None, None, 4, 0,
            None, out, splits=2)
    (fn, args, pdl), (reduce, _, reduce_pdl) = launches
    assert (fn, reduce, pdl, reduce_pdl) == ("gemv", "reduce", True, True)
    assert int(args[-2]) == 64 and int(args[-1]) == 1  # 2 splits of 64 chunks, partials


@pytest.mark.parametrize("n,k", [(4096, 4096), (4096, 11008), (22016, 4096), (208, 320),
                                 (8192, 28672)])
@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("config", [c for cs in cw.STAGED_CONFIGS.values() for c in cs])
def test_staged_splits_fill_the_sms_within_a_cluster(n: int, k: int, bits: int, config) -> None:
    """The staged GEMM's K splits: 1 to 8 (a portable cluster), each split two stages or more
    where K has them, and no more blocks than about one an SM once the rows fill them."""
    nt, rt, wr, wk, ks, stages = config
    splits = cw.staged_splits(n, k, bits, config, 132)
    k_stages = -(-(k // (64 if bits == 4 else 32)) // ks)
    blocks = -(-(n // 16) // (rt * wr))
    assert 1 <= splits <= cw.STAGED_MAX_SPLITS
    assert splits == 1 or k_stages // splits >= 2
    assert splits == 1 or blocks * (splits - 0.5) <= 132


@pytest.mark.parametrize("config", [c for cs in cw.STAGED_CONFIGS.values() for c in cs])
def test_staged_shared_memory_holds_every_use(config) -> None:
    """A block's dynamic shared memory holds its x stages (padded rows), the K warps' sums and
    the block's float32 sums, and fits an H100 / H200 SM (227 KiB)."""
    nt, rt, wr, wk, ks, stages = config
    for bits, row in ((4, ks * 128 + 16), (8, ks * 64 + 64)):
        nbytes = cw.staged_shared_bytes(config, bits)
        assert nbytes >= stages * 8 * nt * row
        assert nbytes >= wr * (wk - 1) * rt * nt * 4 * 32 * 4
        assert nbytes >= 8 * nt * 16 * rt * wr * 4
        assert nbytes <= 227 << 10


def test_staged_splits_fit_their_clusters_in_one_wave() -> None:
    """Given how many clusters of each size run at once (the H200's counts for the default
    config: 30 of 4, 39 of 3), the splits step down until every row block's cluster runs in
    the first wave: 7B's 4096-row weights (32 row blocks) take 3 splits, not 4."""
    capacity = dict(zip(range(1, 9), (132, 66, 39, 30, 22, 17, 15, 15)))
    config = cw.STAGED_CONFIGS[8][0]
    assert cw.staged_splits(4096, 4096, 4, config, 132) == 4  # without the driver's count
    assert cw.staged_splits(4096, 4096, 4, config, 132, capacity.__getitem__) == 3
    assert cw.staged_splits(1536, 4096, 4, config, 132, capacity.__getitem__) == 8  # 12 blocks
    assert cw.staged_splits(22016, 4096, 4, config, 132, capacity.__getitem__) == 1


def test_shipped_staged_table_holds_known_configs() -> None:
    """Every entry of staged_tuned.json: a config of STAGED_CONFIGS at its token tiles (4 or
    8: the dispatch takes it from M = 17), a mode with its group (per channel 0, groupwise one
    that tiles and divides K), a weight that tiles."""
    table = cw.staged_table(cw.STAGED_TUNED_PATH)
    assert table
    for (device, dtype, mode, group, nt, n, k), config in table.items():
        assert nt in (4, 8) and config in cw.STAGED_CONFIGS[nt] and mode in (0, 1, 2, 3)
        assert (group == 0) == (mode <= 1) and groups_tile(group) and k % max(group, 1) == 0
        assert n % 16 == 0 and k % (32 if mode == 0 else 64) == 0, (device, dtype, n, k)


def test_staged_config_only_for_table_weights_and_token_tiles(monkeypatch, tmp_path) -> None:
    import json

    import torch

    path = tmp_path / "t.json"
    path.write_text(json.dumps({"devices": {"GPU X": [
        {"dtype": "bfloat16", "mode": 1, "n": 4096, "k": 4096, "config": [8, 2, 4, 2, 4, 3]},
        {"dtype": "bfloat16", "mode": 2, "group": 128, "n": 4096, "k": 4096,
         "config": [8, 1, 4, 2, 4, 3]},
        {"dtype": "bfloat16", "mode": 1, "n": 1024, "k": 4096, "config": [4, 2, 4, 1, 2, 4]}]}}))
    monkeypatch.setenv("TPQUANT_STAGED_TUNED", str(path))
    monkeypatch.setattr(cw, "device_name", lambda device: "GPU X")
    cw.staged_table.cache_clear()
    try:
        dev = torch.device("cuda", 0)
        for m, want in ((32, None), (33, (8, 2, 4, 2, 4, 3)), (64, (8, 2, 4, 2, 4, 3)),
                        (65, None)):
            assert cw.staged_config(m, 4096, 4096, dev, torch.bfloat16, 1) == want
        assert cw.staged_config(64, 4096, 4096, dev, torch.float16, 1) is None
        assert cw.staged_config(64, 4096, 4096, dev, torch.bfloat16, 0) is None
        assert cw.staged_config(40, 4096, 4096, dev, torch.bfloat16, 2, 128) == (8, 1, 4, 2, 4, 3)
        for mode_, group in ((2, 64), (3, 128), (1, 128)):  # another group or mode: not named
            assert cw.staged_config(40, 4096, 4096, dev, torch.bfloat16, mode_, group) is None
        for m, want in ((16, None), (17, (4, 2, 4, 1, 2, 4)), (32, (4, 2, 4, 1, 2, 4)),
                        (33, None)):  # an entry of 4 token tiles: M = 17-32
            assert cw.staged_config(m, 1024, 4096, dev, torch.bfloat16, 1) == want
        monkeypatch.setenv("TPQUANT_STAGED_TUNED", "off")
        cw.staged_table.cache_clear()
        assert cw.staged_config(64, 4096, 4096, dev, torch.bfloat16, 1) is None
    finally:
        cw.staged_table.cache_clear()
    assert cw.staged_default(1) == cw.STAGED_CONFIGS[2][0]
    assert cw.staged_default(40) == cw.STAGED_CONFIGS[8][0]


@pytest.mark.parametrize("group,zeros", [(0, False), (128, True), (256, False)])
@pytest.mark.parametrize("capability,splits,want_splits", [
    ((9, 0), None, 3), ((9, 0), 5, 5), ((9, 0), 100, 8), ((8, 0), None, 1), ((8, 0), 4, 1)])
def test_staged_launch_geometry(monkeypatch, capability, splits, want_splits, group,
                                zeros) -> None:
    """What `staged_gemm` launches, with the kernels and the device stubbed out (CPU tensors):
    row blocks of 16 RT WR rows, the K splits (the rule under the H200's cluster counts, forced
    ones capped at 8, one below sm_90) as a cluster of that many blocks, dynamic shared memory
    opted in past 48 KiB, and the shape's launch worked out once; groupwise, the mode's kernel
    with the zeros and the group size."""
    import numpy as np
    import torch

    capacity = dict(zip(range(1, 9), (132, 66, 39, 30, 22, 17, 15, 15)))
    launches, opt_ins, counted = [], [], []
    monkeypatch.setattr(cw, "_STAGED_LAUNCHES", {})
    monkeypatch.setattr(cw, "_tiles_functions", lambda dev, dtype, names: names)
    monkeypatch.setattr(cw, "allow_dynamic_shared", lambda f, n, dev: opt_ins.append(n))
    monkeypatch.setattr(cw, "active_clusters", lambda f, threads, shared, cluster, dev:
                        counted.append(cluster) or capacity[cluster[1]])
    monkeypatch.setattr(cw, "sm_count", lambda dev: 132)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda dev: capability)
    monkeypatch.setattr(cw, "launch", lambda fn, grid, block, args, dev, pdl=False,
                        shared_mem=0, cluster=None: launches.append(
                            (fn, grid, block, args, shared_mem, cluster)))
    n, k, m = 4096, 4096, 64
    config = cw.STAGED_CONFIGS[8][0]  # (8, 2, 4, 2, 4, 3): 128 rows a block, 4 k-tiles a stage
    x = torch.zeros(m, k, dtype=torch.bfloat16)
    tiled = torch.zeros(n, k // 2, dtype=torch.uint8)
    out = torch.empty(m, n, dtype=torch.bfloat16)
    scale = torch.ones(k // group, n) if group else torch.ones(n)  # [K/g, N] groupwise
    zero_points = torch.zeros_like(scale) if zeros else None
    for _ in range(2):
        cw.staged_gemm(x, tiled, scale, None, out, config=config, splits=splits,
                       zeros=zero_points, group=group)
    assert len(launches) == 2 and launches[0] == launches[1]
    assert len(opt_ins) <= 1 and len(set(counted)) == len(counted)  # once per shape
    fn, grid, block, args, shared, cluster = launches[0]
    k_stages = k // 64 // 4
    per_split = -(-k_stages // want_splits)
    assert fn == f"wo_staged<{{dt}}, {cw.mode(4, group, zeros)}, 8, 2, 4, 2, 4, 3>"
    assert grid == (n // 128, -(-k_stages // per_split)) and block == (256,)
    assert int(args[-2]) == per_split and isinstance(args[-2], np.int32)
    assert int(args[-1]) == (group or 1) and int(args[3]) == (zero_points.data_ptr() if zeros
                                                               else 0)
    assert cluster == ((1, grid[1], 1) if grid[1] > 1 else None)
    assert shared == cw.staged_shared_bytes(config, 4) and opt_ins == [shared]


def test_staged_gemm_refuses_groups_it_cannot_read() -> None:
    """Groups that are not whole powers of two of k-tiles, groups on int8 codes, zeros without
    groups: refused before anything is compiled (CPU tensors)."""
    import torch

    x, out = torch.zeros(40, 256, dtype=torch.bfloat16), torch.empty(40, 64, dtype=torch.bfloat16)
    int4, int8 = torch.zeros(64, 128, dtype=torch.uint8), torch.zeros(64, 256, dtype=torch.int8)
    config = cw.STAGED_CONFIGS[8][0]
    for tiled, group, zeros in ((int4, 192, None), (int8, 128, None), (int4, 0, torch.zeros(64))):
        with pytest.raises(ValueError, match="groups"):
            cw.staged_gemm(x, tiled, torch.ones(64), None, out, config=config, group=group,
                           zeros=zeros)
