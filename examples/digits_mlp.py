"""An example spec for ``headwater score``: a small MLP on scikit-learn's digits.

Run it with

    headwater score examples/digits_mlp.py --out headwater-out/digits_mlp

A spec defines ``model``, ``train`` and ``query`` (and optionally ``task``,
``image_shape``, ``class_names``); each may be a value or a function returning it.
``display`` (optional) maps inputs to the images the report draws.
"""

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from torch import nn

import headwater

WEIGHT_DECAY = 1e-3

_x, _y = load_digits(return_X_y=True)
_order = np.random.default_rng(0).permutation(len(_y))
_x = (_x / 16.0).astype(np.float32)
_train, _query = _order[:600], _order[600:640]

train = (
    torch.from_numpy(_x[_train]),
    torch.from_numpy(_y[_train]),
)  # (inputs [600, 64], labels [600])
query = (torch.from_numpy(_x[_query]), torch.from_numpy(_y[_query]))  # the 40 examples to explain
task = headwater.ClassificationTask(
    weight_decay=WEIGHT_DECAY
)  # cross-entropy + L2, as trained below
image_shape = (8, 8)  # show the flat inputs as images in the report


def display(inputs: torch.Tensor) -> torch.Tensor:
    """The report's images: the raw pixel values 0..16 (ink) of the scaled inputs."""
    return (inputs * 16.0).reshape(-1, 8, 8)


def model() -> nn.Module:
    """Train the model (called once by ``headwater score``, after it sets the seed)."""
    net = nn.Sequential(nn.Linear(64, 32), nn.Tanh(), nn.Linear(32, 10))
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    x, y = train
    for _ in range(300):  # full batch
        reg = sum(p.pow(2).sum() for p in net.parameters())
        loss = F.cross_entropy(net(x), y) + 0.5 * WEIGHT_DECAY * reg
        opt.zero_grad()
        loss.backward()
        opt.step()
    return net.eval()
