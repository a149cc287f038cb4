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
    """Whether groups of `group` input features (0: per channel) hold whole int4 tiles along K:
    the tiled kernels take one group's scale and zero for each tile."""
    return group % TILE_K[4] == 0


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


@functools.cache
def _positions(bits: int) -> torch.Tensor:
    """The layout as one permutation: entry TK r + f is where, among a tile's codes in memory
    order (int4: byte b's low nibble at 2 b, its high nibble at 2 b + 1), the code of the
    tile's row r and feature f lies (the module docstring's formulas)."""
    tk = TILE_K[bits]
    if bits == 4:
        lane, s, j = torch.meshgrid(torch.arange(32), torch.arange(4), torch.arange(8),
                                    indexing="ij")
        row = lane // 4 + 8 * (j & 1)
        feature = 16 * (lane % 4) + 4 * s + 2 * ((j >> 1) & 1) + (j >> 2)
        where = 32 * lane + 8 * s + j
    else:
        lane, b = torch.meshgrid(torch.arange(32), torch.arange(16), indexing="ij")
        row = lane // 4 + 8 * (b & 1)
        feature = 8 * (lane % 4) + 2 * (b >> 2) + ((b >> 1) & 1)
        where = 16 * lane + b
    positions = torch.empty(TILE_N * tk, dtype=torch.long)
    positions[(tk * row + feature).flatten()] = where.flatten()
    return positions


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
    tk = TILE_K[bits]
    by_tile = _codes(q, bits).reshape(n // 16, 16, k // tk, tk).permute(0, 2, 1, 3)
    by_tile = by_tile.reshape(n // 16, k // tk, 16 * tk)  # tk r + f
    ordered = torch.empty_like(by_tile)
    ordered[..., _positions(bits).to(q.device)] = by_tile
    return _bytes(ordered.reshape(n, k), bits)


def untile_codes(tiled: torch.Tensor, bits: int = 4) -> torch.Tensor:
    """The tiled layout's codes as [N, K] in k order: int4 unsigned uint8 0..15 (what
    `unpack_int4` of the stored layout gives, unsigned), int8 as stored."""
    n, k = _check(tiled, bits)
    tk = TILE_K[bits]
    memory = _codes(tiled, bits).reshape(n // 16, k // tk, 16 * tk)
    by_tile = memory[..., _positions(bits).to(tiled.device)]  # tk r + f
    return by_tile.reshape(n // 16, k // tk, 16, tk).permute(0, 2, 1, 3).reshape(n, k)


def untile(tiled: torch.Tensor, bits: int) -> torch.Tensor:
    """Inverse of `tile`: the tiled layout -> the stored one."""
    return _bytes(untile_codes(tiled, bits), bits)


def tile_int4(packed: torch.Tensor) -> torch.Tensor:
    """Stored packed int4 uint8 [N, K/2] -> the same codes in the tiled layout, uint8 [N, K/2]."""
    return tile(packed, 4)


def untile_int4(tiled: torch.Tensor) -> torch.Tensor:
    """Inverse of `tile_int4`: the tiled layout -> stored packed int4 uint8 [N, K/2]."""
    return untile(tiled, 4)
