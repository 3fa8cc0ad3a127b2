"""Exact metagradients of recorded language-model runs: token and position embeddings, tied
head, causal attention, LayerNorm, ``LanguageModelingTask`` (prompt labels -100), tensor
and Hugging Face dict batches, against finite differences of real retraining (float64);
the single-model ground truth of such a run is its replay without the subset."""

from __future__ import annotations

import pytest
import torch
from cases import causal_lm
from oracles import assert_close

from headwater.evaluate import single_model_ground_truth
from headwater.gradients.functional import bind
from headwater.methods.metagradient import Metagradient
from headwater.task import LanguageModelingTask
from headwater.train.recorder import Recorder, replay


def record_lm(model, train, *, optimizer: str = "adam", batch: int = 4, epochs: int = 2):
    """A user-style loop over ``train`` (an ``(inputs, labels)`` pair whose inputs may be a
    dict batch): warm-up schedule, clipping in the second epoch, the model in its mode."""
    task = LanguageModelingTask()  # the optimizer holds the weight decay
    x, y = train
    if optimizer == "adam":
        opt = torch.optim.Adam(model.parameters(), lr=0.02, weight_decay=1e-2)
    else:
        opt = torch.optim.SGD(model.parameters(), lr=0.2, momentum=0.9, weight_decay=1e-2)
    sched = torch.optim.lr_scheduler.LinearLR(opt, 0.3, 1.0, total_iters=3)
    n = y.shape[0]
    rec = Recorder(model, opt, n_train=n, checkpoint_every=3)
    gen = torch.Generator().manual_seed(2)
    take = (lambda i: {k: v[i] for k, v in x.items()}) if isinstance(x, dict) else x.__getitem__
    for epoch in range(epochs):
        for idx in torch.randperm(n, generator=gen).split(batch):
            opt.zero_grad()
            task.train_loss(model, (take(idx), y[idx])).mean().backward()
            rec.step(idx, max_norm=1.0 if epoch == 1 else None)
            sched.step()
    return task, rec.finish()


def finite_differences(model, task, run, train, query, columns, eps: float = 1e-5):
    """``[Q, len(columns)]`` central differences of the replayed query measurement in the
    weight of each training example of ``columns``."""
    n = train[1].shape[0]

    def measured(weights):
        return task.measurement(
            bind(model, replay(model, task, train, run, weights=weights)), query
        )

    out = []
    for i in columns:
        up, down = torch.ones(n, dtype=torch.float64), torch.ones(n, dtype=torch.float64)
        up[i], down[i] = 1 + eps, 1 - eps
        out.append((measured(up) - measured(down)) / (2 * eps))
    return torch.stack(out, dim=1)


@pytest.mark.parametrize(("optimizer", "tied"), [("adam", True), ("sgd", False)])
def test_tiny_causal_lm_equals_finite_differences_of_retraining(optimizer, tied):
    case = causal_lm(n_train=12, n_query=3, tied=tied)
    task, run = record_lm(case.model, case.train, optimizer=optimizer)
    hyper = Metagradient(case.model, task, run).hypergradients(case.query, case.train)
    cols = list(range(0, 12, 2))
    fd = finite_differences(case.model, task, run, case.train, case.query, cols)
    assert fd.abs().max() > 1e-4  # the run does depend on the weights
    assert_close(hyper[:, cols], fd, rtol=1e-5, atol=1e-5 * float(fd.abs().max()), what="dm/dw")


@pytest.mark.parametrize("mode", ["eval", "train"])
def test_hugging_face_gpt2_dict_batches_equal_finite_differences_and_ground_truth(tmp_path, mode):
    """In train mode (a fine-tuning loop as users write it: GPT-2's default dropout 0.1 on
    embeddings, attention and residuals) the run's masks are replayed."""
    hf = pytest.importorskip("hf_models")
    model = hf.gpt2().train(mode == "train")  # LayerNorm, tied head, padded dict batches
    batch, query = hf.lm_batch(12, seed=0), hf.lm_batch(3, seed=5)
    train = ({k: v for k, v in batch.items() if k != "labels"}, batch["labels"])
    query = ({k: v for k, v in query.items() if k != "labels"}, query["labels"])
    task, run = record_lm(model, train)
    assert len(run.rng) == (run.num_steps if mode == "train" else 0)
    final = replay(model, task, train, run)
    assert all(torch.equal(final[k], p.detach()) for k, p in model.named_parameters())
    model.eval()
    hyper = Metagradient(model, task, run).hypergradients(query, train)
    cols = list(range(0, 12, 3))
    fd = finite_differences(model, task, run, train, query, cols)
    assert fd.abs().max() > 1e-4
    assert_close(hyper[:, cols], fd, rtol=1e-5, atol=1e-5 * float(fd.abs().max()), what="dm/dw")
    truth = single_model_ground_truth(
        model, task, train, query, run, fraction=0.25, n_subsets=2, store_dir=tmp_path
    )
    params = replay(model, task, train, run, weights=truth.masks[1].double())
    want = task.measurement(bind(model, params), query)
    assert_close(truth.actual[1], want, rtol=0, atol=0, what="replayed measurement")
