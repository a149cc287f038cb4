"""What the kernels' launch rules ask of the GPU."""

from __future__ import annotations

import torch


def sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device (torch keeps its properties)."""
    return torch.cuda.get_device_properties(device).multi_processor_count
