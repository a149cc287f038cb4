"""QuantMode: every predicate on every valid combination, every error, names round-trip.

The expected predicate values are written from the *description* (what is quantized),
not from the flag bits, so the test checks the flag logic rather than repeating it.
"""

import itertools

import pytest

from tpquant.quantization.mode import QuantMode, known_names

ARGS = (
    "quantize_weights",
    "quantize_activations",
    "per_token",
    "per_channel",
    "per_group",
    "use_int4_weights",
    "use_int8_kv_cache",
    "use_fp8_kv_cache",
    "use_fp8_qdq",
)


def _is_valid(d: dict) -> bool:
    w, a = d["quantize_weights"], d["quantize_activations"]
    return not (
        (a and not w)
        or (d["per_token"] and not (w and a))
        or (d["per_channel"] and not (w and a))
        or (d["per_group"] and not (w and d["use_int4_weights"]))
        or (d["use_int4_weights"] and (a or not w))
        or (d["use_int8_kv_cache"] and d["use_fp8_kv_cache"])
    )


ALL = [dict(zip(ARGS, bits)) for bits in itertools.product([False, True], repeat=len(ARGS))]
VALID = [d for d in ALL if _is_valid(d)]
INVALID = [d for d in ALL if not _is_valid(d)]


def _expected(d: dict) -> dict[str, bool]:
    w, a, int4 = d["quantize_weights"], d["quantize_activations"], d["use_int4_weights"]
    weight_only = w and not a
    return {
        "is_int8_weight_only": weight_only and not int4,
        "is_int4_weight_only": weight_only and int4,
        "is_weight_only": weight_only,
        "is_int4_weight_only_per_group": weight_only and int4 and d["per_group"],
        "has_act_and_weight_quant": w and a,
        "has_act_or_weight_quant": w,
        "has_per_token_dynamic_scaling": d["per_token"],
        "has_act_static_scaling": w and a and not d["per_token"],
        "has_per_channel_scaling": d["per_channel"],
        "has_per_group_scaling": d["per_group"],
        "has_int8_kv_cache": d["use_int8_kv_cache"],
        "has_fp8_kv_cache": d["use_fp8_kv_cache"],
        "has_kv_cache_quant": d["use_int8_kv_cache"] or d["use_fp8_kv_cache"],
        "has_fp8_qdq": d["use_fp8_qdq"],
        "has_any_quant": w or d["use_int8_kv_cache"] or d["use_fp8_kv_cache"] or d["use_fp8_qdq"],
    }


def test_enumeration_covers_both_sides():
    # 512 descriptions; the weight/activation part has 8 valid shapes, times 3 KV choices x 2 QDQ.
    assert len(ALL) == 512
    assert len(VALID) == 8 * 3 * 2


@pytest.mark.parametrize("desc", VALID, ids=lambda d: "-".join(k for k, v in d.items() if v) or "none")
def test_every_predicate_on_every_valid_combination(desc):
    mode = QuantMode.from_description(**desc)
    assert mode & ~QuantMode.VALID_FLAGS == 0
    for predicate, expected in _expected(desc).items():
        assert getattr(mode, predicate)() is expected, predicate


@pytest.mark.parametrize("desc", INVALID, ids=lambda d: "-".join(k for k, v in d.items() if v))
def test_every_impossible_combination_raises_naming_an_argument(desc):
    with pytest.raises(ValueError) as err:
        QuantMode.from_description(**desc)
    named = [arg for arg in ARGS if arg in str(err.value) and desc[arg]]
    assert named, f"message does not name a set argument: {err.value}"


@pytest.mark.parametrize(
    "kwargs, needle",
    [
        (dict(quantize_activations=True), "quantize_activations"),
        (dict(quantize_weights=True, per_token=True), "per_token"),
        (dict(quantize_weights=True, per_channel=True), "per_channel"),
        (dict(quantize_weights=True, per_group=True), "per_group"),
        (dict(per_group=True, use_int4_weights=True), "per_group"),
        (dict(quantize_weights=True, quantize_activations=True, use_int4_weights=True), "use_int4"),
        (dict(use_int8_kv_cache=True, use_fp8_kv_cache=True), "exclusive"),
    ],
)
def test_each_error_message(kwargs, needle):
    with pytest.raises(ValueError, match=needle):
        QuantMode.from_description(**kwargs)


def test_masks():
    flags = [m for m in QuantMode if m.value and m.value & (m.value - 1) == 0 and m < QuantMode.COUNT]
    assert len(flags) == 9
    assert QuantMode.VALID_FLAGS == sum(flags) == QuantMode.COUNT - 1
    assert QuantMode.WEIGHTS_AND_ACTIVATIONS == (
        QuantMode.INT4_WEIGHTS | QuantMode.INT8_WEIGHTS | QuantMode.ACTIVATIONS
    )


def test_shortcuts_equal_descriptions():
    for per_token, per_channel in itertools.product([False, True], repeat=2):
        assert QuantMode.use_smooth_quant(per_token, per_channel) == QuantMode.from_description(
            quantize_weights=True,
            quantize_activations=True,
            per_token=per_token,
            per_channel=per_channel,
        )
    assert QuantMode.use_weight_only() == QuantMode.INT8_WEIGHTS
    assert QuantMode.use_weight_only(True) == QuantMode.INT4_WEIGHTS
    assert QuantMode.use_weight_only(True, True) == QuantMode.INT4_WEIGHTS | QuantMode.PER_GROUP


def test_set_helpers_toggle_only_their_flag():
    base = QuantMode.use_smooth_quant(per_token=True, per_channel=True)
    for setter, pred in [
        ("set_int8_kv_cache", "has_int8_kv_cache"),
        ("set_fp8_kv_cache", "has_fp8_kv_cache"),
        ("set_fp8_qdq", "has_fp8_qdq"),
    ]:
        on = getattr(base, setter)()
        assert getattr(on, pred)() and not getattr(base, pred)()
        off = getattr(on, setter)(False)
        assert off == base


@pytest.mark.parametrize("desc", VALID, ids=lambda d: "-".join(k for k, v in d.items() if v) or "none")
def test_every_valid_mode_has_a_name_that_round_trips(desc):
    mode = QuantMode.from_description(**desc)
    name = mode.to_name()
    assert QuantMode.from_name(name) == mode
    assert QuantMode.from_name(name.upper()) == mode


def test_names_are_the_documented_ones():
    for name in ["fp16", "bf16", "fp32", "int8_wo", "int4_wo", "int4_gw", "w8a8_tensor",
                 "w8a8_token_channel", "int8_wo+int8kv", "w8a8_token+fp8kv"]:
        assert QuantMode.from_name(name).to_name().split("+")[0] in known_names()
    assert QuantMode.from_name("int4_gw").is_int4_weight_only_per_group()
    assert QuantMode.from_name("w8a8_token_channel").has_per_token_dynamic_scaling()
    assert QuantMode.from_name("bf16") == QuantMode(0)


@pytest.mark.parametrize("bad", ["int3_wo", "", "int8_wo+foo", "w8a8_token+int8kv+fp8kv"])
def test_unknown_names_raise(bad):
    with pytest.raises(ValueError):
        QuantMode.from_name(bad)


def test_unsupported_flag_combination_has_no_name():
    with pytest.raises(ValueError, match="no name"):
        (QuantMode.INT4_WEIGHTS | QuantMode.INT8_WEIGHTS).to_name()
