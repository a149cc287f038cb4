"""The Llama model's parts without MPI: RoPE, the per-rank KV cache, schemes, loading.

References: RoPE and llama3 frequency scaling written out in float64 below, element by
element; the local KV head counts from DESIGN s6's rules; a tiny random model against
transformers' LlamaForCausalLM with the same weights (TP 1).
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"  # before transformers is imported: never touch the hub
os.environ["TRANSFORMERS_OFFLINE"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

from tpquant.checkpoint import MissingTensorError, open_checkpoint  # noqa: E402
from tpquant.collectives import SingleProcessCommunicator  # noqa: E402
from tpquant.models.config import Llama3RopeScaling, LlamaConfig  # noqa: E402
from tpquant.models.llama import (  # noqa: E402
    Llama,
    LlamaSchemes,
    apply_rope,
    generate_greedy,
    rope_cos_sin,
    rope_inv_freq,
)
from tpquant.models.loader import load_llama  # noqa: E402
from tpquant.parallel.mapping import Mapping  # noqa: E402
from tpquant.quantization.mode import QuantMode, known_names  # noqa: E402
from tpquant.quantization.schemes import (  # noqa: E402
    Groupwise,
    Passthrough,
    SmoothQuant,
    WeightOnly,
)

F32 = torch.float32


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# -- RoPE ------------------------------------------------------------------------------------


def _ref_freq(i: int, head_dim: int, theta: float, s: Llama3RopeScaling | None) -> float:
    """Frequency of pair i, with Llama-3.1's scaling rule as its reference code states it."""
    f = theta ** (-2 * i / head_dim)
    if s is None:
        return f
    wavelen = 2 * math.pi / f
    if wavelen < s.original_max_position_embeddings / s.high_freq_factor:
        return f  # high frequencies: unchanged
    if wavelen > s.original_max_position_embeddings / s.low_freq_factor:
        return f / s.factor  # low frequencies: slowed down by factor
    smooth = (s.original_max_position_embeddings / wavelen - s.low_freq_factor) / (
        s.high_freq_factor - s.low_freq_factor
    )
    return (1 - smooth) * f / s.factor + smooth * f


def _ref_rope(x: torch.Tensor, pos: torch.Tensor, theta: float, s) -> torch.Tensor:
    """Rotate pair (x[j], x[j + hd/2]) by pos * freq_j, in float64, one pair at a time."""
    x = x.double()
    hd = x.shape[-1]
    h = hd // 2
    out = torch.empty_like(x)
    for j in range(h):
        angle = pos.double()[..., None] * _ref_freq(j, hd, theta, s)  # [B, T, 1] over heads
        c, sn = torch.cos(angle), torch.sin(angle)
        out[..., j] = x[..., j] * c - x[..., j + h] * sn
        out[..., j + h] = x[..., j + h] * c + x[..., j] * sn
    return out


# Wavelengths of head_dim 16 at theta 1e4 run 6.3 ... 2e4: with original context 64 the
# pairs fall in all three bands (kept < 16 < interpolated < 64 < slowed).
SCALING = Llama3RopeScaling(
    factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=64
)


@pytest.mark.parametrize("theta", [10000.0, 500000.0])
@pytest.mark.parametrize("scaling", [None, SCALING], ids=["plain", "llama3"])
def test_rope_matches_float64_formula(theta, scaling):
    g = _gen(0)
    head_dim, max_pos = 16, 300
    x = torch.randn(2, 5, 3, head_dim, generator=g)  # [B, T, H, hd]
    pos = torch.randint(0, max_pos, (2, 5), generator=g)  # any positions, per row
    cos, sin = rope_cos_sin(rope_inv_freq(head_dim, theta, scaling), max_pos)
    got = apply_rope(x, cos[pos], sin[pos])
    want = _ref_rope(x, pos, theta, scaling)
    assert got.dtype == x.dtype
    err = (got.double() - want).abs().max().item()
    assert err <= 1e-5, err  # float32 inputs and tables, float64 reference


def test_llama3_scaling_bands():
    """Each band is really hit, and matches the reference frequency exactly in float64."""
    inv = rope_inv_freq(16, 10000.0, SCALING)
    plain = rope_inv_freq(16, 10000.0, None)
    want = torch.tensor([_ref_freq(i, 16, 10000.0, SCALING) for i in range(8)], dtype=torch.float64)
    torch.testing.assert_close(inv, want, rtol=1e-12, atol=0)
    ratio = plain / inv
    assert ratio[0] == 1 and ratio[-1] == SCALING.factor
    assert ((ratio > 1) & (ratio < SCALING.factor)).any()


def test_rope_scores_depend_on_distance_only():
    """<rope(q, m), rope(k, n)> is a function of m - n (what makes RoPE relative)."""
    g = _gen(1)
    q, k = torch.randn(2, 1, 1, 1, 32, generator=g)  # each [B=1, T=1, H=1, hd]
    cos, sin = rope_cos_sin(rope_inv_freq(32, 10000.0, SCALING), 200)

    def score(m: int, n: int) -> float:
        at_m, at_n = torch.tensor([[m]]), torch.tensor([[n]])
        qm = apply_rope(q, cos[at_m], sin[at_m])
        kn = apply_rope(k, cos[at_n], sin[at_n])
        return (qm.double() * kn.double()).sum().item()

    scale = q.norm().item() * k.norm().item()
    for m, n, shift in [(5, 2, 40), (17, 17, 100), (3, 60, 99)]:
        assert abs(score(m, n) - score(m + shift, n + shift)) <= 1e-5 * scale  # float32 math
        assert abs(score(m, n) - score(m, n + 7)) > 1e-3 * scale  # and it does depend on it


# -- KV cache: only this rank's heads -------------------------------------------------------


def _tiny_config(n_heads: int, n_kv: int, **kw) -> LlamaConfig:
    d = dict(vocab_size=50, hidden_size=8 * n_heads, intermediate_size=48, num_layers=2,
             num_heads=n_heads, num_kv_heads=n_kv, head_dim=8)
    return LlamaConfig(**(d | kw))


def _expected_local_kv(n_heads: int, n_kv: int, tp: int) -> int:
    """DESIGN s6: split when both divide; one replicated KV head per rank when tp is a
    multiple of n_kv; else one KV head per query head, padded up to a multiple of tp."""
    if n_heads % tp == 0 and n_kv % tp == 0:
        return n_kv // tp
    if n_heads % tp == 0 and tp % n_kv == 0:
        return 1
    return -(-n_heads // tp)


@pytest.mark.parametrize("n_heads,n_kv", [(9, 3), (8, 2), (4, 4), (6, 1)])
@pytest.mark.parametrize("tp", [1, 2, 3, 4])
def test_kv_cache_holds_only_local_heads(n_heads, n_kv, tp):
    config = _tiny_config(n_heads, n_kv)
    schemes = LlamaSchemes.from_name("fp16", dtype=torch.bfloat16)
    kv = _expected_local_kv(n_heads, n_kv, tp)
    for rank in range(tp):  # construction only: no collective runs, one process suffices
        mapping = Mapping(tp, rank)
        model = Llama(config, mapping, SingleProcessCommunicator(), schemes, torch.bfloat16)
        model.setup_caches(max_batch=3, max_seq=20)
        for layer in model.layers:
            cache = layer.attention.kv_cache
            for t in (cache.k, cache.v):
                assert t.shape == (3, 20, kv, config.head_dim) and t.dtype == torch.bfloat16
            attn = layer.attention
            assert attn.n_kv_heads == kv and attn.n_heads * tp >= n_heads
            assert attn.n_heads % attn.n_kv_heads == 0
        assert kv * tp >= n_kv  # every KV head lives somewhere


def test_cache_overflow_is_refused():
    config = _tiny_config(4, 2)
    schemes = LlamaSchemes.from_name("fp32", dtype=F32)
    model = Llama(config, Mapping(1, 0), SingleProcessCommunicator(), schemes, F32)
    model.setup_caches(max_batch=1, max_seq=8)
    with pytest.raises(ValueError, match="max_seq 8"):
        model.positions(5, 1, 4)
    with pytest.raises(ValueError, match="max_batch 1"):
        model.positions(0, 2, 1)


# -- schemes from names ---------------------------------------------------------------------


@pytest.mark.parametrize("name", known_names())
def test_schemes_from_name(name):
    dtype = torch.bfloat16
    s = LlamaSchemes.from_name(name, dtype=dtype, group_size=64)
    mode = QuantMode.from_name(name)
    want_type = {
        "int8_wo": WeightOnly, "int4_wo": WeightOnly, "int4_gw": Groupwise,
    }.get(name, SmoothQuant if mode.has_act_and_weight_quant() else Passthrough)
    for kind in ("qkv", "o", "gate_up", "down"):
        scheme = getattr(s, kind)
        assert type(scheme) is want_type and scheme.mode == mode and scheme.dtype == dtype
    assert s.lm_head == Passthrough(dtype)  # lm_head stays float by default
    if want_type is WeightOnly:
        assert s.qkv.bits == (4 if "int4" in name else 8)
    if want_type is Groupwise:
        assert s.qkv.group_size == 64
    q = LlamaSchemes.from_name(name, dtype=dtype, group_size=64, quantize_lm_head=True)
    assert q.lm_head == q.qkv


def test_schemes_from_name_kv_suffix_and_errors():
    assert LlamaSchemes.from_name("int8_wo+int8kv", F32).qkv == WeightOnly(8, F32)
    with pytest.raises(ValueError, match="unknown quantization"):
        LlamaSchemes.from_name("int3_magic")
    config = _tiny_config(4, 2)
    with pytest.raises(ValueError, match="runs in torch.float16"):
        fp16 = LlamaSchemes.from_name("fp16")
        Llama(config, Mapping(1, 0), SingleProcessCommunicator(), fp16, F32)


# -- tiny checkpoint: against transformers, and a missing tensor ----------------------------

HF_TINY = dict(
    model_type="llama", hidden_act="silu", vocab_size=37, hidden_size=48, intermediate_size=64,
    num_hidden_layers=2, num_attention_heads=6, num_key_value_heads=2, head_dim=8,
    max_position_embeddings=128, rms_norm_eps=1e-5, attention_bias=True, mlp_bias=True,
    tie_word_embeddings=False, bos_token_id=1, eos_token_id=2,
    rope_parameters=dict(rope_type="llama3", rope_theta=10000.0, factor=8.0,
                         low_freq_factor=1.0, high_freq_factor=4.0,
                         original_max_position_embeddings=16),
)


def _tiny_tensors(seed: int) -> dict[str, torch.Tensor]:
    g = _gen(seed)
    h, f, v, hd = 48, 64, 37, 8
    q, kv = 6 * hd, 2 * hd
    w = lambda o, i: torch.randn(o, i, generator=g) / i**0.5  # noqa: E731
    b = lambda o: torch.randn(o, generator=g) * 0.1  # noqa: E731
    norm = lambda: torch.rand(h, generator=g) + 0.5  # noqa: E731
    t = {"model.embed_tokens.weight": torch.randn(v, h, generator=g),
         "model.norm.weight": norm(), "lm_head.weight": w(v, h)}
    for i in range(2):
        p = f"model.layers.{i}."
        t |= {p + "input_layernorm.weight": norm(), p + "post_attention_layernorm.weight": norm()}
        for name, (o, i_) in {"self_attn.q_proj": (q, h), "self_attn.k_proj": (kv, h),
                              "self_attn.v_proj": (kv, h), "self_attn.o_proj": (h, q),
                              "mlp.gate_proj": (f, h), "mlp.up_proj": (f, h),
                              "mlp.down_proj": (h, f)}.items():
            t[p + name + ".weight"], t[p + name + ".bias"] = w(o, i_), b(o)
    return t


def _write_hf_dir(path: Path, tensors: dict[str, torch.Tensor]) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(HF_TINY))
    save_file({k: t.contiguous() for k, t in tensors.items()}, str(path / "model.safetensors"))
    return path


def test_tiny_model_matches_transformers(tmp_path):
    transformers = pytest.importorskip("transformers")
    tensors = _tiny_tensors(0)
    ckpt = open_checkpoint(_write_hf_dir(tmp_path / "tiny", tensors))
    hf_config = {k: v for k, v in HF_TINY.items() if k != "model_type"}
    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(**hf_config)).eval()
    hf.load_state_dict(tensors, strict=True)
    comm = SingleProcessCommunicator()
    model = load_llama(ckpt, Mapping(1, 0), comm, LlamaSchemes.from_name("fp32", F32), F32,
                       max_seq=64, max_batch=2)
    tokens = torch.randint(0, 37, (2, 30), generator=_gen(1))
    with torch.no_grad():
        want = hf(tokens).logits.double()
        got = model(tokens, 0)
        # the same sequence fed as a prefill of 20 and 10 single-token decode steps
        steps = [model(tokens[:, :20], 0)] + [model(tokens[:, t : t + 1], t) for t in range(20, 30)]
    scale = want.abs().max().item()
    assert (got.double() - want).abs().max().item() <= 1e-5 * scale
    assert (torch.cat(steps, dim=1).double() - want).abs().max().item() <= 1e-5 * scale

    # greedy generation through the cache == argmax of full forwards without a cache
    prompt = tokens[0, :10].tolist()
    seq = list(prompt)
    with torch.no_grad():
        for _ in range(8):
            seq.append(int(hf(torch.tensor([seq])).logits[0, -1].argmax()))
    assert generate_greedy(model, prompt, 8, comm, stop_ids=()) == seq[10:]


def test_missing_tensor_names_it(tmp_path):
    tensors = _tiny_tensors(0)
    del tensors["model.layers.1.mlp.up_proj.weight"]
    ckpt = open_checkpoint(_write_hf_dir(tmp_path / "broken", tensors))
    schemes = LlamaSchemes.from_name("fp32", F32)
    with pytest.raises(MissingTensorError, match="model.layers.1.mlp.up_proj.weight"):
        load_llama(ckpt, Mapping(1, 0), SingleProcessCommunicator(), schemes, F32, max_seq=8)
