"""What column- and row-parallel linears share: holding one rank's shard of a scheme's tensors.

A `ShardedLinear` owns a quantization `Scheme` and this rank's slice of every tensor the scheme
produced for the full weight. Which slice is decided by the sharding rules alone
(`tpquant.parallel.shard`, driven by each tensor's `TensorSpec`), so every scheme works under
both parallel styles without per-scheme code. Subclasses add only their forward.

Two ways to load, with identical results. `load_full` quantizes the *full* weight and shards
the result: per-tensor and per-channel scales then equal the single-process ones, which is
what makes a TP result match TP 1. `load_shard` quantizes only this rank's slice of the
weight, given the scheme's statistics of the full weight (gathered by the caller, e.g. an
all-reduce(max) over ranks): the same scales, without any rank holding the full weight.
"""

from __future__ import annotations

from typing import Literal, Sequence

import torch
from torch import nn

from tpquant.collectives import Communicator
from tpquant.parallel.mapping import Mapping
from tpquant.parallel.shard import check_divisible, shard_tensor, shard_tensors
from tpquant.quantization.schemes.base import Scheme, TensorSpec

Style = Literal["column", "row"]
_BIAS_SPEC = TensorSpec(out_dim=0)  # split with the outputs under column TP, replicated under row TP


class ShardedLinear(nn.Module):
    style: Style

    def __init__(
        self,
        in_features: int,
        out_features: int,
        scheme: Scheme,
        mapping: Mapping,
        comm: Communicator,
        bias: bool = False,
        part_sizes: Sequence[int] | None = None,
    ) -> None:
        super().__init__()
        tp = mapping.tp_size
        split = out_features if self.style == "column" else in_features
        check_divisible(f"{self.style}-parallel {'out' if self.style == 'column' else 'in'}_features", split, tp)
        self.in_features, self.out_features = in_features, out_features
        self.scheme, self.mapping, self.comm = scheme, mapping, comm
        self.has_bias = bias
        self.part_sizes = tuple(part_sizes) if part_sizes else None
        self._names: list[str] = []  # the scheme's tensors held as buffers, in a stable order

    # -- loading ----------------------------------------------------------------------------

    def load_full(
        self, weight: torch.Tensor, bias: torch.Tensor | None = None, **quant_options
    ) -> ShardedLinear:
        """Quantize the full weight [out, in] with the scheme and keep this rank's shard."""
        if tuple(weight.shape) != (self.out_features, self.in_features):
            raise ValueError(
                f"weight shape {tuple(weight.shape)} != (out, in) = "
                f"({self.out_features}, {self.in_features})"
            )
        full = self.scheme.quantize(weight, **quant_options)
        rank, tp, parts = self.mapping.tp_rank, self.mapping.tp_size, self.part_sizes
        shards = shard_tensors(full, self.scheme.specs(full), self.style, rank, tp, parts)
        if bias is not None:
            bias = shard_tensor(bias, _BIAS_SPEC, self.style, rank, tp, parts)
        return self.load_shards(shards, bias)

    def load_shard(
        self,
        weight: torch.Tensor,
        bias: torch.Tensor | None = None,
        statistics: dict[str, torch.Tensor] | None = None,
    ) -> ShardedLinear:
        """Quantize this rank's slice of W and keep it.

        weight: rows [out/tp, in] under column TP (per part for a fused layer:
        [part_0_r | part_1_r | ...]), columns [out, in/tp] under row TP. bias: already this
        rank's (split under column TP, whole under row TP). statistics: the scheme's
        statistics (`Scheme.statistics`) of the FULL weight, those indexed by the split axis
        cut like the weight; then the result equals `load_full`'s shard exactly.
        """
        tp = self.mapping.tp_size
        local = (
            (self.out_features // tp, self.in_features) if self.style == "column"
            else (self.out_features, self.in_features // tp)
        )
        if tuple(weight.shape) != local:
            raise ValueError(
                f"{type(self).__name__}: weight slice shape {tuple(weight.shape)} != {local} "
                f"for rank {self.mapping.tp_rank} of {tp}"
            )
        if self.scheme.statistic_specs() is None:
            raise ValueError(
                f"{type(self.scheme).__name__} quantizes full weights only: use load_full"
            )
        return self.load_shards(self.scheme.quantize(weight, statistics=statistics), bias)

    def load_shards(
        self, tensors: dict[str, torch.Tensor], bias: torch.Tensor | None = None
    ) -> ShardedLinear:
        """Keep already-sharded tensors (from an engine file, or `load_full` / `load_shard`), in
        the layout the scheme's kernels read (`Scheme.pack`: after sharding, which cuts the
        stored layout). Shapes are checked against the specs."""
        specs = self.scheme.specs(tensors)
        if set(tensors) != set(specs):
            raise ValueError(f"expected tensors {sorted(specs)}, got {sorted(tensors)}")
        for name, t in tensors.items():
            self._check_shard_shape(name, t, specs[name])
        tensors = self.scheme.pack(tensors)
        if (bias is not None) != self.has_bias:
            raise ValueError(f"layer has bias={self.has_bias} but bias {'given' if bias is not None else 'missing'}")
        for name in self._names:
            delattr(self, name)
        self._names = sorted(tensors)
        for name in self._names:
            self.register_buffer(name, _owned(tensors[name]))
        if bias is not None:
            self._check_shard_shape("bias", bias, _BIAS_SPEC)
            self.register_buffer("bias", _owned(bias.to(self.scheme.dtype)))
        else:
            self.bias = None
        return self

    def _check_shard_shape(self, name: str, t: torch.Tensor, spec: TensorSpec) -> None:
        tp = self.mapping.tp_size
        local_out = self.out_features // tp if self.style == "column" else self.out_features
        local_in = self.in_features // tp if self.style == "row" else self.in_features
        for dim, size in ((spec.out_dim, local_out), (spec.in_dim, local_in // spec.in_per_index)):
            if dim is not None and t.shape[dim] != size:
                raise ValueError(
                    f"{type(self).__name__}: tensor {name!r} has shape {tuple(t.shape)}, "
                    f"expected {size} along dim {dim} for rank {self.mapping.tp_rank} of {tp}"
                )

    @property
    def tensors(self) -> dict[str, torch.Tensor]:
        """This rank's tensors of the scheme, by name."""
        if not self._names:
            raise RuntimeError(
                f"{type(self).__name__} has no weights: call load_full, load_shard or load_shards"
            )
        return {name: getattr(self, name) for name in self._names}

    def local_forward(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        return self.scheme.forward(x, self.tensors, bias)

    def extra_repr(self) -> str:
        return (
            f"in={self.in_features}, out={self.out_features}, scheme={self.scheme.mode.to_name()}, "
            f"tp={self.mapping.tp_size}, rank={self.mapping.tp_rank}, bias={self.has_bias}"
        )


def _owned(t: torch.Tensor) -> torch.Tensor:
    """t in memory of its own: a shard that is a view of the full tensor would keep the whole
    full tensor alive on every rank."""
    t = t.contiguous()
    return t if t.untyped_storage().nbytes() == t.nbytes else t.clone()
