"""Progress of ``headwater.influence``: every long step reports through the callback, the
default draws tqdm bars (with ETA), ``False`` is silent."""

import pytest
import torch
from cases import mlp

import headwater
from headwater.bars import ProgressBars, as_progress


def _record():
    calls = []
    return calls, lambda stage, done, total: calls.append((stage, done, total))


@pytest.mark.parametrize(
    ("curvature", "iterative"), [("cg", "CG iterations"), ("lissa", "LiSSA steps")]
)
def test_iterative_solves_and_damping_probes_report_progress(curvature, iterative):
    case = mlp()
    calls, progress = _record()
    headwater.influence(
        case.model,
        case.train,
        case.query,
        curvature=curvature,
        progress=progress,
        damping=None,
        curvature_options={"max_iter": 50, "warn": False} if curvature == "cg" else {"depth": 20},
    )
    stages = {stage for stage, _, _ in calls}
    assert {"damping probes", iterative, "gradients (train)"} <= stages, stages
    for stage in stages:  # counts only grow within a run of a stage and each run ends complete
        runs = [(d, t) for s, d, t in calls if s == stage]
        assert runs[-1][0] == runs[-1][1], (stage, runs[-1])
        assert all(0 <= d <= t for d, t in runs)


def test_progress_true_draws_bars_and_false_is_silent(capsys, monkeypatch):
    case = mlp()
    monkeypatch.setattr("headwater.bars.API_DELAY", 0.0)
    headwater.influence(case.model, case.train, case.query, curvature="exact", progress=False)
    assert capsys.readouterr().err == ""
    headwater.influence(case.model, case.train, case.query, curvature="exact")
    err = capsys.readouterr().err
    assert "gradients (train)" in err and "100%" in err


def test_progress_argument_is_checked():
    assert isinstance(as_progress(True), ProgressBars) and as_progress(None) is None
    with pytest.raises(TypeError, match="progress: expected True, False or a callable"):
        headwater.influence(
            torch.nn.Linear(2, 1),
            (torch.ones(3, 2), torch.ones(3, 1)),
            (torch.ones(1, 2), torch.ones(1, 1)),
            progress="yes",
        )
