"""Low-rank queries on the digits MLP: EK-FAC with ``query_rank`` vs full rank, LDS on the margin.

Run: ``python -m bench.scale_lds [--ranks 32 16 8]`` (one thread; the LDS ground truth of
``bench.run`` is computed once and cached in ``bench/.cache``). The MLP of ``bench.run``
(64-128-64-10 tanh, 1,000 digits, 200 test points) at ``bench.run``'s damping; its blocks
are ``[128, 65]``, ``[64, 129]`` and ``[10, 65]``, so rank 32 truncates the first two (the
third is kept whole: its factors would not be smaller). Writes the ``## LDS`` section of
``bench/scale_results.md``.
"""

from __future__ import annotations

import argparse
import re
import time

import torch

import headwater
from bench.problems import mlp
from bench.run import DAMPING, lds_quality
from bench.scale_sizes import RESULTS
from headwater.task import ClassificationTask

SECTION = "## LDS on the digits MLP (bench/scale_lds.py)"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ranks", type=int, nargs="+", default=[32, 16, 8, 4, 2, 1])
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    problem = mlp()
    task = ClassificationTask(weight_decay=problem.weight_decay, measurement="margin")
    rows, full, reference = [], None, None
    for rank in [None, *args.ranks]:
        start = time.perf_counter()
        scores = headwater.influence(
            problem.model,
            (problem.X_train, problem.y_train),
            (problem.X_test, problem.y_test),
            task=task,
            curvature="ekfac",
            damping=DAMPING["mlp"],
            curvature_options={"query_rank": rank},
            progress=False,
        ).values
        seconds = time.perf_counter() - start
        quality = lds_quality(problem, scores)
        full = quality["lds"] if rank is None else full
        reference = scores if rank is None else reference
        error = float((scores - reference).abs().max() / reference.abs().max())
        label = "full rank" if rank is None else f"query_rank={rank}"
        rows.append(
            f"| {label} | {quality['lds']:.4f} +- {quality['lds_se']:.4f} | "
            f"{quality['lds'] - full:+.4f} | {error:.1e} | {seconds:.1f} |"
        )
        print(rows[-1], flush=True)
    section = [
        SECTION,
        "",
        f"Written by `python -m bench.scale_lds` on {time.strftime('%Y-%m-%d')}: EK-FAC on the "
        "64-128-64-10 tanh MLP of bench/run.py (1,000 digits, 200 test points, damping "
        f"{DAMPING['mlp']}), LDS on the margin against its retraining ground truth "
        "(100 random halves x 2 seeds; mean +- s.e. over test points); one thread.",
        "",
        "| queries | LDS | vs full rank | max abs score error / max abs score | time (s) |",
        "|---|---:|---:|---:|---:|",
        *rows,
        "",
    ]
    text = RESULTS.read_text() if RESULTS.exists() else ""
    text = re.split(re.escape(SECTION), text)[0].rstrip("\n")
    RESULTS.write_text((text + "\n\n" if text else "") + "\n".join(section))
    print(f"wrote {RESULTS}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
