"""Checkpoint readers (HF safetensors, GGUF), LlamaConfig and tokenizer loading.

References, all independent of the code under test:
* SmolLM2-135M-Instruct Q4_1 GGUF loaded by Hugging Face transformers (its own GGUF
  dequantization and q/k un-permutation): config fields, every tensor, the tokenizer.
  Tensors must match exactly: both sides dequantize with `gguf.quants.dequantize` in
  float32 and the un-permutation is a pure reindexing, so no rounding can differ.
* That model written by `save_pretrained` as a sharded safetensors directory: the HF reader
  must give the same names, config and tensors as the GGUF reader.
* Small synthetic files written here with random tensors (torch.Generator, fixed seeds):
  a GGUF made with `gguf.GGUFWriter`, q/k permuted with llama.cpp's converter formula
  (written below), tensors stored as Q8_0/Q4_0/Q4_1/F16/BF16/F32; and HF directories.
  Expected values are the random tensors passed through the storage type's round trip.
* llama3 RoPE factors computed with llama.cpp's converter loop (written below).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"  # before transformers is imported: never touch the hub
os.environ["TRANSFORMERS_OFFLINE"] = "1"

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

from tpquant.checkpoint import MissingTensorError, open_checkpoint  # noqa: E402
from tpquant.models.config import Llama3RopeScaling, LlamaConfig  # noqa: E402
from tpquant.checkpoint.default import default_checkpoint

import gguf  # noqa: E402

TEXTS = [
    "Hello world",
    "The capital of France is Paris.",
    "  def f(x):\n\treturn x ** 2  # 42, 3.14159",
    "Ünïcødé — 日本語のテキスト 🙂",
]
CHAT = [{"role": "user", "content": "What is the capital of France?"}]




def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _ids(out) -> list[int]:
    """apply_chat_template / __call__ results as a flat id list (dict or list, any version)."""
    ids = out["input_ids"] if hasattr(out, "keys") else out
    return list(ids[0]) if ids and isinstance(ids[0], list) else list(ids)


# -- SmolLM2 fixtures (module scope: the transformers load takes most of this file's time) --


@pytest.fixture(scope="module")
def gguf_path() -> Path:
    path = default_checkpoint()  # the set-up command installs it; missing is an error
    return path


@pytest.fixture(scope="module", autouse=True)
def _parse_gguf_once_for_transformers():
    """transformers re-parses the whole GGUF (~8 s here) for its config, its weights and every
    tokenizer load; hand it one cached read-only parse per file. tpquant's reader bound its
    own GGUFReader at import, so it still parses the file itself, independently."""
    cache: dict[str, object] = {}
    real = gguf.GGUFReader

    def cached_reader(path, mode="r"):
        key = f"{Path(path).resolve()}:{mode}"
        if key not in cache:
            cache[key] = real(path, mode)
        return cache[key]

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(gguf, "GGUFReader", cached_reader)
        yield


@pytest.fixture(scope="module")
def ref_model(gguf_path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(
        str(gguf_path.parent), gguf_file=gguf_path.name, dtype=torch.float32
    ).eval()


@pytest.fixture(scope="module")
def ref_tokenizer(gguf_path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)


@pytest.fixture(scope="module")
def gguf_ckpt(gguf_path):
    return open_checkpoint(gguf_path)


@pytest.fixture(scope="module")
def gguf_tensors(gguf_ckpt) -> dict[str, torch.Tensor]:
    return {name: gguf_ckpt.get(name) for name in gguf_ckpt.names()}


@pytest.fixture(scope="module")
def hf_dir(ref_model, ref_tokenizer, tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("smollm2_hf")
    # transformers refuses to save a model it loaded from GGUF ("quantized with gguf"); its
    # weights are plain float32 already, so save it as the unquantized model it now is
    quantizer, ref_model.hf_quantizer = ref_model.hf_quantizer, None
    try:
        ref_model.save_pretrained(d, max_shard_size="100MB")  # ~540 MB float32 -> >= 2 shards
    finally:
        ref_model.hf_quantizer = quantizer
    # ...and it still tags config.json with quant_method "gguf", which the reader (rightly)
    # refuses as a pre-quantized checkpoint: drop the stale tag
    config = json.loads((d / "config.json").read_text())
    config.pop("quantization_config", None)
    (d / "config.json").write_text(json.dumps(config))
    ref_tokenizer.save_pretrained(d)
    return d


# -- (a) config ----------------------------------------------------------------------


def test_gguf_config_matches_transformers(gguf_ckpt, ref_model):
    c, tf = gguf_ckpt.config, ref_model.config
    rope = getattr(tf, "rope_parameters", None) or {}
    eos = tf.eos_token_id
    assert c.vocab_size == tf.vocab_size
    assert c.hidden_size == tf.hidden_size
    assert c.intermediate_size == tf.intermediate_size
    assert c.num_layers == tf.num_hidden_layers
    assert c.num_heads == tf.num_attention_heads
    assert c.num_kv_heads == tf.num_key_value_heads
    assert c.head_dim == tf.head_dim
    assert c.rms_norm_eps == tf.rms_norm_eps
    assert c.rope_theta == rope.get("rope_theta", getattr(tf, "rope_theta", None))
    assert c.rope_scaling is None and rope.get("rope_type", "default") == "default"
    assert c.max_position_embeddings == tf.max_position_embeddings
    assert c.tie_word_embeddings == tf.tie_word_embeddings
    assert c.bos_token_id == tf.bos_token_id
    assert c.eos_token_ids == ((eos,) if isinstance(eos, int) else tuple(eos))
    assert c.attention_bias == tf.attention_bias
    assert c.mlp_bias == tf.mlp_bias


# -- (b) every GGUF tensor equals transformers' -------------------------------------------


def test_gguf_tensors_match_transformers(gguf_ckpt, gguf_tensors, ref_model):
    ref = ref_model.state_dict()
    tied = gguf_ckpt.config.tie_word_embeddings
    expected_names = set(ref) - ({"lm_head.weight"} if tied else set())
    assert set(gguf_ckpt.names()) == expected_names
    if tied:  # the tied head is the embedding, which the reader does return
        assert ref["lm_head.weight"].data_ptr() == ref["model.embed_tokens.weight"].data_ptr()
    for name, got in gguf_tensors.items():
        want = ref[name]
        assert got.dtype == torch.float32, name
        assert tuple(got.shape) == tuple(want.shape) == gguf_ckpt.shape(name), name
        # exact: same dequantizer, and the q/k un-permutation only moves values
        assert torch.equal(got, want), f"{name}: max abs diff {(got - want).abs().max()}"


# -- (c) get_slice equals slicing get() ---------------------------------------------------


def _check_slices(ckpt, names: list[str], gen: torch.Generator, per_dim: int = 3) -> None:
    for name in names:
        full = ckpt.get(name)
        for dim in range(full.dim()):
            n = full.shape[dim]
            bounds = [(0, n), (0, 0), (n // 3, n // 3 + 1)]  # whole, empty, one row/column
            for _ in range(per_dim):  # random, mostly unaligned to heads and quant blocks
                a, b = sorted(torch.randint(0, n + 1, (2,), generator=gen).tolist())
                bounds.append((a, b))
            for a, b in bounds:
                got = ckpt.get_slice(name, dim, a, b)
                assert got.dtype == full.dtype, name
                assert torch.equal(got, full.narrow(dim, a, b - a)), (name, dim, a, b)
        with pytest.raises(IndexError):
            ckpt.get_slice(name, 0, 0, full.shape[0] + 1)


def _check_owned(ckpt, names: list[str]) -> None:
    """Writing into a returned tensor must not change what the next get() returns."""
    for name in names:
        want = ckpt.get(name).clone()
        for got in (ckpt.get(name), ckpt.get_slice(name, 0, 0, 1)):
            got.fill_(12345.0)
        assert torch.equal(ckpt.get(name), want), name


SLICED = [  # Q8_0 (the embedding) is sliced in the cheaper synthetic GGUF test below
    "model.layers.0.self_attn.q_proj.weight",  # permuted, 9 heads
    "model.layers.0.self_attn.k_proj.weight",  # permuted, 3 heads
    "model.layers.1.self_attn.v_proj.weight",  # Q4_1
    "model.layers.2.mlp.down_proj.weight",
    "model.layers.2.post_attention_layernorm.weight",  # F32, 1-D
]


def test_gguf_get_slice_equals_get(gguf_ckpt):
    _check_slices(gguf_ckpt, SLICED, _gen(1))


# -- (d) the HF directory written by transformers reads the same ----------------------------


def test_hf_reader_matches_gguf(hf_dir, gguf_ckpt, gguf_tensors, gguf_path):
    index = json.loads((hf_dir / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) >= 2
    ckpt = open_checkpoint(hf_dir)
    assert type(ckpt).__name__ == "HFCheckpoint"
    assert ckpt.config == gguf_ckpt.config
    assert sorted(ckpt.names()) == sorted(gguf_ckpt.names())
    for name, want in gguf_tensors.items():
        got = ckpt.get(name)
        assert got.dtype == want.dtype and torch.equal(got, want), name
        assert ckpt.shape(name) == tuple(want.shape)
    _check_slices(ckpt, SLICED, _gen(2), per_dim=2)
    # GGUF checksum: plain sha256 of the file; HF: covers every shard
    assert gguf_ckpt.source_checksum() == hashlib.sha256(gguf_path.read_bytes()).hexdigest()
    digest = ckpt.source_checksum()
    assert len(digest) == 64 and int(digest, 16) >= 0 and digest != gguf_ckpt.source_checksum()


# -- (f) tokenizer and chat template ------------------------------------------------------


def test_tokenizers_match_transformers(gguf_ckpt, hf_dir, ref_tokenizer):
    hf_ckpt = open_checkpoint(hf_dir)
    want_template = ref_tokenizer.chat_template
    assert isinstance(want_template, str) and "im_start" in want_template
    assert gguf_ckpt.chat_template == want_template
    assert hf_ckpt.chat_template == want_template
    want_chat = _ids(ref_tokenizer.apply_chat_template(CHAT, add_generation_prompt=True))
    assert len(want_chat) > 10
    for ckpt in (gguf_ckpt, hf_ckpt):
        tok = ckpt.tokenizer()
        for text in TEXTS:
            assert _ids(tok(text)) == _ids(ref_tokenizer(text)), (ckpt, text)
        assert _ids(tok.apply_chat_template(CHAT, add_generation_prompt=True)) == want_chat
    # the template string itself, applied by the reference tokenizer, gives the same ids
    got = ref_tokenizer.apply_chat_template(
        CHAT, chat_template=gguf_ckpt.chat_template, add_generation_prompt=True
    )
    assert _ids(got) == want_chat


# -- synthetic HF directories: missing tensors, dtypes, single file ------------------------

TINY = dict(vocab_size=40, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-5, rope_theta=10000.0,
            max_position_embeddings=128, tie_word_embeddings=False, bos_token_id=1,
            eos_token_id=2, model_type="llama", hidden_act="silu")


def _tiny_tensors(gen: torch.Generator, dtype=torch.float32) -> dict[str, torch.Tensor]:
    h, f, v, kv = 32, 48, 40, 2 * 8
    t = {"model.embed_tokens.weight": torch.randn(v, h, generator=gen),
         "model.norm.weight": torch.rand(h, generator=gen) + 0.5,
         "lm_head.weight": torch.randn(v, h, generator=gen)}
    for i in range(2):
        p = f"model.layers.{i}."
        t |= {p + "input_layernorm.weight": torch.rand(h, generator=gen) + 0.5,
              p + "post_attention_layernorm.weight": torch.rand(h, generator=gen) + 0.5,
              p + "self_attn.q_proj.weight": torch.randn(h, h, generator=gen),
              p + "self_attn.k_proj.weight": torch.randn(kv, h, generator=gen),
              p + "self_attn.v_proj.weight": torch.randn(kv, h, generator=gen),
              p + "self_attn.o_proj.weight": torch.randn(h, h, generator=gen),
              p + "mlp.gate_proj.weight": torch.randn(f, h, generator=gen),
              p + "mlp.up_proj.weight": torch.randn(f, h, generator=gen),
              p + "mlp.down_proj.weight": torch.randn(h, f, generator=gen)}
    return {k: x.to(dtype) for k, x in t.items()}


def test_hf_single_file_dtypes_and_missing_tensor(tmp_path):
    tensors = _tiny_tensors(_gen(3), torch.bfloat16)
    tensors["model.norm.weight"] = tensors["model.norm.weight"].double()  # -> float32
    dropped = "model.layers.1.mlp.up_proj.weight"
    (tmp_path / "config.json").write_text(json.dumps(TINY))
    save_file({k: v for k, v in tensors.items() if k != dropped}, tmp_path / "model.safetensors")
    ckpt = open_checkpoint(tmp_path)
    assert ckpt.config == LlamaConfig.from_hf(TINY)
    assert set(ckpt.names()) == set(tensors) - {dropped}
    for name in ckpt.names():
        got, want = ckpt.get(name), tensors[name]
        assert got.dtype == (torch.float32 if want.dtype == torch.float64 else want.dtype)
        assert torch.equal(got, want.to(got.dtype)), name
    _check_slices(ckpt, ["model.layers.0.self_attn.k_proj.weight", "model.norm.weight"], _gen(4))
    _check_owned(ckpt, ["model.layers.0.self_attn.k_proj.weight", "model.norm.weight"])
    with pytest.raises(MissingTensorError) as err:
        ckpt.get(dropped)
    assert dropped in str(err.value) and str(tmp_path) in str(err.value)
    assert isinstance(err.value, KeyError)
    gptq = dict(TINY, quantization_config={"quant_method": "gptq"})
    (tmp_path / "config.json").write_text(json.dumps(gptq))
    with pytest.raises(ValueError, match="pre-quantized"):
        open_checkpoint(tmp_path)


def test_hf_sharded_shard_lacking_a_tensor(tmp_path):
    tensors = _tiny_tensors(_gen(5))
    names = sorted(tensors)
    first, second = "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"
    shards = {first: names[::2], second: names[1::2]}
    dropped = shards[second][0]
    for file, keys in shards.items():  # the index lists `dropped`, its shard lacks it
        save_file({k: tensors[k] for k in keys if k != dropped}, tmp_path / file)
    weight_map = {k: file for file, keys in shards.items() for k in keys}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    (tmp_path / "config.json").write_text(json.dumps(TINY))
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [7, 2]}))
    ckpt = open_checkpoint(tmp_path)
    assert ckpt.config.eos_token_ids == (2, 7)  # config.json first, generation extras after
    for name in names:
        if name != dropped:
            assert torch.equal(ckpt.get(name), tensors[name]), name
    for bad in (dropped, "model.layers.9.mlp.up_proj.weight"):
        with pytest.raises(MissingTensorError, match=bad.replace(".", r"\.")):
            ckpt.get(bad)
        with pytest.raises(MissingTensorError, match=str(tmp_path)):
            ckpt.get_slice(bad, 0, 0, 1)


def test_open_checkpoint_rejects_other_paths(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        open_checkpoint(tmp_path / "nothing_here")
    with pytest.raises(ValueError, match="config.json"):
        open_checkpoint(tmp_path)  # a directory, but not a checkpoint
    (tmp_path / "model.bin").write_bytes(b"\0" * 16)
    with pytest.raises(ValueError, match="gguf"):
        open_checkpoint(tmp_path / "model.bin")


def test_gguf_missing_tensor(gguf_ckpt, gguf_path):
    name = "model.layers.30.self_attn.q_proj.weight"  # SmolLM2 has layers 0..29
    with pytest.raises(MissingTensorError) as err:
        gguf_ckpt.get_slice(name, 0, 0, 1)
    assert name in str(err.value) and str(gguf_path) in str(err.value)
    if gguf_ckpt.config.tie_word_embeddings:
        with pytest.raises(MissingTensorError):
            gguf_ckpt.get("lm_head.weight")


# -- synthetic GGUF: every storage type, llama.cpp's permutation, untied head, biases ------


def llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """convert_hf_to_gguf.py LlamaModel.permute: HF q/k rows -> llama.cpp rope layout."""
    head = w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
    return head.swapaxes(1, 2).reshape(w.shape)


def llama_cpp_rope_factors(theta, dim, factor, low, high, old_ctx) -> np.ndarray:
    """convert_hf_to_gguf.py LlamaModel rope_freqs for rope_type llama3, loop as written there."""
    freqs = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    out = []
    for freq in freqs.tolist():
        wavelen = 2 * math.pi / freq
        if wavelen < old_ctx / high:
            out.append(1)
        elif wavelen > old_ctx / low:
            out.append(factor)
        else:
            smooth = (old_ctx / wavelen - low) / (high - low)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return np.array(out, dtype=np.float32)


Q = gguf.GGMLQuantizationType
SYN = dict(vocab=48, hidden=128, heads=4, kv=2, inter=96, layers=2, theta=500000.0)
SYN_SCALING = dict(factor=16.0, low=1.0, high=32.0, old_ctx=8192)  # hd 32: >= 2 mid factors
SYN_LAYER = [  # (llama.cpp name, HF module, out, in, storage type, rope heads)
    ("attn_q", "self_attn.q_proj", "h", "h", Q.Q8_0, "heads"),
    ("attn_k", "self_attn.k_proj", "kv", "h", Q.F16, "kv"),
    ("attn_v", "self_attn.v_proj", "kv", "h", Q.BF16, None),
    ("attn_output", "self_attn.o_proj", "h", "h", Q.Q4_1, None),
    ("ffn_gate", "mlp.gate_proj", "inter", "h", Q.F32, None),
    ("ffn_up", "mlp.up_proj", "inter", "h", Q.Q8_0, None),
    ("ffn_down", "mlp.down_proj", "h", "inter", Q.Q4_0, None),
]


def _stored(x: np.ndarray, qtype) -> tuple[np.ndarray, torch.Tensor]:
    """(array for GGUFWriter, what a reader must return) for float32 x stored as qtype."""
    if qtype == Q.F32:
        return x, torch.from_numpy(x.copy())
    if qtype == Q.F16:
        return x.astype(np.float16), torch.from_numpy(x).half()
    q = gguf.quants.quantize(x, qtype)
    if qtype == Q.BF16:  # round-to-nearest-even, like torch's float32 -> bfloat16
        return q, torch.from_numpy(x).bfloat16()
    return q, torch.from_numpy(gguf.quants.dequantize(q, qtype).copy())


def _write_synthetic_gguf(path: Path, gen: torch.Generator) -> dict[str, torch.Tensor]:
    """A tiny untied Llama with q/k/v/o biases; returns what the reader must give per name."""
    s = SYN
    hd = s["hidden"] // s["heads"]
    dims = {"h": s["hidden"], "kv": s["kv"] * hd, "inter": s["inter"]}
    w = gguf.GGUFWriter(path, "llama")
    w.add_block_count(s["layers"])
    w.add_context_length(1024)
    w.add_embedding_length(s["hidden"])
    w.add_feed_forward_length(s["inter"])
    w.add_head_count(s["heads"])
    w.add_head_count_kv(s["kv"])
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_freq_base(s["theta"])
    w.add_rope_dimension_count(hd)
    w.add_bos_token_id(1)
    w.add_eos_token_id(3)
    w.add_eot_token_id(5)
    w.add_chat_template("{{ x }}")
    expected: dict[str, torch.Tensor] = {}

    def add(gguf_name: str, hf_name: str, shape: tuple[int, ...], qtype, heads=None) -> None:
        x = (torch.randn(shape, generator=gen) if len(shape) == 2
             else torch.rand(shape, generator=gen) + 0.5).numpy()
        raw, expected[hf_name] = _stored(x, qtype)
        if heads is not None:  # whole rows move, so permuting the stored form is the same
            raw = llama_cpp_permute(raw, heads)
        w.add_tensor(gguf_name, raw, raw_dtype=qtype if raw.dtype == np.uint8 else None)

    add("token_embd.weight", "model.embed_tokens.weight", (s["vocab"], dims["h"]), Q.Q8_0)
    add("output.weight", "lm_head.weight", (s["vocab"], dims["h"]), Q.F16)
    add("output_norm.weight", "model.norm.weight", (dims["h"],), Q.F32)
    w.add_tensor("rope_freqs.weight", llama_cpp_rope_factors(s["theta"], hd, *SYN_SCALING.values()))
    for i in range(s["layers"]):
        hf = f"model.layers.{i}"
        add(f"blk.{i}.attn_norm.weight", f"{hf}.input_layernorm.weight", (dims["h"],), Q.F32)
        post_norm = f"{hf}.post_attention_layernorm.weight"
        add(f"blk.{i}.ffn_norm.weight", post_norm, (dims["h"],), Q.F32)
        for short, module, out, n_in, qtype, heads in SYN_LAYER:
            n_heads = None if heads is None else s[heads]
            add(f"blk.{i}.{short}.weight", f"{hf}.{module}.weight",
                (dims[out], dims[n_in]), qtype, n_heads)
            if module.startswith("self_attn"):  # bias: 1-D, drawn from randn like weights
                add(f"blk.{i}.{short}.bias", f"{hf}.{module}.bias", (dims[out],), Q.F32, n_heads)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return expected


def test_synthetic_gguf(tmp_path):
    s, path = SYN, tmp_path / "tiny.gguf"
    expected = _write_synthetic_gguf(path, _gen(6))
    ckpt = open_checkpoint(path)
    c = ckpt.config
    assert (c.vocab_size, c.hidden_size, c.intermediate_size, c.num_layers) == (
        s["vocab"], s["hidden"], s["inter"], s["layers"])
    assert (c.num_heads, c.num_kv_heads, c.head_dim, c.rope_theta) == (
        s["heads"], s["kv"], s["hidden"] // s["heads"], s["theta"])
    assert (c.bos_token_id, c.eos_token_ids, c.max_position_embeddings) == (1, (3, 5), 1024)
    assert not c.tie_word_embeddings and c.attention_bias and not c.mlp_bias
    assert ckpt.chat_template == "{{ x }}"
    rs = c.rope_scaling
    assert rs is not None and rs.original_max_position_embeddings == SYN_SCALING["old_ctx"]
    assert [rs.factor, rs.low_freq_factor, rs.high_freq_factor] == pytest.approx(
        [SYN_SCALING["factor"], SYN_SCALING["low"], SYN_SCALING["high"]], rel=1e-4)
    assert set(ckpt.names()) == set(expected)
    for name, want in expected.items():
        got = ckpt.get(name)
        assert got.dtype == want.dtype and torch.equal(got, want), name
    sliced = [n for n in expected if "layers.1" in n and "norm" not in n]
    _check_slices(ckpt, sliced + ["model.embed_tokens.weight"], _gen(7), per_dim=2)
    _check_owned(ckpt, list(expected))


def test_fast_reader_parses_what_gguf_reader_parses(tmp_path):
    """FastGGUFReader (a plain-ndarray view of the map, for speed) gives the same fields
    (types, parts, data indices, contents) and tensors as gguf.GGUFReader, on a file with
    the string and number arrays a tokenizer brings."""
    from tpquant.checkpoint.gguf import FastGGUFReader

    path = tmp_path / "model.gguf"  # quantized tensors, permuted q/k, rope_freqs
    _write_synthetic_gguf(path, _gen(8))
    w = gguf.GGUFWriter(tmp_path / "tok.gguf", "llama")  # a vocabulary and merges
    w.add_token_list([f"tok{i}" for i in range(300)] + ["Ünïcødé", ""])
    w.add_token_merges([f"t o{i}" for i in range(200)])
    w.add_token_scores([float(i) / 3 for i in range(302)])
    w.add_token_types([1] * 302)
    w.add_string("general.name", "tiny")
    w.add_tensor("token_embd.weight", np.arange(24, dtype=np.float32).reshape(4, 6))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    for file in (path, tmp_path / "tok.gguf"):
        slow, fast = gguf.gguf_reader.GGUFReader(file, "r"), FastGGUFReader(file, "r")
        assert type(fast.data) is np.ndarray and isinstance(fast.data.base, np.memmap)
        assert list(slow.fields) == list(fast.fields)
        for name, a in slow.fields.items():
            b = fast.fields[name]
            assert (a.offset, a.types, a.data) == (b.offset, b.types, b.data), name
            assert len(a.parts) == len(b.parts)
            assert all(np.array_equal(x, y) for x, y in zip(a.parts, b.parts)), name
            assert a.contents() == b.contents(), name
        assert [t.name for t in slow.tensors] == [t.name for t in fast.tensors]
        for a, b in zip(slow.tensors, fast.tensors):
            assert (a.tensor_type, a.n_bytes, a.data_offset) == (b.tensor_type, b.n_bytes,
                                                                 b.data_offset)
            assert np.array_equal(a.shape, b.shape) and np.array_equal(a.data, b.data), a.name
    assert fast.fields["tokenizer.ggml.tokens"].contents()[-2:] == ["Ünïcødé", ""]


# -- llama3 RoPE factors recovered from rope_freqs ----------------------------------------


@pytest.mark.parametrize(
    "factor,low,high,ctx", [(8.0, 1.0, 4.0, 8192), (32.0, 1.0, 4.0, 8192), (4.0, 2.0, 16.0, 4096)]
)
def test_llama3_scaling_from_rope_freqs(factor, low, high, ctx):
    from tpquant.checkpoint.gguf import llama3_scaling_from_rope_freqs

    theta, dim = 500000.0, 128
    stored = llama_cpp_rope_factors(theta, dim, factor, low, high, ctx)
    got = llama3_scaling_from_rope_freqs(stored, theta, dim, ctx)
    got_params = [got.factor, got.low_freq_factor, got.high_freq_factor]
    assert got_params == pytest.approx([factor, low, high], rel=1e-4)
    assert got.original_max_position_embeddings == ctx
    with pytest.raises(ValueError):  # no interpolated band: nothing to recover
        llama3_scaling_from_rope_freqs(np.ones(dim // 2, np.float32), theta, dim)


# -- (g) LlamaConfig ------------------------------------------------------------------------


def test_config_dict_round_trip():
    gen = _gen(8)
    for i in range(5):
        heads_kv = int(torch.randint(1, 5, (1,), generator=gen))
        heads = heads_kv * int(torch.randint(1, 5, (1,), generator=gen))
        hd = 2 * int(torch.randint(4, 64, (1,), generator=gen))
        scaling = Llama3RopeScaling(float(torch.rand(1, generator=gen)) * 30 + 1, 1.0, 4.0, 8192)
        c = LlamaConfig(
            vocab_size=int(torch.randint(100, 200000, (1,), generator=gen)), hidden_size=heads * hd,
            intermediate_size=int(torch.randint(1, 30000, (1,), generator=gen)),
            num_layers=int(torch.randint(1, 100, (1,), generator=gen)), num_heads=heads,
            num_kv_heads=heads_kv, head_dim=hd if i % 2 else None,
            rms_norm_eps=float(torch.rand(1, generator=gen)) * 1e-5 + 1e-7,
            rope_theta=float(torch.rand(1, generator=gen)) * 1e6 + 1.0,
            rope_scaling=scaling if i % 2 else None, tie_word_embeddings=bool(i % 3),
            bos_token_id=1, eos_token_ids=(2, 99), attention_bias=bool(i % 2), mlp_bias=False)
        d = json.loads(json.dumps(c.to_dict()))
        assert LlamaConfig.from_dict(d) == c
        assert c.head_dim == hd


def test_config_from_hf_both_rope_styles():
    llama31 = dict(TINY, rope_theta=500000.0, eos_token_id=[2, 3],
                   rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                 "high_freq_factor": 4.0, "original_max_position_embeddings": 8192})
    v5 = {k: v for k, v in llama31.items() if k not in ("rope_theta", "rope_scaling")}
    v5["rope_parameters"] = dict(llama31["rope_scaling"], rope_theta=500000.0)
    a, b = LlamaConfig.from_hf(llama31), LlamaConfig.from_hf(v5)
    assert a == b
    assert a.rope_scaling == Llama3RopeScaling(8.0, 1.0, 4.0, 8192)
    assert (a.rope_theta, a.eos_token_ids, a.head_dim) == (500000.0, (2, 3), 32 // 4)


@pytest.mark.parametrize(
    "change,match",
    [
        (dict(hidden_size=30), "not divisible by num_heads"),
        (dict(num_key_value_heads=3), "multiple of num_kv_heads"),
        (dict(num_hidden_layers=0), "num_layers"),
        (dict(eos_token_id=40), "outside the vocabulary"),
        (dict(model_type="gpt2"), "not a Llama"),
        (dict(hidden_act="gelu"), "silu"),
        (dict(rope_scaling={"rope_type": "yarn", "factor": 4.0}), "yarn"),
        (dict(rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 4.0,
                            "high_freq_factor": 1.0, "original_max_position_embeddings": 8192}),
         "low_freq"),
    ],
)
def test_config_validation_errors(change, match):
    with pytest.raises(ValueError, match=match):
        LlamaConfig.from_hf(dict(TINY, **change))


def test_config_from_dict_rejects_unknown_keys():
    d = LlamaConfig.from_hf(TINY).to_dict()
    with pytest.raises(ValueError, match="unknown LlamaConfig keys"):
        LlamaConfig.from_dict(dict(d, n_experts=8))
