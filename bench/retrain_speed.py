"""Wall time of retraining 64 digits MLPs: vmap (one vectorised pass) vs a plain loop.

Run: ``.venv/bin/python -m bench.retrain_speed [--members 64] [--epochs 5]``.
Both paths run headwater's ensemble trainer on the bench MLP architecture
(64-128-64-10 tanh, float32, Adam lr 1e-3, batch 50, weight decay 1e-3) on the same
1,000 digits training examples, each member on its own random half; the script
prints both times, the speed ratio and the largest parameter difference.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch import nn

from bench.problems import N_TRAIN, WEIGHT_DECAY, _tensors
from headwater.task import ClassificationTask
from headwater.train.ensemble import TrainConfig, train_ensemble


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--members", type=int, default=64)
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--repeats", type=int, default=3, help="timed runs per path; the median is shown"
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    x_train, y_train, _, _ = _tensors(torch.float32)
    model = nn.Sequential(
        nn.Linear(64, 128), nn.Tanh(), nn.Linear(128, 64), nn.Tanh(), nn.Linear(64, 10)
    )
    task = ClassificationTask(weight_decay=WEIGHT_DECAY)
    gen = torch.Generator().manual_seed(0)
    masks = torch.rand(args.members, N_TRAIN, generator=gen) < 0.5
    results = {}
    # warm-up: torch.func's first call imports its compiler stack (seconds), which would
    # otherwise be charged to whichever path runs first
    warm = TrainConfig(optimizer="adam", lr=1e-3, epochs=1, batch_size=50, vectorize="vmap")
    train_ensemble(model, task, (x_train, y_train), masks[:2], config=warm)
    runs: dict[str, list[float]] = {"vmap": [], "loop": []}
    for _ in range(args.repeats):  # interleaved, so a burst of load hits both paths alike
        for mode in ("vmap", "loop"):
            config = TrainConfig(
                optimizer="adam",
                lr=1e-3,
                epochs=args.epochs,
                batch_size=50,
                members_per_pass=args.members,
                vectorize=mode,
            )
            start = time.perf_counter()
            results[mode] = train_ensemble(model, task, (x_train, y_train), masks, config=config)
            runs[mode].append(time.perf_counter() - start)
    times = {mode: statistics.median(t) for mode, t in runs.items()}
    diff = max(
        (results["vmap"].params[k] - results["loop"].params[k]).abs().max().item()
        for k in results["vmap"].params
    )
    print(f"{args.members} MLPs x {args.epochs} epochs on {N_TRAIN} digits, {args.threads} threads")
    print(
        f"median of {args.repeats}: vmap: {times['vmap']:.2f} s   loop: {times['loop']:.2f} s   "
        f"speed-up: {times['loop'] / times['vmap']:.1f}x   max |param diff|: {diff:.1e}"
    )


if __name__ == "__main__":
    main()
