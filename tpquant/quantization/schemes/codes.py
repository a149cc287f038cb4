"""Where a weight-only scheme keeps its codes: "qweight" (the stored layout: int8, or int4 packed
two per byte) or "qweight_tiles" (`tpquant.kernels.tiles`' layout, made by `Scheme.pack` after
sharding, since a tile does not split along K). WeightOnly (int8 / int4) and Groupwise share
these rules; the tensor's name says which layout an engine file holds.
"""

from __future__ import annotations

import torch

from tpquant.kernels.tiles import can_tile, code_bits, features, tile, untile
from tpquant.quantization.schemes.base import Tensors

STORED = "qweight"
TILED = "qweight_tiles"


def codes_name(tensors: Tensors | None) -> str:
    """The name the codes go by in `tensors` (None: the stored form `quantize` makes)."""
    return TILED if tensors is not None and TILED in tensors else STORED


def codes(tensors: Tensors) -> tuple[torch.Tensor, bool]:
    """(the codes, whether they are tiled)."""
    name = codes_name(tensors)
    return tensors[name], name == TILED


def tile_codes(tensors: Tensors, allowed: bool, bits: int) -> dict[str, torch.Tensor]:
    """`tensors` with the stored `bits`-bit codes tiled where `allowed` (the scheme's
    conditions) and the [out, in] shape divides into tiles; tiled codes stay as they are."""
    out = dict(tensors)
    q = out.get(STORED)
    if allowed and q is not None and can_tile(q.shape[0], features(q, bits), bits):
        out[TILED] = tile(out.pop(STORED), bits)
    return out


def stored_codes(tensors: Tensors) -> dict[str, torch.Tensor]:
    """`tensors` with tiled codes put back in the stored layout (for the torch reference on the
    CPU, which reads the stored layout directly and would otherwise untile at every call)."""
    out = dict(tensors)
    q = out.pop(TILED, None)
    if q is not None:
        out[STORED] = untile(q, code_bits(q))
    return out
