"""GPTQ: round a weight one input column at a time, correcting the columns not yet rounded.

Round-to-nearest (RTN) rounds every weight on its own. GPTQ (Frantar et al., 2022) rounds the
columns of W[out, in] in order and, after each, spreads its rounding error over the columns
still to come so that the layer's OUTPUT on calibration inputs X changes least:

    minimise ||X W^T - X Q^T||^2,   H = X^T X  [in, in]   (accumulated by `hessian_update`)

With U the upper Cholesky factor of H^-1 (after damping H's diagonal by `damp` times its
mean), column j's error e = (w_j - q_j) / U[j, j] is subtracted, times U[j, k], from every
column k > j. Work goes in blocks of `block` columns (the lazy batch update of the paper).

The order of the columns matters. With `act_order` (the default) they go by decreasing
H[j, j], the most-used inputs first, while the columns still to come can absorb their
errors; on SmolLM2 this is what makes GPTQ beat round-to-nearest for per-channel int4
(docs/benchmarks.md). Without it they go in index order.

The grid is the scheme's own: a `Grid` says how to round one column given the parameters
(scales, zeros) of its row or group, and how those parameters come from weights. Per-row
grids take their parameters from the whole ORIGINAL weight; so do group grids under
act_order (a group's columns are no longer consecutive), and in index order each group's
from its weights as they stand when GPTQ reaches its first column (the corrected ones). The
result is a float W whose every value lies on the grid, and the statistics that give the
same grid back: `Scheme.quantize(W, statistics=...)` then stores exactly what GPTQ chose.

Pure functions on torch tensors (float64 inside); nothing here knows of ranks or files.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Protocol

import torch

from tpquant.quantization import numerics
from tpquant.quantization.schemes import Groupwise, Scheme, WeightOnly

Tensors = dict[str, torch.Tensor]


def hessian_update(h: torch.Tensor | None, x: torch.Tensor) -> torch.Tensor:
    """h + X^T X for inputs x [..., in] (flattened to rows), float64 [in, in]."""
    x = x.detach().reshape(-1, x.shape[-1]).double()
    xtx = x.t() @ x
    return xtx if h is None else h + xtx.to(h.device)


class Grid(Protocol):
    """How one scheme rounds: per row, or per group of `group_size` input columns."""

    group_size: int | None  # None: one set of parameters per row, from the whole weight

    def fit(self, w: torch.Tensor) -> Tensors:
        """Parameters and statistics of weights w [out, k] (k = in, or one group)."""
        ...

    def round(self, column: torch.Tensor, params: Tensors) -> torch.Tensor:
        """The grid value nearest to each weight of one column [out], float64."""
        ...


@dataclass(frozen=True)
class Symmetric:
    """scale = max|w| / qmax, per row from the whole weight (WeightOnly int8/int4: statistic
    "amax"), or per group (Groupwise int4 without zeros: "group_amax")."""

    qmax: int
    group_size: int | None = None

    def fit(self, w: torch.Tensor) -> Tensors:
        amax = w.float().abs().amax(dim=1)
        name = "amax" if self.group_size is None else "group_amax"
        return {name: amax, "scale": numerics.symmetric_scale(amax, self.qmax)}

    def round(self, column: torch.Tensor, params: Tensors) -> torch.Tensor:
        s = params["scale"]
        return (numerics.quantize_symmetric(column, s, self.qmax).float() * s).double()


@dataclass(frozen=True)
class AsymmetricGroups:
    """Groupwise int4 with zeros: (scale, zero) from each group's [min, max] (Groupwise)."""

    group_size: int

    def fit(self, w: torch.Tensor) -> Tensors:
        lo, hi = w.float().amin(dim=1), w.float().amax(dim=1)
        scale, zero = numerics.asymmetric_params(lo, hi)
        return {"group_min": lo, "group_max": hi, "scale": scale, "zero": zero}

    def round(self, column: torch.Tensor, params: Tensors) -> torch.Tensor:
        s, z = params["scale"], params["zero"]
        return ((numerics.quantize_asymmetric(column, s, z).float() - z) * s).double()


def gptq(
    weight: torch.Tensor, hessian: torch.Tensor, grid: Grid, damp: float = 0.01,
    block: int = 128, act_order: bool = True,
) -> tuple[torch.Tensor, Tensors]:
    """GPTQ-round W[out, in] on `grid` (module docstring).

    Returns (Q float32 [out, in] on the grid, statistics): per-row grids give the fit of the
    original W; group grids each group's fit stacked to [out, in / g]. Input columns that
    calibration never saw (H[j, j] == 0: a padded head, say) carry no information: their
    weights are rounded as they are and correct nothing.
    """
    if weight.dim() != 2 or hessian.shape != (weight.shape[1],) * 2:
        raise ValueError(f"weight [out, in] and hessian [in, in] expected, got "
                         f"{tuple(weight.shape)} and {tuple(hessian.shape)}")
    if not 0 < damp < 1:
        raise ValueError(f"damp must be in (0, 1), got {damp}")
    g = grid.group_size
    n = weight.shape[1]
    if g is not None and n % g:
        raise ValueError(f"group size {g} does not divide in_features={n}")
    w = weight.detach().double().clone()
    h = hessian.detach().double().clone()
    # act_order: columns by decreasing H[j, j], the most-used inputs first, while later ones
    # are still free to absorb their errors. Groups then keep static grids, fitted on the
    # original weights, since a group's columns are no longer consecutive.
    perm = torch.argsort(torch.diag(h), descending=True, stable=True) if act_order \
        else torch.arange(n, device=w.device)
    w, h = w[:, perm], h[perm][:, perm]
    static = [grid.fit(weight[:, k : k + g]) for k in range(0, n, g)] \
        if g is not None and act_order else None
    if g is not None and static is None:  # a dynamic group is fitted whole, up to date
        block = g * max(1, block // g)
    dead = torch.diag(h) == 0
    h[dead, dead] = 1.0
    h += damp * torch.diag(h).mean() * torch.eye(n, dtype=h.dtype, device=h.device)
    # U with H^-1 = U^T U: row j of U holds how column j's error spreads to columns > j
    u = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)

    q = torch.zeros_like(w)
    fits: list[Tensors] = [] if static is None else static
    params = grid.fit(weight) if g is None else None
    for b0 in range(0, n, block):
        b1 = min(b0 + block, n)
        errors = torch.zeros(w.shape[0], b1 - b0, dtype=w.dtype, device=w.device)
        for j in range(b0, b1):
            if static is not None:
                params = static[int(perm[j]) // g]
            elif g is not None and j % g == 0:  # a new group: fit its weights as they stand
                params = grid.fit(w[:, j : j + g])
                fits.append(params)
            q[:, j] = grid.round(w[:, j], params)
            e = (w[:, j] - q[:, j]) / u[j, j]
            w[:, j:b1] -= e[:, None] * u[j, j:b1][None, :]
            errors[:, j - b0] = e
        w[:, b1:] -= errors @ u[b0:b1, b1:]  # the block's errors, onto the later blocks
    q = q[:, torch.argsort(perm)]
    if g is None:
        stats = {k: v for k, v in params.items() if k != "scale"}
    else:
        names = [k for k in fits[0] if k not in ("scale", "zero")]
        stats = {k: torch.stack([f[k] for f in fits], dim=1) for k in names}  # [out, in/g]
    return q.float(), stats


def grid_for(scheme: Scheme) -> Grid | None:
    """The grid GPTQ rounds to for a weight-only scheme; None for schemes it does not apply
    to (float weights; SmoothQuant, whose error is the activations' as much as the weights')."""
    if isinstance(scheme, WeightOnly):
        return Symmetric(scheme.qmax)
    if isinstance(scheme, Groupwise):
        if scheme.pre_quant_scale:
            raise ValueError("GPTQ with a pre-quant scale (AWQ) is not supported: H would be "
                             "of the scaled input")
        if scheme.zeros:
            return AsymmetricGroups(scheme.group_size)
        return Symmetric(numerics.INT4_MAX, scheme.group_size)
    return None


class GptqPlan:
    """GPTQ for the weight-only linears of one model: load_llama's `transform` and
    `quant_options` (tpquant.models.loader).

    hessians: layer name -> H = X^T X of the layer's float input, full width in the model's
    layout (`calibrate_hessians`); scheme_of: layer name -> its scheme (LlamaSchemes.for_layer).
    `transform_weight` GPTQ-rounds the full weight (a layer without a Hessian or a grid passes
    through) and `quant_options` hands the scheme the statistics of the grid it chose. Results
    are kept by layer name, so one plan serves every rank a process builds of one model.
    """

    def __init__(self, hessians: dict[str, torch.Tensor], scheme_of: Callable[[str], Scheme],
                 damp: float = 0.01) -> None:
        self.hessians, self.scheme_of, self.damp = hessians, scheme_of, damp
        self._done: dict[str, tuple[torch.Tensor, Tensors]] = {}

    def transform_weight(self, layer_name: str, weight: torch.Tensor) -> torch.Tensor:
        grid = grid_for(self.scheme_of(layer_name))
        if grid is None or layer_name not in self.hessians:
            return weight
        if layer_name not in self._done:
            self._done[layer_name] = gptq(weight, self.hessians[layer_name], grid, self.damp)
        return self._done[layer_name][0]

    def quant_options(self, layer_name: str) -> dict:
        if layer_name not in self._done:
            return {}
        return {"statistics": self._done[layer_name][1]}

    def transform_norm(self, norm_name: str, weight: torch.Tensor) -> torch.Tensor:
        return weight
