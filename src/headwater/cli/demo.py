"""``headwater demo``: a LeNet-style CNN on the bundled digits, attributed end to end.

Data: scikit-learn's ``load_digits`` (1,797 8x8 images, no download), shuffled with
``--seed``; the first ``--n-train`` are training examples, the next ``--n-test`` the
test set, standardised with the training mean and std. ``--label-noise`` flips a
fraction of training labels (to show that self-influence finds them).
Model: LeNet (LeCun et al. 1998) scaled to 8x8 inputs, trained with Adam on
``mean CE + (weight_decay/2)·‖θ‖²``, the objective the curvature describes.
"""

from __future__ import annotations

import argparse
import logging

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from headwater import store
from headwater.cli.common import (
    ProgressBars,
    Timer,
    UserError,
    add_attribution_options,
    check_attribution_options,
    check_data_sizes,
    prepare_output,
)
from headwater.cli.run import attribute, write_outputs
from headwater.methods.registry import METHODS
from headwater.report import RunResult, format_top_k_table
from headwater.task import ClassificationTask

__all__ = ["LeNet", "add_parser", "digits_pixels", "digits_split", "run", "train_model"]

log = logging.getLogger("headwater.cli")

N_DIGITS = 1797


class LeNet(nn.Module):
    """LeNet-5's layout for 8x8 inputs: conv(6) → pool → conv(16) → pool → fc(32) → fc(10),
    tanh activations, average pooling (3,350 parameters)."""

    def __init__(self, n_classes: int = 10):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 6, 3, padding=1)  # 8x8 -> 8x8
        self.conv2 = nn.Conv2d(6, 16, 3, padding=1)  # 4x4 -> 4x4
        self.fc1 = nn.Linear(16 * 2 * 2, 32)
        self.fc2 = nn.Linear(32, n_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = F.avg_pool2d(torch.tanh(self.conv1(x)), 2)
        x = F.avg_pool2d(torch.tanh(self.conv2(x)), 2)
        return self.fc2(torch.tanh(self.fc1(x.flatten(1))))


def _digits(
    seed: int, n_train: int, n_test: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Raw pixels ``[1797, 64]`` (0..16), labels, and the train/test rows of the seeded split."""
    from sklearn.datasets import load_digits

    if n_train <= 0 or n_test <= 0 or n_train + n_test > N_DIGITS:
        raise UserError(
            f"--n-train/--n-test: need positive sizes with n_train + n_test <= {N_DIGITS}, "
            f"got {n_train} + {n_test}"
        )
    x, y = load_digits(return_X_y=True)
    perm = np.random.default_rng(seed).permutation(len(y))
    return x.astype(np.float32), y, perm[:n_train], perm[n_train : n_train + n_test]


def digits_split(seed: int, n_train: int, n_test: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(x_train [n,1,8,8], y_train [n], x_test, y_test)``, standardised float32 / int64."""
    x, y, tr, te = _digits(seed, n_train, n_test)
    mean, std = x[tr].mean(axis=0), x[tr].std(axis=0)
    std[std == 0] = 1.0
    x = ((x - mean) / std).reshape(-1, 1, 8, 8)
    as_x, as_y = torch.from_numpy, lambda a: torch.from_numpy(a.astype(np.int64))
    return as_x(x[tr]).contiguous(), as_y(y[tr]), as_x(x[te]).contiguous(), as_y(y[te])


def digits_pixels(seed: int, n_train: int, n_test: int) -> tuple[Tensor, Tensor]:
    """The raw pixel values (0 = background .. 16 = ink) ``[n, 8, 8]`` of :func:`digits_split`'s
    train and test examples, for display."""
    x, _, tr, te = _digits(seed, n_train, n_test)
    x = torch.from_numpy(x.reshape(-1, 8, 8))
    return x[tr].contiguous(), x[te].contiguous()


def flip_labels(
    y: Tensor, fraction: float, seed: int, n_classes: int = 10
) -> tuple[Tensor, Tensor]:
    """Labels with ``fraction`` of them changed to another class, and the flipped mask."""
    if not 0 <= fraction < 1:
        raise UserError(f"--label-noise: expected a fraction in [0, 1), got {fraction}")
    gen = torch.Generator().manual_seed(seed + 1)
    n_flip = round(fraction * y.shape[0])
    idx = torch.randperm(y.shape[0], generator=gen)[:n_flip]
    shift = torch.randint(1, n_classes, (n_flip,), generator=gen)
    noisy = y.clone()
    noisy[idx] = (y[idx] + shift) % n_classes
    flipped = torch.zeros(y.shape[0], dtype=torch.bool)
    flipped[idx] = True
    return noisy, flipped


def train_model(
    x: Tensor,
    y: Tensor,
    *,
    seed: int,
    epochs: int,
    lr: float,
    batch_size: int,
    weight_decay: float,
    device: str = "cpu",
    progress=None,
) -> LeNet:
    """Train a :class:`LeNet` deterministically from ``seed`` (global RNG untouched)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LeNet().to(device)
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(epochs, 1))
    x, y = x.to(device), y.to(device)
    model.train()
    for epoch in range(epochs):
        order = torch.randperm(x.shape[0], generator=gen).to(device)
        for start in range(0, x.shape[0], batch_size):
            b = order[start : start + batch_size]
            reg = sum(p.pow(2).sum() for p in model.parameters())
            loss = F.cross_entropy(model(x[b]), y[b]) + 0.5 * weight_decay * reg
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        sched.step()
        if progress is not None:
            progress("training (epochs)", epoch + 1, epochs)
    model.eval()
    for p in model.parameters():
        p.grad = None
    return model


def choose_queries(y: Tensor, pred: Tensor, n: int) -> list[int]:
    """The first misclassified test example (if any), then the first correct ones."""
    wrong = (pred != y).nonzero().flatten().tolist()
    right = (pred == y).nonzero().flatten().tolist()
    chosen = wrong[:1] + right[: max(n - 1, 0) + (0 if wrong else 1)]
    return sorted(chosen[:n])


def add_parser(sub: argparse._SubParsersAction, parents: list) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "demo",
        parents=parents,
        help="train a LeNet on the bundled digits, attribute its test predictions, write a report",
        description=__doc__.replace("``", ""),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    d = p.add_argument_group("data and training")
    d.add_argument("--n-train", type=int, default=1297, help="training examples (default 1297)")
    d.add_argument(
        "--n-test", type=int, default=500, help="test examples, all scored (default 500)"
    )
    d.add_argument(
        "--label-noise",
        type=float,
        default=0.02,
        help="fraction of training labels flipped to show mislabel detection (default 0.02)",
    )
    d.add_argument("--epochs", type=int, default=60, help="training epochs (default 60)")
    d.add_argument("--lr", type=float, default=3e-3, help="Adam learning rate (default 3e-3)")
    d.add_argument("--batch-size", type=int, default=64, help="training batch size (default 64)")
    d.add_argument(
        "--weight-decay",
        type=float,
        default=1e-3,
        help="L2 coefficient of the training objective (default 1e-3)",
    )
    d.add_argument(
        "--examples", type=int, default=3, help="test examples detailed in the table and report"
    )
    d.add_argument(
        "--queries",
        type=int,
        nargs="+",
        default=None,
        help="test indices to detail (default: the first misclassified, then correct ones)",
    )
    add_attribution_options(p, out_default="headwater-out/demo", threads_default=1)
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    check_attribution_options(args)
    for name in ("epochs", "batch_size", "examples"):
        if getattr(args, name) <= 0:
            raise UserError(
                f"--{name.replace('_', '-')}: must be a positive integer, got {getattr(args, name)}"
            )
    if args.lr <= 0 or args.weight_decay < 0:
        raise UserError("--lr must be > 0 and --weight-decay >= 0")
    folder = prepare_output(args.out)
    progress, timer = ProgressBars(enabled=not args.quiet), Timer()

    x_tr, y_clean, x_te, y_te = digits_split(args.seed, args.n_train, args.n_test)
    check_data_sizes(args, len(y_clean), len(y_te), "test examples")  # before training
    pixels_tr, pixels_te = digits_pixels(
        args.seed, args.n_train, args.n_test
    )  # shown as people see them
    y_tr, flipped = flip_labels(y_clean, args.label_noise, args.seed)
    log.info(
        "digits: %d train (%d labels flipped), %d test; LeNet, %d epochs, seed %d",
        len(y_tr),
        int(flipped.sum()),
        len(y_te),
        args.epochs,
        args.seed,
    )
    with timer("training"):
        model = train_model(
            x_tr,
            y_tr,
            seed=args.seed,
            epochs=args.epochs,
            lr=args.lr,
            batch_size=args.batch_size,
            weight_decay=args.weight_decay,
            device=args.device,
            progress=progress,
        )
    with torch.no_grad():
        pred = model(x_te.to(args.device)).argmax(1).cpu()
    accuracy = float((pred == y_te).float().mean())
    log.info(
        "test accuracy %.3f (%d parameters)", accuracy, sum(p.numel() for p in model.parameters())
    )
    store.save(folder / "model", dict(model.state_dict()), {"model": "LeNet", "accuracy": accuracy})

    task = ClassificationTask(weight_decay=args.weight_decay)
    scores = attribute(model, (x_tr, y_tr), (x_te, y_te), task, args, progress, timer)

    queries = args.queries or choose_queries(y_te, pred, args.examples)
    result = RunResult(
        scores=scores.values.detach().cpu(),
        train_labels=y_tr,
        query_labels=y_te,
        query_predictions=pred,
        self_influence=None
        if scores.self_influence is None
        else scores.self_influence.detach().cpu(),
        train_images=pixels_tr,
        query_images=pixels_te,
        flipped=flipped if flipped.any() else None,
        shown=tuple(queries),
        settings=scores.settings,
    )
    result = write_outputs(
        folder, "demo", args, result, timer, accuracy=accuracy, shown=list(queries)
    )
    print(format_top_k_table(result, queries, args.top_k))
    if result.self_influence is not None and result.flipped is not None:
        top = torch.argsort(result.self_influence, descending=True)[
            : max(2 * int(flipped.sum()), 10)
        ]
        print(
            f"self-influence: {int(flipped[top].sum())} of the {int(flipped.sum())} flipped labels are among "
            f"the {len(top)} training examples with the largest self-influence"
        )
    uses_curvature = "curvature" in METHODS[args.method].options
    curvature = f", curvature={args.curvature}" if uses_curvature else ""
    print(
        f"test accuracy {accuracy:.3f}; method={args.method}{curvature}; "
        f"total {sum(timer.seconds.values()):.1f} s"
    )
    print(f"report: {folder / 'report' / 'index.html'}")
    return 0
