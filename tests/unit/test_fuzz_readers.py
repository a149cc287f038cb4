"""Fuzzing the file readers: mutated engine files and GGUF files give clean errors, never a crash,
a hang or unbounded memory.

Seeds (valid files, made here):
- engine: a small real rank file and config.json written by `write_rank_file` /
  `write_engine_config` from a tiny random Llama's tensors (TP 1);
- GGUF: a tiny Llama written with `gguf.GGUFWriter` (F32, F16, Q8_0, Q4_0 tensors, tokenizer
  keys), and the first bytes of the real SmolLM2 GGUF (its header: magic, counts, metadata).

Mutations (hypothesis): byte flips, truncation, inserted and deleted bytes, and 64/32-bit
length fields overwritten with huge or off-by-some values (at the GGUF count fields, the
safetensors header length, and anywhere). Each mutated file goes through the reader as a job
would use it: `open_rank_file` (with config.json rewritten to the mutated file's size and
sha256, so the parser is reached, or left as built) and every tensor read; `open_checkpoint`
with its config and every tensor read.

Only the documented exceptions may escape: `EngineError` (tpquant.engine.format) and
`ValueError` from the GGUF reader (tpquant.checkpoint.gguf). Every example runs under a time
limit (SIGALRM), and the whole run in a forked child whose address space is capped
(RLIMIT_AS): a reader that tries to allocate what the file only claims fails as MemoryError,
which is not allowed.

Every run of the test suite (CI too) replays the same 10,000 mutated files per reader
(derandomized, about 3 minutes on 2 cores). Setting TPQUANT_FUZZ_EXAMPLES explores new ones
at random, as many per reader as it says:
    TPQUANT_FUZZ_EXAMPLES=10000 python -m pytest -q tests/unit/test_fuzz_readers.py
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
import resource
import shutil
import signal
import tempfile
import traceback
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")
from hypothesis import HealthCheck, example, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from tpquant.checkpoint import MissingTensorError, open_checkpoint  # noqa: E402
from tpquant.checkpoint.default import default_checkpoint  # noqa: E402
from tpquant.engine.format import (  # noqa: E402
    EngineError,
    EngineMeta,
    open_rank_file,
    write_engine_config,
    write_rank_file,
)
from tpquant.models.config import LlamaConfig  # noqa: E402

EXAMPLES = int(os.environ.get("TPQUANT_FUZZ_EXAMPLES", "10000"))
FULL = "TPQUANT_FUZZ_EXAMPLES" in os.environ  # a full run explores; CI replays the same examples
PER_EXAMPLE_S = 10  # a reader that takes longer on a file of a few KB is hanging
EXTRA_MEMORY = 2 << 30  # bytes the readers may allocate beyond what the process holds
CHILD_TIMEOUT_S = 1800
SMOLLM2_HEADER_BYTES = 48 << 10

Q = gguf.GGMLQuantizationType
HUGE = [2**64 - 1, 2**63 - 1, 2**63, 2**32, 2**32 - 1, 2**31, 2**31 - 1, 2**40, 10**12, 65536,
        4096, 255, 0, 1]


class TimeLimit(BaseException):
    """An example ran past PER_EXAMPLE_S (a BaseException: no reader may catch it as an error)."""


@contextmanager
def time_limit(seconds: float):
    def expire(signum, frame):
        raise TimeLimit(f"no answer after {seconds} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


# -- seed files ------------------------------------------------------------------------------

TINY = LlamaConfig(vocab_size=48, hidden_size=16, intermediate_size=24, num_layers=1,
                   num_heads=2, num_kv_heads=1, eos_token_ids=(2,))


def engine_seed(directory: Path) -> None:
    """A TP-1 engine of a tiny random Llama: int8 weights with scales, float norms."""
    g = torch.Generator().manual_seed(0)
    h, f, v, kv = 16, 24, 48, 8
    tensors = {"embed.weight": torch.randn(v, h, generator=g).bfloat16(),
               "norm.weight": torch.rand(h, generator=g),
               "layers.0.attn.qkv.qweight": torch.randint(-127, 128, (h + 2 * kv, h), generator=g,
                                                          dtype=torch.int8),
               "layers.0.attn.qkv.scale": torch.rand(h + 2 * kv, generator=g).half(),
               "layers.0.mlp.down.qweight": torch.randint(0, 256, (h, f // 2), generator=g,
                                                          dtype=torch.uint8)}
    meta = EngineMeta(model_config=TINY.to_dict(), quant="int8_wo", quant_options={"group_size": 8},
                      tp_size=1, rank=0, source_checksum="ab" * 32, build_key="cd" * 32,
                      layouts={"layers.0.attn.qkv.qweight": "int8",
                               "layers.0.mlp.down.qweight": "int4_packed_lo_even"},
                      extra={"dtype": "bfloat16"})
    info = write_rank_file(directory, meta, tensors)
    write_engine_config(directory, meta, [info])


def gguf_seed(path: Path, block_count: int = 1) -> None:
    """A tiny dense Llama GGUF with the keys and tensor types a real export has (one layer,
    whatever `block_count` says)."""
    g = np.random.default_rng(0)
    h, f, v, heads, kv_heads = 32, 64, 64, 4, 2
    kv = kv_heads * h // heads
    w = gguf.GGUFWriter(path, "llama")
    w.add_block_count(block_count)
    w.add_context_length(256)
    w.add_embedding_length(h)
    w.add_feed_forward_length(f)
    w.add_head_count(heads)
    w.add_head_count_kv(kv_heads)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_freq_base(10000.0)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_tokenizer_model("gpt2")
    w.add_token_list([f"t{i}" for i in range(v)])
    w.add_chat_template("{{ x }}")

    def add(name: str, shape: tuple[int, ...], qtype) -> None:
        x = g.standard_normal(shape).astype(np.float32)
        if qtype == Q.F32:
            w.add_tensor(name, x)
        elif qtype == Q.F16:
            w.add_tensor(name, x.astype(np.float16))
        else:
            w.add_tensor(name, gguf.quants.quantize(x, qtype), raw_dtype=qtype)

    add("token_embd.weight", (v, h), Q.Q8_0)
    add("output_norm.weight", (h,), Q.F32)
    add("blk.0.attn_norm.weight", (h,), Q.F32)
    add("blk.0.ffn_norm.weight", (h,), Q.F32)
    add("blk.0.attn_q.weight", (h, h), Q.Q4_0)
    add("blk.0.attn_k.weight", (kv, h), Q.F16)
    add("blk.0.attn_v.weight", (kv, h), Q.Q8_0)
    add("blk.0.attn_output.weight", (h, h), Q.F32)
    add("blk.0.ffn_gate.weight", (f, h), Q.Q4_0)
    add("blk.0.ffn_up.weight", (f, h), Q.F16)
    add("blk.0.ffn_down.weight", (h, f), Q.Q8_0)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.fixture(scope="module")
def seeds(tmp_path_factory) -> dict[str, bytes]:
    root = tmp_path_factory.mktemp("seeds")
    engine_seed(root / "engine")
    gguf_seed(root / "tiny.gguf")
    with open(default_checkpoint(), "rb") as f:
        smollm2_header = f.read(SMOLLM2_HEADER_BYTES)
    return {"rank0.engine": (root / "engine" / "rank0.engine").read_bytes(),
            "config.json": (root / "engine" / "config.json").read_bytes(),
            "tiny.gguf": (root / "tiny.gguf").read_bytes(),
            "smollm2.gguf": smollm2_header}


def test_seeds_are_valid(seeds, tmp_path):
    """The unmutated seeds read cleanly (the SmolLM2 slice: a clean error, it is cut short)."""
    directory = tmp_path / "e"
    directory.mkdir()
    (directory / "rank0.engine").write_bytes(seeds["rank0.engine"])
    (directory / "config.json").write_bytes(seeds["config.json"])
    assert len(read_engine(directory, refresh_config=False)) == 5
    (tmp_path / "tiny.gguf").write_bytes(seeds["tiny.gguf"])
    assert len(read_gguf(tmp_path / "tiny.gguf")) == 11
    (tmp_path / "cut.gguf").write_bytes(seeds["smollm2.gguf"])
    with pytest.raises(ValueError):
        read_gguf(tmp_path / "cut.gguf")


# -- readers as a job uses them --------------------------------------------------------------


def read_engine(directory: Path, refresh_config: bool) -> dict[str, torch.Tensor]:
    """open_rank_file and every tensor. refresh_config: first make config.json agree with the
    (mutated) rank file's size and sha256, so the checks pass and the parser is reached."""
    path = directory / "rank0.engine"
    if refresh_config:
        config = directory / "config.json"
        doc = json.loads(config.read_text())
        data = path.read_bytes()
        doc["ranks"][0].update(size=len(data), sha256=hashlib.sha256(data).hexdigest())
        config.write_text(json.dumps(doc))
    with open_rank_file(directory, 0, 1, verify=True) as engine:
        tensors = {name: engine.get(name) for name in engine.names()}
        for t in tensors.values():
            t.float().sum()  # touch every byte of every tensor
    return tensors


def read_gguf(path: Path) -> dict[str, torch.Tensor]:
    """open_checkpoint (header, config) and every tensor."""
    ckpt = open_checkpoint(path)
    ckpt.chat_template  # noqa: B018 - a metadata read
    tensors = {name: ckpt.get(name) for name in ckpt.names()}
    for t in tensors.values():
        t.float().sum()
    return tensors


# -- mutations -------------------------------------------------------------------------------


def mutations(length_fields: list[int]):
    """Lists of edits; positions are fractions of the current length, so any edit applies."""
    pos = st.floats(0, 1, allow_nan=False)
    return st.lists(st.one_of(
        st.tuples(st.just("flip"), pos, st.integers(1, 255)),
        st.tuples(st.just("truncate"), pos, st.just(0)),
        st.tuples(st.just("insert"), pos, st.binary(min_size=1, max_size=64)),
        st.tuples(st.just("delete"), pos, st.integers(1, 64)),
        st.tuples(st.just("u64"), pos, st.sampled_from(HUGE) | st.integers(0, 2**64 - 1)),
        st.tuples(st.just("u32"), pos, st.sampled_from(HUGE[4:]) | st.integers(0, 2**32 - 1)),
        st.tuples(st.just("length"), st.sampled_from(length_fields), st.sampled_from(HUGE)),
    ), min_size=1, max_size=4)


def mutate(data: bytes, edits) -> bytes:
    b = bytearray(data)
    for kind, where, arg in edits:
        at = int(where * len(b)) if isinstance(where, float) else where
        if kind == "flip" and b:
            b[min(at, len(b) - 1)] ^= arg
        elif kind == "truncate":
            del b[at:]
        elif kind == "insert":
            b[at:at] = arg
        elif kind == "delete":
            del b[at:at + arg]
        elif kind in ("u64", "u32", "length"):
            width = 4 if kind == "u32" else 8
            b[at:at + width] = (arg % 2 ** (8 * width)).to_bytes(width, "little")
    return bytes(b)


# Where lengths live: safetensors' header length (first 8 bytes); GGUF's tensor and kv counts
# (bytes 8 and 16), and the first key's length (24).
ENGINE_LENGTHS = [0]
GGUF_LENGTHS = [8, 16, 24]


def _run_engine_fuzz(seeds: dict[str, bytes], workdir: Path, n: int) -> dict[str, int]:
    outcomes = {"read": 0, "refused": 0}
    @settings(max_examples=n, deadline=None, database=None, derandomize=not FULL,
              suppress_health_check=list(HealthCheck))
    @given(target=st.sampled_from(["rank file", "rank file, config as built", "config.json"]),
           edits=mutations(ENGINE_LENGTHS))
    @example(target="rank file", edits=[("length", 0, 2**64 - 1)])
    @example(target="config.json", edits=[("insert", 0.0, b"[" * 64)])
    def one(target, edits):
        directory = Path(tempfile.mkdtemp(dir=workdir))
        try:
            name = "config.json" if target == "config.json" else "rank0.engine"
            other = "rank0.engine" if name == "config.json" else "config.json"
            (directory / name).write_bytes(mutate(seeds[name], edits))
            (directory / other).write_bytes(seeds[other])
            with time_limit(PER_EXAMPLE_S):
                try:
                    read_engine(directory, refresh_config=target == "rank file")
                    outcomes["read"] += 1
                except EngineError:
                    outcomes["refused"] += 1
        finally:
            shutil.rmtree(directory)

    one()
    return outcomes


def _run_gguf_fuzz(seeds: dict[str, bytes], workdir: Path, n: int) -> dict[str, int]:
    outcomes = {"read": 0, "refused": 0}
    @settings(max_examples=n, deadline=None, database=None, derandomize=not FULL,
              suppress_health_check=list(HealthCheck))
    @given(seed=st.sampled_from(["tiny.gguf", "smollm2.gguf"]), edits=mutations(GGUF_LENGTHS))
    @example(seed="tiny.gguf", edits=[("length", 16, 2**63 - 1)])
    def one(seed, edits):
        path = Path(tempfile.mkdtemp(dir=workdir)) / "model.gguf"
        try:
            path.write_bytes(mutate(seeds[seed], edits))
            with time_limit(PER_EXAMPLE_S):
                try:
                    read_gguf(path)
                    outcomes["read"] += 1
                except ValueError:
                    outcomes["refused"] += 1
        finally:
            shutil.rmtree(path.parent)

    one()
    return outcomes


def _in_capped_child(run, *args) -> dict[str, int]:
    """run(*args) in a forked child with RLIMIT_AS capped at what it holds plus EXTRA_MEMORY;
    returns its result (JSON), or fails with the child's falsifying example and traceback."""
    reader, writer = multiprocessing.Pipe(duplex=False)

    def child() -> None:
        vm = _virtual_memory()
        resource.setrlimit(resource.RLIMIT_AS, (vm + EXTRA_MEMORY, resource.RLIM_INFINITY))
        try:
            writer.send_bytes(json.dumps(run(*args)).encode())
        except BaseException:  # noqa: BLE001 - everything goes back to the parent
            writer.send_bytes(traceback.format_exc().encode())

    process = multiprocessing.get_context("fork").Process(target=child)
    process.start()
    writer.close()
    process.join(CHILD_TIMEOUT_S)
    if process.is_alive():
        process.kill()
        pytest.fail(f"the fuzz run did not finish in {CHILD_TIMEOUT_S} s")
    message = reader.recv_bytes().decode() if reader.poll() else None
    assert process.exitcode == 0 and message and message.startswith("{"), (
        f"child exit code {process.exitcode}:\n{message}")
    return json.loads(message)


def _virtual_memory() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")


@pytest.mark.skipif(not Path("/proc/self/statm").exists(), reason="needs Linux /proc")
def test_fuzz_engine_reader(seeds, tmp_path):
    outcomes = _in_capped_child(_run_engine_fuzz, seeds, tmp_path, EXAMPLES)
    print("engine reader:", outcomes)
    _check_depth(outcomes)


@pytest.mark.skipif(not Path("/proc/self/statm").exists(), reason="needs Linux /proc")
def test_fuzz_gguf_reader(seeds, tmp_path):
    outcomes = _in_capped_child(_run_gguf_fuzz, seeds, tmp_path, EXAMPLES)
    print("GGUF reader:", outcomes)
    _check_depth(outcomes)


def _check_depth(outcomes: dict[str, int]) -> None:
    """The run reached both ends: files refused, and mutated files read through every tensor
    (a fuzzer whose mutants all die at the magic number tests nothing)."""
    total = sum(outcomes.values())
    assert total >= EXAMPLES, outcomes
    assert outcomes["read"] >= total // 50 and outcomes["refused"] >= total // 10, outcomes


def _gguf_prefix(kv_count: int) -> bytes:
    """GGUF v3: magic, version, tensor count 0, kv count."""
    u32, u64 = (lambda v: v.to_bytes(4, "little")), (lambda v: v.to_bytes(8, "little"))
    return b"GGUF" + u32(3) + u64(0) + u64(kv_count)


# Found by fuzzing: gguf.GGUFReader reads past the end of the file as empty arrays, so an
# array field claiming 2**62 uint8 elements looped (and grew a list) until killed.
@pytest.mark.parametrize("count", [2**62, 2**64 - 1, 1000])
def test_gguf_array_longer_than_the_file_is_refused_at_once(tmp_path, count):
    key = b"general.architecture"
    # value type 9 (array) of item type 0 (uint8), `count` items, then only 7 bytes
    array_of_u8 = b"".join(v.to_bytes(w, "little") for v, w in ((9, 4), (0, 4), (count, 8)))
    path = tmp_path / "cut.gguf"
    path.write_bytes(_gguf_prefix(1) + len(key).to_bytes(8, "little") + key + array_of_u8
                     + b"\x01" * 7)
    with time_limit(PER_EXAMPLE_S), pytest.raises(ValueError, match="is not a readable GGUF file"):
        open_checkpoint(path)


# Found by the 10,000-example run (hypothesis seed 152169341296516301092978711829882685172):
# a block_count mutated to a huge number made GGUFCheckpoint loop over every claimed layer.
@pytest.mark.parametrize("block_count", [2**31, 2**32 - 1])  # the key is a uint32
def test_gguf_claiming_more_layers_than_it_has_opens_at_once(tmp_path, block_count):
    path = tmp_path / "many_layers.gguf"
    gguf_seed(path, block_count)
    with time_limit(PER_EXAMPLE_S):
        ckpt = open_checkpoint(path)
    assert ckpt.config.num_layers == block_count
    ckpt.get("model.layers.0.self_attn.q_proj.weight")  # the layer it has reads as usual
    with pytest.raises(MissingTensorError, match="model.layers.1.self_attn.q_proj.weight"):
        ckpt.get("model.layers.1.self_attn.q_proj.weight")
