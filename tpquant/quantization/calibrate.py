"""Activation statistics for calibration: the per-input-channel abs-max of a layer's input.

SmoothQuant needs max|X_:j| per input channel j (for the smoothing factors) and the static
activation scale needs max|X'| (DESIGN s5). Both come from one running maximum, updated batch
by batch. A maximum is exact and order-free, so merging partial statistics (batches, or ranks
through an all_reduce with MAX) gives the same tensor as one pass over all the data.

Pure: no hooks into a model; the caller feeds the inputs it captured.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

import torch


@dataclass
class ActStats:
    """Running per-channel abs-max of inputs x[..., in_features], float32 [in_features]."""

    amax: torch.Tensor

    @staticmethod
    def empty(in_features: int, device: torch.device | str | None = None) -> ActStats:
        # Zero is the identity of a max over absolute values.
        return ActStats(torch.zeros(in_features, dtype=torch.float32, device=device))

    @property
    def in_features(self) -> int:
        return self.amax.shape[0]

    def update(self, x: torch.Tensor) -> ActStats:
        """Fold a batch x[..., in_features] (any float dtype) into the running max; returns self."""
        if x.shape[-1] != self.in_features:
            raise ValueError(
                f"input has {x.shape[-1]} channels, statistics have {self.in_features}"
            )
        if x.numel() == 0:
            return self
        # abs and max are exact in any float dtype, and widening to float32 is exact too.
        batch = x.detach().reshape(-1, self.in_features).abs().amax(dim=0).float()
        self.amax = torch.maximum(self.amax, batch.to(self.amax.device))
        return self

    def merge(self, other: ActStats) -> ActStats:
        """Elementwise max of two statistics, as a new ActStats (commutative, associative)."""
        if other.in_features != self.in_features:
            raise ValueError(f"cannot merge {self.in_features} and {other.in_features} channels")
        return ActStats(torch.maximum(self.amax, other.amax.to(self.amax.device)))


def collect(named_inputs: Iterable[tuple[str, torch.Tensor]]) -> dict[str, ActStats]:
    """Statistics per name over a stream of (layer name, input batch) pairs."""
    stats: dict[str, ActStats] = {}
    for name, x in named_inputs:
        if name not in stats:
            stats[name] = ActStats.empty(x.shape[-1], device=x.device)
        stats[name].update(x)
    return stats
