"""`python -m tpquant.build`: quantize and shard a checkpoint into one engine file per rank.

    mpirun -n 3 python -m tpquant.build --checkpoint model.gguf --quant int8_wo --out engines/x
    python -m tpquant.build --tp 3 ...        # one process builds every rank in turn
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
    p.add_argument("--out", required=True, help="engine directory")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)

    def build(job: Job) -> None:
        spec = BuildSpec(str(args.checkpoint or default_checkpoint()), args.quant,
                         args.tp or job.comm.world_size, args.dtype, args.group_size)
        start = time.perf_counter()
        out, reused = build_engine(spec, args.out, job.comm)
        if job.comm.rank == 0:
            what = "reused the engine in" if reused else "built"
            print(f"{what} {out} ({spec.quant}, tp {spec.tp}, {spec.dtype}) "
                  f"in {time.perf_counter() - start:.1f} s", flush=True)

    run_job(build, use_gpu=False)


if __name__ == "__main__":
    main()
