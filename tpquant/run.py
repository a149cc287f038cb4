"""`python -m tpquant.run`: distributed generation from per-rank engines.

    mpirun -n 3 python -m tpquant.run --engine engines/x --chat --prompt "What is the capital of France?"
    mpirun -n 4 python -m tpquant.run     # the built-in default: SmolLM2-135M-Instruct, built
                                          # once into a cache at this world size

Rank 0 tokenizes, samples and prints; every rank runs its shard of every forward pass.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from tpquant.checkpoint.default import default_checkpoint
from tpquant.engine.build import DTYPES, TOKENIZER_DIR, BuildSpec, build_engine
from tpquant.engine.collective import collective_region, on_all_ranks
from tpquant.engine.job import Job, run_job
from tpquant.engine.sampling import SamplingParams
from tpquant.engine.session import Generation, generate, load_engine
from tpquant.quantization.mode import known_names

DEFAULT_PROMPT = "What is the capital of France?"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m tpquant.run", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--engine", help="engine directory from tpquant.build (default: build the "
                   "checkpoint into a cache directory)")
    p.add_argument("--checkpoint", help="without --engine: HF directory or .gguf (default SmolLM2)")
    p.add_argument("--quant", default="fp16", help=f"without --engine: one of {', '.join(known_names())}")
    p.add_argument("--dtype", default="float32", choices=list(DTYPES), help="without --engine")
    p.add_argument("--group-size", type=int, default=128, help="without --engine")
    p.add_argument("--cache-dir", default=os.environ.get("TPQUANT_CACHE", "~/.cache/tpquant"))
    p.add_argument("--prompt", action="append", default=[], help="repeatable: one batch row each")
    p.add_argument("--prompts-file", help="one prompt per line")
    p.add_argument("--chat", action="store_true", help="apply the model's chat template")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-verify", action="store_true", help="skip the engine files' sha256 check")
    args = p.parse_args(argv)
    if args.max_new_tokens < 1:
        p.error("--max-new-tokens must be >= 1")
    return args


def _engine_dir(args: argparse.Namespace, job: Job) -> Path:
    if args.engine:
        return Path(args.engine)
    checkpoint = Path(args.checkpoint) if args.checkpoint else default_checkpoint()
    spec = BuildSpec(str(checkpoint), args.quant, job.comm.world_size, args.dtype, args.group_size)
    name = f"{checkpoint.stem}-{spec.quant}-{spec.dtype}-g{spec.group_size}-tp{spec.tp}"
    out, _ = build_engine(spec, Path(args.cache_dir).expanduser() / name, job.comm)
    return out


def _read_prompts(args: argparse.Namespace) -> list[str]:
    prompts = list(args.prompt)
    if args.prompts_file:
        prompts += Path(args.prompts_file).read_text().splitlines()
    return prompts


def _tokenize(engine: Path, args: argparse.Namespace, max_positions: int):
    """Rank 0: the tokenizer and the prompt ids, with every bad prompt refused by name."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(engine / TOKENIZER_DIR))
    prompts = _read_prompts(args)
    chat = args.chat
    if not prompts:
        prompts, chat = [DEFAULT_PROMPT], True
    ids = []
    for i, text in enumerate(prompts):
        if not text.strip():
            raise ValueError(f"prompt {i + 1} is empty")
        if chat:
            if not tokenizer.chat_template:
                raise ValueError("--chat: this model has no chat template")
            row = tokenizer.apply_chat_template([{"role": "user", "content": text}],
                                                add_generation_prompt=True, tokenize=True)
            row = list(row["input_ids"] if hasattr(row, "keys") else row)
        else:
            row = tokenizer.encode(text)
        if len(row) + args.max_new_tokens > max_positions:
            raise ValueError(
                f"prompt {i + 1} has {len(row)} tokens; with --max-new-tokens "
                f"{args.max_new_tokens} that exceeds the model's {max_positions} positions"
            )
        ids.append(row)
    return tokenizer, prompts, ids


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)

    def run(job: Job) -> None:
        engine = _engine_dir(args, job)
        model = on_all_ranks(
            job.comm,
            lambda: load_engine(engine, job.mapping, job.comm, job.device, not args.no_verify),
            "loading the engine",
        )
        max_positions = model.config.max_position_embeddings
        tokenized = on_all_ranks(
            job.comm,
            lambda: _tokenize(engine, args, max_positions) if job.comm.rank == 0 else None,
            "reading the prompts",
        )
        params = SamplingParams(args.temperature, args.top_k, args.top_p, args.seed)
        stream = _Streamer(*tokenized[:2]) if job.comm.rank == 0 else None
        with collective_region(job.comm, "generation"):
            result = generate(model, job.comm, tokenized[2] if tokenized else None,
                              args.max_new_tokens, params, stream.step if stream else None)
        if stream:
            stream.finish(result, job)

    run_job(run)


class _Streamer:
    """Rank 0's output: one prompt streams as it is generated; a batch prints at the end."""

    def __init__(self, tokenizer, prompts: list[str]) -> None:
        self.tokenizer, self.prompts, self.shown = tokenizer, prompts, ""

    def step(self, tokens: list[list[int]]) -> None:
        if len(tokens) == 1:
            text = self.tokenizer.decode(tokens[0], skip_special_tokens=True)
            if text.startswith(self.shown):  # print only what is new and stable
                sys.stdout.write(text[len(self.shown):])
                sys.stdout.flush()
                self.shown = text

    def finish(self, result: Generation, job: Job) -> None:
        if len(result.tokens) == 1:
            print(flush=True)
        else:
            for prompt, row in zip(self.prompts, result.tokens):
                print(f"### {prompt}\n{self.tokenizer.decode(row, skip_special_tokens=True)}\n")
        print(
            f"[tpquant] tp {job.comm.world_size} on {job.device.type}: "
            f"prompt {result.prompt_tokens} tokens, {result.prompt_tokens / max(result.prefill_s, 1e-9):.1f} tok/s; "
            f"generation {result.new_tokens} tokens, {result.new_tokens / max(result.decode_s, 1e-9):.1f} tok/s",
            file=sys.stderr, flush=True,
        )


if __name__ == "__main__":
    main()
