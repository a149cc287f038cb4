"""`python -m tpquant.build`: quantize and shard a checkpoint into one engine file per rank.

    mpirun -n 3 python -m tpquant.build --checkpoint model.gguf --quant int8_wo --out engines/x
    python -m tpquant.build --tp 3 ...        # one process builds every rank in turn
    python -m tpquant.build --quant w8a8_tensor --calib-text notes.txt --calib-tokens 2048 ...
"""

from __future__ import annotations

import argparse
import time

from tpquant.checkpoint.default import default_checkpoint
from tpquant.engine.build import DTYPES, BuildSpec, build_engine
from tpquant.engine.job import Job, run_job
from tpquant.quantization.mode import known_names


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m tpquant.build", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", help="HF directory or .gguf file (default: SmolLM2-135M-Instruct)")
    p.add_argument("--quant", default="fp16", help=f"one of {', '.join(known_names())}")
    p.add_argument("--tp", type=int, help="tensor-parallel size (default: the MPI world size)")
    p.add_argument("--dtype", default="float32", choices=list(DTYPES))
    p.add_argument("--group-size", type=int, default=128, help="int4_gw group size")
    p.add_argument("--gptq", action="store_true",
                   help="weight-only modes: GPTQ rounding, calibrated on --calib-text, "
                        "instead of round-to-nearest (columns in act order; SmolLM2 perplexity "
                        "in docs/benchmarks.md)")
    calib = p.add_argument_group("calibration (w8a8_* modes, and --gptq)")
    calib.add_argument("--calib-text", metavar="FILE",
                       help=f"text file to calibrate on, never one you evaluate on "
                            f"(default: {BuildSpec.calib_text})")
    calib.add_argument("--calib-tokens", type=int, metavar="N",
                       help=f"first N tokens of it (default: {BuildSpec.calib_tokens})")
    calib.add_argument("--smooth-alpha", type=float, metavar="A",
                       help=f"migration strength in [0, 1] (default: {BuildSpec.smooth_alpha})")
    p.add_argument("--out", required=True, help="engine directory")
    return p.parse_args(argv)


_CALIBRATION = {"calib_text": "--calib-text", "calib_tokens": "--calib-tokens",
                "smooth_alpha": "--smooth-alpha"}


def build_spec(args: argparse.Namespace, world_size: int) -> BuildSpec:
    """The BuildSpec the arguments ask for; ValueError naming the option that is wrong."""
    given = {field: getattr(args, field) for field in _CALIBRATION
             if getattr(args, field) is not None}
    spec = BuildSpec(str(args.checkpoint or default_checkpoint()), args.quant,
                     args.tp or world_size, args.dtype, args.group_size, **given,
                     gptq=args.gptq)
    if given and not spec.needs_calibration():
        options = ", ".join(_CALIBRATION[f] for f in given)
        raise ValueError(f"{options}: only used by calibrated builds (w8a8_* modes, or "
                         f"--gptq), not by --quant {spec.quant}")
    if "smooth_alpha" in given and spec.gptq:
        raise ValueError("--smooth-alpha: only used by SmoothQuant modes (w8a8_*), not by "
                         "--gptq")
    return spec


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)

    def build(job: Job) -> None:
        spec = build_spec(args, job.comm.world_size)
        start = time.perf_counter()
        out, reused = build_engine(spec, args.out, job.comm)
        if job.comm.rank == 0:
            what = "reused the engine in" if reused else "built"
            print(f"{what} {out} ({spec.quant}, tp {spec.tp}, {spec.dtype}) "
                  f"in {time.perf_counter() - start:.1f} s", flush=True)

    run_job(build, use_gpu=False)


if __name__ == "__main__":
    main()
