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
from tpquant.models.loader import FullWeightStatistics, load_llama  # noqa: E402
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


@pytest.mark.parametrize("down_rotation", [0, 16, 64])
def test_tiny_model_matches_transformers(tmp_path, down_rotation):
    """Also with down_proj's input rotated (W8A8's Hadamard blocks): the same function."""
    transformers = pytest.importorskip("transformers")
    tensors = _tiny_tensors(0)
    ckpt = open_checkpoint(_write_hf_dir(tmp_path / "tiny", tensors))
    hf_config = {k: v for k, v in HF_TINY.items() if k != "model_type"}
    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(**hf_config)).eval()
    hf.load_state_dict(tensors, strict=True)
    comm = SingleProcessCommunicator()
    schemes = LlamaSchemes.from_name("fp32", F32, down_rotation=down_rotation)
    model = load_llama(ckpt, Mapping(1, 0), comm, schemes, F32, max_seq=64, max_batch=2)
    assert model.layers[0].mlp.down_rotation == down_rotation
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


class _CountingReads:
    """A checkpoint that counts the elements its reads return, by tensor name."""

    def __init__(self, checkpoint) -> None:
        self._checkpoint, self.config, self.read = checkpoint, checkpoint.config, {}

    def _count(self, name: str, t: torch.Tensor) -> torch.Tensor:
        self.read[name] = self.read.get(name, 0) + t.numel()
        return t

    def get(self, name: str) -> torch.Tensor:
        return self._count(name, self._checkpoint.get(name))

    def get_slice(self, name: str, dim: int, start: int, stop: int) -> torch.Tensor:
        return self._count(name, self._checkpoint.get_slice(name, dim, start, stop))

    def shape(self, name: str) -> tuple[int, ...]:
        return self._checkpoint.shape(name)


class _Unchanged:
    """A transform that changes nothing; any transform makes load_llama read whole tensors."""

    def transform_weight(self, layer_name: str, weight: torch.Tensor) -> torch.Tensor:
        return weight

    def transform_norm(self, norm_name: str, weight: torch.Tensor) -> torch.Tensor:
        return weight


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
@pytest.mark.parametrize("quant", ["fp32", "int8_wo", "int4_wo"])
def test_sliced_load_equals_full_read(tmp_path, quant, tied):
    """One process loading the ranks one after another reads each rank's slices only and
    quantizes them with the full weights' statistics (`FullWeightStatistics`: computed once,
    reused by the next ranks); the tensors equal, bit for bit, those of the full-read path
    (every tensor read whole, quantized whole, then sharded). TP 1, 2, 4 on the tiny model:
    6 query / 2 KV heads (split at 2; expanded and zero-padded heads at 4), a vocabulary of
    37 padded to a multiple of tp, biases everywhere."""
    tensors = _tiny_tensors(0)
    if tied:
        del tensors["lm_head.weight"]
    path = _write_hf_dir(tmp_path / "tiny", tensors)
    (path / "config.json").write_text(json.dumps({**HF_TINY, "tie_word_embeddings": tied}))
    ckpt = open_checkpoint(path)
    schemes, comm = LlamaSchemes.from_name(quant, F32), SingleProcessCommunicator()
    for tp in (1, 2, 4):
        statistics = FullWeightStatistics()
        for rank in range(tp):
            reader = _CountingReads(ckpt)
            mapping = Mapping(tp, rank)
            got = load_llama(reader, mapping, comm, schemes, F32, max_seq=1,
                             statistics=statistics).state_dict()
            want = load_llama(ckpt, mapping, comm, schemes, F32, max_seq=1,
                              transform=_Unchanged()).state_dict()
            assert got.keys() == want.keys()
            for k in want:
                assert got[k].dtype == want[k].dtype and torch.equal(got[k], want[k]), (tp, rank, k)

            # what this rank read: its 1/tp of the MLP, at most ceil(6 / tp) of the 6 query
            # heads (q's rows, o_proj's columns), its vocabulary rows; and the full
            # row-parallel weights once more for the first rank of a scheme with statistics
            stats_read = quant != "fp32" and rank == 0 and tp > 1
            for i in range(2):
                p = f"model.layers.{i}."
                for name, share in (("mlp.gate_proj", 1 / tp), ("mlp.up_proj", 1 / tp),
                                    ("mlp.down_proj", 1 / tp),
                                    ("self_attn.q_proj", -(-6 // tp) / 6),
                                    ("self_attn.o_proj", -(-6 // tp) / 6)):
                    full_once = stats_read and name in ("mlp.down_proj", "self_attn.o_proj")
                    n = math.prod(ckpt.shape(p + name + ".weight"))
                    read = reader.read[p + name + ".weight"]
                    assert read <= n * share + n * full_once, (tp, rank, name, read)
                    if name.startswith("mlp"):
                        assert read == n * share + n * full_once, (tp, rank, name, read)
            if not tied:
                rows = -(-37 // tp)  # padded vocabulary rows per rank
                assert reader.read["lm_head.weight"] <= rows * 48


# -- fixed-shape decode step, INT8 KV cache, decode attention kernel ------------------------


def _tiny_model(tmp_path, int8_kv: bool = False, max_batch: int = 4, max_seq: int = 48) -> Llama:
    ckpt = open_checkpoint(_write_hf_dir(tmp_path / "tiny", _tiny_tensors(0)))
    model = load_llama(ckpt, Mapping(1, 0), SingleProcessCommunicator(),
                       LlamaSchemes.from_name("fp32", F32), F32, max_seq=max_seq)
    model.int8_kv_cache = int8_kv
    model.setup_caches(max_batch, max_seq)
    return model


def _decode_both_ways(model: Llama, prompts: list[list[int]], steps: int, seed: int):
    """Per step: logits of `decode_step` (fixed shapes, whole-cache attention) and of
    `forward` (mask over the used positions), fed the same random tokens on the same caches
    state (each path prefills its own copy)."""
    g = _gen(seed)
    B, longest = len(prompts), max(map(len, prompts))
    batch = torch.zeros(B, longest, dtype=torch.long)
    for b, p in enumerate(prompts):
        batch[b, : len(p)] = torch.tensor(p)
    lengths = torch.tensor([len(p) for p in prompts])
    feed = torch.randint(0, 37, (steps, B), generator=g)
    runs = []
    for fixed in (True, False):
        model.setup_caches(model.max_batch, model.max_seq)
        out = [model(batch, 0, logits_at=lengths - 1)]
        for s in range(steps):
            pos = lengths + s
            out.append(model.decode_step(feed[s], pos) if fixed
                       else model(feed[s][:, None], pos)[:, -1])
        runs.append(torch.stack(out))  # [steps + 1, B, V]
    return runs


@torch.no_grad()
def test_decode_step_matches_masked_forward(tmp_path):
    """decode_step (the CUDA-graph path; on CPU its attention is the torch reference over the
    whole max_seq cache) == the masked forward, for right-padded rows of different lengths.
    float32, same math up to summation order: 1e-5 of the largest logit."""
    model = _tiny_model(tmp_path)
    prompts = [[3, 4, 5, 6, 7, 8, 9], [10, 11], [12, 13, 14, 15]]
    fixed, masked = _decode_both_ways(model, prompts, steps=6, seed=3)
    scale = masked.abs().max().item()
    assert (fixed - masked).abs().max().item() <= 1e-5 * scale
    # and prefill's logits_at picks exactly the rows' last real positions
    full = model(torch.tensor([prompts[1] + [0] * 5]), 0)
    want = full[0, len(prompts[1]) - 1]
    model.setup_caches(model.max_batch, model.max_seq)
    got = model(torch.tensor([prompts[1] + [0] * 5]), 0, logits_at=torch.tensor([1]))[0]
    assert (got - want).abs().max().item() <= 1e-6 * want.abs().max().item()


def test_int8_kv_quantization_error_bound():
    """Every cached element is within scale / 2 of its float value, scale = max|x| / 127 per
    (row, position, head); an all-zero head stays exactly zero."""
    from tpquant.layers.kv_cache import KVCache

    g = _gen(4)
    k = torch.randn(2, 9, 3, 16, generator=g) * torch.rand(2, 9, 3, 1, generator=g) * 5
    k[1, 2, 0] = 0
    cache = KVCache(2, 9, 3, 16, F32, int8=True)
    cache.write(torch.arange(9).expand(2, 9), k, -k)
    got_k, got_v = cache.read(2, 9)
    bound = k.abs().amax(-1, keepdim=True) / 127 / 2 * (1 + 1e-6)
    assert ((got_k - k).abs() <= bound).all() and ((got_v + k).abs() <= bound).all()
    assert (got_k[1, 2, 0] == 0).all()
    assert cache.k.dtype == torch.int8 and cache.k_scale.shape == (2, 9, 3)


@torch.no_grad()
def test_int8_kv_cache_against_float_cache(tmp_path):
    """The whole model with an INT8 cache against the float32 cache: per-(token, head) int8
    perturbs keys and values by <= 0.4% of each head's max, which moves logits by 5.0e-3 of
    the largest logit here (2 layers, random weights); bound 1e-2. Both decode paths agree with each other
    exactly as with the float cache (same dequantized values)."""
    plain = _decode_both_ways(_tiny_model(tmp_path / "a"), [[3, 4, 5, 6], [7, 8]], 5, seed=5)
    int8 = _decode_both_ways(_tiny_model(tmp_path / "b", int8_kv=True), [[3, 4, 5, 6], [7, 8]],
                             5, seed=5)
    scale = plain[1].abs().max().item()
    assert (int8[0] - int8[1]).abs().max().item() <= 1e-5 * scale
    err = (int8[1] - plain[1]).abs().max().item()
    assert 0 < err <= 1e-2 * scale, err  # 0 < : the int8 cache is really in use


_TRITON_CHECK = r"""
import torch
from tpquant.layers.decode_attention import decode_attention_reference, decode_attention_triton
from tpquant.layers.kv_cache import KVCache
g = torch.Generator().manual_seed(0)
worst = 0.0
# (dtype, int8, H, Hkv, hd, B, max_seq, max_batch): GQA groups 1, 2, 3 and 8, lengths from 1
# to max_seq, splits that see nothing; bfloat16 is left to the GPU test (the interpreter's
# bfloat16 tl.dot is wrong)
for dtype, int8, H, Hkv, hd, B, S, MB in [
    (torch.float32, False, 4, 2, 16, 3, 70, 4), (torch.float32, True, 6, 2, 32, 2, 40, 2),
    (torch.float16, False, 8, 1, 64, 2, 100, 3), (torch.float16, True, 2, 2, 16, 1, 33, 1),
    (torch.float32, False, 3, 3, 16, 5, 8, 5),
]:
    cache = KVCache(MB, S, Hkv, hd, dtype, int8=int8)
    k, v = (torch.randn(MB, S, Hkv, hd, generator=g).to(dtype) for _ in range(2))
    cache.write(torch.arange(S).expand(MB, S), k, v)
    lengths = torch.randint(1, S + 1, (B,), generator=g)
    lengths[0] = 1
    q = torch.randn(B, H, hd, generator=g).to(dtype)
    got = decode_attention_triton(q, cache, lengths - 1).double()  # query at position len - 1
    want = decode_attention_reference(q.double(), KVCache_double(cache), lengths - 1)
    tol = 1e-5 if dtype == torch.float32 else 2e-3
    assert got.isfinite().all(), "no NaN or inf (max() would pass a NaN error over)"
    worst = max(worst, (got - want).abs().max().item() / tol)
print("WORST", worst)
"""


def _kv_double_helper() -> str:
    return (
        "def KVCache_double(c):\n"
        "    d = KVCache(c.max_batch, c.max_seq, c.k.shape[2], c.k.shape[3], torch.float64)\n"
        "    k, v = c.read(c.max_batch, c.max_seq)\n"
        "    d.write(torch.arange(c.max_seq).expand(c.max_batch, c.max_seq), k.double(), v.double())\n"
        "    return d\n"
    )


def test_triton_decode_attention_in_interpreter():
    """The Triton split-K kernel (run by Triton's CPU interpreter, in a subprocess because the
    interpreter is chosen at import) against the float64 reference on the same (dequantized)
    cache values: float32 within 1e-5, float16 within 2e-3 (outputs are O(1))."""
    pytest.importorskip("triton")
    assert _run_in_interpreter(_TRITON_CHECK) <= 1.0


_TRITON_ROPE_CHECK = r"""
import torch
from tpquant.layers.decode_attention import (
    decode_attention_reference, decode_attention_rope, num_splits, one_block)
from tpquant.layers.kv_cache import KVCache
from tpquant.models.llama import apply_rope_reference
g = torch.Generator().manual_seed(1)
worst = 0.0
# splits of one block each (2, 2, 1, 1 and 8 splits): positions 0 .. 63 of a split, the new
# one first, last or alone in it
for dtype, H, Hkv, hd, B, S, MB in [
    (torch.float32, 4, 2, 16, 3, 70, 4), (torch.float16, 8, 1, 64, 2, 100, 3),
    (torch.float32, 3, 3, 16, 5, 8, 5), (torch.float16, 6, 2, 32, 2, 40, 2),
    (torch.float32, 2, 2, 16, 2, 512, 2),
]:
    assert one_block(S, num_splits(B, Hkv, S))
    cache = KVCache(MB, S, Hkv, hd, dtype)
    old = [torch.randn(MB, S, Hkv, hd, generator=g).to(dtype) for _ in range(2)]
    cache.write(torch.arange(S).expand(MB, S), *old)  # stale values at the new positions too
    lengths = torch.randint(1, S + 1, (B,), generator=g)
    lengths[0], lengths[-1] = 1, S
    if S == 512:
        lengths[0] = 65  # its new position first in the second split
    pos = lengths - 1
    for step in range(2):  # twice, the second step over the first one's keys
        qkv = torch.randn(B, (H + 2 * Hkv) * hd, generator=g).to(dtype)
        ang = torch.randn(B, hd // 2, generator=g) * 3
        cos, sin = ang.cos(), ang.sin()
        # the unfused path: RoPE in torch, the new key and value written to a float64 copy
        qk = apply_rope_reference(qkv[:, None, : (H + Hkv) * hd].view(B, 1, H + Hkv, hd),
                                  cos[:, None], sin[:, None])
        q, k_new = qk.split([H, Hkv], dim=2)
        v_new = qkv[:, None, (H + Hkv) * hd :].view(B, 1, Hkv, hd)
        ref = KVCache_double(cache)
        ref.write(pos[:, None], k_new.double(), v_new.double())
        want = decode_attention_reference(q[:, 0].double(), ref, pos)
        before_k, before_v = cache.k.clone(), cache.v.clone()
        got = decode_attention_rope(qkv, cos, sin, cache, pos, H).double()
        tol = 1e-5 if dtype == torch.float32 else 2e-3
        assert got.isfinite().all(), "no NaN or inf (max() would pass a NaN error over)"
        worst = max(worst, (got - want).abs().max().item() / tol)
        rows = torch.arange(B)
        assert torch.equal(cache.k[rows, pos], k_new[:, 0]), "the stored key is RoPE's"
        assert torch.equal(cache.v[rows, pos], v_new[:, 0]), "the stored value is qkv's"
        before_k[rows, pos], before_v[rows, pos] = cache.k[rows, pos], cache.v[rows, pos]
        assert torch.equal(cache.k, before_k) and torch.equal(cache.v, before_v), "nothing else"
        pos = torch.minimum(pos + 1, torch.full_like(pos, S - 1))
print("WORST", worst)
"""


def _run_in_interpreter(code: str) -> float:
    """`code` in a subprocess under Triton's CPU interpreter (chosen at import); its WORST."""
    import subprocess
    import sys

    code = code.replace("g = torch.Generator()", _kv_double_helper() + "g = torch.Generator()")
    env = dict(os.environ, TRITON_INTERPRET="1")
    run = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    return float(run.stdout.split("WORST")[-1])


def test_triton_decode_attention_rope_in_interpreter():
    """decode_attention_rope (RoPE, the KV write and attention in one kernel) against the
    unfused path: torch's RoPE, the write, and the float64 reference attention. Attention
    within the tolerances above; the stored key and value bit for bit RoPE's and qkv's (the
    interpreter has no fused multiply-add: the same float32 operations, the same roundings),
    every other cache entry unchanged."""
    pytest.importorskip("triton")
    assert _run_in_interpreter(_TRITON_ROPE_CHECK) <= 1.0


def test_decode_attention_splits_and_warps():
    """Llama-2-7B's cache of 576 positions (bench_decode's): splits fill 512 programs, no
    split shorter than a block; 4 warps where a split spans 1-3 blocks of 64, 2 from 4 on."""
    from tpquant.layers.decode_attention import num_splits, split_warps

    cases = [  # (batch, KV heads, max_seq) -> (splits, warps)
        ((1, 32, 576), (9, 4)),  # TP 1, batch 1: one block a split
        ((1, 16, 576), (9, 4)),  # TP 2, batch 1
        ((8, 32, 576), (2, 2)),  # TP 1, batch 8: 288 positions, 5 blocks
        ((8, 16, 576), (4, 4)),  # TP 2, batch 8: 144 positions, 3 blocks
        ((64, 32, 576), (1, 2)),  # batch 64: one split of 9 blocks
        ((1, 8, 4096), (64, 4)),  # a long cache: 64 splits of one block
    ]
    for (batch, kv_heads, max_seq), want in cases:
        splits = num_splits(batch, kv_heads, max_seq)
        assert (splits, split_warps(max_seq, splits)) == want, (batch, kv_heads, max_seq)
    assert split_warps(193, 1) == 2 and split_warps(192, 1) == 4  # 4 blocks (one partial), 3


def test_rope_fusion_rule():
    """decode_attention_rope where each split is one block of 64 positions: Llama-2-7B's 576
    positions at batch 1 (9 splits) and TP 2 batch 1, not batch 8 (2 splits of 288); never a
    CPU or INT8 cache (its write stays in torch), which `fuses_rope` turns down before any rule."""
    from tpquant.layers.decode_attention import fuses_rope, num_splits, one_block
    from tpquant.layers.kv_cache import KVCache

    assert one_block(576, num_splits(1, 32, 576)) and one_block(576, num_splits(1, 16, 576))
    assert not one_block(576, num_splits(8, 32, 576))
    assert not one_block(576, num_splits(64, 32, 576))
    assert one_block(64, 1) and not one_block(65, 1)
    for int8 in (False, True):
        assert not fuses_rope(KVCache(1, 64, 2, 16, torch.float32, int8=int8), 1)


def test_decode_buckets():
    from tpquant.engine.graphs import BUCKETS, bucket_for

    assert [bucket_for(b) for b in (1, 2, 3, 5, 8, 9, 33, 64)] == [1, 2, 4, 8, 8, 16, 64, 64]
    assert bucket_for(65) is None and BUCKETS[-1] == 64
    with pytest.raises(ValueError, match="batch must be >= 1"):
        bucket_for(0)


def test_prefill_lengths():
    """Prompts run padded to the next power of two, 64 at least, where the cache holds it."""
    from tpquant.engine.graphs import PREFILL_MIN_LENGTH, prefill_length

    assert PREFILL_MIN_LENGTH == 64
    assert [prefill_length(t, 4096) for t in (1, 37, 64, 65, 512, 513, 4096)] == [
        64, 64, 64, 128, 512, 1024, 4096]
    assert prefill_length(513, 1000) is None and prefill_length(512, 512) == 512
    assert prefill_length(3, 60) is None  # the cache is shorter than the smallest graph
    with pytest.raises(ValueError, match="at least one token"):
        prefill_length(0, 64)


def test_prefill_graphs_need_cuda(tmp_path):
    from tpquant.engine.graphs import PrefillGraphs

    with pytest.raises(ValueError, match="CUDA graphs need the model on a CUDA device"):
        PrefillGraphs(_tiny_model(tmp_path))


@torch.no_grad()
def test_session_generate_batch_equals_each_prompt_alone(tmp_path):
    """engine.session.generate on a right-padded batch (prefill logits at each row's last
    token, then per-row positions) gives each row the ids generate_greedy gives it alone."""
    from tpquant.engine.sampling import SamplingParams
    from tpquant.engine.session import generate

    model = _tiny_model(tmp_path)
    comm = SingleProcessCommunicator()
    prompts = [[3, 4, 5, 6, 7, 8, 9], [10, 11], [12, 13, 14, 15]]
    got = generate(model, comm, prompts, 6, SamplingParams(), stop_ids=()).tokens
    want = [generate_greedy(model, p, 6, comm, stop_ids=()) for p in prompts]
    assert got == want and all(len(row) == 6 for row in got)


@torch.no_grad()
def test_session_generate_stops_each_row_at_its_stop_token(tmp_path):
    """A row ends with its first stop token (kept); the others go on, and the batch ends with
    the last row to stop. on_step sees every step's tokens so far, in order."""
    from tpquant.engine.sampling import SamplingParams
    from tpquant.engine.session import generate

    model = _tiny_model(tmp_path)
    comm = SingleProcessCommunicator()
    prompts = [[3, 4, 5, 6, 7, 8, 9], [10, 11], [12, 13, 14, 15]]
    full = generate(model, comm, prompts, 10, SamplingParams(), stop_ids=()).tokens
    stop = full[0][2]
    want = [row[: row.index(stop) + 1] if stop in row else row for row in full]
    seen: list[list[list[int]]] = []
    got = generate(model, comm, prompts, 10, SamplingParams(), stop_ids=[stop],
                   on_step=lambda out: seen.append([list(r) for r in out])).tokens
    assert got == want and len(got[0]) == 3
    assert len(seen) == max(map(len, want))
    assert seen[-1] == want and all(len(s[0]) == min(i + 1, 3) for i, s in enumerate(seen))


def test_rope_table_is_built_on_the_frequencies_device() -> None:
    # setup_caches runs on a model already on its GPU (bench_decode, graphs): the positions
    # must be made on inv_freq's device. "meta" stands in for CUDA here (no data, same check).
    inv_freq = rope_inv_freq(8, 10000.0, None).to("meta")
    cos, sin = rope_cos_sin(inv_freq, 16)
    assert cos.device.type == "meta" and sin.device.type == "meta"
    assert tuple(cos.shape) == (16, 4)


_ROPE_CHECK = r"""
import torch
from tpquant.kernels.triton_rope import apply_rope
from tpquant.models.llama import apply_rope_reference
g = torch.Generator().manual_seed(0)
worst = 0.0
# (dtype, B, T, NH, hd, heads of the row): a slice of a wider row (as q|k of the qkv output),
# head counts that leave a partial block, head_dim whose half is not a power of two
for dtype, B, T, NH, hd, row in [
    (torch.float32, 2, 3, 12, 64, 18), (torch.float16, 1, 1, 40, 128, 48),
    (torch.bfloat16, 3, 2, 5, 16, 5), (torch.float32, 2, 4, 3, 12, 4),
    (torch.float32, 3, 1, 4, 16, 4),
]:
    full = torch.randn(B, T, row * hd, generator=g).to(dtype)
    x = full[..., : NH * hd].view(B, T, NH, hd)
    if T == 1:  # batch and token strides that do not nest (a transposed [T, B] tensor)
        x = torch.randn(T, B, NH, hd, generator=g).to(dtype).transpose(0, 1)
    ang = torch.rand(B, T, hd // 2, generator=g) * 6.3
    got = apply_rope(x, ang.cos(), ang.sin()).double()
    want = apply_rope_reference(x.double(), ang.cos().double(), ang.sin().double())
    tol = {torch.float32: 1e-6, torch.float16: 1e-3, torch.bfloat16: 8e-3}[dtype]
    worst = max(worst, (got - want).abs().max().item() / (tol * want.abs().max().item()))
print("WORST", worst)
"""


def test_triton_rope_in_interpreter():
    """The RoPE kernel (Triton's CPU interpreter, in a subprocess) against the float64 torch
    reference: float32 within 1e-6, float16 1e-3, bfloat16 8e-3 of the largest value (one
    rounding of the output)."""
    pytest.importorskip("triton")
    import subprocess
    import sys

    env = dict(os.environ, TRITON_INTERPRET="1")
    run = subprocess.run([sys.executable, "-c", _ROPE_CHECK], env=env, capture_output=True,
                         text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    worst = float(run.stdout.split("WORST")[-1])
    assert worst <= 1.0, worst
