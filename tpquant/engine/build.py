"""Building engines: a checkpoint -> one quantized, sharded file per rank (DESIGN s2, s7).

Under mpirun with N ranks each rank builds and writes its own `rank{r}.engine` in parallel,
reading only its own slices of the checkpoint (`tpquant.models.loader`: statistics of full
weights by all_reduce(max)); in a single process one builder writes every rank in turn,
computing those statistics once from the full weights. Both write identical tensors. Rank 0
hashes the checkpoint once (other ranks get the digest), saves the tokenizer and writes
config.json last. A build whose inputs (checkpoint bytes, quantization, TP size, dtype,
options, format version) match an existing complete engine reuses it.
"""

from __future__ import annotations

import dataclasses
import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from tpquant.checkpoint import open_checkpoint
from tpquant.collectives import Communicator, SingleProcessCommunicator
from tpquant.engine.collective import on_all_ranks
from tpquant.engine.format import (
    EngineMeta,
    RankFileInfo,
    build_key,
    engine_is_current,
    read_rank_metadata,
    write_engine_config,
    write_rank_file,
)
from tpquant.kernels import tiles
from tpquant.models.llama import LlamaSchemes, default_down_rotation
from tpquant.models.loader import (
    AllReduceStatistics,
    FullWeightStatistics,
    WeightStatistics,
    load_llama,
)
from tpquant.parallel.heads import lay_out_heads, plan_heads
from tpquant.parallel.mapping import Mapping
from tpquant.quantization.calibrate import calibrate, calibrate_hessians, text_token_batches
from tpquant.quantization.gptq import GptqPlan
from tpquant.quantization.mode import QuantMode
from tpquant.quantization.schemes.codes import TILED
from tpquant.quantization.smoothquant import SmoothQuantPlan

DEFAULT_CALIB_TEXT = "/usr/share/common-licenses/LGPL-2.1"
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass(frozen=True)
class BuildSpec:
    """Everything that determines an engine, besides the checkpoint's bytes."""

    checkpoint: str
    quant: str = "fp16"
    tp: int = 1
    dtype: str = "float32"
    group_size: int = 128
    # Calibrated builds (SmoothQuant, GPTQ) only: calibration text, how many of its tokens,
    # SmoothQuant's alpha. The text must never be one a model is evaluated on
    # (benchmarks/accuracy.py uses GPL-3).
    calib_text: str = DEFAULT_CALIB_TEXT
    calib_tokens: int = 1024
    smooth_alpha: float = 0.5
    # Weight-only modes: GPTQ rounding (tpquant.quantization.gptq) instead of round-to-nearest
    gptq: bool = False

    def __post_init__(self) -> None:
        QuantMode.from_name(self.quant)  # ValueError naming the known names
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype {self.dtype!r} unknown; known: {', '.join(DTYPES)}")
        if self.tp < 1:
            raise ValueError(f"tp must be >= 1, got {self.tp}")
        if self.group_size < 1:
            raise ValueError(f"group size (--group-size) must be >= 1, got {self.group_size}")
        if self.calib_tokens < 1:
            raise ValueError(
                f"calibration tokens (--calib-tokens) must be >= 1, got {self.calib_tokens}"
            )
        if not 0.0 <= self.smooth_alpha <= 1.0:
            raise ValueError(
                f"smoothing alpha (--smooth-alpha) must be in [0, 1], got {self.smooth_alpha}"
            )
        if self.gptq and not QuantMode.from_name(self.quant).is_weight_only():
            raise ValueError(f"--gptq applies to weight-only modes (int8_wo, int4_wo, "
                             f"int4_gw), not --quant {self.quant}")
        if self.needs_calibration() and not Path(self.calib_text).is_file():
            raise ValueError(
                f"calibration text {self.calib_text} is not a file (--quant {self.quant}"
                f"{' --gptq' if self.gptq else ''} calibrates on it: give one with --calib-text)"
            )

    def schemes_for(self, config: Any) -> LlamaSchemes:
        """The schemes for a model of this config: down_proj's input rotated in W8A8 modes."""
        rotation = default_down_rotation(QuantMode.from_name(self.quant),
                                         config.intermediate_size, self.tp)
        return LlamaSchemes.from_name(self.quant, DTYPES[self.dtype], self.group_size,
                                      down_rotation=rotation)

    def needs_calibration(self) -> bool:
        """Every SmoothQuant mode (smoothing factors from activation statistics), and GPTQ
        (each layer's X^T X)."""
        return self.gptq or QuantMode.from_name(self.quant).has_act_and_weight_quant()

    def key_fields(self) -> dict[str, Any]:
        """What goes into the build key besides the checkpoint's bytes: the calibration
        settings (and the text's sha256) only where they are used."""
        fields = {k: v for k, v in dataclasses.asdict(self).items() if k != "checkpoint"}
        if not self.gptq:
            del fields["gptq"]  # engines built before the option keep their keys
        calib = ("calib_text", "calib_tokens", "smooth_alpha")
        if self.needs_calibration():
            fields["calib_text"] = hashlib.sha256(Path(self.calib_text).read_bytes()).hexdigest()
        else:
            fields = {k: v for k, v in fields.items() if k not in calib}
        return fields


def calibration_tokens(checkpoint: Any, path: str | Path, n_tokens: int) -> list[int]:
    """The first n_tokens token ids of a text file, with the checkpoint's tokenizer."""
    ids = checkpoint.tokenizer()(Path(path).read_text())["input_ids"]
    if len(ids) < n_tokens:
        raise ValueError(f"calibration text {path} has {len(ids)} tokens, {n_tokens} asked")
    return [int(t) for t in ids[:n_tokens]]


def smoothquant_plan(
    checkpoint: Any, mapping: Mapping, comm: Communicator, tokens: list[int], alpha: float = 0.5,
    window: int = 512, down_rotation: int = 0,
) -> SmoothQuantPlan:
    """Calibrate a float32 model of `mapping` on `tokens` (windows of `window`) and plan the
    smoothing. Every rank of `comm` (the TP group) must call this; each runs its own shard
    and the statistics are combined by all_reduce(max) (`calibrate`). down_rotation: the
    quantized model's (its statistics are of the rotated input)."""
    act_amax = calibrate(_float_model(checkpoint, mapping, comm, window, down_rotation),
                         text_token_batches(tokens, window), comm)
    return SmoothQuantPlan(act_amax, alpha)


def gptq_plan(
    checkpoint: Any, mapping: Mapping, comm: Communicator, tokens: list[int],
    schemes: LlamaSchemes, window: int = 512,
) -> GptqPlan:
    """Calibrate a float32 model of `mapping` on `tokens` for GPTQ (each layer's X^T X).
    Every rank of `comm` (the TP group) must call this (`calibrate_hessians`)."""
    hessians = calibrate_hessians(_float_model(checkpoint, mapping, comm, window),
                                  text_token_batches(tokens, window), comm)
    return GptqPlan(hessians, schemes.for_layer)


def _float_model(checkpoint: Any, mapping: Mapping, comm: Communicator, window: int,
                 down_rotation: int = 0) -> Any:
    schemes = LlamaSchemes.from_name("fp32", torch.float32, down_rotation=down_rotation)
    return load_llama(checkpoint, mapping, comm, schemes,
                      torch.float32, max_seq=window, max_batch=1)


def relayout_stats(act_amax: dict[str, torch.Tensor], config: Any, tp: int) -> dict[str, torch.Tensor]:
    """TP-1 statistics in the head layout of `tp` ranks: o_proj's input gets the zero columns
    of padded heads (the only layer whose input width depends on the layout)."""
    return _lay_out_o_proj_inputs(act_amax, config, tp, dims=(0,))


def relayout_hessians(hessians: dict[str, torch.Tensor], config: Any,
                      tp: int) -> dict[str, torch.Tensor]:
    """TP-1 Hessians in the head layout of `tp` ranks: the input columns of padded heads
    (o_proj) get zero rows and columns, as inputs that are always zero would give."""
    return _lay_out_o_proj_inputs(hessians, config, tp, dims=(0, 1))


def _lay_out_o_proj_inputs(tensors: dict[str, torch.Tensor], config: Any, tp: int,
                           dims: tuple[int, ...]) -> dict[str, torch.Tensor]:
    """Each o_proj tensor's axes `dims`, indexed by o_proj's input features, laid out as
    o_proj's input columns are for `tp` ranks; the other layers' tensors as they are."""
    layout = plan_heads(config.num_heads, config.num_kv_heads, tp)
    out = dict(tensors)
    for name, t in tensors.items():
        if name.endswith("attention.o_proj"):
            for dim in dims:
                t = lay_out_heads(t, layout, "q", config.head_dim, dim, name)
            out[name] = t
    return out


TOKENIZER_DIR = "tokenizer"


def save_tokenizer(checkpoint: Any, folder: Path) -> None:
    """The engine carries its tokenizer (JSON files, no code), so a run needs no checkpoint."""
    tokenizer = checkpoint.tokenizer()
    if getattr(tokenizer, "chat_template", None) is None and checkpoint.chat_template:
        tokenizer.chat_template = checkpoint.chat_template
    tokenizer.save_pretrained(str(folder))


def _layout(name: str, t: torch.Tensor) -> str:
    # The packing each kernel reads (README: int4 two per byte, even index in the low nibble;
    # int8 / int4 in tiles, tpquant.kernels.tiles).
    if name.endswith(TILED):
        return tiles.LAYOUTS[tiles.code_bits(t)]
    if t.dtype == torch.uint8:
        return "int4_packed_lo_even"
    if t.dtype == torch.int8:
        return "int8"
    return "float"


class _Progress:
    """A checkpoint whose reads advance a progress bar (rank 0 only): one step for the first
    read, whole or sliced, of each tensor."""

    def __init__(self, checkpoint: Any, bar: Any) -> None:
        self._checkpoint, self._bar, self.config = checkpoint, bar, checkpoint.config
        self._seen: set[str] = set()

    def _step(self, name: str) -> None:
        if self._bar is not None and name not in self._seen:
            self._seen.add(name)
            self._bar.update(1)

    def get(self, name: str) -> torch.Tensor:
        t = self._checkpoint.get(name)
        self._step(name)
        return t

    def get_slice(self, name: str, dim: int, start: int, stop: int) -> torch.Tensor:
        t = self._checkpoint.get_slice(name, dim, start, stop)
        self._step(name)
        return t

    def shape(self, name: str) -> tuple[int, ...]:
        return self._checkpoint.shape(name)

    def next_rank(self) -> None:
        self._seen.clear()


def build_rank(checkpoint: Any, spec: BuildSpec, rank: int, key: str, source: str,
               out_dir: Path, plan: SmoothQuantPlan | None = None,
               statistics: WeightStatistics | None = None) -> RankFileInfo:
    """Quantize and shard the model for `rank` of `spec.tp`, and write its file.

    plan: the calibrated smoothing, required for SmoothQuant modes (`smoothquant_plan`).
    statistics: completes the statistics of weight slices (`tpquant.models.loader`):
    `AllReduceStatistics` over the TP group when every rank builds its own file at once,
    one `FullWeightStatistics` shared by every rank a single process builds (the default:
    a fresh one)."""
    if spec.needs_calibration() and plan is None:
        raise ValueError(f"--quant {spec.quant} needs calibration: pass a SmoothQuantPlan")
    # The model's layers never communicate while building: they only quantize and keep
    # their shard. Only the statistics of sliced weights may (all_reduce(max)).
    schemes = spec.schemes_for(checkpoint.config)
    model = load_llama(checkpoint, Mapping(spec.tp, rank), SingleProcessCommunicator(),
                       schemes, DTYPES[spec.dtype], max_seq=1, max_batch=1,
                       quant_options=plan.quant_options if plan else None, transform=plan,
                       statistics=statistics if statistics is not None else FullWeightStatistics())
    tensors = model.state_dict()
    meta = EngineMeta(
        model_config=checkpoint.config.to_dict(),
        quant=spec.quant,
        quant_options={"group_size": spec.group_size, **(
            {"calib_text": Path(spec.calib_text).name, "calib_tokens": spec.calib_tokens,
             "smooth_alpha": spec.smooth_alpha} if plan else {}), **(
            {"down_rotation": schemes.down_rotation} if schemes.down_rotation else {})},
        tp_size=spec.tp,
        rank=rank,
        source_checksum=source,
        build_key=key,
        layouts={name: _layout(name, t) for name, t in tensors.items()},
        extra={"dtype": spec.dtype, "head_layout": dataclasses.asdict(model.layout)},
    )
    return write_rank_file(out_dir, meta, tensors)


def build_engine(spec: BuildSpec, out_dir: str | Path, comm: Communicator) -> tuple[Path, bool]:
    """Build (or reuse) the engine of `spec` in `out_dir`, collectively over `comm`.

    With comm.world_size == spec.tp each rank builds its own file; with world size 1 this
    process builds all of them. The build runs on the CPU: `comm` must take CPU tensors
    (MPI, or a single process), as its collectives combine weight statistics and
    calibration maxima. Returns (out_dir, reused).
    """
    out = Path(out_dir)
    if comm.world_size not in (1, spec.tp):
        raise ValueError(
            f"--tp {spec.tp} with {comm.world_size} MPI ranks: run with mpirun -n {spec.tp}, "
            "or without mpirun to build every rank in one process"
        )

    def prepare() -> tuple[Any, str | None]:
        checkpoint = open_checkpoint(spec.checkpoint)
        # one rank reads every byte of the checkpoint to hash it, not all of them
        return checkpoint, checkpoint.source_checksum() if comm.rank == 0 else None

    checkpoint, source = on_all_ranks(comm, prepare, "opening the checkpoint")
    source = comm.broadcast_object(source, root=0)
    key = on_all_ranks(comm, lambda: build_key(source_checksum=source, **spec.key_fields()),
                       "checking the build options")
    if engine_is_current(out, key):
        comm.barrier()
        return out, True
    out.mkdir(parents=True, exist_ok=True)

    my_ranks = list(range(spec.tp)) if comm.world_size == 1 else [comm.rank]
    bar = None
    if comm.rank == 0:
        from tqdm import tqdm

        bar = tqdm(total=len(checkpoint.names()) * len(my_ranks), desc=f"building {spec.quant} tp{spec.tp}",
                   unit="tensor", disable=None)
    reader = _Progress(checkpoint, bar)

    def calibrate_mine() -> list[SmoothQuantPlan | GptqPlan | None]:
        # Under mpirun each rank calibrates its own shard (all_reduce(max) combines them);
        # one process building every rank calibrates once at TP 1 and re-lays out o_proj's
        # statistics for padded heads. Both give TP 1's maxima up to summation order.
        if not spec.needs_calibration():
            return [None] * len(my_ranks)
        tokens = calibration_tokens(checkpoint, spec.calib_text, spec.calib_tokens)
        schemes = spec.schemes_for(checkpoint.config)
        if spec.gptq:  # GPTQ rounds full weights: one plan serves every rank built here
            if comm.world_size > 1:
                return [gptq_plan(checkpoint, Mapping(spec.tp, comm.rank), comm, tokens,
                                  schemes)]
            base = gptq_plan(checkpoint, Mapping(1, 0), comm, tokens, schemes)
            hessians = relayout_hessians(base.hessians, checkpoint.config, spec.tp)
            return [GptqPlan(hessians, schemes.for_layer)] * len(my_ranks)
        # TP 1 calibration with the target's rotation blocks (they divide every rank's slice)
        rotation = schemes.down_rotation
        if comm.world_size > 1:
            mapping = Mapping(spec.tp, comm.rank)
            return [smoothquant_plan(checkpoint, mapping, comm, tokens, spec.smooth_alpha,
                                     down_rotation=rotation)]
        base = smoothquant_plan(checkpoint, Mapping(1, 0), comm, tokens, spec.smooth_alpha,
                                down_rotation=rotation)
        stats = relayout_stats(base.act_amax, checkpoint.config, spec.tp)
        return [SmoothQuantPlan(stats, spec.smooth_alpha) for _ in my_ranks]

    plans = on_all_ranks(comm, calibrate_mine, "calibrating")

    # Under mpirun the ranks complete each other's statistics; one process computes them
    # once from the full weights and keeps them for every rank it builds.
    statistics = AllReduceStatistics(comm) if comm.world_size > 1 else FullWeightStatistics()

    def build_mine() -> list[RankFileInfo]:
        infos = []
        for r, plan in zip(my_ranks, plans):
            reader.next_rank()
            infos.append(build_rank(reader, spec, r, key, source, out, plan, statistics))
        return infos

    infos = on_all_ranks(comm, build_mine, "building the engine")
    if bar is not None:
        bar.close()
    # rank 0 learns every rank's file info, then writes config.json last: an engine is
    # complete (and reusable) only once it exists
    if comm.world_size > 1:
        infos = [RankFileInfo.from_dict(comm.broadcast_object(infos[0].to_dict(), root=r))
                 for r in range(comm.world_size)]

    def finish() -> None:
        if comm.rank == 0:
            save_tokenizer(checkpoint, out / TOKENIZER_DIR)
            write_engine_config(out, read_rank_metadata(out / infos[0].name), infos)

    on_all_ranks(comm, finish, "writing the tokenizer and config.json")  # waits for rank 0
    return out, False
