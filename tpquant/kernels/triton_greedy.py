"""Greedy decoding's choice and the next position in one Triton kernel, at the end of a decode
step's CUDA graph (`tpquant.engine.graphs`): the step's output becomes the next step's input
on the device, so between two steps the host queues only the tokens' copy to itself and the
graph's launch, not torch's argmax, an add and two copies (design note 47).

    logits [B, V] -> tokens[b] = the first index of row b's largest logit (torch.argmax's
    choice), pos[b] = min(pos[b] + 1, last)

Logits are taken as finite: torch.argmax returns a NaN's index, while this kernel's choice in a
row holding a NaN is whatever Triton's max and argmax make of it (not checked).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

from tpquant.kernels import pdl

_BLOCK = 8192  # a row in few blocks: every block's load is in flight before any is reduced


@triton.jit
def _greedy_kernel(LOGITS, TOKENS, POS, stride_l, last, V: tl.constexpr, BLOCK: tl.constexpr,
                   PDL: tl.constexpr):
    if PDL:  # tpquant.kernels.pdl: wait for the kernel before, then let the next one start
        gdc_wait()
        gdc_launch_dependents()
    b = tl.program_id(0)
    offs = tl.arange(0, BLOCK)
    row = LOGITS + b * stride_l
    best = float("-inf")
    token = 0
    for start in tl.static_range(0, V, BLOCK):  # V is the model's: one compile per vocabulary
        v = tl.load(row + start + offs, mask=start + offs < V, other=float("-inf")).to(tl.float32)
        m = tl.max(v, 0)
        i = tl.argmax(v, 0, tie_break_left=True)
        take = m > best  # strictly: an earlier block keeps a tie, as torch.argmax does
        token = tl.where(take, start + i, token)
        best = tl.where(take, m, best)
    tl.store(TOKENS + b, token.to(tl.int64))
    tl.store(POS + b, tl.minimum(tl.load(POS + b) + 1, last))


def greedy_advance(logits: torch.Tensor, tokens: torch.Tensor, pos: torch.Tensor,
                   last: int) -> None:
    """tokens [B] (int64) = argmax of logits [B, V] per row; pos [B] (int64) += 1, at most
    `last`. In place, no host synchronisation (CUDA-graph safe)."""
    B, V = logits.shape
    if (tokens.shape != (B,) or pos.shape != (B,) or tokens.dtype != torch.long
            or pos.dtype != torch.long or not tokens.is_contiguous() or not pos.is_contiguous()
            or logits.stride(1) != 1):
        raise ValueError(f"greedy_advance: logits {tuple(logits.shape)} (rows of contiguous "
                         f"logits), tokens {tuple(tokens.shape)} {tokens.dtype}, pos "
                         f"{tuple(pos.shape)} {pos.dtype} (contiguous int64 [B])")
    _greedy_kernel[(B,)](logits, tokens, pos, logits.stride(0), last, V=V, BLOCK=_BLOCK,
                         num_warps=8, **pdl.triton_args(logits.device))
