"""Hugging Face checkpoint directory: config.json + safetensors (single file or sharded).

Tensors are read through `safetensors.safe_open`, which memory-maps each shard and reads only
the bytes a `get_slice` asks for. Shards are opened on first use. Tensor names are the HF Llama
names already; the only filtering is dropping non-weights some exports carry
(`rotary_emb.inv_freq`) and a stored `lm_head.weight` when config.json says it is tied.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from tpquant.checkpoint import Checkpoint, output_dtype, sha256_files, slice_dim
from tpquant.models.config import LlamaConfig

_INDEX = "model.safetensors.index.json"
_SINGLE = "model.safetensors"


class HFCheckpoint(Checkpoint):
    """A Hugging Face Llama directory, read lazily."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.config = _read_config(self.path)
        if (self.path / _INDEX).is_file():
            weight_map: dict[str, str] = json.loads((self.path / _INDEX).read_text())["weight_map"]
        elif (self.path / _SINGLE).is_file():
            with safe_open(self.path / _SINGLE, framework="pt") as f:
                weight_map = {name: _SINGLE for name in f.keys()}
        else:
            raise ValueError(f"{self.path} has neither {_SINGLE} nor {_INDEX}")
        self._files = sorted(set(weight_map.values()))
        self._weight_map = {
            name: file for name, file in weight_map.items()
            if not name.endswith("rotary_emb.inv_freq")
            and not (self.config.tie_word_embeddings and name == "lm_head.weight")
        }
        self._handles: dict[str, Any] = {}  # shard file -> safe_open handle
        self._keys: dict[str, set[str]] = {}  # shard file -> the names it really holds
        self._tokenizer: Any = None
        self._checksum: str | None = None

    # -- tensors ---------------------------------------------------------------------

    def names(self) -> list[str]:
        return list(self._weight_map)

    def __contains__(self, name: str) -> bool:
        return name in self._weight_map

    def _handle(self, name: str) -> Any:
        file = self._weight_map.get(name)
        if file is None:
            raise self._missing(name)
        if file not in self._handles:
            if not (self.path / file).is_file():
                raise self._missing(name, f"its shard {file} does not exist")
            self._handles[file] = safe_open(self.path / file, framework="pt")
            self._keys[file] = set(self._handles[file].keys())
        if name not in self._keys[file]:
            raise self._missing(name, f"the index places it in {file}, which lacks it")
        return self._handles[file]

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._handle(name).get_slice(name).get_shape())

    def get(self, name: str) -> torch.Tensor:
        return output_dtype(self._handle(name).get_tensor(name), copy=True)

    def get_slice(self, name: str, dim: int, start: int, stop: int) -> torch.Tensor:
        sl = self._handle(name).get_slice(name)
        dim = slice_dim(tuple(sl.get_shape()), dim, start, stop)
        return output_dtype(sl[(slice(None),) * dim + (slice(start, stop),)], copy=True)

    def source_checksum(self) -> str:
        if self._checksum is None:
            index = [_INDEX] if (self.path / _INDEX).is_file() else []
            files = ["config.json", *index, *self._files]
            self._checksum = sha256_files([self.path / f for f in files], root=self.path)
        return self._checksum

    def close(self) -> None:
        self._handles.clear()

    # -- tokenizer -------------------------------------------------------------------

    def tokenizer(self) -> Any:
        if self._tokenizer is None:
            from transformers import AutoTokenizer  # optional dependency, only for text I/O

            self._tokenizer = AutoTokenizer.from_pretrained(str(self.path), local_files_only=True)
        return self._tokenizer

    @property
    def chat_template(self) -> str | None:
        template = getattr(self.tokenizer(), "chat_template", None)
        return template if isinstance(template, str) else None

    def __repr__(self) -> str:
        return f"HFCheckpoint({str(self.path)!r}, {len(self._files)} shard(s))"


def _read_config(path: Path) -> LlamaConfig:
    """config.json, plus any extra end-of-sequence ids from generation_config.json."""
    d = json.loads((path / "config.json").read_text())
    quant = (d.get("quantization_config") or {}).get("quant_method")
    if quant is not None:  # GPTQ/AWQ/fp8 exports store packed weights under other names
        raise ValueError(
            f"{path} holds a pre-quantized checkpoint (quant_method={quant!r}); "
            "tpquant quantizes itself: give it the float16/bfloat16/float32 checkpoint"
        )
    config = LlamaConfig.from_hf(d)
    gen_path = path / "generation_config.json"
    if gen_path.is_file():
        eos = json.loads(gen_path.read_text()).get("eos_token_id")
        extra = [] if eos is None else [eos] if isinstance(eos, int) else list(eos)
        new = tuple(t for t in dict.fromkeys(extra) if t not in config.eos_token_ids)
        merged = config.eos_token_ids + new
        config = dataclasses.replace(config, eos_token_ids=merged)
    return config
