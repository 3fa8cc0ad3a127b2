"""SIGKILL in the middle of a fit, of scoring and of a projection, then a rerun on the same
store: the result is bit-identical to an uninterrupted run, and the rerun says whether it
resumed (and from which row). The kill comes from the run's own progress callback at a
chosen step (deterministic: no timing)."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from cases import mlp

import headwater

SCRIPT = textwrap.dedent("""
    import json, os, signal, sys
    sys.path.insert(0, {tests!r})
    from test_kill_resume import attribute

    store, options, kill_stage, kill_at = sys.argv[1], json.loads(sys.argv[2]), sys.argv[3], int(sys.argv[4])
    calls = []

    def progress(stage, done, total):
        if kill_stage in stage:
            calls.append(done)
            if len(calls) == kill_at:
                os.kill(os.getpid(), signal.SIGKILL)

    attribute(store, options, progress)
""")


def attribute(store, options: dict, progress=None):
    """The run that is killed, resumed, and run uninterrupted (tiny MLP, chunks of 8)."""
    torch.set_num_threads(1)
    case = mlp(n_train=30)
    return headwater.influence(
        case.model,
        case.train,
        case.query,
        task=case.task,
        damping=1e-2,
        self_influence=True,
        chunk_size=8,
        store=store,
        progress=progress,
        **options,
    )


def _killed(tmp_path: Path, store: Path, options: dict, kill_stage: str, kill_at: int):
    script = tmp_path / "run.py"
    script.write_text(SCRIPT.format(tests=str(Path(__file__).parent)))
    return subprocess.run(
        [sys.executable, str(script), str(store), json.dumps(options), kill_stage, str(kill_at)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


EKFAC = {"curvature": "ekfac", "curvature_options": {"chunk_size": 8}}
POINTS = {  # (options, progress stage, k-th report of that stage at which the run is killed)
    "ekfac factor pass": (EKFAC, "kfac factors", 2),
    "ekfac eigenvalue pass": (EKFAC, "ekfac correction", 2),
    "ekfac scoring, fit stored": (EKFAC, "module gradients (train)", 2),
    "projection after 8 rows": ({"projection": 12}, "projected gradients (train)", 1),
    "projection after 24 rows": ({"projection": 12}, "projected gradients (train)", 3),
}


@pytest.mark.parametrize("point", list(POINTS))
def test_a_killed_run_resumes_to_the_bit_identical_result(point, tmp_path):
    options, stage, k = POINTS[point]
    threads = torch.get_num_threads()
    try:
        clean = attribute(tmp_path / "clean-store", options)
        proc = _killed(tmp_path, tmp_path / "store", options, stage, k)
        assert proc.returncode == -signal.SIGKILL, f"not killed at {stage} #{k}: {proc.stderr}"
        again = attribute(tmp_path / "store", options)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(again.values, clean.values) and torch.equal(
        again.self_influence, clean.self_influence
    )
    status = again.settings["store"]
    if "projection" in options:  # chunks of 8 rows were counted before the kill
        assert (
            f"resumed after {8 * k} of 30" in status["train"] and "damaged" not in status["train"]
        )
    elif "scoring" in point:
        assert status.startswith("curvature loaded")  # the fit was complete before the kill
    else:
        assert status.startswith("curvature computed")  # nothing half-written was taken for a fit
