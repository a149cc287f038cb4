"""The tensor-parallel Llama at TP = world size against Hugging Face transformers.

SmolLM2-135M-Instruct (GGUF, float32 after dequantization; 9 query / 3 KV heads, so TP 2 and
4 use zero-padded heads, TP 3 the plain split) is loaded by tpquant on every rank and by
transformers on rank 0 only, which broadcasts what it computed: the references do not depend
on the world size, so the file passes under `mpirun -n 1/2/3/4`. A tiny random Llama with
what SmolLM2 lacks (llama3 RoPE scaling, biases, an untied head, a vocabulary no TP size
divides, KV heads fewer than ranks) is checked the same way.

Tolerances (float32; only summation order differs from transformers), with what TP 1-4
measured: SmolLM2 logits 1e-3 absolute (<= 6.3e-5, logit scale ~31); a batch row against the
same prompt alone 1e-4 (same code, other matmul shapes: <= 6.1e-5); the tiny model 1e-5
relative to its largest logit (<= 8.7e-7); greedy ids exactly (the smallest top-1/top-2
logit gap along the reference continuation is ~0.15).
"""

from __future__ import annotations

import os
import time
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"  # before transformers is imported: never touch the hub
os.environ["TRANSFORMERS_OFFLINE"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402

from tpquant.checkpoint import open_checkpoint  # noqa: E402
from tpquant.models.llama import LlamaSchemes, generate_greedy  # noqa: E402
from tpquant.quantization.rotation import rotation_block  # noqa: E402
from tpquant.models.loader import load_llama  # noqa: E402
from tpquant.parallel.mapping import Mapping  # noqa: E402
from tpquant.checkpoint.default import default_checkpoint

pytest.importorskip("mpi4py")
pytestmark = pytest.mark.mpi

F32 = torch.float32
MAX_SEQ = 128
PROMPT_LEN = 64
NEW_TOKENS = 32
CHAT = [{"role": "user", "content": "What is the capital of France?"}]
TEXT = (
    "The Eiffel Tower is a wrought-iron lattice tower on the Champ de Mars in Paris, France. "
    "It is named after the engineer Gustave Eiffel, whose company designed and built the tower "
    "from 1887 to 1889. Locally nicknamed \"La dame de fer\" (French for \"Iron Lady\"), it was "
    "constructed as the centrepiece of the 1889 World's Fair, and to crown the centennial "
    "anniversary of the French Revolution."
)




def _ids(out) -> list[int]:
    """Tokenizer / apply_chat_template output as a flat id list (dict or list, any version)."""
    ids = out["input_ids"] if hasattr(out, "keys") else out
    return [int(t) for t in (ids[0] if ids and isinstance(ids[0], list) else ids)]


def _on_rank0(comm, work, meanwhile=None):
    """work() on rank 0 while the other ranks run meanwhile(); work's result on rank 0 (None
    elsewhere). The wait sleeps rather than spins: on 2 cores, ranks polling in a blocking
    collective would take the CPU from rank 0 while it runs transformers. An error on any
    rank fails every rank instead of leaving the others waiting."""
    result, error = None, None
    try:
        if comm.rank == 0:
            result = work()
        elif meanwhile is not None:
            meanwhile()
    except Exception as e:  # reported on every rank below
        error = e
    req = comm.mpi_comm.Ibarrier()
    while not req.Test():
        time.sleep(0.02)
    failed = comm.all_reduce(torch.tensor([int(error is not None)]), op="max")
    if error is not None:
        raise error
    if failed.item():
        pytest.fail("another rank failed while rank 0 computed the reference")
    return result


def _max_err(got: torch.Tensor, want: torch.Tensor) -> float:
    return (got.double() - want.double()).abs().max().item()


# -- fixtures (module scope: loading dominates this file's time) ----------------------------


@pytest.fixture(scope="module")
def mapping(comm) -> Mapping:
    torch.set_num_threads(1)  # up to 4 ranks share 2 cores
    return Mapping(comm.world_size, comm.rank)


@pytest.fixture(scope="module")
def ckpt():
    path = default_checkpoint()  # the set-up command installs it; missing is an error
    return open_checkpoint(path)


@pytest.fixture(scope="module")
def model(ckpt, mapping, comm):
    schemes = LlamaSchemes.from_name("fp32", dtype=F32)
    return load_llama(ckpt, mapping, comm, schemes, dtype=F32, max_seq=MAX_SEQ, max_batch=2)


def _transformers_reference(path: Path) -> dict:
    """Rank 0 only: token ids, last-position logits and greedy continuations from transformers."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    hf = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=F32)
    hf.eval()
    prompt = _ids(tok(TEXT))
    assert len(prompt) >= PROMPT_LEN
    prompt = prompt[:PROMPT_LEN]
    chat = _ids(tok.apply_chat_template(CHAT, add_generation_prompt=True))
    with torch.no_grad():
        last = hf(torch.tensor([prompt])).logits[0, -1].float()
        x = torch.tensor([chat])
        greedy = hf.generate(x, max_new_tokens=NEW_TOKENS, do_sample=False)[0, len(chat):]
        # no EOS stop: all NEW_TOKENS decode steps are compared
        full = hf.generate(x, max_new_tokens=NEW_TOKENS, do_sample=False, eos_token_id=None)
    return {
        "tokenizer": tok,
        "prompt": prompt,
        "chat": chat,
        "last_logits": last,
        "greedy": greedy.tolist(),
        "greedy_no_eos": full[0, len(chat):].tolist(),
    }


@pytest.fixture(scope="module")
def reference(request, comm, ckpt) -> dict:
    """transformers' results on every rank (the tokenizer on rank 0 only)."""
    # build our model on the other ranks meanwhile: rank 0 is the slow one
    ref = _on_rank0(
        comm, lambda: _transformers_reference(ckpt.path), lambda: request.getfixturevalue("model")
    )
    ids = comm.broadcast_object(
        {k: ref[k] for k in ("prompt", "chat", "greedy", "greedy_no_eos")} if ref else None
    )
    last = ref["last_logits"] if ref else torch.empty(ckpt.config.vocab_size, dtype=F32)
    ids["last_logits"] = comm.broadcast(last.contiguous(), root=0)
    ids["tokenizer"] = ref["tokenizer"] if ref else None
    return ids


# -- SmolLM2 against transformers ----------------------------------------------------------


def test_prefill_logits_match_transformers(reference, model):  # reference first: see its fixture
    with torch.no_grad():
        logits = model(torch.tensor([reference["prompt"]]), 0)  # [1, 64, V]
    assert logits.shape == (1, PROMPT_LEN, model.config.vocab_size)
    err = _max_err(logits[0, -1], reference["last_logits"])
    assert err <= 1e-3, f"last-position logits differ from transformers by {err:.3g}"


def test_greedy_matches_transformers(model, reference, comm):
    chat = reference["chat"]
    full = generate_greedy(model, chat, NEW_TOKENS, comm, stop_ids=())
    assert full == reference["greedy_no_eos"] and len(full) == NEW_TOKENS
    stopped = generate_greedy(model, chat, NEW_TOKENS, comm)  # stops after EOS, like generate()
    assert stopped == reference["greedy"]
    assert stopped[-1] in model.config.eos_token_ids
    tok = reference["tokenizer"]
    text = comm.broadcast_object(tok.decode(stopped) if comm.rank == 0 else None)
    assert "Paris" in text, text


def test_batch_of_prompts_of_different_lengths(model, reference):
    """Right-padded batch == each prompt alone, for the prefill and one decode step with
    per-row positions (start_pos a [B] tensor)."""
    prompts = [reference["prompt"], reference["chat"]]
    lengths = [len(p) for p in prompts]
    assert lengths[0] != lengths[1]
    alone, alone_next, next_tokens = [], [], []
    with torch.no_grad():
        for p in prompts:  # each prompt alone: prefill, then decode its greedy next token
            logits = model(torch.tensor([p]), 0)[0]  # [L, V]
            nxt = int(logits[-1].argmax())
            alone.append(logits)
            next_tokens.append(nxt)
            alone_next.append(model(torch.tensor([[nxt]]), len(p))[0, 0])
        T = max(lengths)
        batch = torch.tensor([p + [0] * (T - len(p)) for p in prompts])  # right padding
        logits = model(batch, 0)  # [2, T, V]
        step = model(torch.tensor(next_tokens)[:, None], torch.tensor(lengths))[:, 0]  # [2, V]
    for b, L in enumerate(lengths):
        err = _max_err(logits[b, :L], alone[b])
        assert err <= 1e-4, f"row {b} prefill differs from the prompt alone by {err:.3g}"
        err = _max_err(step[b], alone_next[b])
        assert err <= 1e-4, f"row {b} decode step differs from the prompt alone by {err:.3g}"


def test_int8_weight_only_close_to_float(ckpt, mapping, comm, model, reference):
    """Smoke test of a quantized scheme through the whole model: per-channel int8 weights on
    every linear but lm_head. Measured on this 64-token prompt (TP 1, logit scale ~40): max
    abs error 1.74, mean 0.21, mean KL(float || int8) 0.0035, top-1 agreement 61/64. The
    bounds leave about 2x room."""
    schemes = LlamaSchemes.from_name("int8_wo", dtype=F32)
    q_model = load_llama(ckpt, mapping, comm, schemes, dtype=F32, max_seq=MAX_SEQ)
    x = torch.tensor([reference["prompt"]])
    with torch.no_grad():
        want, got = model(x, 0)[0].double(), q_model(x, 0)[0].double()  # [64, V]
    diff = (got - want).abs()
    p_want, p_got = want.log_softmax(-1), got.log_softmax(-1)
    kl = (p_want.exp() * (p_want - p_got)).sum(-1).mean().item()
    agree = (got.argmax(-1) == want.argmax(-1)).double().mean().item()
    assert diff.max().item() <= 3.0 and diff.mean().item() <= 0.5, (diff.max(), diff.mean())
    assert kl <= 0.02, f"mean KL(float || int8) = {kl:.3g}"
    assert agree >= 0.85, f"top-1 agrees with float on only {agree:.0%} of positions"


# -- tiny random Llama: llama3 RoPE, biases, untied head, odd vocabulary -------------------

TINY = dict(
    vocab_size=61, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
    num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=128,
    rms_norm_eps=1e-5, attention_bias=True, mlp_bias=True, tie_word_embeddings=False,
    rope_parameters=dict(
        rope_type="llama3", rope_theta=10000.0, factor=8.0, low_freq_factor=1.0,
        high_freq_factor=4.0, original_max_position_embeddings=16,
    ),
)
TINY_TOKENS = 40


def _tiny_reference(directory: Path) -> torch.Tensor:
    """Rank 0: a random tiny LlamaForCausalLM saved to `directory`; its logits on random tokens."""
    from transformers import LlamaConfig as HFLlamaConfig, LlamaForCausalLM

    hf = LlamaForCausalLM(HFLlamaConfig(**TINY)).eval()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(torch.rand(p.shape, generator=g) + 0.5)
            else:
                p.copy_(torch.randn(p.shape, generator=g) / p.shape[-1] ** 0.5)
        hf.save_pretrained(directory)
        tokens = torch.randint(0, TINY["vocab_size"], (2, TINY_TOKENS), generator=g)
        return torch.cat([tokens.float()[..., None], hf(tokens).logits], dim=-1)  # [2, T, 1 + V]


@pytest.mark.parametrize("rotate_down", [False, True], ids=["plain", "rotated"])
def test_tiny_llama_matches_transformers(mapping, comm, tmp_path_factory, rotate_down):
    """Rotated: down_proj's input in W8A8's Hadamard blocks, each rank its own slice."""
    directory = tmp_path_factory.mktemp("tiny_llama") if comm.rank == 0 else None
    ref = _on_rank0(comm, lambda: _tiny_reference(directory))
    directory = Path(comm.broadcast_object(str(directory) if directory else None))
    if comm.rank != 0:
        ref = torch.empty(2, TINY_TOKENS, 1 + TINY["vocab_size"], dtype=F32)
    ref = comm.broadcast(ref, root=0)
    tokens, want = ref[..., 0].long(), ref[..., 1:]

    tiny = open_checkpoint(directory)
    assert tiny.config.rope_scaling is not None  # the llama3 path is really taken
    rotation = rotation_block(TINY["intermediate_size"] // comm.world_size) if rotate_down else 0
    schemes = LlamaSchemes.from_name("fp32", dtype=F32, down_rotation=rotation)
    model = load_llama(tiny, mapping, comm, schemes, dtype=F32, max_seq=64, max_batch=2)
    assert model.padded_vocab % comm.world_size == 0
    assert not rotate_down or model.layers[0].mlp.down_rotation > 1
    with torch.no_grad():
        got = model(tokens, 0)  # [2, T, V]
    err = _max_err(got, want)
    assert err <= 1e-5 * want.abs().max().item(), f"tiny Llama differs by {err:.3g}"
    comm.barrier()  # rank 0's directory stays until every rank has read it
