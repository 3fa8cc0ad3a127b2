"""Shared test set-up: the helpers (``cases``, ``oracles``) importable from every test
folder, and one torch thread (tiny models run faster without thread hand-offs)."""

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
torch.set_num_threads(1)
