"""Running engines: load this rank's file into the model, generate in lockstep (DESIGN s8).

Every rank runs the same forward passes; rank 0 owns the tokenizer and the sampling and
broadcasts the chosen tokens, so ranks never diverge.

On CPUs generation is the plain eager loop. On GPUs the prefill runs flash SDPA, and every
decode step replays a CUDA graph of the step for the batch's size bucket
(`tpquant.engine.graphs`); sampling stays on the device, and the one host synchronisation
per token is reading the broadcast tokens (for EOS and streaming). That read waits for a
copy queued behind the next step's graph, so the GPU runs step n + 1 while the host looks at
step n's tokens: the GPU never waits for the host between tokens. When every row has
stopped, that one step ahead was for nothing; its output is dropped. Greedy steps choose
their tokens at the end of the graph itself (`DecodeGraphs.start` / `advance`), so between
two steps the host queues only the broadcast, that copy and the replay.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Mapping, Sequence

import torch

from tpquant.collectives import Communicator
from tpquant.engine.build import DTYPES
from tpquant.engine.format import open_rank_file
from tpquant.engine.graphs import DecodeGraphs, PrefillGraphs, bucket_for
from tpquant.engine.sampling import SamplingParams, sample
from tpquant.layers.linear import ShardedLinear
from tpquant.models.config import LlamaConfig
from tpquant.models.llama import Llama, LlamaSchemes
from tpquant.parallel.mapping import Mapping as TPMapping
from tpquant.quantization.mode import QuantMode
from tpquant.quantization.schemes.codes import stored_codes


def load_engine(engine_dir: str | Path, mapping: TPMapping, comm: Communicator,
                device: torch.device, verify: bool = True) -> Llama:
    """This rank's model from its engine file (checked against config.json and the job).
    Off the GPU, tiled weights go back to the stored layout, which the torch reference reads
    (measured, SmolLM2 int8 at TP 3 on two CPU cores: 9.6 tok/s against 5.3 with the tiles)."""
    tiled = device.type == "cuda"
    with open_rank_file(engine_dir, mapping.rank, mapping.world_size, verify) as engine:
        meta = engine.meta
        dtype = DTYPES[meta.extra["dtype"]]
        schemes = LlamaSchemes.from_name(meta.quant, dtype, meta.quant_options["group_size"],
                                         down_rotation=meta.quant_options.get("down_rotation", 0))
        int8_kv = QuantMode.from_name(meta.quant).has_int8_kv_cache()
        model = Llama(LlamaConfig.from_dict(meta.model_config), mapping, comm,
                      schemes if tiled else schemes.untiled(), dtype, int8_kv_cache=int8_kv)
        load_tensors(model, engine.tensors(), tiled)
    return model.to(device).eval()


def load_tensors(model: torch.nn.Module, tensors: Mapping[str, torch.Tensor],
                 tiled: bool = True) -> None:
    """Put a state dict written by the build back: sharded linears through `load_shards`
    (which checks every shape against the scheme), everything else by copy. tiled=False: tiled
    codes go back to the stored layout (`codes.stored_codes`)."""
    remaining = dict(tensors)
    for prefix, module in model.named_modules():
        if isinstance(module, ShardedLinear):
            own = {k[len(prefix) + 1:]: remaining.pop(k) for k in list(remaining)
                   if k.startswith(prefix + ".")}
            if not tiled:
                own = stored_codes(own)
            module.load_shards(own, own.pop("bias", None))
    missing, unexpected = model.load_state_dict(remaining, strict=False)
    linear_keys = {k for k, _ in model.named_buffers() if k not in remaining}
    missing = [k for k in missing if k not in linear_keys]
    if missing or unexpected:
        raise KeyError(f"engine does not fit the model: missing {missing}, unexpected {unexpected}")


@dataclass
class Generation:
    """What a generate call produced, with its timings (seconds)."""

    tokens: list[list[int]]
    prompt_tokens: int
    prefill_s: float
    decode_s: float
    new_tokens: int = field(init=False)

    def __post_init__(self) -> None:
        self.new_tokens = sum(len(t) for t in self.tokens)


@torch.no_grad()
def generate(model: Llama, comm: Communicator, prompts: Sequence[Sequence[int]] | None,
             max_new_tokens: int, params: SamplingParams,
             on_step: Callable[[list[list[int]]], None] | None = None,
             graphs: DecodeGraphs | None = None,
             stop_ids: Iterable[int] | None = None,
             prefill: PrefillGraphs | None = None) -> Generation:
    """Generate for a batch of prompts of different lengths, on every rank in lockstep.

    `prompts` matter on rank 0 only (broadcast). Prompts are right-padded (see the model's
    docstring); row b decodes from position len_b. A row stops after a token in `stop_ids`
    (default: the model's EOS tokens; it is kept); the batch stops when every row has, or
    after max_new_tokens. `on_step` (rank 0) sees the tokens so far after each step, for
    streaming.

    On CUDA the decode steps run through `graphs` (made here if not given; pass one to keep
    its captured graphs across calls), and the prefill through `prefill` where given (worth
    it where prompt lengths come back: its graphs are captured at first use). On the CPU the
    loop is eager.
    """
    prompts = comm.broadcast_object([list(map(int, p)) for p in prompts] if comm.rank == 0 else None)
    device = model.embed.weight.device
    if graphs is None and device.type == "cuda":
        graphs = DecodeGraphs(model)
    lengths = torch.tensor([len(p) for p in prompts], device=device)
    longest = max(len(p) for p in prompts)
    need = longest + max_new_tokens
    rows = graphs.rows_for(len(prompts)) if graphs else len(prompts)
    if rows > model.max_batch or need > model.max_seq:
        model.setup_caches(max(rows, model.max_batch), max(need, model.max_seq))
    if graphs:
        graphs.prepare(len(prompts))  # captures write the cache: before the prefill fills it
    batch = torch.zeros(len(prompts), longest, dtype=torch.long)
    for b, p in enumerate(prompts):
        batch[b, : len(p)] = torch.tensor(p)
    batch = batch.to(device)

    generator = torch.Generator(device=device).manual_seed(params.seed)
    stop = set(model.config.eos_token_ids if stop_ids is None else stop_ids)
    out: list[list[int]] = [[] for _ in prompts]
    done = [False] * len(prompts)

    _sync(device)
    t0 = time.perf_counter()
    if prefill is not None and device.type == "cuda":
        logits = prefill.run(batch, lengths)  # [B, V]
    else:
        logits = model(batch, 0, logits_at=lengths - 1)
    _sync(device)
    t1 = time.perf_counter()
    token = torch.zeros(len(prompts), dtype=torch.long, device=device)
    # greedy steps choose their tokens inside the step's graph (DecodeGraphs.start / advance)
    in_graph = (graphs is not None and params.greedy
                and bucket_for(len(prompts), graphs.buckets) is not None)
    seen = _HostTokens(len(prompts), device)
    for step in range(max_new_tokens):
        if step == 0 or not in_graph:
            if comm.rank == 0:
                token.copy_(sample(logits, params, generator))
            if in_graph:
                token = graphs.start(token, lengths)  # the graph's buffer from here on
        comm.broadcast(token, root=0)  # in the graph every rank chose: rank 0's choice wins
        seen.copy(token)
        last = step == max_new_tokens - 1
        if not last:  # queued before the host waits: the GPU runs it meanwhile
            if in_graph:
                graphs.advance(len(prompts))  # the next tokens land in `token`
            elif graphs:
                logits = graphs.step(token, lengths + step)
            else:
                logits = model(token[:, None], lengths + step)[:, -1]
        for b, t in enumerate(seen.read()):  # the one host sync per token
            if not done[b]:
                out[b].append(t)
                done[b] = t in stop
        if on_step is not None and comm.rank == 0:
            on_step(out)
        if all(done) or last:  # every rank sees the same tokens: all stop here together
            break
    _sync(device)
    t2 = time.perf_counter()
    return Generation(out, int(lengths.sum()), t1 - t0, t2 - t1)


class _HostTokens:
    """A step's tokens on the host, copied without stopping the stream: the copy goes into
    pinned memory behind an event, and `read` waits for that event only, not for the work
    queued after it. On the CPU the copy is plain."""

    def __init__(self, batch: int, device: torch.device) -> None:
        cuda = device.type == "cuda"
        self._device = device
        self._host = torch.empty(batch, dtype=torch.long, pin_memory=cuda)
        self._done = torch.cuda.Event() if cuda else None

    def copy(self, tokens: torch.Tensor) -> None:
        self._host.copy_(tokens, non_blocking=self._done is not None)
        if self._done is not None:  # on the stream the copy went to: the tokens' device's
            self._done.record(torch.cuda.current_stream(self._device))

    def read(self) -> list[int]:
        if self._done is not None:
            self._done.synchronize()
        return self._host.tolist()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
