"""A build under mpirun writes the same engine files as one process building every rank.

Under mpirun each rank reads only its slices of the checkpoint and completes the statistics
of its row-parallel weights (the per-row maxima of weight-only int8/int4) by all_reduce(max);
one process building the ranks in turn computes them once from the full weights. Max is
exact, so the files must be IDENTICAL, and equal to the old full-read path (every tensor
read whole, quantized whole, then sharded). Checked at TP = the world size, so the file
passes under any `mpirun -n`:

- a tiny random Llama (biases, untied head, a vocabulary of 37 that no TP size divides,
  6 query / 2 KV heads: split at TP 2, expanded and zero-padded at 3 and 4), fp32, fp16,
  int8_wo, int4_wo, int4_gw (group 8: whole groups on every slice): `build_engine` over
  the real communicator, against this rank's file of a one-process build (the same `build_rank` with `FullWeightStatistics`), against the
  full-read model, and against a one-process `build_engine` of every rank (rank 0);
- SmolLM2-135M (GGUF), int8_wo: the mpirun build against the one-process path for this
  rank and the full-read model.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"  # before transformers is imported: never touch the hub
os.environ["TRANSFORMERS_OFFLINE"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402
from safetensors import safe_open  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

from tpquant.checkpoint import open_checkpoint  # noqa: E402
from tpquant.checkpoint.default import default_checkpoint  # noqa: E402
from tpquant.collectives import SingleProcessCommunicator  # noqa: E402
from tpquant.engine.build import DTYPES, BuildSpec, build_engine, build_rank  # noqa: E402
from tpquant.models.loader import FullWeightStatistics, load_llama  # noqa: E402
from tpquant.parallel.mapping import Mapping  # noqa: E402

pytest.importorskip("mpi4py")
pytestmark = pytest.mark.mpi

TINY = dict(
    model_type="llama", hidden_act="silu", vocab_size=37, hidden_size=48, intermediate_size=96,
    num_hidden_layers=2, num_attention_heads=6, num_key_value_heads=2, head_dim=8,
    max_position_embeddings=64, rms_norm_eps=1e-5, attention_bias=True, mlp_bias=True,
    tie_word_embeddings=False, bos_token_id=1, eos_token_id=2,
)


def write_tiny_checkpoint(path: Path, seed: int = 0) -> Path:
    """A Hugging Face directory: random weights with row scales over 4 orders of magnitude
    (so per-row int8 scales differ), and a word-level tokenizer (a build saves one)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    g = torch.Generator().manual_seed(seed)
    c = TINY
    h, f, v, hd = c["hidden_size"], c["intermediate_size"], c["vocab_size"], c["head_dim"]
    q, kv = c["num_attention_heads"] * hd, c["num_key_value_heads"] * hd

    def w(o: int, i: int) -> torch.Tensor:
        rows = torch.logspace(-2, 2, o)[torch.randperm(o, generator=g)]
        return torch.randn(o, i, generator=g) * rows[:, None]

    t = {"model.embed_tokens.weight": torch.randn(v, h, generator=g),
         "model.norm.weight": torch.rand(h, generator=g) + 0.5, "lm_head.weight": w(v, h)}
    for i in range(c["num_hidden_layers"]):
        p = f"model.layers.{i}."
        t[p + "input_layernorm.weight"] = torch.rand(h, generator=g) + 0.5
        t[p + "post_attention_layernorm.weight"] = torch.rand(h, generator=g) + 0.5
        for name, (o, i_) in {"self_attn.q_proj": (q, h), "self_attn.k_proj": (kv, h),
                              "self_attn.v_proj": (kv, h), "self_attn.o_proj": (h, q),
                              "mlp.gate_proj": (f, h), "mlp.up_proj": (f, h),
                              "mlp.down_proj": (h, f)}.items():
            t[p + name + ".weight"] = w(o, i_)
            t[p + name + ".bias"] = torch.randn(o, generator=g) * 0.1
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(c))
    save_file(t, str(path / "model.safetensors"))
    vocab = {f"w{i}": i for i in range(v)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="w0", bos_token="w1",
                            eos_token="w2").save_pretrained(str(path))
    return path


class _Unchanged:
    """A transform that changes nothing; any transform makes load_llama read whole tensors."""

    def transform_weight(self, layer_name: str, weight: torch.Tensor) -> torch.Tensor:
        return weight

    def transform_norm(self, norm_name: str, weight: torch.Tensor) -> torch.Tensor:
        return weight


def _rank_file(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    with safe_open(str(path), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata())


def _differences(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> list[str]:
    if got.keys() != want.keys():
        return [f"names differ: {sorted(set(got) ^ set(want))}"]
    return [k for k in want if got[k].dtype != want[k].dtype or not torch.equal(got[k], want[k])]


def _shared_dir(comm, tmp_path_factory, name: str) -> Path:
    """A directory every rank sees (rank 0 makes it)."""
    d = str(tmp_path_factory.mktemp(name)) if comm.rank == 0 else None
    return Path(comm.broadcast_object(d))


def _check_build(comm, spec: BuildSpec, root: Path, one_process_engine: bool) -> None:
    """mpirun build == the one-process path for this rank == the full-read model
    (== a one-process build_engine of every rank, on rank 0, if asked). Every rank
    collects its differences; the assertion comes after the collectives."""
    rank = comm.rank
    out, reused = build_engine(spec, root / "mpirun", comm)
    assert not reused
    got, meta = _rank_file(out / f"rank{rank}.engine")

    # this rank's file as one process builds it (FullWeightStatistics: the full weights)
    ckpt = open_checkpoint(spec.checkpoint)
    source, key = (json.loads(meta[k]) for k in ("source_checksum", "build_key"))
    alone_dir = root / f"alone{rank}"
    info = build_rank(ckpt, spec, rank, key, source, alone_dir, statistics=FullWeightStatistics())
    alone, alone_meta = _rank_file(alone_dir / info.name)

    # the full-read path: every tensor whole, quantized whole, then sharded
    full = load_llama(ckpt, Mapping(spec.tp, rank), SingleProcessCommunicator(),
                      spec.schemes_for(ckpt.config),
                      DTYPES[spec.dtype], max_seq=1, transform=_Unchanged()).state_dict()
    problems = {"one-process path": _differences(got, alone), "full read": _differences(got, full),
                "metadata": [k for k in meta if alone_meta.get(k) != meta[k]]}
    if one_process_engine and rank == 0:
        seq, _ = build_engine(spec, root / "one_process", SingleProcessCommunicator())
        for r in range(spec.tp):
            a, _ = _rank_file(out / f"rank{r}.engine")
            b, _ = _rank_file(seq / f"rank{r}.engine")
            problems[f"one-process build_engine rank {r}"] = _differences(a, b)
    comm.barrier()
    bad = {what: names[:5] for what, names in problems.items() if names}
    assert not bad, f"rank {rank}: the mpirun build differs from {bad}"


@pytest.fixture(scope="module")
def tiny(comm, tmp_path_factory) -> Path:
    torch.set_num_threads(1)  # up to 4 ranks share 2 cores
    d = _shared_dir(comm, tmp_path_factory, "tiny_ckpt")
    if comm.rank == 0:
        write_tiny_checkpoint(d)
    comm.barrier()
    return d


@pytest.mark.parametrize("quant,dtype", [("fp16", "float32"), ("fp16", "float16"),
                                         ("int8_wo", "float32"), ("int4_wo", "bfloat16"),
                                         ("int4_gw", "float16")])
def test_tiny_mpirun_build_is_identical(comm, tiny, tmp_path_factory, quant, dtype):
    # group 8 divides every rank's in_features of the tiny model at TP 1 to 4
    spec = BuildSpec(str(tiny), quant, comm.world_size, dtype, group_size=8)
    _check_build(comm, spec, _shared_dir(comm, tmp_path_factory, "tiny_build"), True)


def test_smollm2_mpirun_build_is_identical(comm, tmp_path_factory):
    spec = BuildSpec(str(default_checkpoint()), "int8_wo", comm.world_size, "float32")
    _check_build(comm, spec, _shared_dir(comm, tmp_path_factory, "smol_build"), False)


def test_tiny_w8a8_engine_runs_the_rotated_model_it_was_built_from(comm, tiny, tmp_path_factory):
    """SmoothQuant static (w8a8_tensor) under mpirun: the engine records down_proj's Hadamard
    block, and the model loaded back from it gives the logits of the model built in memory
    from the same calibration (same rotation, smoothing and scales), to float32 rounding."""
    from tpquant.engine.build import calibration_tokens, smoothquant_plan
    from tpquant.engine.session import load_engine
    from tpquant.models.llama import default_down_rotation
    from tpquant.quantization.mode import QuantMode
    from tpquant.quantization.rotation import rotation_block

    root = _shared_dir(comm, tmp_path_factory, "tiny_w8a8")
    text = root / "calib.txt"
    if comm.rank == 0:
        g = torch.Generator().manual_seed(0)
        text.write_text(" ".join(f"w{int(i)}" for i in torch.randint(3, 37, (96,), generator=g)))
    comm.barrier()
    spec = BuildSpec(str(tiny), "w8a8_tensor", comm.world_size, "float32", calib_text=str(text),
                     calib_tokens=64)
    out, reused = build_engine(spec, root / "engine", comm)
    assert not reused
    rotation = rotation_block(TINY["intermediate_size"] // comm.world_size)
    assert rotation == default_down_rotation(QuantMode.from_name("w8a8_tensor"),
                                             TINY["intermediate_size"], comm.world_size) > 1
    config = json.loads((out / "config.json").read_text())
    assert config["quant_options"]["down_rotation"] == rotation

    mapping = Mapping(comm.world_size, comm.rank)
    engine_model = load_engine(out, mapping, comm, torch.device("cpu"))
    assert engine_model.layers[0].mlp.down_rotation == rotation

    ckpt = open_checkpoint(spec.checkpoint)
    tokens = calibration_tokens(ckpt, spec.calib_text, spec.calib_tokens)
    plan = smoothquant_plan(ckpt, mapping, comm, tokens, spec.smooth_alpha, down_rotation=rotation)
    built = load_llama(ckpt, mapping, comm, spec.schemes_for(ckpt.config), DTYPES[spec.dtype],
                       max_seq=16, quant_options=plan.quant_options, transform=plan)
    ids = torch.randint(3, 37, (1, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = built(ids, 0)
        engine_model.setup_caches(1, 16)
        got = engine_model(ids, 0)
    assert (got - want).abs().max() <= 1e-5 * want.abs().max()
    comm.barrier()
