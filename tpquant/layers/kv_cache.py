"""One layer's KV cache on one rank: its own KV heads only, preallocated (DESIGN s8).

    k, v     [max_batch, max_seq, Hkv, hd]   model dtype, or int8 with the INT8_KV_CACHE flag
    k_scale, v_scale  [max_batch, max_seq, Hkv]  float32, int8 cache only

The INT8 cache keeps one symmetric scale per (row, position, KV head): scale = max|x| / 127
over the head's hd values (`tpquant.quantization.numerics`, the one place for that rule), so
every cached vector is within scale / 2 per element of its float value. Attention reads
dequantized values (`read`; the decode kernel dequantizes the same way in registers).

Writes go through `index_copy_` on the flattened [max_batch * max_seq] axis, or, for a float
cache on CUDA, one Triton kernel that does the same (`tpquant.kernels.triton_kv`): positions
are a device tensor and nothing syncs with the host, so a write can be captured in a CUDA graph.
"""

from __future__ import annotations

import torch
from torch import nn

from tpquant.kernels import has_triton
from tpquant.quantization.numerics import INT8_MAX, quantize_symmetric, symmetric_scale


def quantize_kv(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-(token, head) int8: x [..., hd] -> (q int8 [..., hd], scale float32 [...])."""
    scale = symmetric_scale(x.detach().abs().amax(dim=-1), INT8_MAX)
    return quantize_symmetric(x, scale[..., None], INT8_MAX), scale


def dequantize_kv(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """q [..., hd] * scale [...] in float32, returned in `dtype`."""
    return (q.float() * scale[..., None]).to(dtype)


class KVCache(nn.Module):
    """Keys and values of this rank's KV heads for max_batch rows of max_seq positions."""

    def __init__(
        self,
        max_batch: int,
        max_seq: int,
        n_kv_heads: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device | str | None = None,
        int8: bool = False,
    ) -> None:
        super().__init__()
        self.dtype, self.int8 = dtype, int8
        shape = (max_batch, max_seq, n_kv_heads, head_dim)
        store = torch.int8 if int8 else dtype
        for name in ("k", "v"):
            self.register_buffer(name, torch.zeros(shape, dtype=store, device=device), persistent=False)
            scale = torch.ones(shape[:3], device=device) if int8 else None
            self.register_buffer(name + "_scale", scale, persistent=False)

    @property
    def max_batch(self) -> int:
        return self.k.shape[0]

    @property
    def max_seq(self) -> int:
        return self.k.shape[1]

    def write(self, pos: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store k, v [B, T, Hkv, hd] of rows 0..B-1 at positions pos [B, T]."""
        B, T = pos.shape
        if not self.int8 and self.k.is_cuda and has_triton():
            from tpquant.kernels.triton_kv import write_kv

            return write_kv(self.k, self.v, pos, k, v)
        rows = torch.arange(B, device=pos.device)[:, None]  # [B, 1]
        flat = (rows * self.max_seq + pos).reshape(B * T)  # index into [max_batch * max_seq]
        for cache, scale, x in ((self.k, self.k_scale, k), (self.v, self.v_scale, v)):
            x = x.reshape(B * T, *x.shape[2:])  # [B*T, Hkv, hd]
            if self.int8:
                q, s = quantize_kv(x)
                cache.view(-1, *cache.shape[2:]).index_copy_(0, flat, q)
                scale.view(-1, scale.shape[2]).index_copy_(0, flat, s)
            else:
                cache.view(-1, *cache.shape[2:]).index_copy_(0, flat, x.to(cache.dtype))

    def read(self, B: int, kv_len: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Rows 0..B-1, positions 0..kv_len-1 as [B, kv_len, Hkv, hd] in the model dtype."""
        k, v = self.k[:B, :kv_len], self.v[:B, :kv_len]
        if self.int8:
            k = dequantize_kv(k, self.k_scale[:B, :kv_len], self.dtype)
            v = dequantize_kv(v, self.v_scale[:B, :kv_len], self.dtype)
        return k, v

    def update(
        self, pos: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_len: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Write k, v [B, T, Hkv, hd] at positions pos [B, T]; return `read(B, kv_len)`."""
        self.write(pos, k, v)
        return self.read(k.shape[0], kv_len)

    def nbytes(self) -> int:
        """Device memory held by this cache (values and scales)."""
        return sum(t.numel() * t.element_size() for t in self.buffers())

    def extra_repr(self) -> str:
        return f"shape={tuple(self.k.shape)}, {'int8' if self.int8 else self.dtype}"
