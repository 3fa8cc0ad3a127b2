"""The settings of ``headwater.influence`` (one validated dataclass) and the method registry."""

import pytest
import torch
from cases import CASES

import headwater
from headwater.methods.estimator import Estimator
from headwater.methods.registry import METHODS, AttributionSettings, MethodSpec


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"method": "nope"}, "method"),
        ({"damping": -1.0}, "damping"),
        ({"top_k": 0}, "top_k"),
        ({"chunk_size": 0}, "chunk_size"),
        ({"query_batch": True}, "query_batch"),
        ({"kind": "fisher"}, "kind"),
        ({"curvature": "nope"}, "curvature"),
        ({"projection": 4, "curvature": "cg"}, "curvature"),
        ({"projection": 4, "query_batch": 2}, "query_batch"),
        ({"method": "tracin", "projection": 4}, "projection"),
        ({"method": "tracin", "damping": 1.0}, "damping"),
        ({"method": "influence", "renormalize": True}, "renormalize"),
        ({"method": "hydra", "self_influence": True}, "self_influence"),
    ],
)
def test_bad_settings_name_the_field(kwargs, field):
    with pytest.raises(ValueError, match=f"^{field}:"):
        AttributionSettings(**kwargs)


def test_settings_are_frozen_and_resolve_the_curvature():
    s = AttributionSettings()
    assert s.resolved_curvature() is None  # chosen at fit by the budget (methods/auto.py)
    assert AttributionSettings(curvature="auto").curvature is None
    assert AttributionSettings(curvature="kfac").resolved_curvature() == "kfac"
    assert AttributionSettings(projection=8).resolved_curvature() == "exact"
    with pytest.raises(AttributeError):
        s.damping = 1.0  # type: ignore[misc]


class _GradientDot(Estimator):
    """``∇m(z_q)ᵀ ∇ℓ(z_i)`` (identity curvature), written against the protocol only."""

    method = "gradient_dot"

    def __init__(self, model, task):
        self.model, self.task = model, task

    def scores(self, query, train):
        from headwater.gradients.per_example import Objective, stack_gradients

        g_q = stack_gradients(self.model, self.task, query, objective=Objective.MEASUREMENT)
        return g_q @ stack_gradients(self.model, self.task, train).T

    def settings(self):
        return {"method": self.method}


def test_a_new_method_is_one_registry_entry(monkeypatch):
    case = CASES["mlp"]()
    monkeypatch.setitem(
        METHODS,
        "gradient_dot",
        MethodSpec(
            lambda model, task, settings, inputs, train: _GradientDot(model, task),
            frozenset(),
            self_influence=False,
        ),
    )
    got = headwater.influence(
        case.model, case.train, case.query, task=case.task, method="gradient_dot", top_k=3
    )
    ref = headwater.influence(
        case.model, case.train, case.query, task=case.task, curvature="identity", top_k=3
    )
    assert torch.equal(got.indices, ref.indices)
    torch.testing.assert_close(got.values, ref.values, rtol=1e-10, atol=1e-12)
    with pytest.raises(ValueError, match="self_influence"):
        headwater.influence(
            case.model,
            case.train,
            case.query,
            task=case.task,
            method="gradient_dot",
            self_influence=True,
        )
