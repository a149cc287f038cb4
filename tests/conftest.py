"""Shared fixtures: the communicator of the ranks running this pytest."""

from __future__ import annotations

import pytest

from tpquant.collectives import Communicator, MpiCommunicator, SingleProcessCommunicator


@pytest.fixture(scope="session")
def comm(request: pytest.FixtureRequest) -> Communicator:
    """MpiCommunicator over COMM_WORLD under ``--with-mpi`` (pytest-mpi), else world size 1."""
    if request.config.getoption("--with-mpi", default=False):
        from mpi4py import MPI

        return MpiCommunicator(MPI.COMM_WORLD)
    return SingleProcessCommunicator()
