"""Shared test set-up: the helpers (``cases``, ``oracles``) importable from every test
folder, and one torch thread (tiny models run faster without thread hand-offs)."""

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))


@pytest.fixture(autouse=True)
def _one_thread():
    """Every test on one torch thread, whatever an earlier test (e.g. a CLI run) set."""
    torch.set_num_threads(1)
