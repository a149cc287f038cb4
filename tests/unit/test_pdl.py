"""tpquant.kernels.pdl: when kernels launch with programmatic dependent launch (CPU checks; the
GPU behaviour is tests/gpu/test_pdl_gpu.py)."""

from __future__ import annotations

import torch

from tpquant.kernels import pdl


def test_off_the_gpu_no_pdl() -> None:
    assert not pdl.enabled(torch.device("cpu"))
    assert pdl.triton_args(torch.device("cpu")) == {"PDL": False}


def test_on_by_capability_and_switch(monkeypatch) -> None:
    """Hopper (9.0) and later launch with PDL, an Ampere does not; set_enabled(False) (or
    TPQUANT_PDL=0 at import) turns it off everywhere."""
    capability = {0: (9, 0), 1: (8, 0)}
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index: capability[index])
    monkeypatch.setattr(pdl, "_capable", {})
    monkeypatch.setattr(pdl, "_enabled", True)
    hopper, ampere = torch.device("cuda", 0), torch.device("cuda", 1)
    assert pdl.triton_args(hopper) == {"PDL": True, "launch_pdl": True}
    assert not pdl.enabled(ampere) and pdl.triton_args(ampere) == {"PDL": False}
    pdl.set_enabled(False)
    assert not pdl.enabled(hopper)
    pdl.set_enabled(True)
    assert pdl.enabled(hopper)
