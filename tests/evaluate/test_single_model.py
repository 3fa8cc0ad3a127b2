"""Single-model LDS ground truth: replays with subsets dropped, cached; the metagradient
of a smooth run predicts it."""

from __future__ import annotations

import torch
from cases import mlp
from oracles import assert_close
from torch.func import functional_call

import headwater
from headwater.evaluate import lds, single_model_ground_truth
from headwater.task import ClassificationTask
from headwater.train.recorder import Recorder, replay


def smooth_run(case):
    task = ClassificationTask()
    x, y = case.train
    opt = torch.optim.SGD(case.model.parameters(), lr=0.05, momentum=0.5)
    rec = Recorder(case.model, opt, n_train=x.shape[0], checkpoint_every=5)
    gen = torch.Generator().manual_seed(0)
    for _ in range(4):
        for idx in torch.randperm(x.shape[0], generator=gen).split(10):
            opt.zero_grad()
            task.train_loss(case.model, (x[idx], y[idx])).mean().backward()
            rec.step(idx)
    return task, rec.finish()


def test_ground_truth_is_the_replay_without_the_subset_and_is_cached(tmp_path):
    case = mlp(n_train=30, n_query=4)
    task, run = smooth_run(case)
    truth = single_model_ground_truth(
        case.model, task, case.train, case.query, run, fraction=0.1, n_subsets=5, store_dir=tmp_path
    )
    assert truth.masks.shape == (5, 30) and bool((truth.masks.sum(1) == 27).all())
    params = replay(case.model, task, case.train, run, weights=truth.masks[2].double())
    want = task.measurement(lambda inp: functional_call(case.model, params, (inp,)), case.query)
    assert_close(truth.actual[2], want, rtol=0, atol=0, what="replayed measurement")
    again = single_model_ground_truth(
        case.model, task, case.train, case.query, run, fraction=0.1, n_subsets=5, store_dir=tmp_path
    )
    assert torch.equal(again.actual, truth.actual) and len(list(tmp_path.iterdir())) == 2


def test_metagradient_predicts_single_model_retraining():
    case = mlp(n_train=30, n_query=4)
    task, run = smooth_run(case)
    truth = single_model_ground_truth(
        case.model, task, case.train, case.query, run, fraction=0.1, n_subsets=12
    )
    scores = headwater.influence(
        case.model, case.train, case.query, task=task, method="metagradient", run=run
    )
    assert scores.settings["method"] == "metagradient"
    result = lds(scores.values, truth)
    assert result.mean > 0.95, result.per_query
    assert lds(-scores.values, truth).mean < -0.95  # a sign error fails
