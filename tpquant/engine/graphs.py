"""CUDA graphs of the decode step, one per batch-size bucket (DESIGN s8).

A decode step launches hundreds of small kernels (per layer: norm, four linears, RoPE, the
cache write, attention, an all-reduce or two); at batch 1 launching them costs more than
running them. `Llama.decode_step` has shapes fixed by the batch size alone and never reads a
device value on the host, so it is captured once per bucket and replayed at every position:
its tokens and positions are copied into the graph's static input buffers, and its logits
come out of a static output buffer. The graph ends with greedy decoding's choice written into
its token buffer and each position moved on by one (`sampling.greedy_advance`): greedy
generation (`start`, then `advance` per step) feeds each step from the one before without
the host queuing anything in between but the tokens' copy to itself (design note 47).

A batch is padded up to its bucket (1, 2, 4, ..., 64). The padding rows decode in the cache
rows above the real batch, which no real row reads (from token 0 at position 0 after `start`,
their positions kept below max_seq); the KV cache therefore needs max_batch >= the bucket
(`rows_for`). Batches above the largest bucket run
`decode_step` eagerly.

Capture rules followed here:
- warm-up runs first, on a side stream, outside the capture: Triton compiles and autotunes,
  NCCL (and a custom all-reduce) make their first-call connections;
- warm-up and capture write the KV cache at the static positions (0 .. warmup - 1: each
  warm-up run advances them), so `prepare` must run BEFORE the prefill that fills the cache
  (generate does this);
- every graph shares one memory pool; graphs replay one at a time, in the order generate
  calls them, and the static inputs/outputs stay referenced, so sharing is safe;
- every rank captures the same buckets in the same order (the collectives are inside).
A `setup_caches` (new cache tensors) makes the captured addresses stale: the graphs are
dropped and captured again (`Llama.cache_version`).

`PrefillGraphs` does the same for the prefill, whose eager launches cost more host time than
its kernels take (Llama-2-7B, 512 tokens: 26 ms against 10 ms at TP 1; design note 36): one
graph per (batch bucket, prompt length padded to a power of two). The padding positions
write the KV cache past each prompt, where no decode step reads before writing its own; the
logits are taken at each prompt's last real position. A capture costs a few eager prefills,
so it pays where prompts of a length come back (a benchmark, a server): opt-in.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tpquant.engine.sampling import greedy_advance
from tpquant.models.llama import Llama

BUCKETS = (1, 2, 4, 8, 16, 32, 64)
PREFILL_MIN_LENGTH = 64  # shorter prompts share the 64-position graph


def bucket_for(batch: int, buckets: tuple[int, ...] = BUCKETS) -> int | None:
    """The smallest bucket holding `batch` rows, or None above the largest."""
    if batch < 1:
        raise ValueError(f"batch must be >= 1, got {batch}")
    return next((b for b in buckets if b >= batch), None)


@dataclass
class _Captured:
    graph: torch.cuda.CUDAGraph
    tokens: torch.Tensor  # [bucket] int64, static input; greedy's choice after a replay
    pos: torch.Tensor  # [bucket] int64, static input; one further after a replay
    logits: torch.Tensor  # [bucket, V], static output


class DecodeGraphs:
    """`step(tokens, pos) -> logits` through captured CUDA graphs of `model.decode_step`."""

    def __init__(self, model: Llama, buckets: tuple[int, ...] = BUCKETS, warmup: int = 2) -> None:
        device = model.embed.weight.device
        if device.type != "cuda":
            raise ValueError(f"CUDA graphs need the model on a CUDA device, it is on {device}")
        if list(buckets) != sorted(set(buckets)) or buckets[0] < 1:
            raise ValueError(f"buckets must be increasing positive sizes, got {buckets}")
        self.model, self.buckets, self.warmup, self.device = model, tuple(buckets), warmup, device
        self._graphs: dict[int, _Captured] = {}
        self._version = model.cache_version
        self._pool = None

    def rows_for(self, batch: int) -> int:
        """Cache rows a batch needs: its bucket (padding rows included), or itself if eager."""
        return bucket_for(batch, self.buckets) or batch

    def captured(self) -> list[int]:
        return sorted(self._graphs)

    def prepare(self, batch: int) -> None:
        """Capture the graph for `batch`'s bucket if it is not there yet. Writes the KV cache
        at position 0 of the bucket's rows: call it before the prefill."""
        self._drop_if_stale()
        bucket = bucket_for(batch, self.buckets)
        if bucket is None or bucket in self._graphs:
            return
        if bucket > self.model.max_batch:
            raise ValueError(
                f"bucket {bucket} needs max_batch >= {bucket}, the KV cache has "
                f"{self.model.max_batch}: setup_caches(rows_for(batch), ...) first"
            )
        self._graphs[bucket] = self._capture(bucket)

    @torch.no_grad()
    def step(self, tokens: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """Logits [B, V] of tokens [B] at positions pos [B] (device int64). The result is a
        view of the graph's output buffer: use it before the next step."""
        B = tokens.shape[0]
        bucket = bucket_for(B, self.buckets)
        if bucket is None:
            return self.model.decode_step(tokens, pos)
        self.prepare(B)
        g = self._graphs[bucket]
        g.tokens[:B].copy_(tokens)
        g.pos[:B].copy_(pos)
        g.graph.replay()
        return g.logits[:B]

    def start(self, tokens: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """Put greedy generation's first step, tokens [B] at positions pos [B], in the graph
        buffers of B's bucket (captured already: `prepare`; padding rows decode token 0 from
        position 0). Returns the [B] view of the token buffer, where each `advance` leaves
        the next step's tokens."""
        B = tokens.shape[0]
        g = self._graphs.get(bucket_for(B, self.buckets))
        if g is None or self.model.cache_version != self._version:
            raise RuntimeError(f"no graph of batch {B}'s bucket: prepare({B}) first")
        g.tokens.zero_()
        g.pos.zero_()
        g.tokens[:B].copy_(tokens)
        g.pos[:B].copy_(pos)
        return g.tokens[:B]

    def advance(self, batch: int) -> None:
        """One greedy step from the buffers `start` filled: the graph of `batch`'s bucket
        replays and leaves each row's argmax token in the token buffer, its position + 1."""
        self._graphs[bucket_for(batch, self.buckets)].graph.replay()

    def _drop_if_stale(self) -> None:
        if self.model.cache_version != self._version:
            self._graphs.clear()
            self._pool = None
            self._version = self.model.cache_version

    @torch.no_grad()
    def _capture(self, bucket: int) -> _Captured:
        tokens = torch.zeros(bucket, dtype=torch.long, device=self.device)
        pos = torch.zeros(bucket, dtype=torch.long, device=self.device)
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        last = self.model.max_seq - 1  # padding rows' positions stay in the cache

        def step() -> torch.Tensor:
            logits = self.model.decode_step(tokens, pos)
            greedy_advance(logits, tokens, pos, last)
            return logits

        graph, logits = _capture(step, self.device, self.warmup, self._pool)
        return _Captured(graph, tokens, pos, logits)


def _capture(fn, device: torch.device, warmup: int,
             pool) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
    """fn's graph and static output: `warmup` runs on a side stream first (compiles, autotunes,
    first-call connections), then the capture into `pool`."""
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        for _ in range(warmup):
            fn()
    torch.cuda.current_stream(device).wait_stream(side)
    torch.cuda.synchronize(device)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, pool=pool):
        out = fn()
    return graph, out


def prefill_length(tokens: int, max_seq: int) -> int | None:
    """The padded length a prompt of `tokens` positions runs at in a prefill graph: the next
    power of two, PREFILL_MIN_LENGTH at least; None (eager) where the KV cache is shorter."""
    if tokens < 1:
        raise ValueError(f"a prompt needs at least one token, got {tokens}")
    length = max(PREFILL_MIN_LENGTH, 1 << (tokens - 1).bit_length())
    return length if length <= max_seq else None


@dataclass
class _CapturedPrefill:
    graph: torch.cuda.CUDAGraph
    tokens: torch.Tensor  # [rows, length] int64, static input
    last: torch.Tensor  # [rows] int64: each row's last real position, static input
    logits: torch.Tensor  # [rows, V], static output


class PrefillGraphs:
    """`run(tokens, lengths) -> logits`: `model(tokens, 0, logits_at=lengths - 1)` through
    CUDA graphs captured per (batch bucket, padded length) at first use (module docstring)."""

    def __init__(self, model: Llama, buckets: tuple[int, ...] = BUCKETS, warmup: int = 1) -> None:
        device = model.embed.weight.device
        if device.type != "cuda":
            raise ValueError(f"CUDA graphs need the model on a CUDA device, it is on {device}")
        self.model, self.buckets, self.warmup, self.device = model, tuple(buckets), warmup, device
        self._graphs: dict[tuple[int, int], _CapturedPrefill] = {}
        self._version = model.cache_version
        self._pool = None

    def captured(self) -> list[tuple[int, int]]:
        return sorted(self._graphs)

    @torch.no_grad()
    def run(self, tokens: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """Logits [B, V] at each row's last prompt position: tokens [B, T] right-padded (device
        int64), lengths [B] (device). Eager where no graph fits (a batch above the largest
        bucket, a padded length past the cache). The result is a view of the graph's output
        buffer: use it before the next run."""
        B, T = tokens.shape
        rows = bucket_for(B, self.buckets)
        length = prefill_length(T, self.model.max_seq)
        if rows is None or length is None or rows > self.model.max_batch:
            return self.model(tokens, 0, logits_at=lengths - 1)
        if self.model.cache_version != self._version:
            self._graphs.clear()
            self._pool = None
            self._version = self.model.cache_version
        g = self._graphs.get((rows, length))
        if g is None:
            g = self._graphs[rows, length] = self._capture(rows, length)
        g.tokens.zero_()
        g.tokens[:B, :T].copy_(tokens)
        g.last.zero_()
        g.last[:B].copy_(lengths - 1)
        g.graph.replay()
        return g.logits[:B]

    @torch.no_grad()
    def _capture(self, rows: int, length: int) -> _CapturedPrefill:
        tokens = torch.zeros(rows, length, dtype=torch.long, device=self.device)
        last = torch.zeros(rows, dtype=torch.long, device=self.device)
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        graph, logits = _capture(lambda: self.model(tokens, 0, logits_at=last), self.device,
                                 self.warmup, self._pool)
        return _CapturedPrefill(graph, tokens, last, logits)
