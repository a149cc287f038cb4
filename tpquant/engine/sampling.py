"""Choosing the next token from logits: greedy, temperature, top-k, top-p.

Only rank 0 samples (DESIGN s8); it broadcasts the chosen tokens, so ranks never diverge even
where sampling is random. Pure functions over a [batch, vocab] logits tensor, and
`greedy_advance`, the in-place greedy choice that ends a decode step's CUDA graph (every rank
makes it there; rank 0's is still the one broadcast).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.0  # 0 = greedy
    top_k: int = 0  # 0 = no top-k cut
    top_p: float = 1.0  # 1 = no nucleus cut
    seed: int = 0

    def __post_init__(self) -> None:
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def sample(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None = None) -> torch.Tensor:
    """Next token per row of logits [batch, vocab] -> [batch] int64."""
    if params.greedy:
        return logits.argmax(dim=-1)
    logits = logits.float() / params.temperature
    if params.top_k:
        kth = torch.topk(logits, min(params.top_k, logits.shape[-1]), dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if params.top_p < 1:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = sorted_logits.softmax(dim=-1)
        # drop a token when the tokens ranked above it already hold top_p of the mass;
        # the most likely token is always kept
        drop = probs.cumsum(dim=-1) - probs >= params.top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    probs = logits.softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def greedy_advance(logits: torch.Tensor, tokens: torch.Tensor, pos: torch.Tensor,
                   last: int) -> None:
    """In place: tokens [B] = logits [B, V].argmax(-1), pos [B] = min(pos + 1, last). The
    Triton kernel on CUDA (one launch, inside the decode step's graph), torch otherwise."""
    if logits.is_cuda:
        from tpquant.kernels.triton_greedy import greedy_advance as triton_greedy_advance

        triton_greedy_advance(logits, tokens, pos, last)
        return
    tokens.copy_(logits.argmax(dim=-1))
    pos.add_(1).clamp_(max=last)
