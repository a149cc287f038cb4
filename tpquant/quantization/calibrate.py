"""Activation statistics for calibration: the per-input-channel abs-max of a layer's input.

SmoothQuant needs max|X_:j| per input channel j (for the smoothing factors) and the static
activation scale needs max|X'| (DESIGN s5). Both come from one running maximum, updated batch
by batch. A maximum is exact and order-free, so merging partial statistics (batches, or ranks
through an all_reduce with MAX) gives the same tensor as one pass over all the data.

`ActStats` and `collect` are pure; `calibrate` runs a model with forward pre-hooks on its
linears and combines the ranks' statistics with all_reduce(max). `calibrate_hessians` runs
the same hooks for GPTQ, which needs each layer's X^T X (tpquant.quantization.gptq).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable, Sequence

import torch

from tpquant.collectives import Communicator, gather_columns
from tpquant.layers.linear import ShardedLinear
from tpquant.quantization.gptq import hessian_update


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
        _record(stats, name, x)
    return stats


def _record(stats: dict[str, ActStats], name: str, x: torch.Tensor) -> None:
    if name not in stats:
        stats[name] = ActStats.empty(x.shape[-1], device=x.device)
    stats[name].update(x)


# -- calibrating a model ----------------------------------------------------------------------


def _layer_name(module_name: str) -> str:
    # The model's module path ("layers.3.attention.qkv") in load_llama's layer naming
    # ("model.layers.3.attention.qkv"); "lm_head" stays as it is.
    return "model." + module_name if module_name.startswith("layers.") else module_name


@torch.no_grad()
def calibrate(
    model: torch.nn.Module, token_batches: Iterable[torch.Tensor], comm: Communicator
) -> dict[str, torch.Tensor]:
    """Per-input-channel abs-max of every ShardedLinear's input over the calibration text.

    model: a FLOAT model (the statistics are of the unquantized activations) at any TP size,
        run by every rank of `comm` in lockstep; token_batches: [B, T] token tensors, the same
        on every rank, each starting at position 0 (T <= the model's max_seq).
    Returns layer name ("model.layers.{i}.attention.qkv", ..., "lm_head") -> float32 [in], the
    FULL input width in the model's layout (o_proj: padded heads * head_dim), equal on every
    rank. Column layers see the whole input; a row layer sees this rank's slice, which is
    placed at the rank's offset of a zero vector and combined with all_reduce(max). Maxima are
    exact, so the result equals TP 1's up to the summation order of the activations.
    """
    linears = _linears(model)
    stats: dict[str, ActStats] = {}
    _run_hooked(model, linears, token_batches,
                lambda name, linear, x: _record(stats, name, x))
    _check_all_ran(linears, stats)
    result: dict[str, torch.Tensor] = {}
    for name, m in linears.items():
        local = stats[name].amax
        full = torch.zeros(m.in_features, dtype=torch.float32, device=local.device)
        if m.style == "row":
            width = m.in_features // m.mapping.tp_size
            full[m.mapping.tp_rank * width : (m.mapping.tp_rank + 1) * width] = local
        else:
            full.copy_(local)
        # max over ranks: gathers the row slices, and makes column statistics bitwise equal
        result[name] = comm.all_reduce(full, op="max")
    return result


@torch.no_grad()
def calibrate_hessians(
    model: torch.nn.Module, token_batches: Iterable[torch.Tensor], comm: Communicator,
    skip: Sequence[str] = ("lm_head",),
) -> dict[str, torch.Tensor]:
    """H = X^T X of every ShardedLinear's input over the calibration text, float64 [in, in].

    Same contract as `calibrate` (a FLOAT model at any TP size, every rank of `comm` in
    lockstep, names "model.layers.{i}.attention.qkv", ...), minus the layers in `skip`.
    A row layer's input is gathered back to its full width first (`gather_columns`; H has
    cross terms between ranks' slices); every H is then broadcast from rank 0, so all ranks
    hold the same bits. Memory: sum of in^2 * 8 bytes over the layers.
    """
    linears = _linears(model, skip)
    hessians: dict[str, torch.Tensor] = {}

    def record(name: str, linear: ShardedLinear, x: torch.Tensor) -> None:
        if linear.style == "row":
            x = gather_columns(x.contiguous(), comm)
        hessians[name] = hessian_update(hessians.get(name), x)

    _run_hooked(model, linears, token_batches, record)
    _check_all_ran(linears, hessians)
    for name in linears:
        comm.broadcast(hessians[name], root=0)
    return hessians


def _linears(model: torch.nn.Module, skip: Sequence[str] = ()) -> dict[str, ShardedLinear]:
    """The model's ShardedLinears by load_llama's layer names, less those in `skip`."""
    return {_layer_name(name): m for name, m in model.named_modules()
            if isinstance(m, ShardedLinear) and _layer_name(name) not in skip}


def _run_hooked(
    model: torch.nn.Module, linears: dict[str, ShardedLinear],
    token_batches: Iterable[torch.Tensor],
    record: Callable[[str, ShardedLinear, torch.Tensor], None],
) -> None:
    """Run the model over the batches, calling record(name, linear, input) at every linear."""
    def hook_for(name: str):
        return lambda module, args: record(name, module, args[0])

    handles = [m.register_forward_pre_hook(hook_for(name)) for name, m in linears.items()]
    try:
        for tokens in token_batches:
            model(tokens, 0)
    finally:
        for h in handles:
            h.remove()


def _check_all_ran(linears: dict[str, ShardedLinear], seen: dict) -> None:
    for name in linears:
        if name not in seen:
            raise RuntimeError(f"calibration never ran {name}: no calibration tokens?")


def text_token_batches(
    tokens: Sequence[int], window: int, device: torch.device | str | None = None
) -> list[torch.Tensor]:
    """Consecutive windows [1, window] of a token list (a shorter last one is kept)."""
    if window < 1:
        raise ValueError(f"window must be >= 1, got {window}")
    ids = torch.tensor(list(tokens), dtype=torch.long, device=device)
    return [ids[i : i + window][None] for i in range(0, ids.numel(), window)]
