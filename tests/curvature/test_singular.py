"""A singular curvature at damping 0 (a dead ReLU unit: its weights' gradients are exactly 0)
ends in an error naming the cause, and the indefiniteness warning gives advice that applies."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import headwater
from headwater.errors import NonFiniteError


def _dead_unit() -> tuple[nn.Module, tuple, tuple]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 4), nn.ReLU(), nn.Linear(4, 3))
    with torch.no_grad():
        model[0].weight[0], model[0].bias[0] = 0.0, -1.0  # unit 0 never fires
    x, y = torch.randn(10, 5), torch.randint(0, 3, (10,))
    return model, (x, y), (x[:3], y[:3])


@pytest.mark.parametrize("curvature", ["exact", "ekfac", "kfac", "diagonal"])
def test_damping_zero_with_a_singular_curvature_names_the_cause(curvature):
    model, train, query = _dead_unit()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        with pytest.raises(NonFiniteError, match="damping=0 with a singular curvature"):
            headwater.influence(
                model, train, query, curvature=curvature, damping=0.0, progress=False
            )
        scores = headwater.influence(model, train, query, curvature=curvature, progress=False)
    assert scores.values.isfinite().all()  # the default damping


def test_the_ggn_warning_does_not_advise_the_ggn():
    model, train, query = _dead_unit()
    with pytest.warns(RuntimeWarning, match="not positive definite") as caught:
        with pytest.raises(NonFiniteError):
            headwater.influence(model, train, query, curvature="exact", damping=0.0, progress=False)
    texts = [str(w.message) for w in caught if "positive definite" in str(w.message)]
    assert texts and all("kind='ggn'" not in t and "Increase `damping`" in t for t in texts)
