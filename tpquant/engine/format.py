"""Engine files: one safetensors file per rank plus config.json (DESIGN s7).

    E/config.json       the build's common metadata once, and every rank file with its
                        byte size and sha256
    E/rank{r}.engine    safetensors: rank r's tensors, and in its metadata the same common
                        fields plus `rank` and the packing layout of each tensor

Every safetensors metadata value is JSON (`format_version` "2", `quant` "\\"int4_gw\\"", ...).
Reading is memory-mapped and lazy: `open_rank_file` parses the header, checks it against
config.json and the job, and hands out tensors as views of a private (copy-on-write) mapping
of the file, so only pages that are touched are read and in-place changes never reach the
disk. Nothing is unpickled and nothing in a file is executed.

Writers are atomic: bytes go to a hidden temp file in the same directory, are fsynced, then
renamed over the final name, so a crash leaves either the old file or the new one, never half
of one.

`open_rank_file` refuses, each with its own `EngineError` subclass and a message naming both
values: a TP size other than the job's world size, a missing rank file, a rank file of
another build or rank (its metadata against config.json), a size other than the recorded one
(truncated), a sha256 other than the recorded one (altered; only with verify=True, the one
check that reads the whole file), and a format version this code does not read.

Whatever the bytes of config.json or a rank file, reading raises `EngineError` (a ValueError)
or one of its subclasses, never anything else, and does not hang or allocate more than the
file holds (tests/unit/test_fuzz_readers.py mutates files to check it).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import secrets
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from tpquant.checkpoint import sha256_files

__all__ = [
    "CONFIG_NAME",
    "FORMAT_VERSION",
    "ChecksumError",
    "EngineConfig",
    "EngineConfigError",
    "EngineError",
    "EngineMeta",
    "FormatVersionError",
    "MetadataMismatchError",
    "MissingEngineTensorError",
    "MissingRankFileError",
    "RankEngine",
    "RankFileInfo",
    "RankFileSizeError",
    "TPSizeMismatchError",
    "build_key",
    "engine_is_current",
    "open_rank_file",
    "rank_file_name",
    "read_engine_config",
    "read_rank_metadata",
    "write_engine_config",
    "write_rank_file",
]

# 2: W8A8 engines record down_proj's Hadamard block in quant_options["down_rotation"]; a
# tpquant that reads only 1 would run their rotated weights unrotated, so it must refuse them.
# Version 1 files (no rotation anywhere) are still read.
FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)
CONFIG_NAME = "config.json"
_MAX_HEADER_BYTES = 100 << 20  # safetensors' own limit; guards against garbage lengths


# -- errors ---------------------------------------------------------------------------------


class EngineError(ValueError):
    """An engine directory or file that this job cannot use."""


class EngineConfigError(EngineError):
    """config.json missing, unreadable, or not a tpquant engine config."""


class FormatVersionError(EngineError):
    """Written by a tpquant with another engine format."""


class TPSizeMismatchError(EngineError):
    """The engine was built for another TP size than the job's world size."""


class MissingRankFileError(EngineError):
    """config.json lists a rank file that is not there."""


class RankFileSizeError(EngineError):
    """A rank file whose size differs from config.json (truncated or appended to)."""


class ChecksumError(EngineError):
    """A rank file whose sha256 differs from config.json (altered in place)."""


class MetadataMismatchError(EngineError):
    """A rank file whose metadata disagrees with config.json (another build or rank)."""


class MissingEngineTensorError(EngineError, KeyError):
    """A tensor name the rank file does not hold."""

    def __str__(self) -> str:  # KeyError would repr() the message, quotes and all
        return str(self.args[0])


# -- metadata -------------------------------------------------------------------------------


def rank_file_name(rank: int) -> str:
    return f"rank{rank}.engine"


def _json_copy(value: Any, what: str) -> Any:
    """A JSON round trip: validates, and makes the value equal to what a reader gets back."""
    try:
        return json.loads(json.dumps(value, allow_nan=False))
    except (TypeError, ValueError) as e:
        raise ValueError(f"{what} must be JSON-serializable: {e}") from None


def _short(value: Any, limit: int = 120) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


@dataclass(frozen=True, kw_only=True)
class EngineMeta:
    """What one rank file says about itself.

    model_config: `LlamaConfig.to_dict()` (opaque here).  quant: QuantMode short name.
    quant_options: e.g. {"group_size": 128}.  source_checksum: sha256 of the checkpoint.
    build_key: `build_key(...)` of the build.  layouts: tensor name -> packing layout
    (e.g. "int4_packed_lo_even", "int8", "float").  extra: head layout info etc., the same
    on every rank.  Dict fields are stored as their JSON round trip (tuples become lists).
    """

    model_config: dict[str, Any]
    quant: str
    quant_options: dict[str, Any]
    tp_size: int
    rank: int
    source_checksum: str
    build_key: str
    layouts: dict[str, str] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)
    format_version: int = FORMAT_VERSION

    # The fields every rank shares; config.json holds them once.
    COMMON = ("format_version", "build_key", "tp_size", "quant", "quant_options",
              "source_checksum", "model_config", "extra")

    def __post_init__(self) -> None:
        for name in ("tp_size", "rank", "format_version"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise ValueError(f"EngineMeta.{name} must be an int, got {value!r}")
        if self.tp_size < 1 or not 0 <= self.rank < self.tp_size:
            raise ValueError(f"EngineMeta: need 0 <= rank < tp_size, got rank {self.rank} "
                             f"and tp_size {self.tp_size}")
        for name in ("quant", "source_checksum", "build_key"):
            if not isinstance(getattr(self, name), str) or not getattr(self, name):
                raise ValueError(f"EngineMeta.{name} must be a non-empty str, "
                                 f"got {getattr(self, name)!r}")
        for name in ("model_config", "quant_options", "layouts", "extra"):
            value = getattr(self, name)
            if not isinstance(value, Mapping):
                raise ValueError(f"EngineMeta.{name} must be a dict, got {type(value).__name__}")
            object.__setattr__(self, name, _json_copy(dict(value), f"EngineMeta.{name}"))
        bad = {k: v for k, v in self.layouts.items() if not isinstance(v, str)}
        if bad:
            raise ValueError(f"EngineMeta.layouts values must be str, got {_short(bad)}")

    def common(self) -> dict[str, Any]:
        """The fields shared by every rank, as written to config.json."""
        return {name: getattr(self, name) for name in self.COMMON}

    def to_metadata(self) -> dict[str, str]:
        """safetensors metadata: every field JSON-encoded."""
        return {f.name: json.dumps(getattr(self, f.name), allow_nan=False)
                for f in dataclasses.fields(self)}

    @classmethod
    def from_metadata(cls, metadata: Mapping[str, str], source: str = "rank file") -> EngineMeta:
        """Inverse of `to_metadata`; checks the format version before anything else."""
        if "format_version" not in metadata:
            raise EngineError(f"{source} is not a tpquant engine file: its safetensors "
                              "metadata has no format_version")
        values: dict[str, Any] = {}
        for f in dataclasses.fields(cls):
            if f.name not in metadata:
                continue
            try:
                values[f.name] = json.loads(metadata[f.name])
            except (TypeError, json.JSONDecodeError, RecursionError) as e:
                raise EngineError(f"{source}: metadata {f.name!r} is not JSON ({e})") from None
        _check_version(values["format_version"], source)
        missing = [f.name for f in dataclasses.fields(cls)
                   if f.name not in values and f.default is dataclasses.MISSING
                   and f.default_factory is dataclasses.MISSING]
        if missing:
            raise EngineError(f"{source}: metadata lacks {missing}")
        try:
            return cls(**values)
        except ValueError as e:
            raise EngineError(f"{source}: bad metadata: {e}") from None


def _check_version(version: Any, source: str) -> None:
    if isinstance(version, bool) or version not in READABLE_VERSIONS:
        raise FormatVersionError(
            f"{source} has format version {version!r}, this tpquant reads {FORMAT_VERSION} "
            f"(and {', '.join(str(v) for v in READABLE_VERSIONS if v != FORMAT_VERSION)}); "
            "rebuild the engine with this tpquant (or use the tpquant that built it)"
        )


@dataclass(frozen=True)
class RankFileInfo:
    """One rank file as config.json records it."""

    rank: int
    name: str
    size: int
    sha256: str

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> RankFileInfo:
        return cls(rank=d["rank"], name=d["name"], size=d["size"], sha256=d["sha256"])


@dataclass(frozen=True, kw_only=True)
class EngineConfig:
    """config.json: the build's common metadata (`EngineMeta.COMMON`) and its rank files."""

    engine_dir: Path
    format_version: int
    build_key: str
    tp_size: int
    quant: str
    quant_options: dict[str, Any]
    source_checksum: str
    model_config: dict[str, Any]
    extra: dict[str, Any]
    ranks: tuple[RankFileInfo, ...]

    def common(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in EngineMeta.COMMON}


# -- writing --------------------------------------------------------------------------------


def _atomic_write(final: Path, write: Callable[[Path], None]) -> None:
    """write(tmp) into a hidden temp file beside `final`, fsync, rename over `final`."""
    tmp = final.with_name(f".{final.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    # O_EXCL: never clobber another writer's temp; mode 0o666 lets the umask decide.
    os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
    try:
        write(tmp)
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, final)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(final.parent)  # make the rename itself durable


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return  # platforms without directory fds: the rename is still atomic
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _storable(tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Contiguous CPU tensors that each own exactly their storage.

    safetensors refuses tensors that share memory (two slices of one fused weight, a narrowed
    shard still backed by the full tensor), so those are copied; the rest are written as is.
    """
    out: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for name, t in tensors.items():
        if not isinstance(name, str):
            raise TypeError(f"tensor names must be str, got {name!r}")
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name!r} is a {type(t).__name__}, not a torch.Tensor")
        t = t.detach().to("cpu")
        if t.numel() > 0:
            ptr = t.untyped_storage().data_ptr()
            owns = (t.is_contiguous() and t.storage_offset() == 0
                    and t.untyped_storage().nbytes() == t.numel() * t.element_size())
            if not owns or ptr in seen:
                t = t.clone(memory_format=torch.contiguous_format)
                ptr = t.untyped_storage().data_ptr()
            seen.add(ptr)
        out[name] = t
    return out


def write_rank_file(engine_dir: str | Path, meta: EngineMeta,
                    tensors: Mapping[str, torch.Tensor]) -> RankFileInfo:
    """Write `engine_dir/rank{meta.rank}.engine` atomically; returns its size and sha256.

    Tensors may live on any device and be views; they are written as contiguous CPU copies
    where needed. Every key of meta.layouts must name one of the tensors.
    """
    if meta.format_version != FORMAT_VERSION:
        raise ValueError(f"this tpquant writes format version {FORMAT_VERSION}, "
                         f"meta says {meta.format_version}")
    unknown = sorted(set(meta.layouts) - set(tensors))
    if unknown:
        raise ValueError(f"meta.layouts names tensors that are not written: {unknown}")
    stored = _storable(tensors)
    engine_dir = Path(engine_dir)
    engine_dir.mkdir(parents=True, exist_ok=True)
    final = engine_dir / rank_file_name(meta.rank)
    digest: list[str] = []

    def write(tmp: Path) -> None:
        save_file(stored, tmp, metadata=meta.to_metadata())
        digest.append(sha256_files([tmp]))  # just written: served from the page cache

    _atomic_write(final, write)
    return RankFileInfo(rank=meta.rank, name=final.name, size=final.stat().st_size,
                        sha256=digest[0])


def write_engine_config(engine_dir: str | Path, meta: EngineMeta,
                        ranks: Sequence[RankFileInfo]) -> Path:
    """Write `engine_dir/config.json` atomically: meta's common fields and every rank file.

    `meta` is any rank's metadata (its rank and layouts are not used); `ranks` must hold one
    entry per rank, in any order.
    """
    ranks = sorted(ranks, key=lambda r: r.rank)
    got = [r.rank for r in ranks]
    if got != list(range(meta.tp_size)):
        raise ValueError(f"need one RankFileInfo for each of ranks 0..{meta.tp_size - 1}, "
                         f"got ranks {got}")
    for r in ranks:
        if r.name != rank_file_name(r.rank):
            raise ValueError(f"rank {r.rank} file is named {r.name!r}, "
                             f"expected {rank_file_name(r.rank)!r}")
    doc = {**meta.common(), "ranks": [r.to_dict() for r in ranks]}
    text = json.dumps(doc, indent=2, allow_nan=False) + "\n"
    engine_dir = Path(engine_dir)
    engine_dir.mkdir(parents=True, exist_ok=True)
    final = engine_dir / CONFIG_NAME
    _atomic_write(final, lambda tmp: tmp.write_text(text, encoding="utf-8"))
    return final


# -- reading --------------------------------------------------------------------------------


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def read_engine_config(engine_dir: str | Path) -> EngineConfig:
    """Parse and validate `engine_dir/config.json` (no rank file is touched)."""
    engine_dir = Path(engine_dir)
    path = engine_dir / CONFIG_NAME
    if not engine_dir.is_dir():
        what = "does not exist" if not engine_dir.exists() else "is not a directory"
        raise EngineConfigError(f"engine directory {engine_dir} {what}; build one with "
                                f"`python -m tpquant.build ... --out {engine_dir}`")
    if not path.is_file():
        raise EngineConfigError(f"{engine_dir} holds no engine: {CONFIG_NAME} is missing "
                                "(never built, or a build that did not finish)")
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        # RecursionError: nesting deeper than the parser's stack ("[[[[..."), not a crash
        raise EngineConfigError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(doc, dict) or "format_version" not in doc:
        raise EngineConfigError(f"{path} is not a tpquant engine config (no format_version; "
                                "a Hugging Face checkpoint directory, perhaps?)")
    _check_version(doc["format_version"], str(path))

    missing = [k for k in (*EngineMeta.COMMON, "ranks") if k not in doc]
    if missing:
        raise EngineConfigError(f"{path} lacks {missing}")
    tp = doc["tp_size"]
    if not _is_int(tp) or tp < 1:
        raise EngineConfigError(f"{path}: tp_size must be a positive int, got {tp!r}")
    for k in ("build_key", "quant", "source_checksum"):
        if not isinstance(doc[k], str):
            raise EngineConfigError(f"{path}: {k} must be a str, got {_short(doc[k])}")
    for k in ("quant_options", "model_config", "extra"):
        if not isinstance(doc[k], dict):
            raise EngineConfigError(f"{path}: {k} must be an object, got {_short(doc[k])}")
    entries = doc["ranks"]
    if not isinstance(entries, list) or len(entries) != tp:
        raise EngineConfigError(f"{path}: 'ranks' must list {tp} rank files (tp_size {tp}), "
                                f"got {_short(entries)}")
    ranks = []
    for r, e in enumerate(entries):
        ok = (isinstance(e, dict) and e.get("rank") == r and e.get("name") == rank_file_name(r)
              and _is_int(e.get("size")) and e["size"] >= 0
              and isinstance(e.get("sha256"), str) and len(e["sha256"]) == 64)
        if not ok:
            raise EngineConfigError(f"{path}: bad entry {r} in 'ranks': {_short(e)} (want "
                                    f"rank {r}, name {rank_file_name(r)!r}, size, sha256)")
        ranks.append(RankFileInfo.from_dict(e))
    return EngineConfig(engine_dir=engine_dir, ranks=tuple(ranks),
                        **{k: doc[k] for k in EngineMeta.COMMON})


def _read_header(path: Path) -> dict[str, Any]:
    """The safetensors JSON header, parsed without mapping the data (works on a cut file)."""
    with open(path, "rb") as f:
        head = f.read(8)
        size = os.fstat(f.fileno()).st_size
        if len(head) < 8:
            raise EngineError(f"{path} is {size} bytes, too short for a safetensors file")
        n = int.from_bytes(head, "little")
        if n > min(_MAX_HEADER_BYTES, size - 8):
            raise EngineError(f"{path}: header length {n} does not fit in its {size} bytes "
                              "(truncated, or not a safetensors file)")
        raw = f.read(n)
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise EngineError(f"{path}: safetensors header is not valid JSON ({e})") from None
    if not isinstance(header, dict):
        raise EngineError(f"{path}: safetensors header is not a JSON object")
    return header


def read_rank_metadata(path: str | Path) -> EngineMeta:
    """The EngineMeta of a rank file, from its header alone (tensor data is not read)."""
    path = Path(path)
    metadata = _read_header(path).get("__metadata__") or {}
    if not isinstance(metadata, dict):
        raise EngineError(f"{path}: safetensors __metadata__ is not an object")
    return EngineMeta.from_metadata(metadata, source=str(path))


def _check_against_config(meta: EngineMeta, cfg: EngineConfig, rank: int, path: Path) -> None:
    expected = {**cfg.common(), "rank": rank}
    diffs = [f"{k}: file has {_short(getattr(meta, k))}, config.json has {_short(v)}"
             for k, v in expected.items() if getattr(meta, k) != v]
    if diffs:
        raise MetadataMismatchError(
            f"{path} does not belong to the engine in {cfg.engine_dir} as rank {rank} "
            f"(a file of another rank or another build?): " + "; ".join(diffs)
        )


class RankEngine:
    """One rank's engine file, open and memory-mapped.

    `get(name)` returns a CPU tensor that is a view of a private, copy-on-write mapping of
    the file: pages are read when first touched, and writing to the tensor never changes the
    file. Tensors stay valid after `close()`.
    """

    def __init__(self, path: Path, meta: EngineMeta, handle: Any) -> None:
        self.path = path
        self.meta = meta
        self._handle = handle
        self._names = tuple(handle.keys())

    def names(self) -> tuple[str, ...]:
        return self._names

    def __contains__(self, name: object) -> bool:
        return name in self._names

    def get(self, name: str) -> torch.Tensor:
        if name not in self._names:
            raise MissingEngineTensorError(f"tensor {name!r} is not in {self.path}")
        if self._handle is None:
            raise EngineError(f"{self.path} is closed")
        return self._handle.get_tensor(name)

    def tensors(self) -> Mapping[str, torch.Tensor]:
        """A lazy read-only mapping name -> tensor (each access maps, nothing is copied)."""
        return _LazyTensors(self)

    def close(self) -> None:
        self._handle = None

    def __enter__(self) -> RankEngine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return (f"RankEngine({str(self.path)!r}, rank={self.meta.rank}/{self.meta.tp_size}, "
                f"quant={self.meta.quant!r}, tensors={len(self._names)})")


class _LazyTensors(Mapping):
    def __init__(self, engine: RankEngine) -> None:
        self._engine = engine

    def __getitem__(self, name: str) -> torch.Tensor:
        return self._engine.get(name)

    def __iter__(self) -> Iterator[str]:
        return iter(self._engine.names())

    def __len__(self) -> int:
        return len(self._engine.names())


def open_rank_file(engine_dir: str | Path, rank: int, world_size: int,
                   verify: bool = True) -> RankEngine:
    """Check `engine_dir` against this job and memory-map rank `rank`'s file.

    Cheap checks first (config.json, TP size, the file's header metadata, its size), then,
    with verify=True, the sha256 of the whole file.
    """
    cfg = read_engine_config(engine_dir)
    if world_size != cfg.tp_size:
        raise TPSizeMismatchError(
            f"engine {cfg.engine_dir} was built for TP {cfg.tp_size}, this job has "
            f"{world_size} ranks; run with mpirun -n {cfg.tp_size} or rebuild with "
            f"--tp {world_size}"
        )
    if not 0 <= rank < world_size:
        raise EngineError(f"rank {rank} is out of range for a job of {world_size} ranks")
    info = cfg.ranks[rank]
    path = cfg.engine_dir / info.name
    if not path.is_file():
        raise MissingRankFileError(f"rank file {path} is missing (config.json lists it with "
                                   f"{info.size} bytes); rebuild the engine")
    size = path.stat().st_size

    def size_error() -> RankFileSizeError:
        how = "truncated" if size < info.size else "longer than recorded"
        return RankFileSizeError(f"{path} is {size} bytes, config.json records {info.size} "
                                 f"({how}); rebuild the engine")

    try:
        meta = read_rank_metadata(path)
    except FormatVersionError:
        raise
    except EngineError:
        if size != info.size:  # a cut header: the size says more than the parse error
            raise size_error() from None
        raise
    _check_against_config(meta, cfg, rank, path)
    if size != info.size:
        raise size_error()
    if verify:
        digest = sha256_files([path])
        if digest != info.sha256:
            raise ChecksumError(f"{path} has sha256 {digest}, config.json records "
                                f"{info.sha256} (altered since the build); rebuild the engine")
    try:
        handle = safe_open(str(path), framework="pt")
    except Exception as e:  # safetensors raises its own SafetensorError
        raise EngineError(f"{path} is not a readable safetensors file: {e}") from None
    return RankEngine(path, meta, handle)


# -- build identity -------------------------------------------------------------------------


def build_key(**fields: Any) -> str:
    """sha256 of the canonical JSON of everything that determines an engine.

    Key order, at every level, does not matter; any changed value changes the key. The
    format version is included unless given, so a new format never reuses an old engine.
    Values must be JSON types (pass dtypes and modes by name).
    """
    payload = {"format_version": FORMAT_VERSION, **fields}
    text = json.dumps(payload, sort_keys=True, separators=(",", ":"), ensure_ascii=True,
                      allow_nan=False)
    return hashlib.sha256(text.encode("ascii")).hexdigest()


def engine_is_current(engine_dir: str | Path, key: str) -> bool:
    """True when `engine_dir` holds a complete engine of build `key` (no hashing).

    Checks config.json's build key, and that every rank file exists with its recorded size
    and carries that build key and its rank in its header.
    """
    try:
        cfg = read_engine_config(engine_dir)
        if cfg.build_key != key:
            return False
        for info in cfg.ranks:
            path = cfg.engine_dir / info.name
            if not path.is_file() or path.stat().st_size != info.size:
                return False
            meta = read_rank_metadata(path)
            if meta.build_key != key or meta.rank != info.rank or meta.tp_size != cfg.tp_size:
                return False
    except (EngineError, OSError):
        return False
    return True
