"""Bad input to `tpquant.build` / `tpquant.run` under real mpirun: each case gives a clear
message (printed once, by rank 0), a non-zero exit, and the job ends (no rank left waiting:
a hang fails the test through the subprocess timeout).

One small engine of the real default model is built once (int8 weight-only, bfloat16,
TP 2) and copied for each case that damages it.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

ROOT = Path(__file__).resolve().parents[2]
MPIRUN = [str(ROOT / "launch" / "mpirun.sh")]
TIMEOUT = 240  # s; a job that hangs fails here


def _job(n: int, module: str, *args: str) -> subprocess.CompletedProcess:
    cmd = [*MPIRUN, "-n", str(n), sys.executable, "-m", module, *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=TIMEOUT)


def _fails_with(result: subprocess.CompletedProcess, *needles: str) -> None:
    output = result.stdout + result.stderr
    assert result.returncode != 0, output[-3000:]
    for needle in needles:
        assert needle in output, f"{needle!r} not in:\n{output[-3000:]}"
    # the message comes once, from rank 0, not once per rank
    assert output.count("error: ") == 1, output[-3000:]


@pytest.fixture(scope="module")
def engine(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("engine") / "e"
    result = subprocess.run(
        [sys.executable, "-m", "tpquant.build", "--quant", "int8_wo", "--dtype", "bfloat16",
         "--tp", "2", "--out", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=TIMEOUT,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return out


@pytest.fixture
def damaged(engine, tmp_path) -> Path:
    copy = tmp_path / "e"
    shutil.copytree(engine, copy)
    return copy


def _run(engine_dir: Path, n: int = 2, *args: str) -> subprocess.CompletedProcess:
    return _job(n, "tpquant.run", "--engine", str(engine_dir), "--max-new-tokens", "2", *args)


def test_the_engine_runs(engine):
    result = _run(engine, 2, "--prompt", "The capital of France is")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "tok/s" in result.stderr


def test_world_size_differs_from_engine_tp(engine):
    _fails_with(_run(engine, 3), "built for TP 2, this job has 3 ranks", "mpirun -n 2")


def test_missing_rank_file(damaged):
    (damaged / "rank1.engine").unlink()
    _fails_with(_run(damaged), "rank1.engine is missing")


def test_truncated_rank_file(damaged):
    path = damaged / "rank1.engine"
    size = path.stat().st_size
    with open(path, "r+b") as f:
        f.truncate(size - 1000)
    _fails_with(_run(damaged), "truncated", "rank 1")


def test_altered_rank_file(damaged):
    path = damaged / "rank0.engine"
    with open(path, "r+b") as f:
        f.seek(path.stat().st_size - 12345)
        byte = f.read(1)
        f.seek(-1, 1)
        f.write(bytes([byte[0] ^ 0xFF]))
    _fails_with(_run(damaged), "altered since the build", "rank 0")


def test_unknown_format_version(damaged):
    config = damaged / "config.json"
    data = json.loads(config.read_text())
    data["format_version"] = 99
    config.write_text(json.dumps(data))
    _fails_with(_run(damaged), "format version 99")


def test_prompt_longer_than_the_maximum(engine):
    _fails_with(_run(engine, 2, "--prompt", "Hello", "--max-new-tokens", "100000"),
                "exceeds the model's")


def test_empty_prompt(engine):
    _fails_with(_run(engine, 2, "--prompt", "Hello", "--prompt", "  "), "prompt 2 is empty")


def test_checkpoint_missing_a_tensor(tmp_path):
    """A tiny HF checkpoint whose last down_proj is missing: the build names it."""
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    hidden, inter, layers, vocab = 64, 128, 2, 96
    (ckpt / "config.json").write_text(json.dumps({
        "model_type": "llama", "architectures": ["LlamaForCausalLM"], "vocab_size": vocab,
        "hidden_size": hidden, "intermediate_size": inter, "num_hidden_layers": layers,
        "num_attention_heads": 4, "num_key_value_heads": 2, "rms_norm_eps": 1e-5,
        "max_position_embeddings": 256, "tie_word_embeddings": True,
    }))
    g = torch.Generator().manual_seed(0)
    shapes = {"model.embed_tokens.weight": (vocab, hidden), "model.norm.weight": (hidden,)}
    for i in range(layers):
        p = f"model.layers.{i}."
        shapes |= {
            p + "input_layernorm.weight": (hidden,), p + "post_attention_layernorm.weight": (hidden,),
            p + "self_attn.q_proj.weight": (hidden, hidden), p + "self_attn.k_proj.weight": (32, hidden),
            p + "self_attn.v_proj.weight": (32, hidden), p + "self_attn.o_proj.weight": (hidden, hidden),
            p + "mlp.gate_proj.weight": (inter, hidden), p + "mlp.up_proj.weight": (inter, hidden),
            p + "mlp.down_proj.weight": (hidden, inter),
        }
    del shapes["model.layers.1.mlp.down_proj.weight"]
    save_file({k: torch.randn(s, generator=g) for k, s in shapes.items()}, str(ckpt / "model.safetensors"))
    result = _job(2, "tpquant.build", "--checkpoint", str(ckpt), "--out", str(tmp_path / "out"))
    _fails_with(result, "model.layers.1.mlp.down_proj.weight")
