"""Building engines: a checkpoint -> one quantized, sharded file per rank (DESIGN s2, s7).

Under mpirun with N ranks each rank builds and writes its own `rank{r}.engine` in parallel;
in a single process one builder writes every rank in turn. Rank 0 then writes config.json.
A build whose inputs (checkpoint bytes, quantization, TP size, dtype, options, format
version) match an existing complete engine reuses it.
"""

from __future__ import annotations

import dataclasses
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
from tpquant.models.llama import LlamaSchemes, load_llama
from tpquant.parallel.mapping import Mapping
from tpquant.quantization.mode import QuantMode

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass(frozen=True)
class BuildSpec:
    """Everything that determines an engine, besides the checkpoint's bytes."""

    checkpoint: str
    quant: str = "fp16"
    tp: int = 1
    dtype: str = "float32"
    group_size: int = 128

    def __post_init__(self) -> None:
        QuantMode.from_name(self.quant)  # ValueError naming the known names
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype {self.dtype!r} unknown; known: {', '.join(DTYPES)}")
        if self.tp < 1:
            raise ValueError(f"tp must be >= 1, got {self.tp}")

    @property
    def schemes(self) -> LlamaSchemes:
        return LlamaSchemes.from_name(self.quant, DTYPES[self.dtype], self.group_size)

    def needs_calibration(self) -> bool:
        return QuantMode.from_name(self.quant).has_act_static_scaling()


TOKENIZER_DIR = "tokenizer"


def save_tokenizer(checkpoint: Any, folder: Path) -> None:
    """The engine carries its tokenizer (JSON files, no code), so a run needs no checkpoint."""
    tokenizer = checkpoint.tokenizer()
    if getattr(tokenizer, "chat_template", None) is None and checkpoint.chat_template:
        tokenizer.chat_template = checkpoint.chat_template
    tokenizer.save_pretrained(str(folder))


def _layout(t: torch.Tensor) -> str:
    # The packing each kernel reads (README: int4 two per byte, even index in the low nibble).
    if t.dtype == torch.uint8:
        return "int4_packed_lo_even"
    if t.dtype == torch.int8:
        return "int8"
    return "float"


class _Progress:
    """A checkpoint whose reads advance a progress bar (rank 0 only)."""

    def __init__(self, checkpoint: Any, bar: Any) -> None:
        self._checkpoint, self._bar, self.config = checkpoint, bar, checkpoint.config

    def get(self, name: str) -> torch.Tensor:
        t = self._checkpoint.get(name)
        if self._bar is not None:
            self._bar.update(1)
        return t


def build_rank(checkpoint: Any, spec: BuildSpec, rank: int, key: str, source: str,
               out_dir: Path) -> RankFileInfo:
    """Quantize and shard the model for `rank` of `spec.tp`, and write its file."""
    if spec.needs_calibration():
        raise ValueError(
            f"--quant {spec.quant} uses static activation scales, which need calibration; "
            "it is not built yet: use w8a8_token or w8a8_token_channel (per-token scales)"
        )
    # Building needs no communication: layers only quantize and keep their shard.
    model = load_llama(checkpoint, Mapping(spec.tp, rank), SingleProcessCommunicator(),
                       spec.schemes, DTYPES[spec.dtype], max_seq=1, max_batch=1)
    tensors = model.state_dict()
    meta = EngineMeta(
        model_config=checkpoint.config.to_dict(),
        quant=spec.quant,
        quant_options={"group_size": spec.group_size},
        tp_size=spec.tp,
        rank=rank,
        source_checksum=source,
        build_key=key,
        layouts={name: _layout(t) for name, t in tensors.items()},
        extra={"dtype": spec.dtype, "head_layout": dataclasses.asdict(model.layout)},
    )
    return write_rank_file(out_dir, meta, tensors)


def build_engine(spec: BuildSpec, out_dir: str | Path, comm: Communicator) -> tuple[Path, bool]:
    """Build (or reuse) the engine of `spec` in `out_dir`, collectively over `comm`.

    With comm.world_size == spec.tp each rank builds its own file; with world size 1 this
    process builds all of them. Returns (out_dir, reused).
    """
    out = Path(out_dir)
    if comm.world_size not in (1, spec.tp):
        raise ValueError(
            f"--tp {spec.tp} with {comm.world_size} MPI ranks: run with mpirun -n {spec.tp}, "
            "or without mpirun to build every rank in one process"
        )

    def prepare() -> tuple[Any, str, str]:
        checkpoint = open_checkpoint(spec.checkpoint)
        source = checkpoint.source_checksum()
        fields = {k: v for k, v in dataclasses.asdict(spec).items() if k != "checkpoint"}
        return checkpoint, source, build_key(source_checksum=source, **fields)

    checkpoint, source, key = on_all_ranks(comm, prepare, "opening the checkpoint")
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

    def build_mine() -> list[RankFileInfo]:
        return [build_rank(reader, spec, r, key, source, out) for r in my_ranks]

    infos = on_all_ranks(comm, build_mine, "building the engine")
    if bar is not None:
        bar.close()
    # rank 0 learns every rank's file info, then writes config.json last: an engine is
    # complete (and reusable) only once it exists
    if comm.world_size > 1:
        infos = [RankFileInfo.from_dict(comm.broadcast_object(infos[0].to_dict(), root=r))
                 for r in range(comm.world_size)]
    if comm.rank == 0:
        save_tokenizer(checkpoint, out / TOKENIZER_DIR)
        write_engine_config(out, read_rank_metadata(out / infos[0].name), infos)
    comm.barrier()
    return out, False
