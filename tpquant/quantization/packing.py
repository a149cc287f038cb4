"""INT4 packing: two 4-bit values per uint8 byte, along the last dimension.

The last dimension is the input-feature dimension of W[out, in], so a packed weight is
uint8 [out, in / 2] and a row split (row-parallel TP) cuts whole bytes when every rank's
in_features is even.

Nibble order (the contract with every kernel that reads packed weights):

    byte j of a row = (v[2j] & 0xF) | ((v[2j + 1] & 0xF) << 4)

i.e. the LOW nibble holds the even index and the HIGH nibble the odd index. Signed values
(int8 in [-8, 7]) are stored as their 4-bit two's complement (-1 -> 0xF, -8 -> 0x8) and
sign-extended on unpack; unsigned values (uint8 in [0, 15]) are stored as they are.
"""

from __future__ import annotations

import torch

_RANGES = {torch.int8: (-8, 7), torch.uint8: (0, 15)}


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """Pack int8 in [-8, 7] (signed) or uint8 in [0, 15] (unsigned) into uint8 [..., n / 2].

    Raises TypeError for another dtype, ValueError for an odd last dimension or a value
    outside the dtype's 4-bit range.
    """
    if q.dtype not in _RANGES:
        raise TypeError(f"pack_int4 takes int8 (signed) or uint8 (unsigned), got {q.dtype}")
    if q.dim() == 0 or q.shape[-1] % 2:
        raise ValueError(f"pack_int4 needs an even last dimension, got shape {tuple(q.shape)}")
    lo, hi = _RANGES[q.dtype]
    if q.numel() and (int(q.min()) < lo or int(q.max()) > hi):
        raise ValueError(
            f"pack_int4: {q.dtype} values must lie in [{lo}, {hi}], "
            f"got [{int(q.min())}, {int(q.max())}]"
        )
    # int16 so that the shift by 4 cannot overflow; & 0xF turns -8..-1 into 8..15.
    v = q.to(torch.int16) & 0xF
    return (v[..., 0::2] | (v[..., 1::2] << 4)).to(torch.uint8)


def unpack_int4(p: torch.Tensor, signed: bool) -> torch.Tensor:
    """Inverse of `pack_int4`: uint8 [..., m] -> int8 [..., 2m] (signed) or uint8 [..., 2m]."""
    if p.dtype != torch.uint8:
        raise TypeError(f"unpack_int4 takes packed uint8, got {p.dtype}")
    if p.dim() == 0:
        raise ValueError("unpack_int4 needs at least one dimension")
    v = p.to(torch.int16)
    v = torch.stack((v & 0xF, v >> 4), dim=-1).reshape(*p.shape[:-1], 2 * p.shape[-1])
    if signed:
        return ((v ^ 8) - 8).to(torch.int8)  # sign-extend bit 3
    return v.to(torch.uint8)
