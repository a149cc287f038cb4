"""Engine files (tpquant/engine/format.py): round trip, memory mapping, every refusal.

References, independent of the code under test: the random tensors that were written
(compared with torch.equal, dtype and shape included), `hashlib.sha256` and `os.path.getsize`
of the files on disk, and the safetensors header parsed here by hand (8-byte little-endian
length, then JSON) to find where each tensor's bytes lie.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from tpquant.engine import format as fmt
from tpquant.engine.format import (
    FORMAT_VERSION,
    ChecksumError,
    EngineConfigError,
    EngineError,
    EngineMeta,
    FormatVersionError,
    MetadataMismatchError,
    MissingEngineTensorError,
    MissingRankFileError,
    RankFileInfo,
    RankFileSizeError,
    TPSizeMismatchError,
    build_key,
    engine_is_current,
    open_rank_file,
    read_engine_config,
    write_engine_config,
    write_rank_file,
)
from tpquant.models.config import LlamaConfig

MODEL_CONFIG = LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_layers=2,
                           num_heads=4, num_kv_heads=2, eos_token_ids=(2, 5)).to_dict()
LAYOUTS = {"q_uint8": "int4_packed_lo_even", "q_int8": "int8", "w_f32": "float"}


def _key(**changes) -> str:
    fields = dict(source_checksum="ab" * 32, quant="int4_gw", quant_options={"group_size": 32},
                  tp=3, dtype="float16")
    fields.update(changes)
    return build_key(**fields)


def _tensors(rank: int, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 * seed + rank)
    base = torch.randn(6, 8, generator=g)
    return {
        "w_f32": torch.randn(5, 7, generator=g),
        "w_f16": torch.randn(3, 8, generator=g).half(),
        "w_bf16": torch.randn(4, 4, generator=g).bfloat16(),
        "q_int8": torch.randint(-128, 128, (6, 5), generator=g, dtype=torch.int8),
        "q_uint8": torch.randint(0, 256, (4, 3), generator=g, dtype=torch.uint8),
        "s_i32": torch.randint(-(2**31), 2**31 - 1, (7,), generator=g, dtype=torch.int32),
        "mask": torch.rand(5, generator=g) > 0.5,
        "scalar": torch.randn((), generator=g),
        "transposed": torch.randn(3, 5, generator=g).t(),  # not contiguous
        "part_a": base[:3],  # two views of one storage: safetensors refuses those as is
        "part_b": base[3:, 2:],
    }


def _meta(rank: int, tp: int, key: str, **changes) -> EngineMeta:
    fields = dict(model_config=MODEL_CONFIG, quant="int4_gw", quant_options={"group_size": 32},
                  tp_size=tp, rank=rank, source_checksum="ab" * 32, build_key=key,
                  layouts=LAYOUTS, extra={"kv_heads_per_rank": [1] * tp, "padded": False})
    fields.update(changes)
    return EngineMeta(**fields)


def _build(engine_dir: Path, tp: int, key: str | None = None, seed: int = 0):
    key = key or _key(tp=tp)
    metas = [_meta(r, tp, key) for r in range(tp)]
    tensors = [_tensors(r, seed) for r in range(tp)]
    infos = [write_rank_file(engine_dir, m, t) for m, t in zip(metas, tensors)]
    write_engine_config(engine_dir, metas[0], infos)
    return metas, tensors, infos, key


@pytest.fixture
def engine3(tmp_path: Path):
    metas, tensors, infos, key = _build(tmp_path / "e", 3)
    return tmp_path / "e", metas, tensors, infos, key


def _header(path: Path) -> tuple[int, dict]:
    """(start of the data region, header JSON), parsed by hand."""
    raw = path.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    return 8 + n, json.loads(raw[8:8 + n])


def _edit_config(engine_dir: Path, **changes) -> None:
    p = engine_dir / "config.json"
    doc = json.loads(p.read_text())
    doc.update(changes)
    p.write_text(json.dumps(doc))


def _record(engine_dir: Path, meta: EngineMeta, tp: int) -> None:
    """Rewrite config.json with the true size and sha256 of every rank file now on disk."""
    infos = []
    for r in range(tp):
        data = (engine_dir / f"rank{r}.engine").read_bytes()
        sha = hashlib.sha256(data).hexdigest()
        infos.append(RankFileInfo(r, f"rank{r}.engine", len(data), sha))
    write_engine_config(engine_dir, meta, infos)


# -- round trip -----------------------------------------------------------------------------


@pytest.mark.parametrize("tp", [1, 3])
def test_round_trip(tmp_path: Path, tp: int) -> None:
    engine_dir = tmp_path / "engine"
    metas, tensors, infos, key = _build(engine_dir, tp)

    cfg = read_engine_config(engine_dir)
    assert cfg.common() == metas[0].common()
    assert cfg.tp_size == tp and cfg.build_key == key
    for r in range(tp):
        data = (engine_dir / f"rank{r}.engine").read_bytes()
        want = RankFileInfo(r, f"rank{r}.engine", len(data), hashlib.sha256(data).hexdigest())
        assert infos[r] == want and cfg.ranks[r] == want

    for r in range(tp):
        with open_rank_file(engine_dir, r, tp) as eng:
            assert eng.meta == metas[r]
            assert LlamaConfig.from_dict(eng.meta.model_config).to_dict() == MODEL_CONFIG
            assert set(eng.names()) == set(tensors[r])
            lazy = eng.tensors()
            assert set(lazy) == set(tensors[r]) and len(lazy) == len(tensors[r])
            for name, want in tensors[r].items():
                got = lazy[name]
                assert got.dtype == want.dtype and got.shape == want.shape, name
                assert torch.equal(got, want), name
                assert got.is_contiguous() and got.device.type == "cpu"
            assert eng.get("scalar").dim() == 0
        # ranks hold different values: a reader that mixed ranks up would fail above
        if r:
            assert not torch.equal(tensors[r]["w_f32"], tensors[0]["w_f32"])


def test_meta_metadata_round_trip() -> None:
    meta = _meta(1, 2, _key())
    md = meta.to_metadata()
    assert all(isinstance(k, str) and isinstance(v, str) for k, v in md.items())
    assert json.loads(md["format_version"]) == FORMAT_VERSION
    assert EngineMeta.from_metadata(md) == meta
    # tuples are stored as lists up front, so a written meta equals the one read back
    assert _meta(0, 1, "k", extra={"t": (1, 2)}).extra == {"t": [1, 2]}


def test_tensors_are_memory_mapped_and_lazy(tmp_path: Path) -> None:
    if not os.path.exists("/proc/self/maps"):
        pytest.skip("needs /proc/self/maps (Linux)")
    g = torch.Generator().manual_seed(7)
    n = 1 << 16  # 256 KiB per tensor: each on pages of its own
    tensors = {"a": torch.randn(n, generator=g), "b": torch.randn(n, generator=g)}
    meta = _meta(0, 1, "k", layouts={})
    engine_dir = tmp_path / "e"
    write_engine_config(engine_dir, meta, [write_rank_file(engine_dir, meta, tensors)])
    path = (engine_dir / "rank0.engine").resolve()

    eng = open_rank_file(engine_dir, 0, 1)
    a = eng.get("a")
    assert torch.equal(a, tensors["a"])

    # zero copy: the tensor's memory lies inside a mapping of the rank file
    spans = []
    for line in Path("/proc/self/maps").read_text().splitlines():
        parts = line.split(maxsplit=5)
        if len(parts) == 6 and parts[5] == str(path):
            lo, hi = (int(x, 16) for x in parts[0].split("-"))
            spans.append((lo, hi))
    assert spans, "rank file is not mapped"
    assert any(lo <= a.data_ptr() < hi for lo, hi in spans)

    # lazy: "b" was not read at open or with "a"; a change on disk since then shows up
    start, header = _header(path)
    b0 = start + header["b"]["data_offsets"][0]
    new = torch.randn(4, generator=g)
    with open(path, "r+b") as f:
        f.seek(b0)
        f.write(new.numpy().tobytes())
    b = eng.get("b")
    assert torch.equal(b[:4], new) and torch.equal(b[4:], tensors["b"][4:])

    # private mapping: writing to a tensor never reaches the file
    a[:3] = 0.0
    eng.close()
    assert torch.equal(a[3:], tensors["a"][3:])  # tensors outlive the closed engine
    assert torch.equal(open_rank_file(engine_dir, 0, 1, verify=False).get("a"), tensors["a"])


def test_missing_tensor(engine3) -> None:
    engine_dir = engine3[0]
    eng = open_rank_file(engine_dir, 0, 3)
    with pytest.raises(MissingEngineTensorError, match="'nope' is not in") as e:
        eng.get("nope")
    assert isinstance(e.value, KeyError) and isinstance(e.value, EngineError)
    assert "nope" not in eng and "w_f32" in eng


# -- refusals -------------------------------------------------------------------------------


@pytest.mark.parametrize("world", [1, 2, 4])
def test_tp_mismatch(engine3, world: int) -> None:
    with pytest.raises(TPSizeMismatchError) as e:
        open_rank_file(engine3[0], 0, world)
    msg = str(e.value)
    assert f"built for TP 3, this job has {world} ranks" in msg
    assert "mpirun -n 3" in msg and f"--tp {world}" in msg


def test_missing_rank_file(engine3) -> None:
    engine_dir = engine3[0]
    (engine_dir / "rank2.engine").unlink()
    with pytest.raises(MissingRankFileError, match="rank2.engine"):
        open_rank_file(engine_dir, 2, 3)
    open_rank_file(engine_dir, 1, 3).close()  # the others still open


@pytest.mark.parametrize("cut", [1, 100])
def test_truncated_file(engine3, cut: int) -> None:
    engine_dir, infos = engine3[0], engine3[3]
    path = engine_dir / "rank1.engine"
    data = path.read_bytes()
    path.write_bytes(data[:-cut])
    for verify in (True, False):
        with pytest.raises(RankFileSizeError) as e:
            open_rank_file(engine_dir, 1, 3, verify=verify)
        assert f"{len(data) - cut} bytes" in str(e.value)
        assert f"records {infos[1].size}" in str(e.value) and "truncated" in str(e.value)


def test_file_cut_inside_header(engine3) -> None:
    engine_dir, infos = engine3[0], engine3[3]
    path = engine_dir / "rank0.engine"
    path.write_bytes(path.read_bytes()[:20])
    with pytest.raises(RankFileSizeError, match=f"20 bytes, config.json records {infos[0].size}"):
        open_rank_file(engine_dir, 0, 3)


def test_altered_file(engine3) -> None:
    engine_dir, infos = engine3[0], engine3[3]
    path = engine_dir / "rank2.engine"
    start, _ = _header(path)
    data = bytearray(path.read_bytes())
    at = start + (len(data) - start) // 2
    data[at] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(ChecksumError) as e:
        open_rank_file(engine_dir, 2, 3)
    assert hashlib.sha256(bytes(data)).hexdigest() in str(e.value)
    assert infos[2].sha256 in str(e.value)
    # verify=False skips the one check that reads the whole file
    open_rank_file(engine_dir, 2, 3, verify=False).close()


def test_unknown_format_version_in_config(engine3) -> None:
    engine_dir = engine3[0]
    _edit_config(engine_dir, format_version=7)
    for call in (lambda: read_engine_config(engine_dir),
                 lambda: open_rank_file(engine_dir, 0, 3)):
        with pytest.raises(FormatVersionError,
                           match=f"format version 7, this tpquant reads {FORMAT_VERSION}"):
            call()
    assert not engine_is_current(engine_dir, engine3[4])


def test_unknown_format_version_in_rank_file(engine3) -> None:
    engine_dir, metas, tensors = engine3[0], engine3[1], engine3[2]
    # a rank file whose own metadata says version 7, recorded correctly in config.json
    md = {**metas[1].to_metadata(), "format_version": "7"}
    save_file({k: v.contiguous().clone() for k, v in tensors[1].items()},
              engine_dir / "rank1.engine", metadata=md)
    _record(engine_dir, metas[0], 3)
    with pytest.raises(FormatVersionError,
                       match=f"rank1.engine has format version 7, this tpquant reads "
                             f"{FORMAT_VERSION}"):
        open_rank_file(engine_dir, 1, 3)
    open_rank_file(engine_dir, 0, 3).close()


def test_version_1_files_are_still_read(engine3) -> None:
    """Format 2 only added quant_options["down_rotation"] (absent: not rotated), so files and
    configs of version 1 load; an older tpquant refuses version 2 (it reads only 1)."""
    engine_dir, metas, tensors = engine3[0], engine3[1], engine3[2]
    md = {**metas[1].to_metadata(), "format_version": "1"}
    save_file({k: v.contiguous().clone() for k, v in tensors[1].items()},
              engine_dir / "rank1.engine", metadata=md)
    _record(engine_dir, metas[0], 3)
    _edit_config(engine_dir, format_version=1)
    assert read_engine_config(engine_dir).format_version == 1
    with open_rank_file(engine_dir, 1, 3) as f:
        assert f.meta.format_version == 1
    assert FORMAT_VERSION == 2


def test_rank_file_swapped(engine3) -> None:
    engine_dir = engine3[0]
    shutil.copyfile(engine_dir / "rank0.engine", engine_dir / "rank1.engine")
    for verify in (True, False):  # metadata is checked before size and checksum
        with pytest.raises(MetadataMismatchError,
                           match="rank: file has 0, config.json has 1"):
            open_rank_file(engine_dir, 1, 3, verify=verify)


def test_rank_file_of_another_build(engine3, tmp_path: Path) -> None:
    engine_dir, key = engine3[0], engine3[4]
    other_key = _key(quant_options={"group_size": 64})
    _build(tmp_path / "other", 3, key=other_key)
    shutil.copyfile(tmp_path / "other" / "rank2.engine", engine_dir / "rank2.engine")
    with pytest.raises(MetadataMismatchError) as e:
        open_rank_file(engine_dir, 2, 3)
    assert f"build_key: file has '{other_key}', config.json has '{key}'" in str(e.value)


def test_rank_file_of_another_tp(engine3, tmp_path: Path) -> None:
    engine_dir, key = engine3[0], engine3[4]
    _build(tmp_path / "tp4", 4, key=key)  # same key on purpose: tp_size alone must differ
    shutil.copyfile(tmp_path / "tp4" / "rank0.engine", engine_dir / "rank0.engine")
    with pytest.raises(MetadataMismatchError, match="tp_size: file has 4, config.json has 3"):
        open_rank_file(engine_dir, 0, 3)


def test_not_an_engine_file(engine3) -> None:
    engine_dir, metas = engine3[0], engine3[1]
    save_file({"x": torch.ones(3)}, engine_dir / "rank0.engine")  # no tpquant metadata
    _record(engine_dir, metas[0], 3)
    with pytest.raises(EngineError, match="not a tpquant engine file"):
        open_rank_file(engine_dir, 0, 3)


def test_missing_config(engine3, tmp_path: Path) -> None:
    engine_dir = engine3[0]
    (engine_dir / "config.json").unlink()
    with pytest.raises(EngineConfigError, match="config.json is missing"):
        open_rank_file(engine_dir, 0, 3)
    with pytest.raises(EngineConfigError, match="does not exist"):
        read_engine_config(tmp_path / "nowhere")


def test_bad_config(engine3) -> None:
    engine_dir = engine3[0]
    p = engine_dir / "config.json"
    good = p.read_text()
    p.write_text(good[:-10])
    with pytest.raises(EngineConfigError, match="not valid JSON"):
        read_engine_config(engine_dir)
    p.write_text(json.dumps({"architectures": ["LlamaForCausalLM"]}))  # a HF config.json
    with pytest.raises(EngineConfigError, match="no format_version"):
        read_engine_config(engine_dir)
    doc = json.loads(good)
    doc["ranks"] = doc["ranks"][:2]
    p.write_text(json.dumps(doc))
    with pytest.raises(EngineConfigError, match="must list 3 rank files"):
        read_engine_config(engine_dir)


def test_rank_out_of_range(engine3) -> None:
    with pytest.raises(EngineError, match="rank 3 is out of range"):
        open_rank_file(engine3[0], 3, 3)


# -- writing --------------------------------------------------------------------------------


def test_write_leaves_only_final_files(engine3) -> None:
    names = sorted(os.listdir(engine3[0]))
    assert names == ["config.json", "rank0.engine", "rank1.engine", "rank2.engine"]


def test_crash_while_writing_rank_file(engine3, monkeypatch: pytest.MonkeyPatch) -> None:
    engine_dir, metas = engine3[0], engine3[1]
    before = (engine_dir / "rank0.engine").read_bytes()

    def half_write(tensors, path, metadata=None):
        Path(path).write_bytes(b"partial")
        raise RuntimeError("disk full")

    monkeypatch.setattr(fmt, "save_file", half_write)
    with pytest.raises(RuntimeError, match="disk full"):
        write_rank_file(engine_dir, metas[0], _tensors(0, seed=1))
    assert (engine_dir / "rank0.engine").read_bytes() == before  # old file intact
    assert sorted(os.listdir(engine_dir)) == [
        "config.json", "rank0.engine", "rank1.engine", "rank2.engine"]


def test_crash_while_writing_config(engine3, monkeypatch: pytest.MonkeyPatch) -> None:
    engine_dir, infos = engine3[0], engine3[3]
    before = (engine_dir / "config.json").read_bytes()

    def failing_replace(src, dst):
        raise OSError("rename failed")

    monkeypatch.setattr(fmt.os, "replace", failing_replace)
    with pytest.raises(OSError, match="rename failed"):
        write_engine_config(engine_dir, _meta(0, 3, "another key"), infos)
    monkeypatch.undo()
    assert (engine_dir / "config.json").read_bytes() == before
    assert len(os.listdir(engine_dir)) == 4


def test_write_refusals(tmp_path: Path) -> None:
    meta = _meta(0, 1, "k")
    with pytest.raises(ValueError, match="not written"):
        write_rank_file(tmp_path, meta, {"w_f32": torch.ones(2)})
    with pytest.raises(TypeError, match="not a torch.Tensor"):
        write_rank_file(tmp_path, _meta(0, 1, "k", layouts={}), {"x": [1.0, 2.0]})
    info = RankFileInfo(0, "rank0.engine", 10, "0" * 64)
    with pytest.raises(ValueError, match=r"ranks 0\.\.1"):
        write_engine_config(tmp_path, _meta(0, 2, "k"), [info])
    with pytest.raises(ValueError, match="rank < tp_size"):
        _meta(3, 3, "k")
    with pytest.raises(ValueError, match="JSON"):
        _meta(0, 1, "k", extra={"dtype": torch.float16})
    assert os.listdir(tmp_path) == []


# -- build identity -------------------------------------------------------------------------


def test_engine_is_current(engine3, tmp_path: Path) -> None:
    engine_dir, key = engine3[0], engine3[4]
    assert engine_is_current(engine_dir, key)
    assert not engine_is_current(engine_dir, _key(tp=3, dtype="bfloat16"))
    assert not engine_is_current(tmp_path / "nowhere", key)

    # a rank file of another build with the same size: caught by its header, still no hashing
    other = tmp_path / "other"
    _build(other, 3, key=_key(tp=3, source_checksum="cd" * 32))
    assert (other / "rank1.engine").stat().st_size == (engine_dir / "rank1.engine").stat().st_size
    saved = (engine_dir / "rank1.engine").read_bytes()
    shutil.copyfile(other / "rank1.engine", engine_dir / "rank1.engine")
    assert not engine_is_current(engine_dir, key)
    (engine_dir / "rank1.engine").write_bytes(saved)
    assert engine_is_current(engine_dir, key)

    (engine_dir / "rank1.engine").write_bytes(saved[:-1])
    assert not engine_is_current(engine_dir, key)
    (engine_dir / "rank1.engine").unlink()
    assert not engine_is_current(engine_dir, key)


def test_engine_is_current_without_config(engine3) -> None:
    (engine3[0] / "config.json").unlink()
    assert not engine_is_current(engine3[0], engine3[4])


def test_build_key_is_canonical() -> None:
    a = build_key(source="s", quant="int4_gw", options={"group_size": 128, "zero": True},
                  tp=2, dtype="float16")
    b = build_key(dtype="float16", tp=2, options={"zero": True, "group_size": 128},
                  quant="int4_gw", source="s")
    assert a == b
    assert len(a) == 64 and set(a) <= set("0123456789abcdef")
    assert a == build_key(**json.loads(json.dumps(dict(
        source="s", quant="int4_gw", options={"group_size": 128, "zero": True}, tp=2,
        dtype="float16"))))


def test_build_key_changes_with_every_field() -> None:
    base = dict(source_checksum="ab" * 32, quant="int4_gw", quant_options={"group_size": 32},
                tp=3, dtype="float16")
    changed = dict(source_checksum="ab" * 31 + "ac", quant="int8_wo",
                   quant_options={"group_size": 64}, tp=2, dtype="bfloat16")
    keys = {build_key(**base)}
    for name, value in changed.items():
        keys.add(build_key(**{**base, name: value}))
    keys.add(build_key(**base, format_version=FORMAT_VERSION + 1))
    keys.add(build_key(**base, calibration="c4"))
    assert len(keys) == len(changed) + 3
    assert build_key(**base, format_version=FORMAT_VERSION) == build_key(**base)
    with pytest.raises(TypeError):
        build_key(dtype=torch.float16)
    with pytest.raises(ValueError):
        build_key(alpha=float("nan"))


# -- found by fuzzing (tests/unit/test_fuzz_readers.py): JSON nested deeper than the parser's
# stack raised RecursionError, not an EngineError


DEEP = "[" * 100_000


def test_deeply_nested_config_json_is_an_engine_error(engine3) -> None:
    (engine3[0] / "config.json").write_text(DEEP)
    with pytest.raises(EngineConfigError, match="is not valid JSON"):
        read_engine_config(engine3[0])


def _rewrite_header(path: Path, header: bytes) -> None:
    path.write_bytes(len(header).to_bytes(8, "little") + header)


def test_deeply_nested_rank_header_is_an_engine_error(tmp_path) -> None:
    path = tmp_path / "rank0.engine"
    _rewrite_header(path, DEEP.encode())
    with pytest.raises(EngineError, match="header is not valid JSON"):
        fmt.read_rank_metadata(path)


def test_deeply_nested_metadata_value_is_an_engine_error(tmp_path) -> None:
    path = tmp_path / "rank0.engine"
    header = {"__metadata__": {"format_version": "1", "quant": DEEP}}
    _rewrite_header(path, json.dumps(header).encode())
    with pytest.raises(EngineError, match="metadata 'quant' is not JSON"):
        fmt.read_rank_metadata(path)
