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

    current = torch.cuda.current_stream(device)
    key = (device.index, current.cuda_stream)
    stream = _STREAMS.get(key)
    if stream is None:
        stream = _STREAMS[key] = _wrap(cupy, current, device)
    with cupy.cuda.Device(device.index), stream:
        kernel(grid, block, args)


def _wrap(cupy: Any, stream: torch.cuda.Stream, device: torch.device) -> Any:
    """A CuPy stream for torch's `stream`: through the CUDA stream protocol (which torch's
    streams implement) where CuPy has it (14 on), else ExternalStream (deprecated in 14)."""
    from_external = getattr(cupy.cuda.Stream, "from_external", None)
    if from_external is not None:
        return from_external(stream)
    return cupy.cuda.ExternalStream(stream.cuda_stream, device.index)
