"""The device's copy bandwidth, four ways: the figure every benchmark's "%copy" and bench_decode's
floor divide by (`bench_gemm.copy_bandwidth`), measured against the ways it could be taken.

    python benchmarks/bench_copy.py

1 GiB, bytes/s counting the read and the write (2 x size / time), median of 10:
    copy          dst.copy_(src) launched directly (what copy_bandwidth takes)
    copy, graph   the same copy captured in a CUDA graph (a memcpy node), replayed
    kernel        an elementwise kernel that reads and writes the same bytes (torch.neg on
                  int32), launched directly
    kernel, graph that kernel replayed from a graph
Output: table, $OUT/bench_copy.json.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_gemm import event_times  # noqa: E402

SIZE = 1 << 30
REPS = 10


def median_seconds(fn) -> float:
    fn()
    return statistics.median(event_times(fn, REPS))


def graphed(fn):
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph.replay, graph


def main() -> int:
    if not torch.cuda.is_available():
        print("needs a GPU", file=sys.stderr)
        return 2
    src = torch.empty(SIZE, dtype=torch.uint8, device="cuda").fill_(1)
    dst = torch.empty_like(src)
    copy = lambda: dst.copy_(src)  # noqa: E731
    kernel = lambda: torch.neg(src.view(torch.int32), out=dst.view(torch.int32))  # noqa: E731
    copy_graph, g1 = graphed(copy)
    kernel_graph, g2 = graphed(kernel)
    ways = {"copy": copy, "copy, graph": copy_graph, "kernel": kernel,
            "kernel, graph": kernel_graph}
    result = {"device": torch.cuda.get_device_name(), "bytes": SIZE,
              "GBps": {name: 2 * SIZE / median_seconds(fn) / 1e9 for name, fn in ways.items()}}
    for name, gbps in result["GBps"].items():
        print(f"{name:<14} {gbps:8.0f} GB/s")
    out = Path(os.environ.get("OUT", "/tmp/out"))
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench_copy.json").write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
