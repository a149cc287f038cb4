"""Launching CuPy-compiled CUDA kernels on torch's current stream.

The CUDA sources in cpp/ compile at first use through CuPy's NVRTC (CuPy caches the binaries)
and run on the stream torch is using, so they order with torch's work and can be captured in
CUDA graphs. One place for that rule: the custom all-reduce and the weight-only GEMV use it.
"""

from __future__ import annotations

from typing import Any

import torch

# CuPy wrappers of torch's streams, one per (device, stream handle); they hold no resources.
_STREAMS: dict[tuple[int, int], Any] = {}


def launch(
    kernel: Any, grid: tuple[int, ...], block: tuple[int, ...], args: tuple, device: torch.device
) -> None:
    """kernel<<<grid, block>>>(*args) on torch's current stream of `device`."""
    import cupy

    handle = torch.cuda.current_stream(device).cuda_stream
    stream = _STREAMS.get((device.index, handle))
    if stream is None:
        stream = cupy.cuda.ExternalStream(handle, device.index)
        _STREAMS[(device.index, handle)] = stream
    with cupy.cuda.Device(device.index), stream:
        kernel(grid, block, args)
