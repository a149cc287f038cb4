"""The tiled layouts of int4 ("tiles16x64") and int8 ("tiles16x32") weights: the order the tiled
GEMV reads (wo_tiles in cpp/weight_only_gemv.cu, whose header draws them) and, with K permuted
inside each tile, CUTLASS's shuffled layout for its mixed-input GEMM (design notes 34, 35).

The stored layouts are int8 [N, K] and packed int4 uint8 [N, K/2], low nibble = even k
(`tpquant.quantization.packing`). A tiled weight has the same shape and bytes, reordered
within each 16-row tile of 512 bytes (64 int4 / 32 int8 features) so that a warp reads a tile
as 512 contiguous bytes and every lane's 16 bytes are its tensor-core A fragments for the
tile's k16 steps:

    tile (R, T) = rows 16 R .. 16 R + 15, features TK T .. TK T + TK - 1 (TK = 64 / 32), at
    byte (R * K/TK + T) * 512; lane l = 4 g + t:
    int4: word s (bytes 16 l + 4 s ..), nibble j holds
        row 16 R + g + 8 (j & 1), feature 64 T + 16 t + 4 s + 2 ((j >> 1) & 1) + (j >> 2)
    int8: byte b (16 l + b) holds
        row 16 R + g + 8 (b & 1), feature 32 T + 8 t + 2 (b >> 2) + ((b >> 1) & 1)

So an int4 word pairs rows g and g + 8 nibble by nibble, and an int8 word holds rows g, g + 8
at two adjacent features, bytes 0 / 2 and 1 / 3 being one A register's pair each.

Pure functions (torch, any device): `tile` / `untile` for either width, `untile_codes` (the
codes in k order, what the torch reference reads).
"""

from __future__ import annotations

import functools

import torch

LAYOUTS = {4: "tiles16x64", 8: "tiles16x32"}
TILE_N = 16
TILE_K = {4: 64, 8: 32}  # features per tile: 512 bytes either way
_CODES = {4: torch.uint8, 8: torch.int8}  # the stored dtype


def can_tile(n: int, k: int, bits: int = 4) -> bool:
    """Whether an [n, k] weight of `bits`-bit codes divides into tiles."""
    return n > 0 and k > 0 and n % TILE_N == 0 and k % TILE_K[bits] == 0


def groups_tile(group: int) -> bool:
    """Whether groups of `group` input features (0: per channel) suit the tiled kernels: whole
    int4 tiles along K, a power of two of them (the GEMV finds a tile's group by a shift and
    folds a group's sums where its run of tiles ends; 64, 128, 256, ... features)."""
    tiles, rest = divmod(group, TILE_K[4])
    return group == 0 or (rest == 0 and tiles & (tiles - 1) == 0)


def check_tileable(n: int, k: int, bits: int = 4) -> None:
    """ValueError unless an [n, k] weight divides into tiles."""
    if not can_tile(n, k, bits):
        raise ValueError(f"int{bits} tiles need N % {TILE_N} == 0 and K % {TILE_K[bits]} == 0, "
                         f"got N={n}, K={k}")


def code_bits(q: torch.Tensor) -> int:
    """The code width of a stored or tiled weight: 8 for int8, 4 for packed int4 (uint8)."""
    return 8 if q.dtype == torch.int8 else 4


def features(q: torch.Tensor, bits: int) -> int:
    """K of a stored or tiled weight (two int4 codes per byte)."""
    return q.shape[1] * (2 if bits == 4 else 1)


def _check(q: torch.Tensor, bits: int) -> tuple[int, int]:
    if bits not in TILE_K:
        raise ValueError(f"tiles hold int4 or int8 codes, got bits={bits}")
    if q.dtype != _CODES[bits] or q.dim() != 2:
        what = "packed uint8 [N, K/2]" if bits == 4 else "int8 [N, K]"
        raise TypeError(f"int{bits} tiles take {what}, got {q.dtype} {tuple(q.shape)}")
    n, k = q.shape[0], features(q, bits)
    check_tileable(n, k, bits)
    return n, k


# The layouts as permutations of index bits. A tile's codes in memory order (int4: byte b's low
# nibble at 2 b, its high nibble at 2 b + 1) split into the lane's (g, t) and the code's place
# in the lane's 16 bytes, and the docstring's formulas regroup those into (row, feature):
#   int8:  memory (g 8, t 4, w 4, c 2, h 2), byte b = 4 w + 2 c + h:
#          row = g + 8 h, feature = 8 t + 2 w + c      -> (h, g) x (t, w, c)
#   int4:  memory (g 8, t 4, s 4, j2 2, j1 2, j0 2), nibble j of word s:
#          row = g + 8 j0, feature = 16 t + 4 s + 2 j1 + j2   -> (j0, g) x (t, s, j1, j2)
# _MEMORY: a tile's memory dims; _TO_ROWS: where each dim of [N/16, (row dims), K/TK, (feature
# dims)] comes from in [N/16, K/TK, memory dims].
_MEMORY = {8: (8, 4, 4, 2, 2), 4: (8, 4, 4, 2, 2, 2)}
_TO_ROWS = {8: (0, 6, 2, 1, 3, 4, 5), 4: (0, 7, 2, 1, 3, 4, 6, 5)}


def _inverse(order: tuple[int, ...]) -> tuple[int, ...]:
    return tuple(sorted(range(len(order)), key=order.__getitem__))


@functools.cache
def _positions(bits: int) -> torch.Tensor:
    """The tables above as one permutation of a tile: entry TK r + f is where, among the tile's
    codes in memory order, the code of its row r and feature f lies."""
    within = [i - 2 for i in _TO_ROWS[bits] if i >= 2]  # the tile's own dims
    return torch.arange(TILE_N * TILE_K[bits]).reshape(_MEMORY[bits]).permute(within).flatten()


# How the codes move (CPU, measured): int8 as one permute of the tables' dims, 5x faster than a
# gather through `_positions`; int4, whose unpacked nibbles make more and smaller dims, through
# the gather, 3.5x faster than the permute.
def _to_rows(memory: torch.Tensor, n: int, k: int, bits: int) -> torch.Tensor:
    """A tiled weight's codes in memory order -> [N, K] in k order."""
    tk = TILE_K[bits]
    if bits == 8:
        by_dims = memory.reshape(n // TILE_N, k // tk, *_MEMORY[bits])
        return by_dims.permute(_TO_ROWS[bits]).reshape(n, k)
    by_tile = memory.reshape(n // TILE_N, k // tk, -1)[..., _positions(bits).to(memory.device)]
    return by_tile.reshape(n // TILE_N, k // tk, TILE_N, tk).permute(0, 2, 1, 3).reshape(n, k)


def _to_tiles(codes: torch.Tensor, n: int, k: int, bits: int) -> torch.Tensor:
    """Inverse of `_to_rows`."""
    tk = TILE_K[bits]
    if bits == 8:
        dims = (n // TILE_N, k // tk, *_MEMORY[bits])
        by_rows = codes.reshape([dims[i] for i in _TO_ROWS[bits]])
        return by_rows.permute(_inverse(_TO_ROWS[bits])).reshape(n, k)
    by_tile = codes.reshape(n // TILE_N, TILE_N, k // tk, tk).permute(0, 2, 1, 3)
    by_tile = by_tile.reshape(n // TILE_N, k // tk, TILE_N * tk)
    ordered = torch.empty_like(by_tile)
    ordered[..., _positions(bits).to(codes.device)] = by_tile
    return ordered.reshape(n, k)


def _codes(q: torch.Tensor, bits: int) -> torch.Tensor:
    """[N, K] codes of the bytes in memory order (int4: nibbles unpacked, unsigned)."""
    if bits == 8:
        return q
    return torch.stack((q & 0xF, q >> 4), dim=-1).reshape(q.shape[0], -1)


def _bytes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Inverse of `_codes`."""
    return codes if bits == 8 else codes[:, 0::2] | (codes[:, 1::2] << 4)


def tile(q: torch.Tensor, bits: int) -> torch.Tensor:
    """A stored weight (int8 [N, K], or packed int4 uint8 [N, K/2]) -> the same codes in the
    tiled layout, same dtype and shape."""
    n, k = _check(q, bits)
    return _bytes(_to_tiles(_codes(q, bits), n, k, bits), bits)


def untile_codes(tiled: torch.Tensor, bits: int = 4) -> torch.Tensor:
    """The tiled layout's codes as [N, K] in k order: int4 unsigned uint8 0..15 (what
    `unpack_int4` of the stored layout gives, unsigned), int8 as stored."""
    n, k = _check(tiled, bits)
    return _to_rows(_codes(tiled, bits), n, k, bits)


def untile(tiled: torch.Tensor, bits: int) -> torch.Tensor:
    """Inverse of `tile`: the tiled layout -> the stored one."""
    return _bytes(untile_codes(tiled, bits), bits)


def tile_int4(packed: torch.Tensor) -> torch.Tensor:
    """Stored packed int4 uint8 [N, K/2] -> the same codes in the tiled layout, uint8 [N, K/2]."""
    return tile(packed, 4)


def untile_int4(tiled: torch.Tensor) -> torch.Tensor:
    """Inverse of `tile_int4`: the tiled layout -> stored packed int4 uint8 [N, K/2]."""
    return untile(tiled, 4)
