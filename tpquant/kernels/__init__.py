"""Python entry points of every device op.

Each op has a torch reference implementation that runs on CPU and CUDA tensors alike and is
the oracle the tests compare against. On CUDA tensors in fp16/bf16 the fast Triton kernels
(triton_w8a8.py, triton_norm.py, triton_weight_only.py) are chosen automatically; each entry
point takes `path=` to force one ("reference", "triton", ...), which the benchmarks use.
"""

import functools
import importlib.util


@functools.cache
def has_triton() -> bool:
    """Whether Triton is installed (CPU installs may lack it; the torch references serve them)."""
    return importlib.util.find_spec("triton") is not None
