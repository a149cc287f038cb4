"""GGUF checkpoint (llama.cpp format), read through `gguf.GGUFReader` (memory-mapped).

What differs from a Hugging Face checkpoint, and how this reader undoes it:

* Names: llama.cpp names (`blk.3.attn_q.weight`) map to HF names through `_LAYER_NAMES`.
* Shapes: GGUF lists dimensions innermost first (ggml `ne` order); the HF shape is the
  reverse, and the memory layout is the same row-major [out, in] as HF.
* Quantized types: rows are stored as blocks of `block_size` values (`GGML_QUANT_SIZES`).
  `get_slice` along rows reads only those rows; along columns it reads the blocks covering
  [start, stop) of every row. Both dequantize only what they read (`gguf.quants.dequantize`,
  float32). Float16/bfloat16 tensors keep their dtype, float32 stays float32.
* RoPE layout: llama.cpp's converter permutes the rows of q_proj and k_proj inside every head
  from HF's "rotate halves" order to its interleaved-pairs order. Within one head of size d,
  HF row `j * d/2 + i` (j in {0, 1}, i < d/2) is stored at GGUF row `2 * i + j`. Reading
  undoes it per head, so a row slice reads the whole heads it touches and narrows after.
* Llama-3.1 RoPE scaling: llama.cpp stores the per-frequency factors as the tensor
  `rope_freqs.weight` instead of the four config numbers; `llama3_scaling_from_rope_freqs`
  recovers them (exactly up to float32 rounding) and the tensor is not listed in names().
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
from gguf.gguf_reader import GGUFReader  # the class itself, whatever `gguf.GGUFReader` is
from gguf.quants import dequantize

from tpquant.checkpoint import Checkpoint, output_dtype, sha256_files, slice_dim
from tpquant.models.config import Llama3RopeScaling, LlamaConfig

# llama.cpp per-layer tensor -> HF module path under model.layers.{i}
_LAYER_NAMES = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_GLOBAL_NAMES = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
}
_SKIPPED = {"rope_freqs"}  # folded into config.rope_scaling
_SKIPPED_LAYER = {"attn_rot_embd"}  # old exports' inv_freq: not a weight


class FastGGUFReader(GGUFReader):
    """`gguf.GGUFReader` parsing through a plain ndarray view of its memory map.

    GGUFReader walks the header through one small slice of `self.data` per value, and a
    tokenizer's vocabulary and merges are ~100k strings. Each slice of an `np.memmap` runs
    numpy's memmap bookkeeping (`__array_finalize__`), which made opening SmolLM2's GGUF
    take ~5 s on every rank; over a plain view of the same mapping the same parse is 3-5x
    faster. The mapping stays open through the view's `base`; tensors are still views of
    the file, read only where sliced.
    """

    @property  # type: ignore[override]
    def data(self) -> np.ndarray:
        return self._plain_data

    @data.setter
    def data(self, value: np.ndarray) -> None:
        self._plain_data = value.view(np.ndarray)


def hf_name(gguf_name: str) -> str | None:
    """llama.cpp tensor name -> HF Llama name; None for tensors that are not weights."""
    stem, _, suffix = gguf_name.rpartition(".")
    if suffix not in ("weight", "bias"):
        raise ValueError(f"unexpected GGUF tensor name {gguf_name!r}")
    parts = stem.split(".")
    if len(parts) == 3 and parts[0] == "blk" and parts[1].isdigit():
        if parts[2] in _SKIPPED_LAYER:
            return None
        if parts[2] in _LAYER_NAMES:
            return f"model.layers.{parts[1]}.{_LAYER_NAMES[parts[2]]}.{suffix}"
    elif stem in _SKIPPED:
        return None
    elif stem in _GLOBAL_NAMES:
        return f"{_GLOBAL_NAMES[stem]}.{suffix}"
    raise ValueError(f"GGUF tensor {gguf_name!r} is not part of a dense Llama model")


def unpermute_rope_rows(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Undo llama.cpp's q/k row permutation: interleaved pairs -> HF rotate-halves order."""
    rows = w.shape[0]
    head_dim = rows // n_heads
    if head_dim * n_heads != rows or head_dim % 2:
        raise ValueError(f"{rows} rows do not split into {n_heads} heads of even size")
    # GGUF row h*d + 2i + j  ->  HF row h*d + j*d/2 + i
    return w.reshape(n_heads, head_dim // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def llama3_rope_factors(scaling: Llama3RopeScaling, rope_theta: float, head_dim: int) -> np.ndarray:
    """Per-frequency wavelength factors of llama3 scaling, as llama.cpp computes them."""
    k = np.arange(0, head_dim, 2, dtype=np.float64)
    wavelen = 2 * math.pi * rope_theta ** (k / head_dim)
    low_wavelen = scaling.original_max_position_embeddings / scaling.low_freq_factor
    high_wavelen = scaling.original_max_position_embeddings / scaling.high_freq_factor
    smooth = (scaling.original_max_position_embeddings / wavelen - scaling.low_freq_factor) / (
        scaling.high_freq_factor - scaling.low_freq_factor
    )
    mid = 1.0 / ((1 - smooth) / scaling.factor + smooth)
    long = np.where(wavelen > low_wavelen, scaling.factor, mid)
    return np.where(wavelen < high_wavelen, 1.0, long)


def llama3_scaling_from_rope_freqs(
    factors: np.ndarray,
    rope_theta: float,
    head_dim: int,
    original_max_position_embeddings: int = 8192,
) -> Llama3RopeScaling:
    """Recover llama3 RoPE scaling from llama.cpp's per-frequency factors (`rope_freqs`).

    llama.cpp stores, per frequency k, r_k = 1 (short wavelengths), `factor` (long ones) or, in
    between, 1 / ((1 - s)/factor + s) with s = (L / wavelen_k - low) / (high - low). That is
    s = A / wavelen_k - B with A = L/(high - low), B = low/(high - low): only A and B are
    determined, so L is taken as given (llama.cpp itself assumes 8192) and low/high follow.
    The fitted parameters must reproduce every stored factor.
    """
    r = np.asarray(factors, dtype=np.float64)
    if r.shape != (head_dim // 2,):
        raise ValueError(f"rope_freqs has shape {r.shape}, expected ({head_dim // 2},)")
    factor = float(r.max())
    mid = (r > 1.0 + 1e-6) & (r < factor * (1.0 - 1e-6))
    if factor <= 1.0 or mid.sum() < 2:
        raise ValueError(
            "rope_freqs is not llama3 scaling with an interpolated band: "
            "cannot recover its parameters"
        )
    wavelen = 2 * math.pi * rope_theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    smooth = (1.0 / r[mid] - 1.0 / factor) / (1.0 - 1.0 / factor)
    design = np.stack([1.0 / wavelen[mid], -np.ones(int(mid.sum()))], axis=1)
    (a, b), *_ = np.linalg.lstsq(design, smooth, rcond=None)
    orig = original_max_position_embeddings
    scaling = Llama3RopeScaling(
        factor=round(factor, 5),
        low_freq_factor=round(orig * b / a, 5),
        high_freq_factor=round(orig * (b + 1.0) / a, 5),
        original_max_position_embeddings=orig,
    )
    if not np.allclose(llama3_rope_factors(scaling, rope_theta, head_dim), r, rtol=1e-4, atol=0):
        raise ValueError("rope_freqs does not follow the llama3 scaling formula")
    return scaling


class GGUFCheckpoint(Checkpoint):
    """A llama.cpp GGUF file with a dense Llama model, read lazily."""

    def __init__(self, path: str | Path) -> None:
        """Parse the header (metadata and tensor table; no tensor data is read).

        A file this reader cannot use, damaged or truncated included, raises ValueError
        naming the file and what is wrong; nothing else escapes from a bad file. Every
        tensor's type, shape and byte range are checked here, so later reads need no checks.
        """
        self.path = Path(path)

        class StrictReader(FastGGUFReader):
            # GGUFReader's reads past the end of the file return short (even empty) arrays,
            # so an array field that claims 2**60 elements loops forever, filling a list.
            # Refusing a short read bounds the parse by the file's size.
            def _get(self, offset: int, dtype: Any, count: int = 1,
                     override_order: Any = None) -> Any:
                values = super()._get(offset, dtype, count, override_order)
                if len(values) != int(count):
                    raise ValueError(f"the file ends inside the {int(count)} values of "
                                     f"{np.dtype(dtype)} it declares at byte {offset}")
                return values

        try:
            self._reader = StrictReader(self.path, "r")
        except Exception as e:  # noqa: BLE001 - the gguf package raises whatever a bad byte causes
            raise ValueError(f"{self.path} is not a readable GGUF file (damaged or truncated?): "
                             f"{type(e).__name__}: {e}") from None
        arch = self._meta("general.architecture")
        if arch != "llama":
            raise ValueError(
                f"{self.path}: GGUF architecture is {arch!r}, only 'llama' is supported"
            )
        self._tensors: dict[str, Any] = {}  # HF name -> gguf ReaderTensor
        self._by_gguf_name = {t.name: t for t in self._reader.tensors}
        if len(self._by_gguf_name) != len(self._reader.tensors):
            raise ValueError(f"{self.path}: the GGUF tensor table names a tensor twice")
        readable: dict[Any, bool] = {}
        for t in self._reader.tensors:
            name = hf_name(t.name)
            if name is None:
                continue
            qtype = t.tensor_type
            if qtype not in readable:  # one block of zeros: NotImplementedError for exotic types
                try:
                    if qtype in GGML_QUANT_SIZES and t.data.dtype == np.uint8 \
                            and qtype != GGMLQuantizationType.BF16:
                        dequantize(np.zeros((1, GGML_QUANT_SIZES[qtype][1]), np.uint8), qtype)
                    readable[qtype] = qtype in GGML_QUANT_SIZES
                except Exception:  # noqa: BLE001
                    readable[qtype] = False
            shape = [int(n) for n in t.shape]
            if not readable[qtype]:
                raise ValueError(f"{self.path}: tensor {t.name!r} has type {qtype!r}, "
                                 "which this reader cannot dequantize")
            if not 1 <= len(shape) <= 4 or min(shape) < 1:
                raise ValueError(f"{self.path}: tensor {t.name!r} has shape {shape}")
            block = GGML_QUANT_SIZES[qtype][0]
            if shape[0] % block:
                raise ValueError(f"{self.path}: tensor {t.name!r}: its rows of {shape[0]} values "
                                 f"are not whole blocks of {block} ({qtype.name})")
            self._tensors[name] = t
        self.config = self._read_config()
        # q and k rows are permuted per head (module docstring); number of heads per tensor.
        # Walk the tensors the file has, not the layers its metadata claims (a damaged
        # block_count of 2**40 would loop for days); a layer it lacks is a missing tensor.
        heads = {"q_proj": self.config.num_heads, "k_proj": self.config.num_kv_heads}
        self._rope_heads: dict[str, int] = {
            name: heads[proj] for name in self._tensors
            if (proj := name.rsplit(".", 2)[-2]) in heads and ".self_attn." in name
        }
        self._tokenizer: Any = None
        self._checksum: str | None = None

    def _meta(self, key: str, default: Any = None) -> Any:
        field = self._reader.fields.get(key)
        if field is None:
            return default
        try:
            return field.contents()
        except Exception as e:  # noqa: BLE001 - a damaged field: whatever numpy raised
            raise ValueError(f"{self.path}: GGUF metadata {key!r} is unreadable: "
                             f"{type(e).__name__}: {e}") from None

    def _read_config(self) -> LlamaConfig:
        """The model config from the llama.* metadata; ValueError naming what is missing or bad."""
        required = ("embedding_length", "attention.head_count", "feed_forward_length",
                    "block_count", "attention.layer_norm_rms_epsilon", "context_length")
        missing = [f"llama.{k}" for k in required if f"llama.{k}" not in self._reader.fields]
        if missing:
            raise ValueError(f"{self.path}: GGUF metadata lacks {missing}")
        try:
            def m(key: str, default: Any = None) -> Any:
                return self._meta(f"llama.{key}", default)

            if m("expert_count", 0):
                raise ValueError(f"{self.path}: mixture-of-experts GGUF models are not supported")
            scaling_type = m("rope.scaling.type", "none")
            if scaling_type != "none":
                raise ValueError(f"{self.path}: RoPE scaling {scaling_type!r} is not supported")
            hidden, num_heads = int(m("embedding_length")), int(m("attention.head_count"))
            head_dim = m("attention.key_length")
            rope_theta = float(m("rope.freq_base", 10000.0))
            rope_scaling = None
            if "rope_freqs.weight" in self._by_gguf_name:
                rope_scaling = llama3_scaling_from_rope_freqs(
                    self._by_gguf_name["rope_freqs.weight"].data,
                    rope_theta,
                    int(m("rope.dimension_count", head_dim or hidden // num_heads)),
                    int(m("rope.scaling.original_context_length", 8192)),
                )
            vocab = m("vocab_size")
            if vocab is None:
                tokens = self._reader.fields.get("tokenizer.ggml.tokens")
                if tokens is not None:
                    vocab = len(tokens.data)
                else:
                    vocab = self.shape("model.embed_tokens.weight")[0]
            bos = self._meta("tokenizer.ggml.bos_token_id")
            # eot/eom end a chat turn in Llama-3 GGUFs; the runtime stops on any of them
            eos = [self._meta(f"tokenizer.ggml.{k}_token_id") for k in ("eos", "eot", "eom")]
            return LlamaConfig(
                vocab_size=int(vocab),
                hidden_size=hidden,
                intermediate_size=int(m("feed_forward_length")),
                num_layers=int(m("block_count")),
                num_heads=num_heads,
                num_kv_heads=int(m("attention.head_count_kv", num_heads)),
                head_dim=None if head_dim is None else int(head_dim),
                rms_norm_eps=float(m("attention.layer_norm_rms_epsilon")),
                rope_theta=rope_theta,
                rope_scaling=rope_scaling,
                max_position_embeddings=int(m("context_length")),
                tie_word_embeddings="lm_head.weight" not in self._tensors,
                bos_token_id=None if bos is None else int(bos),
                eos_token_ids=tuple(dict.fromkeys(int(t) for t in eos if t is not None)),
                attention_bias="model.layers.0.self_attn.q_proj.bias" in self._tensors,
                mlp_bias="model.layers.0.mlp.gate_proj.bias" in self._tensors,
            )
        except ValueError:
            raise
        except (TypeError, ArithmeticError, IndexError, AttributeError) as e:
            # a value of the wrong type or size (a list where a number belongs, a zero count)
            raise ValueError(f"{self.path}: bad GGUF model metadata: "
                             f"{type(e).__name__}: {e}") from None

    # -- tensors ---------------------------------------------------------------------

    def names(self) -> list[str]:
        return list(self._tensors)

    def __contains__(self, name: str) -> bool:
        return name in self._tensors

    def _tensor(self, name: str) -> Any:
        t = self._tensors.get(name)
        if t is None:
            raise self._missing(name)
        return t

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(int(n) for n in reversed(self._tensor(name).shape))  # ggml ne -> HF

    def get(self, name: str) -> torch.Tensor:
        return self.get_slice(name, 0, 0, self.shape(name)[0])

    def get_slice(self, name: str, dim: int, start: int, stop: int) -> torch.Tensor:
        t, shape = self._tensor(name), self.shape(name)
        dim = slice_dim(shape, dim, start, stop)
        index = [slice(0, n) for n in shape]
        index[dim] = slice(start, stop)
        heads = self._rope_heads.get(name)
        if heads is None or start == stop:
            return _read(t, index)
        # permuted within heads: read the whole heads covering the rows, unpermute, narrow
        head_dim = shape[0] // heads
        r0, r1 = index[0].start // head_dim, -(-index[0].stop // head_dim)
        index[0] = slice(r0 * head_dim, r1 * head_dim)
        out = unpermute_rope_rows(_read(t, index), r1 - r0)
        offset = (start if dim == 0 else 0) - r0 * head_dim
        rows = (stop - start) if dim == 0 else shape[0]
        return out if rows == out.shape[0] else out[offset : offset + rows].clone()

    def source_checksum(self) -> str:
        if self._checksum is None:
            self._checksum = sha256_files([self.path])  # == `sha256sum file.gguf`
        return self._checksum

    # -- tokenizer -------------------------------------------------------------------

    def tokenizer(self) -> Any:
        if self._tokenizer is None:
            # optional dependency, only for text I/O. The fast tokenizer class builds itself
            # from the GGUF's tokenizer metadata; AutoTokenizer would first parse the whole
            # header again into a model config only to pick this same class (~10 s more).
            from transformers import PreTrainedTokenizerFast

            self._tokenizer = PreTrainedTokenizerFast.from_pretrained(
                str(self.path.parent), gguf_file=self.path.name, local_files_only=True
            )
        return self._tokenizer

    @property
    def chat_template(self) -> str | None:
        return self._meta("tokenizer.chat_template")

    def __repr__(self) -> str:
        return f"GGUFCheckpoint({str(self.path)!r})"


def _read(t: Any, index: list[slice]) -> torch.Tensor:
    """t[index] in HF layout (index: one slice per HF dim), reading only the bytes needed."""
    qtype = t.tensor_type
    shape = tuple(s.stop - s.start for s in index)
    if t.data.dtype != np.uint8:  # F32/F16/F64/I*: the reader gives a typed numpy view
        return output_dtype(torch.from_numpy(np.array(t.data[tuple(index)])))
    if qtype == GGMLQuantizationType.BF16:  # raw bytes, two per value
        last = index[-1]
        raw = np.array(t.data[(*index[:-1], slice(2 * last.start, 2 * last.stop))])  # a copy
        return torch.from_numpy(raw.view(np.int16)).view(torch.bfloat16).reshape(shape)
    if 0 in shape:
        return torch.empty(shape, dtype=torch.float32)
    # block-quantized: each row is ne0/block blocks of type_size bytes; read whole blocks
    block, type_size = GGML_QUANT_SIZES[qtype]
    last = index[-1]
    b0, b1 = last.start // block, -(-last.stop // block)
    raw = np.ascontiguousarray(t.data[(*index[:-1], slice(b0 * type_size, b1 * type_size))])
    values = torch.from_numpy(dequantize(raw, qtype))  # float32 [..., (b1 - b0) * block]
    lo = last.start - b0 * block
    if lo == 0 and values.shape[-1] == shape[-1]:
        return values
    return values[..., lo : lo + shape[-1]].contiguous()
