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

import functools

import torch

LAYOUT = "tiles16x64"
TILE_N, TILE_K = 16, 64


def can_tile(n: int, k: int) -> bool:
    """Whether an [n, k] weight divides into tiles."""
    return n > 0 and k > 0 and n % TILE_N == 0 and k % TILE_K == 0


def groups_tile(group: int) -> bool:
    """Whether groups of `group` input features (0: per channel) hold whole tiles along K: the
    tiled kernels take one group's scale and zero for each tile."""
    return group % TILE_K == 0


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


@functools.cache
def _positions() -> torch.Tensor:
    """The layout as one permutation: entry 64 r + f is where, among a tile's 1024 codes in
    memory order (byte b's low nibble at 2 b, its high nibble at 2 b + 1), the code of the
    tile's row r and feature f lies (the module docstring's formula)."""
    lane, s, j = torch.meshgrid(torch.arange(32), torch.arange(4), torch.arange(8),
                                indexing="ij")
    g, t = lane // 4, lane % 4
    row = g + 8 * (j & 1)
    feature = 16 * t + 4 * s + 2 * ((j >> 1) & 1) + (j >> 2)
    positions = torch.empty(16 * 64, dtype=torch.long)
    positions[(64 * row + feature).flatten()] = (32 * lane + 8 * s + j).flatten()
    return positions


def tile_int4(packed: torch.Tensor) -> torch.Tensor:
    """Stored packed int4 uint8 [N, K/2] -> the same codes in the tiled layout, uint8 [N, K/2]."""
    n, k = _check(packed)
    codes = torch.stack((packed & 0xF, packed >> 4), dim=-1).reshape(n // 16, 16, k // 64, 64)
    by_tile = codes.permute(0, 2, 1, 3).reshape(n // 16, k // 64, 1024)  # 64 r + f
    ordered = torch.empty_like(by_tile)
    ordered[..., _positions().to(packed.device)] = by_tile
    return (ordered[..., 0::2] | (ordered[..., 1::2] << 4)).reshape(n, k // 2)


def untile_codes(tiled: torch.Tensor) -> torch.Tensor:
    """The tiled layout's 4-bit codes as uint8 [N, K] in k order (what `unpack_int4` of the
    stored layout gives, unsigned), for the reference's dequantization."""
    n, k = _check(tiled)
    codes = torch.stack((tiled & 0xF, tiled >> 4), dim=-1).reshape(n // 16, k // 64, 1024)
    by_tile = codes[..., _positions().to(tiled.device)]  # 64 r + f
    return by_tile.reshape(n // 16, k // 64, 16, 64).permute(0, 2, 1, 3).reshape(n, k)


def untile_int4(tiled: torch.Tensor) -> torch.Tensor:
    """Inverse of `tile_int4`: the tiled layout -> stored packed int4 uint8 [N, K/2]."""
    codes = untile_codes(tiled)
    return codes[:, 0::2] | (codes[:, 1::2] << 4)
