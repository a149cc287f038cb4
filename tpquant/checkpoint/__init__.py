"""Lazy, memory-mapped checkpoint readers (DESIGN s2, build flow).

`open_checkpoint(path)` returns a `Checkpoint` for a Hugging Face directory (config.json +
safetensors, see hf.py) or a GGUF file (gguf.py). Every reader speaks the Hugging Face Llama
tensor names and layouts:

    model.embed_tokens.weight                       [vocab, hidden]
    model.layers.{i}.input_layernorm.weight         [hidden]
    model.layers.{i}.self_attn.{q,k,v,o}_proj.weight [out, in]
    model.layers.{i}.post_attention_layernorm.weight [hidden]
    model.layers.{i}.mlp.{gate,up,down}_proj.weight [out, in]
    model.norm.weight                               [hidden]
    lm_head.weight                                  [vocab, hidden], absent when tied

(plus `.bias` entries where config.attention_bias / mlp_bias say so).

dtypes: `get`/`get_slice` return float16 and bfloat16 tensors in their stored dtype (doubling
them to float32 would only cost memory; consumers cast where they compute) and everything else
as float32: float32 as is, float64/fp8/int tensors converted, GGUF block-quantized tensors
dequantized. Returned tensors own their memory: in-place changes to one (a SmoothQuant
rescale, say) never show up in a later `get` (safetensors alone would hand out views of one
shared mapping).

`get_slice(name, dim, start, stop)` equals `get(name).narrow(dim, start, stop - start)` and reads
only that slice where the format allows, so a tensor-parallel rank touches little more than
its own shard.
"""

from __future__ import annotations

import abc
import hashlib
from pathlib import Path
from typing import Any, Iterable

import torch

from tpquant.models.config import LlamaConfig

__all__ = ["Checkpoint", "MissingTensorError", "open_checkpoint", "sha256_files"]

_KEPT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


class MissingTensorError(KeyError):
    """A tensor name the checkpoint does not hold."""

    def __init__(self, name: str, path: str | Path, detail: str = "") -> None:
        self.name = name
        self.path = str(path)
        msg = f"tensor {name!r} is not in checkpoint {self.path}"
        super().__init__(msg + (f" ({detail})" if detail else ""))

    def __str__(self) -> str:  # KeyError would repr() the message, quotes and all
        return str(self.args[0])


class Checkpoint(abc.ABC):
    """A model checkpoint read lazily: config, tensors by HF name, tokenizer."""

    path: Path
    config: LlamaConfig

    @abc.abstractmethod
    def names(self) -> list[str]:
        """Every tensor name, HF Llama naming, in file order."""

    @abc.abstractmethod
    def get(self, name: str) -> torch.Tensor:
        """The whole tensor (dtype: see the module docstring)."""

    @abc.abstractmethod
    def get_slice(self, name: str, dim: int, start: int, stop: int) -> torch.Tensor:
        """`get(name)` narrowed to [start, stop) along dim, reading only what it must."""

    @abc.abstractmethod
    def shape(self, name: str) -> tuple[int, ...]:
        """Shape of a tensor in HF layout, without reading it."""

    @abc.abstractmethod
    def source_checksum(self) -> str:
        """sha256 hex digest of the checkpoint file(s) (streamed, never fully in memory)."""

    @abc.abstractmethod
    def tokenizer(self) -> Any:
        """The model's tokenizer as a transformers tokenizer (needs `transformers`)."""

    @property
    @abc.abstractmethod
    def chat_template(self) -> str | None:
        """Jinja chat template shipped with the checkpoint, None if it has none."""

    def close(self) -> None:
        """Release file handles (the default holds none worth closing)."""

    def __enter__(self) -> Checkpoint:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __contains__(self, name: str) -> bool:
        return name in self.names()

    def _missing(self, name: str, detail: str = "") -> MissingTensorError:
        return MissingTensorError(name, self.path, detail)


def slice_dim(shape: tuple[int, ...], dim: int, start: int, stop: int) -> int:
    """Validate a get_slice request against a shape; returns dim made non-negative."""
    ndim = len(shape)
    if not -ndim <= dim < ndim:
        raise IndexError(f"dim {dim} out of range for a tensor of shape {tuple(shape)}")
    dim %= ndim
    if not 0 <= start <= stop <= shape[dim]:
        raise IndexError(
            f"slice [{start}, {stop}) out of range for dim {dim} of shape {tuple(shape)}"
        )
    return dim


def output_dtype(t: torch.Tensor, copy: bool = False) -> torch.Tensor:
    """Apply the module's dtype policy: keep fp32/fp16/bf16, everything else to float32.

    copy=True guarantees a tensor with its own memory (for views of a mapped file).
    """
    if t.dtype not in _KEPT_DTYPES:
        return t.to(torch.float32)
    return t.clone() if copy else t


def sha256_files(paths: Iterable[Path], root: Path | None = None, chunk: int = 1 << 22) -> str:
    """sha256 over several files, streamed in chunks.

    With several files each one's name (relative to root) and size go in before its bytes,
    so moving bytes from one shard to the next changes the digest. A single file with no root
    hashes to exactly `sha256sum` of that file.
    """
    paths = list(paths)
    h = hashlib.sha256()
    for p in paths:
        if root is not None:
            h.update(f"{p.relative_to(root).as_posix()}\0{p.stat().st_size}\0".encode())
        with open(p, "rb") as f:
            while block := f.read(chunk):
                h.update(block)
    return h.hexdigest()


def open_checkpoint(path: str | Path) -> Checkpoint:
    """Open a Hugging Face directory (with config.json) or a .gguf file, lazily."""
    p = Path(path)
    if p.is_dir():
        if not (p / "config.json").is_file():
            raise ValueError(
                f"{p} is a directory without config.json: not a Hugging Face checkpoint"
            )
        from tpquant.checkpoint.hf import HFCheckpoint  # imported here: hf imports this module

        return HFCheckpoint(p)
    if p.is_file() and p.suffix.lower() == ".gguf":
        from tpquant.checkpoint.gguf import GGUFCheckpoint  # `gguf` is only needed for GGUF

        return GGUFCheckpoint(p)
    what = "does not exist" if not p.exists() else "is neither a directory nor a .gguf file"
    raise ValueError(
        f"cannot open checkpoint {p}: it {what}; expected a Hugging Face directory with "
        "config.json and *.safetensors, or a .gguf file"
    )
