"""What the kernels' launch rules ask of the GPU."""

from __future__ import annotations

import functools

import torch


def sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device (torch keeps its properties)."""
    return torch.cuda.get_device_properties(device).multi_processor_count


def device_name(device: torch.device) -> str:
    """The name that tuned tables key a CUDA device by ("NVIDIA H200"): torch's, asked once."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    return _name(index)


@functools.cache
def _name(index: int) -> str:
    return torch.cuda.get_device_name(index)
