"""QuantMode: which parts of a model are quantized, and how, as one integer of flags.

The flags follow TensorRT-LLM's meaning so that users of that stack read them at a glance.
A mode is built with `from_description` (which refuses impossible combinations) or by name
(`QuantMode.from_name("int4_gw")`, `mode.to_name()`); the short names are what CLIs and engine metadata use.
"""

from __future__ import annotations

from enum import IntFlag


class QuantMode(IntFlag):
    INT4_WEIGHTS = 1 << 0
    INT8_WEIGHTS = 1 << 1
    ACTIVATIONS = 1 << 2  # int8 activations (SmoothQuant W8A8)
    PER_CHANNEL = 1 << 3  # weight scales per output channel (else one per tensor)
    PER_TOKEN = 1 << 4  # activation scales per token, computed at run time (else static)
    PER_GROUP = 1 << 5  # int4 weight scales per group of input channels
    INT8_KV_CACHE = 1 << 6
    FP8_KV_CACHE = 1 << 7
    FP8_QDQ = 1 << 8

    # Masks. COUNT is one past the highest flag, as in TensorRT-LLM.
    COUNT = 1 << 9
    VALID_FLAGS = COUNT - 1
    WEIGHTS_AND_ACTIVATIONS = INT4_WEIGHTS | INT8_WEIGHTS | ACTIVATIONS

    # -- predicates ---------------------------------------------------------------------

    def _all(self, bits: int) -> bool:
        return (self & bits) == bits

    def _any(self, bits: int) -> bool:
        return bool(self & bits)

    def is_int8_weight_only(self) -> bool:
        return (self & QuantMode.WEIGHTS_AND_ACTIVATIONS) == QuantMode.INT8_WEIGHTS

    def is_int4_weight_only(self) -> bool:
        return (self & QuantMode.WEIGHTS_AND_ACTIVATIONS) == QuantMode.INT4_WEIGHTS

    def is_weight_only(self) -> bool:
        return self.is_int4_weight_only() or self.is_int8_weight_only()

    def is_int4_weight_only_per_group(self) -> bool:
        return self.is_int4_weight_only() and self._any(QuantMode.PER_GROUP)

    def has_act_and_weight_quant(self) -> bool:
        return self._all(QuantMode.INT8_WEIGHTS | QuantMode.ACTIVATIONS)

    def has_act_or_weight_quant(self) -> bool:
        return self._any(QuantMode.WEIGHTS_AND_ACTIVATIONS)

    def has_per_token_dynamic_scaling(self) -> bool:
        return self._any(QuantMode.PER_TOKEN)

    def has_act_static_scaling(self) -> bool:
        return self.has_act_and_weight_quant() and not self.has_per_token_dynamic_scaling()

    def has_per_channel_scaling(self) -> bool:
        return self._any(QuantMode.PER_CHANNEL)

    def has_per_group_scaling(self) -> bool:
        return self._any(QuantMode.PER_GROUP)

    def has_int8_kv_cache(self) -> bool:
        return self._any(QuantMode.INT8_KV_CACHE)

    def has_fp8_kv_cache(self) -> bool:
        return self._any(QuantMode.FP8_KV_CACHE)

    def has_kv_cache_quant(self) -> bool:
        return self.has_int8_kv_cache() or self.has_fp8_kv_cache()

    def has_fp8_qdq(self) -> bool:
        return self._any(QuantMode.FP8_QDQ)

    def has_any_quant(self) -> bool:
        return self._any(
            QuantMode.WEIGHTS_AND_ACTIVATIONS | QuantMode.INT8_KV_CACHE | QuantMode.FP8_KV_CACHE | QuantMode.FP8_QDQ
        )

    # -- set_* helpers: return a new mode with the flag(s) set or cleared -----------------

    def _set(self, bits: int, value: bool) -> QuantMode:
        return QuantMode(self | bits) if value else QuantMode(self & ~bits & QuantMode.VALID_FLAGS)

    def set_int8_kv_cache(self, value: bool = True) -> QuantMode:
        return self._set(QuantMode.INT8_KV_CACHE, value)

    def set_fp8_kv_cache(self, value: bool = True) -> QuantMode:
        return self._set(QuantMode.FP8_KV_CACHE, value)

    def set_fp8_qdq(self, value: bool = True) -> QuantMode:
        return self._set(QuantMode.FP8_QDQ, value)

    # -- construction -------------------------------------------------------------------

    @staticmethod
    def from_description(
        quantize_weights: bool = False,
        quantize_activations: bool = False,
        per_token: bool = False,
        per_channel: bool = False,
        per_group: bool = False,
        use_int4_weights: bool = False,
        use_int8_kv_cache: bool = False,
        use_fp8_kv_cache: bool = False,
        use_fp8_qdq: bool = False,
    ) -> QuantMode:
        """Build a mode from what is quantized; raise ValueError naming the bad arguments."""
        if quantize_activations and not quantize_weights:
            raise ValueError(
                "quantize_activations=True needs quantize_weights=True: "
                "activations are only quantized together with weights (W8A8)"
            )
        both = quantize_weights and quantize_activations
        if per_token and not both:
            raise ValueError(
                "per_token=True needs quantize_weights=True and quantize_activations=True"
            )
        if per_channel and not both:
            raise ValueError(
                "per_channel=True needs quantize_weights=True and quantize_activations=True "
                "(weight-only schemes are always per channel)"
            )
        if per_group and not (quantize_weights and use_int4_weights):
            raise ValueError("per_group=True needs quantize_weights=True and use_int4_weights=True")
        if use_int4_weights and quantize_activations:
            raise ValueError(
                "use_int4_weights=True with quantize_activations=True is not supported: "
                "activation quantization is W8A8 only"
            )
        if use_int4_weights and not quantize_weights:
            raise ValueError("use_int4_weights=True needs quantize_weights=True")
        if use_int8_kv_cache and use_fp8_kv_cache:
            raise ValueError("use_int8_kv_cache and use_fp8_kv_cache are exclusive")

        mode = QuantMode(0)
        if quantize_weights:
            mode |= QuantMode.INT4_WEIGHTS if use_int4_weights else QuantMode.INT8_WEIGHTS
        flags = {
            QuantMode.ACTIVATIONS: quantize_activations,
            QuantMode.PER_TOKEN: per_token,
            QuantMode.PER_CHANNEL: per_channel,
            QuantMode.PER_GROUP: per_group,
            QuantMode.INT8_KV_CACHE: use_int8_kv_cache,
            QuantMode.FP8_KV_CACHE: use_fp8_kv_cache,
            QuantMode.FP8_QDQ: use_fp8_qdq,
        }
        for flag, on in flags.items():
            if on:
                mode |= flag
        return mode

    @staticmethod
    def use_smooth_quant(per_token: bool = False, per_channel: bool = False) -> QuantMode:
        return QuantMode.from_description(True, True, per_token, per_channel)

    @staticmethod
    def use_weight_only(use_int4_weights: bool = False, per_group: bool = False) -> QuantMode:
        return QuantMode.from_description(
            quantize_weights=True, use_int4_weights=use_int4_weights, per_group=per_group
        )

    # -- short names ----------------------------------------------------------------------

    def to_name(self) -> str:
        """The short name for CLIs and engine metadata: the weight scheme's name, then '+int8kv' / '+fp8kv' / '+fp8qdq'."""
        base = self & ~(QuantMode.INT8_KV_CACHE | QuantMode.FP8_KV_CACHE | QuantMode.FP8_QDQ)
        names = [n for n, m in _WEIGHT_MODES.items() if m == base]
        if not names:
            raise ValueError(f"QuantMode {int(self):#x} has no name (not a supported combination)")
        return names[0] + "".join(sfx for sfx, flag in _SUFFIXES.items() if self & flag)

    @staticmethod
    def from_name(name: str) -> QuantMode:
        """Inverse of `to_name`; 'fp16', 'bf16' and 'fp32' are all the unquantized mode."""
        weight, *extras = name.strip().lower().split("+")
        if weight not in _WEIGHT_MODES and weight not in _FLOAT_NAMES:
            raise ValueError(f"unknown quantization {name!r}; known: {', '.join(known_names())}")
        mode = _WEIGHT_MODES.get(weight, QuantMode(0))
        for extra in extras:
            flag = _SUFFIXES.get("+" + extra)
            if flag is None:
                raise ValueError(
                    f"unknown suffix {'+' + extra!r} in {name!r}; known: {', '.join(_SUFFIXES)}"
                )
            mode |= flag
        if mode.has_int8_kv_cache() and mode.has_fp8_kv_cache():
            raise ValueError(f"{name!r}: int8 and fp8 KV caches are exclusive")
        return mode


# The unquantized mode is 0; which float type the weights stay in is a separate choice
# (the scheme's dtype), so the three float names all map to 0 and 0 prints as "fp16".
_FLOAT_NAMES = ("fp16", "bf16", "fp32")
_WEIGHT_MODES: dict[str, QuantMode] = {
    "fp16": QuantMode(0),
    "int8_wo": QuantMode.use_weight_only(),
    "int4_wo": QuantMode.use_weight_only(use_int4_weights=True),
    "int4_gw": QuantMode.use_weight_only(use_int4_weights=True, per_group=True),
    "w8a8_tensor": QuantMode.use_smooth_quant(),
    "w8a8_channel": QuantMode.use_smooth_quant(per_channel=True),
    "w8a8_token": QuantMode.use_smooth_quant(per_token=True),
    "w8a8_token_channel": QuantMode.use_smooth_quant(per_token=True, per_channel=True),
}
_SUFFIXES: dict[str, QuantMode] = {
    "+int8kv": QuantMode.INT8_KV_CACHE,
    "+fp8kv": QuantMode.FP8_KV_CACHE,
    "+fp8qdq": QuantMode.FP8_QDQ,
}


def known_names() -> list[str]:
    """Every weight-scheme name a CLI accepts (suffixes '+int8kv' etc. may follow)."""
    return [*_FLOAT_NAMES, *(n for n in _WEIGHT_MODES if n not in _FLOAT_NAMES)]
