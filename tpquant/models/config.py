"""Llama model configuration.

`LlamaConfig` is the one description of a Llama-family model that the checkpoint readers
produce and the engine stores. It is frozen and validated on construction, so a config that
exists is a config the model can be built from. `from_hf` reads a Hugging Face config.json
(both the transformers 4 `rope_theta`/`rope_scaling` keys and the transformers 5
`rope_parameters` key); `to_dict`/`from_dict` are a JSON-safe round trip for engine metadata.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Llama3RopeScaling:
    """Llama-3.1 "llama3" RoPE frequency scaling.

    Wavelengths above original_max_position_embeddings / low_freq_factor are stretched by
    `factor`, those below original_max_position_embeddings / high_freq_factor are kept, and
    the band in between is interpolated smoothly.
    """

    factor: float
    low_freq_factor: float
    high_freq_factor: float
    original_max_position_embeddings: int

    def __post_init__(self) -> None:
        if not self.factor >= 1.0:
            raise ValueError(f"llama3 rope scaling: factor must be >= 1, got {self.factor}")
        if not 0.0 < self.low_freq_factor < self.high_freq_factor:
            raise ValueError(
                "llama3 rope scaling: need 0 < low_freq_factor < high_freq_factor, got "
                f"{self.low_freq_factor} and {self.high_freq_factor}"
            )
        if self.original_max_position_embeddings <= 0:
            raise ValueError(
                "llama3 rope scaling: original_max_position_embeddings must be positive, got "
                f"{self.original_max_position_embeddings}"
            )


@dataclass(frozen=True)
class LlamaConfig:
    """Shape and numerics of a Llama model.

    head_dim defaults to hidden_size // num_heads (hidden_size must then divide evenly);
    eos_token_ids lists every token that ends a generation (config first, then extras).
    """

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int | None = None  # filled in by __post_init__ when None
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: Llama3RopeScaling | None = None
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = field(default_factory=tuple)
    attention_bias: bool = False
    mlp_bias: bool = False

    def __post_init__(self) -> None:
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers",
                     "num_heads", "num_kv_heads", "max_position_embeddings"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"LlamaConfig.{name} must be a positive int, got {value!r}")
        if self.num_heads % self.num_kv_heads != 0:
            raise ValueError(
                f"num_heads ({self.num_heads}) must be a multiple of num_kv_heads "
                f"({self.num_kv_heads}) for grouped-query attention"
            )
        if self.head_dim is None:
            if self.hidden_size % self.num_heads != 0:
                raise ValueError(
                    f"hidden_size ({self.hidden_size}) is not divisible by num_heads "
                    f"({self.num_heads}) and no head_dim is given"
                )
            # frozen dataclass: the derived default is set once, here
            object.__setattr__(self, "head_dim", self.hidden_size // self.num_heads)
        elif self.head_dim <= 0:
            raise ValueError(f"LlamaConfig.head_dim must be positive, got {self.head_dim}")
        if not (self.rms_norm_eps > 0 and self.rope_theta > 0):
            raise ValueError(
                f"rms_norm_eps and rope_theta must be positive, got {self.rms_norm_eps} and "
                f"{self.rope_theta}"
            )
        if self.rope_scaling is not None and not isinstance(self.rope_scaling, Llama3RopeScaling):
            raise ValueError(
                f"rope_scaling must be Llama3RopeScaling or None, got {self.rope_scaling!r}"
            )
        object.__setattr__(self, "eos_token_ids", tuple(int(t) for t in self.eos_token_ids))
        bos = () if self.bos_token_id is None else (self.bos_token_id,)
        for t in (*bos, *self.eos_token_ids):
            if not 0 <= t < self.vocab_size:
                raise ValueError(
                    f"special token id {t} is outside the vocabulary ({self.vocab_size})"
                )

    # -- Hugging Face config.json --------------------------------------------------------

    @classmethod
    def from_hf(cls, d: dict[str, Any]) -> LlamaConfig:
        """Build from a Hugging Face Llama config.json dict."""
        model_type = d.get("model_type", "llama")
        if model_type != "llama":
            raise ValueError(f"not a Llama config: model_type is {model_type!r}")
        act = d.get("hidden_act", "silu")
        if act != "silu":
            raise ValueError(f"Llama MLP must use silu, config.json says hidden_act={act!r}")
        num_heads = d["num_attention_heads"]
        rope_params = d.get("rope_parameters") or {}
        rope_theta = d.get("rope_theta", rope_params.get("rope_theta", 10000.0))
        eos = d.get("eos_token_id")
        eos_ids = () if eos is None else (eos,) if isinstance(eos, int) else tuple(eos)
        return cls(
            vocab_size=d["vocab_size"],
            hidden_size=d["hidden_size"],
            intermediate_size=d["intermediate_size"],
            num_layers=d["num_hidden_layers"],
            num_heads=num_heads,
            num_kv_heads=d.get("num_key_value_heads") or num_heads,
            head_dim=d.get("head_dim"),
            rms_norm_eps=float(d.get("rms_norm_eps", 1e-6)),
            rope_theta=float(rope_theta),
            rope_scaling=_rope_scaling_from_hf(d.get("rope_scaling") or rope_params),
            max_position_embeddings=d.get("max_position_embeddings", 2048),
            tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
            bos_token_id=d.get("bos_token_id"),
            eos_token_ids=eos_ids,
            attention_bias=bool(d.get("attention_bias", False)),
            mlp_bias=bool(d.get("mlp_bias", False)),
        )

    # -- JSON round trip (engine metadata) ----------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-safe dict (tuples become lists, rope_scaling a dict or None)."""
        d = dataclasses.asdict(self)
        d["eos_token_ids"] = list(self.eos_token_ids)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> LlamaConfig:
        """Inverse of `to_dict`; unknown keys are an error (a newer engine format, a typo)."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown LlamaConfig keys: {unknown}")
        d = dict(d)
        if d.get("rope_scaling") is not None:
            d["rope_scaling"] = Llama3RopeScaling(**d["rope_scaling"])
        d["eos_token_ids"] = tuple(d.get("eos_token_ids", ()))
        return cls(**d)


def _rope_scaling_from_hf(rs: dict[str, Any]) -> Llama3RopeScaling | None:
    """HF rope_scaling / rope_parameters dict -> Llama3RopeScaling, None for plain RoPE."""
    rope_type = rs.get("rope_type", rs.get("type", "default"))
    if rope_type == "default":
        return None
    if rope_type != "llama3":
        raise ValueError(f"unsupported RoPE scaling {rope_type!r}: only 'llama3' is implemented")
    return Llama3RopeScaling(
        factor=float(rs["factor"]),
        low_freq_factor=float(rs["low_freq_factor"]),
        high_freq_factor=float(rs["high_freq_factor"]),
        original_max_position_embeddings=int(rs["original_max_position_embeddings"]),
    )
