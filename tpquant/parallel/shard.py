"""Shard math: a full tensor -> one rank's slice, and back (DESIGN s6).

Pure functions of (tensor, rank, tp); nothing here knows about schemes, kernels or
communicators. Every quantized tensor declares through its `TensorSpec` which dimension runs
along W[out, in]'s output features and which along its input features, and one generic rule
shards all of them:

    column-parallel  (Y = X [A_1 ... A_p]):  split along spec.out_dim, replicate if None
    row-parallel     (Y = sum_r X_r A_r):    split along spec.in_dim,  replicate if None

So a plain weight [out, in] and a packed int4 weight [out, in/2] are split by rows (column
style) or columns (row style); a per-channel scale [out] is split or replicated; group scales
[in/g, out] are split on out or on in/g; pre_quant_scale / smoother [in] are replicated or
split; a scalar activation scale is always replicated; a bias (TensorSpec(out_dim=0)) is split
under column style and replicated under row style, where the layer adds it once after the
all-reduce.

Fused projections (q/k/v, gate/up) are split per part along the output features and each
rank's pieces concatenated, so a rank holds [q_r | k_r | v_r], never a contiguous slice of
the fused rows.

Every size that cannot be split raises ValueError naming the constraint and the TP sizes that
would work, at build time rather than as a shape error at run time.
"""

from __future__ import annotations

from typing import Literal, Mapping, Sequence

import torch

from tpquant.quantization.schemes.base import TensorSpec

Style = Literal["column", "row"]

# Largest TP size listed in error messages (beyond any TP size anyone runs).
_MAX_LISTED_TP = 64


def working_tp_sizes(size: int, limit: int = _MAX_LISTED_TP) -> list[int]:
    """TP sizes up to `limit` that divide `size` evenly."""
    return [d for d in range(1, limit + 1) if size % d == 0]


def _works(size: int, tp: int) -> str:
    sizes = working_tp_sizes(size, max(tp, _MAX_LISTED_TP))
    return "TP sizes that work: " + ", ".join(map(str, sizes))


def _check_rank(rank: int, tp: int) -> None:
    if tp < 1:
        raise ValueError(f"tp must be >= 1, got tp={tp}")
    if not 0 <= rank < tp:
        raise ValueError(f"rank must be in [0, {tp}), got rank={rank} (tp={tp})")


def check_divisible(name: str, size: int, tp: int) -> int:
    """Return size // tp; ValueError naming `name` and the TP sizes that work otherwise.

    For sizes that must divide across ranks with no padding fallback, e.g. an MLP
    intermediate size.
    """
    if tp < 1:
        raise ValueError(f"tp must be >= 1, got tp={tp}")
    if size % tp:
        raise ValueError(
            f"{name} = {size} must be divisible by tp={tp} for tensor parallelism; "
            + _works(size, tp)
        )
    return size // tp


def split(t: torch.Tensor, dim: int, rank: int, tp: int) -> torch.Tensor:
    """Rank `rank`'s contiguous 1/tp slice of `t` along `dim` (a view, no copy)."""
    _check_rank(rank, tp)
    if t.dim() == 0:
        raise ValueError("cannot split a 0-dim tensor")
    dim = dim % t.dim()
    size = t.shape[dim]
    if size % tp:
        raise ValueError(
            f"cannot split dim {dim} of size {size} (shape {tuple(t.shape)}) across tp={tp}: "
            f"{size} is not divisible by {tp}; {_works(size, tp)}"
        )
    n = size // tp
    return t.narrow(dim, rank * n, n)


def _check_parts(size: int, part_sizes: Sequence[int], dim: int) -> None:
    if sum(part_sizes) != size or any(p < 0 for p in part_sizes):
        raise ValueError(
            f"part_sizes {tuple(part_sizes)} (sum {sum(part_sizes)}) do not add up to "
            f"the size {size} of dim {dim}"
        )


def split_fused(
    t: torch.Tensor, dim: int, part_sizes: Sequence[int], rank: int, tp: int
) -> torch.Tensor:
    """Split each part of a fused tensor (e.g. q, k, v along out) and concatenate rank's pieces.

    t along `dim` is [part_0 | part_1 | ...]; the result is [part_0_r | part_1_r | ...]
    where part_i_r is rank r's 1/tp of part i. A copy unless tp == 1 or there is one part.
    """
    _check_rank(rank, tp)
    dim = dim % t.dim()
    _check_parts(t.shape[dim], part_sizes, dim)
    for i, p in enumerate(part_sizes):
        if p % tp:
            raise ValueError(
                f"fused part {i} of {tuple(part_sizes)} has size {p}, not divisible by tp={tp}; "
                f"{_works(p, tp)}"
            )
    if tp == 1:
        return t
    pieces = [split(part, dim, rank, tp) for part in t.split(list(part_sizes), dim=dim)]
    return pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim=dim)


def _check_style(style: str, part_sizes: Sequence[int] | None) -> None:
    if style not in ("column", "row"):
        raise ValueError(f"style must be 'column' or 'row', got {style!r}")
    if part_sizes is not None and style != "column":
        raise ValueError(
            "part_sizes are output-feature sizes of a fused projection and only apply to "
            f"column-parallel sharding, got style={style!r}"
        )


def split_dim(spec: TensorSpec, style: Style) -> int | None:
    """The dimension of a tensor with `spec` that `style` splits; None: it is replicated."""
    _check_style(style, None)
    return spec.out_dim if style == "column" else spec.in_dim


def shard_tensor(
    t: torch.Tensor,
    spec: TensorSpec,
    style: Style,
    rank: int,
    tp: int,
    part_sizes: Sequence[int] | None = None,
    *,
    name: str = "tensor",
) -> torch.Tensor:
    """Rank's shard of one stored tensor under `style`, driven only by its `spec`.

    Column: split along spec.out_dim (per part if `part_sizes`, in output features).
    Row: split along spec.in_dim; every rank's in_features must be a multiple of
    spec.in_per_index (the packing factor or group size). Tensors without the split dim
    are returned as-is (the same object).
    """
    _check_style(style, part_sizes)
    _check_rank(rank, tp)
    if style == "column":
        if spec.out_dim is None:
            return t
        if part_sizes is not None:
            try:
                return split_fused(t, spec.out_dim, part_sizes, rank, tp)
            except ValueError as e:
                raise ValueError(f"{name}: {e}") from None
        dim = spec.out_dim
    else:
        if spec.in_dim is None:
            return t
        dim = spec.in_dim
        n_index = t.shape[dim]
        g = spec.in_per_index
        if n_index % tp and g > 1:
            # per-rank in_features (n_index * g / tp) is a multiple of g iff tp | n_index
            in_features = n_index * g
            raise ValueError(
                f"{name}: row-parallel split of in_features={in_features} across tp={tp} gives "
                f"{in_features / tp:g} input features per rank, not a multiple of the group "
                f"size / packing factor {g} (input features per index along dim {dim}, "
                f"shape {tuple(t.shape)}); {_works(n_index, tp)}"
            )
    try:
        return split(t, dim, rank, tp)
    except ValueError as e:
        raise ValueError(f"{name}: {style}-parallel: {e}") from None


def shard_tensors(
    tensors: Mapping[str, torch.Tensor],
    specs: Mapping[str, TensorSpec],
    style: Style,
    rank: int,
    tp: int,
    part_sizes: Sequence[int] | None = None,
) -> dict[str, torch.Tensor]:
    """`shard_tensor` for every named tensor; every tensor needs a spec."""
    missing = set(tensors) - set(specs)
    if missing:
        raise ValueError(f"no TensorSpec for tensors {sorted(missing)}")
    return {
        k: shard_tensor(t, specs[k], style, rank, tp, part_sizes, name=k)
        for k, t in tensors.items()
    }


def _check_replicas(shards: Sequence[torch.Tensor], name: str) -> torch.Tensor:
    first = shards[0]
    for r, s in enumerate(shards[1:], start=1):
        if s.shape != first.shape or s.dtype != first.dtype or not torch.equal(s, first):
            raise ValueError(f"{name}: replicated tensor differs between rank 0 and rank {r}")
    return first


def gather_shards(
    shards: Sequence[torch.Tensor],
    spec: TensorSpec,
    style: Style,
    part_sizes: Sequence[int] | None = None,
    *,
    name: str = "tensor",
) -> torch.Tensor:
    """Inverse of `shard_tensor`: rebuild the full tensor from every rank's shard, in rank order.

    Replicated tensors must be identical on every rank; one of them is returned.
    `part_sizes` are the FULL (unsharded) part sizes, as given to `shard_tensor`.
    """
    _check_style(style, part_sizes)
    if not shards:
        raise ValueError(f"{name}: no shards to gather")
    tp = len(shards)
    dim = split_dim(spec, style)
    if dim is None:
        return _check_replicas(shards, name)
    if part_sizes is None:
        return torch.cat(list(shards), dim=dim)
    for i, p in enumerate(part_sizes):
        if p % tp:
            raise ValueError(
                f"{name}: fused part {i} of {tuple(part_sizes)} not divisible by tp={tp}"
            )
    local = [p // tp for p in part_sizes]
    per_rank = [s.split(local, dim=dim) for s in shards]
    parts = [torch.cat([pieces[i] for pieces in per_rank], dim=dim) for i in range(len(local))]
    return torch.cat(parts, dim=dim)


def unshard_tensors(
    shards: Sequence[Mapping[str, torch.Tensor]],
    specs: Mapping[str, TensorSpec],
    style: Style,
    part_sizes: Sequence[int] | None = None,
) -> dict[str, torch.Tensor]:
    """Inverse of `shard_tensors`: shards[r] is rank r's dict; returns the full tensors."""
    if not shards:
        raise ValueError("no shards to gather")
    names = list(shards[0])
    for r, s in enumerate(shards):
        if list(s) != names:
            raise ValueError(f"rank {r} holds tensors {sorted(s)}, rank 0 holds {sorted(names)}")
    return {
        k: gather_shards([s[k] for s in shards], specs[k], style, part_sizes, name=k) for k in names
    }


def pad_to_multiple(t: torch.Tensor, dim: int, multiple: int) -> torch.Tensor:
    """Append zeros along `dim` up to the next multiple of `multiple` (t itself if already)."""
    if multiple < 1:
        raise ValueError(f"multiple must be >= 1, got {multiple}")
    size = t.shape[dim]
    pad = -size % multiple
    if pad == 0:
        return t
    shape = list(t.shape)
    shape[dim] = pad
    return torch.cat([t, t.new_zeros(shape)], dim=dim)


def vocab_shard(weight: torch.Tensor, rank: int, tp: int) -> tuple[torch.Tensor, int]:
    """Rank's rows of a [vocab, hidden] lm_head / embedding, vocab zero-padded to a multiple of tp.

    Returns (shard[padded_vocab / tp, hidden], padded_vocab). The padded rows are zero, so
    their logits are exactly 0 -- which can beat real (negative) logits: after gathering the
    [..., padded_vocab] logits the caller MUST drop [..., vocab:] before softmax / sampling.
    In a vocab-parallel embedding the padded ids are never looked up.
    """
    _check_rank(rank, tp)
    padded = pad_to_multiple(weight, 0, tp)
    return split(padded, 0, rank, tp), padded.shape[0]
