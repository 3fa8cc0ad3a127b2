"""A small LeNet-style CNN on the 8x8 digits: the convolutional bench problem.

Same data and objective as ``bench.problems`` (1,000 train x 200 test digits,
standardised per pixel, mean CE + (weight_decay/2)||theta||^2 on every parameter,
weight_decay = 1e-3), inputs reshaped to ``[N, 1, 8, 8]``:

    Conv2d(1, 8, 3, padding=1) - Tanh - AvgPool2d(2)      # [8, 4, 4]
    Conv2d(8, 16, 3, padding=1) - Tanh - AvgPool2d(2)     # [16, 2, 2]
    Flatten - Linear(64, 32) - Tanh - Linear(32, 10)      # 3,658 parameters

float32, minibatch Adam from a fixed seed, weights cached in ``bench/.cache`` like
the other problems. Every weight sits in a Conv2d or Linear, so K-FAC/EK-FAC cover the
whole model (the convolutions through patch extraction, several positions per example).

``cnn_lds_truth(problem)`` is the LDS ground truth with the problem's own recipe
(``bench.run.lds_truth`` with fewer subsets by default: a CNN retrains slower than the
MLP on a busy 2-core machine); ``cnn_lds_quality(problem, scores)`` -> {"lds", "lds_se"}.

    python -m bench.cnn_problem          # train (or load) and print accuracy
"""

from __future__ import annotations

import sys

import torch
from torch import nn

from bench.problems import CACHE_DIR, WEIGHT_DECAY, Problem, _load_or_train, _tensors, _train_mlp

__all__ = ["CNN_LDS_SUBSETS", "cnn", "cnn_lds_quality", "cnn_lds_truth"]

CNN_LDS_SUBSETS, CNN_LDS_SEEDS = 50, 1


def _build_cnn(seed: int, batch_norm: bool = False, dropout: float = 0.0) -> nn.Module:
    """The LeNet-style CNN; ``batch_norm``: a BatchNorm after each convolution (whose bias
    it cancels); ``dropout``: before the first Linear (neither draws from the seed)."""
    torch.manual_seed(seed)

    def norm(channels: int) -> list[nn.Module]:
        return [nn.BatchNorm2d(channels)] if batch_norm else []

    return nn.Sequential(
        nn.Unflatten(1, (1, 8, 8)),
        nn.Conv2d(1, 8, 3, padding=1),
        *norm(8),
        nn.Tanh(),
        nn.AvgPool2d(2),
        nn.Conv2d(8, 16, 3, padding=1),
        *norm(16),
        nn.Tanh(),
        nn.AvgPool2d(2),
        nn.Flatten(),
        *([nn.Dropout(dropout)] if dropout else []),
        nn.Linear(64, 32),
        nn.Tanh(),
        nn.Linear(32, 10),
    )


def cnn(*, use_cache: bool = True) -> Problem:
    """The trained CNN problem (float32). Inputs stay ``[N, 64]``; the model's first
    layer reshapes them, so every peer adapter and ``bench.run`` helper applies as is."""
    settings = {
        "problem": "cnn",
        "arch": "lenet c8-c16-32-10 tanh avgpool",
        "weight_decay": WEIGHT_DECAY,
        "train_dtype": "float32",
        "optimizer": "Adam",
        "lr": 3e-3,
        "epochs": 40,
        "batch_size": 50,
        "seed": 0,
        "n_train": 1000,
        "n_test": 200,
    }
    Xtr, ytr, Xte, yte = _tensors(torch.float32)
    # the MLP's trainer is architecture-agnostic: Adam on mean CE + wd/2 ||theta||^2
    model = _load_or_train(
        "cnn",
        settings,
        lambda: _build_cnn(settings["seed"]),
        lambda m: _train_mlp(
            m,
            Xtr,
            ytr,
            WEIGHT_DECAY,
            settings["epochs"],
            settings["batch_size"],
            settings["lr"],
            settings["seed"],
        ),
        use_cache,
    )
    return Problem("cnn", Xtr, ytr, Xte, yte, model, WEIGHT_DECAY, settings)


def cnn_lds_truth(
    problem: Problem, n_subsets: int = CNN_LDS_SUBSETS, seeds_per_subset: int = CNN_LDS_SEEDS
):
    """Margins after retraining on random halves (cached in ``bench/.cache``)."""
    from bench.run import _print_progress
    from headwater.evaluate.lds import lds_ground_truth
    from headwater.task import ClassificationTask
    from headwater.train.ensemble import TrainConfig

    s = problem.settings
    task = ClassificationTask(weight_decay=problem.weight_decay, measurement="margin")
    config = TrainConfig(
        optimizer="adam", lr=s["lr"], epochs=s["epochs"], batch_size=s["batch_size"]
    )
    return lds_ground_truth(
        problem.model,
        task,
        (problem.X_train, problem.y_train),
        (problem.X_test, problem.y_test),
        n_subsets=n_subsets,
        alpha=0.5,
        seeds_per_subset=seeds_per_subset,
        config=config,
        store_dir=CACHE_DIR,
        progress=_print_progress,
    )


def cnn_lds_quality(problem: Problem, scores: torch.Tensor) -> dict[str, float]:
    from headwater.evaluate.lds import lds

    result = lds(scores, cnn_lds_truth(problem))
    return {"lds": float(result.mean), "lds_se": float(result.stderr)}


if __name__ == "__main__":
    p = cnn()
    n_params = sum(q.numel() for q in p.model.parameters())
    print(
        f"cnn: {n_params} parameters, train acc {p.train_accuracy():.3f}, "
        f"test acc {p.test_accuracy():.3f}, ||grad|| {p.grad_norm():.2e}"
    )
    if "--lds-truth" in sys.argv:
        gt = cnn_lds_truth(p)
        print("lds truth", tuple(gt.actual.shape))
