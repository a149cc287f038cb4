"""The "tiles16x64" layout of int4 weights: the order the tiled GEMV reads (wo_tiles in
cpp/weight_only_gemv.cu, whose header draws it).

The stored layout is packed uint8 [N, K/2], low nibble = even k (`tpquant.quantization.packing`).
The tiled one has the same shape and bytes, reordered within each 16-row x 64-feature tile so
that a warp reads one tile as 512 contiguous bytes and every lane's 16 bytes are its tensor-core
A fragments for the tile's four k16 steps:

    tile (R, T) = rows 16 R .. 16 R + 15, features 64 T .. 64 T + 63, at byte (R * K/64 + T) * 512
    lane l = 4 g + t, word s (bytes 16 l + 4 s ..): nibble j holds
        row 16 R + g + 8 (j & 1), feature 64 T + 16 t + 4 s + 2 ((j >> 1) & 1) + (j >> 2)

Pure functions (torch, any device): `tile_int4` and its inverse `untile_int4`, which the torch
reference uses to read a tiled weight.
"""

from __future__ import annotations

import torch

LAYOUT = "tiles16x64"
TILE_N, TILE_K = 16, 64


def can_tile(n: int, k: int) -> bool:
    """Whether an [n, k] weight divides into tiles."""
    return n > 0 and k > 0 and n % TILE_N == 0 and k % TILE_K == 0


def check_tileable(n: int, k: int) -> None:
    """ValueError unless an [n, k] weight divides into tiles."""
    if not can_tile(n, k):
        raise ValueError(f"int4 tiles need N % {TILE_N} == 0 and K % {TILE_K} == 0, "
                         f"got N={n}, K={k}")


def _check(packed: torch.Tensor) -> tuple[int, int]:
    if packed.dtype != torch.uint8 or packed.dim() != 2:
        raise TypeError(f"int4 tiles take packed uint8 [N, K/2], got {packed.dtype} "
                        f"{tuple(packed.shape)}")
    n, k = packed.shape[0], 2 * packed.shape[1]
    check_tileable(n, k)
    return n, k


# Codes [N, K] viewed as (R, h, g, T, t, s, c_hi, c_lo): row 16 R + 8 h + g, feature
# 64 T + 16 t + 4 s + 2 c_hi + c_lo. The tiled order is (R, T, g, t, s, c_lo, c_hi, h), whose
# last three dimensions are the nibble index j = 4 c_lo + 2 c_hi + h.
_TO_TILES = (0, 3, 2, 4, 5, 7, 6, 1)
_FROM_TILES = tuple(_TO_TILES.index(i) for i in range(8))


def _view(codes: torch.Tensor, n: int, k: int) -> torch.Tensor:
    return codes.reshape(n // 16, 2, 8, k // 64, 4, 4, 2, 2)


def tile_int4(packed: torch.Tensor) -> torch.Tensor:
    """Stored packed int4 uint8 [N, K/2] -> the same codes in the tiled layout, uint8 [N, K/2]."""
    n, k = _check(packed)
    codes = torch.stack((packed & 0xF, packed >> 4), dim=-1)  # [N, K/2, 2]: k order
    tiled = _view(codes, n, k).permute(_TO_TILES).reshape(-1, 2)  # nibbles j = 2b, 2b + 1
    return (tiled[:, 0] | (tiled[:, 1] << 4)).reshape(n, k // 2)


def untile_int4(tiled: torch.Tensor) -> torch.Tensor:
    """Inverse of `tile_int4`: the tiled layout -> stored packed int4 uint8 [N, K/2]."""
    n, k = _check(tiled)
    codes = torch.stack((tiled & 0xF, tiled >> 4), dim=-1)  # nibble j = 2b, 2b + 1
    shape = (n // 16, k // 64, 8, 4, 4, 2, 2, 2)  # (R, T, g, t, s, c_lo, c_hi, h)
    ordered = codes.reshape(shape).permute(_FROM_TILES).reshape(n, k // 2, 2)
    return ordered[..., 0] | (ordered[..., 1] << 4)
