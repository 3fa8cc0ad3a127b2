"""Shared test set-up: the helpers (``cases``, ``oracles``) importable from every test
folder, and a fixed number of torch threads per test: ``--threads N`` (default 1; tiny
models run faster without thread hand-offs). ``make test`` runs the suite with 1 thread and
every test not marked slow again with 2, so no result may depend on how a reduction is split
between threads."""

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))


def pytest_addoption(parser):
    parser.addoption(
        "--threads", type=int, default=1, help="torch threads in every test (default 1)"
    )


@pytest.fixture(autouse=True)
def _threads(request):
    """Every test on ``--threads`` torch threads, whatever an earlier test (e.g. a CLI run) set."""
    torch.set_num_threads(request.config.getoption("--threads"))
