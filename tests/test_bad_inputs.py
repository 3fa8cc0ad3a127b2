"""Bad inputs x estimators: a NaN/inf (or an extreme finite value) in the training inputs,
query inputs, targets or parameters either raises a headwater error naming the set and
the example, or gives finite scores — never a NaN score, never a SciPy or LAPACK traceback."""

from __future__ import annotations

import copy

import pytest
import torch
from cases import linear_regression, mlp

import headwater
from headwater.curvature import CURVATURES
from headwater.errors import HeadwaterError
from headwater.gradients.projection import KroneckerProjection
from headwater.methods.tracin import Checkpoint

BIG = 1e200  # finite in float64; its square is not

ESTIMATORS = {
    **{name: {"curvature": name} for name in sorted(CURVATURES)},
    **{
        name: {"curvature": name, "curvature_options": {"rank": 8}}
        for name in ("arnoldi", "lanczos", "nystrom")
    },
    "projection": {"projection": 12},
    "kronecker projection": {"projection": KroneckerProjection(3, 3)},
    "tracin": {"method": "tracin"},
}


def _set(tensor, value):
    out = tensor.clone()
    out[1].view(-1)[0] = value  # example 1
    return out


def _input(where: str, value: float):
    def corrupt(case):
        which = case.train if where == "train" else case.query
        which = (_set(which[0], value), which[1])
        return (which, case.query) if where == "train" else (case.train, which)

    return corrupt


def _target(where: str, value: float):
    def corrupt(case):
        which = case.train if where == "train" else case.query
        which = (which[0], _set(which[1], value))
        return (which, case.query) if where == "train" else (case.train, which)

    return corrupt


BAD = {  # name: (case, corrupt(case) -> (train, query), corrupts the parameters, expected example)
    **{
        f"train input {v}": (mlp, _input("train", v), False, "train")
        for v in (float("inf"), float("nan"))
    },
    **{
        f"query input {v}": (mlp, _input("query", v), False, "query")
        for v in (float("inf"), float("nan"))
    },
    **{
        f"train target {v}": (linear_regression, _target("train", v), False, "train")
        for v in (float("inf"), float("nan"))
    },
    **{
        f"query target {v}": (linear_regression, _target("query", v), False, "query")
        for v in (float("inf"), float("nan"))
    },
    "parameter nan": (mlp, None, True, "train query"),
    "train input extreme": (mlp, _input("train", BIG), False, None),
    "query input extreme": (mlp, _input("query", BIG), False, None),
    "regression input extreme": (linear_regression, _input("train", BIG), False, None),
}


@pytest.mark.parametrize("estimator", list(ESTIMATORS))
@pytest.mark.parametrize("bad", list(BAD))
def test_a_bad_value_raises_a_named_error_or_gives_finite_scores(bad, estimator):
    make, corrupt, in_params, where = BAD[bad]
    case = make(n_train=12, n_query=3)
    model = copy.deepcopy(case.model)
    if in_params:
        with torch.no_grad():
            next(model.parameters()).view(-1)[0] = float("nan")
    train, query = corrupt(case) if corrupt is not None else (case.train, case.query)
    options = dict(ESTIMATORS[estimator])
    if options.get("method") == "tracin":
        options["checkpoints"] = [Checkpoint(model.state_dict(), lr=0.1)]
    else:
        options["damping"] = 1e-2
    try:
        scores = headwater.influence(
            model, train, query, task=case.task, self_influence=True, **options
        )
    except HeadwaterError as err:
        message = str(err)
        assert "\n" not in message and any(word in message for word in ("NaN", "nan", "inf")), (
            message
        )
        if where is not None:
            assert message.split(":")[0] in where.split(), message  # the set is named first
            if not in_params:  # the corrupted example is named
                assert "example 1" in message or "examples 1" in message, message
        return
    assert where is None, (
        f"{bad} with {estimator}: no error"
    )  # only an extreme finite value may pass
    assert bool(scores.values.isfinite().all()) and bool(scores.self_influence.isfinite().all())


def test_finite_row_check_names_exactly_the_bad_rows():
    """Rows holding a NaN or an inf (in any of several aligned tensors) are named, offset
    applied; a finite row whose sum overflows float32 is not."""
    from headwater.errors import NonFiniteError, check_finite_rows

    x = torch.randn(6, 5)
    x[1] = 3e38  # finite, but its sum overflows to inf
    other = torch.randn(6, 2)
    check_finite_rows([x, other], what="gradient", name="train")
    x[4, 2], other[2, 1], x[5, 0], x[5, 1] = (
        float("nan"),
        float("-inf"),
        float("inf"),
        -float("inf"),
    )
    with pytest.raises(NonFiniteError, match="train: the gradient of examples 12, 14, 15 ") as err:
        check_finite_rows([x, other], what="gradient", name="train", offset=10)
    assert err.value.rows == (12, 14, 15)
