"""The headwater command line: demo report, the API agreement, score on the example spec,
config reproduction, and one-line user errors (run as subprocesses, like a user would)."""

from __future__ import annotations

import json
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import pytest
import torch
from PIL import Image

import headwater
from headwater import store
from headwater.cli.demo import LeNet, digits_pixels, digits_split, flip_labels
from headwater.cli.main import main
from headwater.gradients.projection import KroneckerProjection
from headwater.report import load_result

pytestmark = (
    pytest.mark.slow
)  # subprocesses and multi-process runs: `make test-fast` leaves them out

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "examples" / "digits_mlp.py"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
SMALL_DEMO = ["--n-train", "300", "--n-test", "40", "--epochs", "6", "--threads", "1"]


def headwater_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "headwater.cli.main", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


class _Page(HTMLParser):
    """Collects image sources and the proponent/opponent table rows of index.html."""

    def __init__(self) -> None:
        super().__init__()
        self.images: list[str] = []
        self.rows: list[dict[str, str]] = []

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "img":
            self.images.append(attrs["src"])
        if tag == "tr" and "data-kind" in attrs:
            self.rows.append(attrs)


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo") / "out"
    proc = headwater_cli("demo", *SMALL_DEMO, "--quiet", "-o", str(out), cwd=out.parent)
    assert proc.returncode == 0, proc.stderr
    return out, proc


def _page(out: Path) -> _Page:
    page = _Page()
    page.feed((out / "report" / "index.html").read_text(encoding="utf-8"))
    return page


def test_demo_report_references_valid_pngs(demo):
    out, proc = demo
    page = _page(out)
    assert len(page.images) >= 5  # 3 test examples, mislabeled, distribution
    for src in page.images:
        path = out / "report" / src
        assert path.is_file(), src
        assert path.read_bytes()[:8] == PNG_MAGIC, src
        with Image.open(path) as img:
            img.verify()
    shown = {r["data-query"] for r in page.rows}
    assert len(shown) == 3
    assert "proponent" in proc.stdout and "opponent" in proc.stdout
    assert (out / "top_k.csv").is_file() and (out / "config.json").is_file()


def test_demo_top_proponent_is_what_the_api_returns(demo):
    out, proc = demo
    args = json.loads((out / "config.json").read_text())["args"]
    x_tr, y_tr, x_te, y_te = digits_split(args["seed"], args["n_train"], args["n_test"])
    y_tr, _ = flip_labels(y_tr, args["label_noise"], args["seed"])
    model = LeNet()
    state, _ = store.load(out / "model")
    model.load_state_dict(state)
    api = headwater.influence(
        model,
        (x_tr, y_tr),
        (x_te, y_te),
        task=headwater.ClassificationTask(weight_decay=args["weight_decay"]),
        curvature=args["curvature"],
        damping=args["damping"],
        kind=args["kind"],
        top_k=args["top_k"],
    )
    page = _page(out)
    top = {
        int(r["data-query"]): int(r["data-train-index"])
        for r in page.rows
        if r["data-kind"] == "proponent" and r["data-rank"] == "1"
    }
    assert len(top) == 3
    for q, train_index in top.items():
        assert train_index == int(api.indices[q, 0]), (q, train_index, api.indices[q])
        # the printed table shows the same index on the first rank line of this query
        block = proc.stdout.split(f"test #{q} ")[1]
        first_row = block.splitlines()[3].split()
        assert int(first_row[1]) == train_index


def test_demo_report_draws_raw_pixels_not_standardised_inputs(demo):
    out, _ = demo
    args = json.loads((out / "config.json").read_text())["args"]
    result = load_result(out)
    pixels_tr, pixels_te = digits_pixels(args["seed"], args["n_train"], args["n_test"])
    assert torch.equal(result.train_images, pixels_tr) and torch.equal(
        result.query_images, pixels_te
    )
    assert (
        result.train_images.min() == 0 and result.train_images.max() == 16
    )  # ink 0..16, background 0
    x_tr = digits_split(args["seed"], args["n_train"], args["n_test"])[0]
    assert x_tr.min() < 0  # the model saw standardised inputs; the report shows the pixels


def test_config_reproduces_the_run(demo, tmp_path):
    out, _ = demo
    again = tmp_path / "again"
    proc = headwater_cli(
        "demo",
        "--config",
        str(out / "config.json"),
        "--quiet",
        "--no-report",
        "-o",
        str(again),
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr
    assert torch.equal(load_result(out).scores, load_result(again).scores)


def test_report_command_renders_a_saved_folder(demo, tmp_path):
    out, _ = demo
    proc = headwater_cli(
        "report",
        str(out),
        "--to",
        str(tmp_path / "r"),
        "--top-k",
        "3",
        "--queries",
        "0",
        "--quiet",
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr
    parser = _Page()
    parser.feed((tmp_path / "r" / "index.html").read_text(encoding="utf-8"))
    assert {r["data-query"] for r in parser.rows} == {"0"}
    assert max(int(r["data-rank"]) for r in parser.rows) == 3


def test_score_runs_the_example_spec(tmp_path):
    out = tmp_path / "score"
    proc = headwater_cli(
        "score", str(EXAMPLE), "--quiet", "--threads", "1", "-o", str(out), cwd=tmp_path
    )
    assert proc.returncode == 0, proc.stderr
    result = load_result(out)
    assert result.scores.shape == (40, 600)
    assert (
        result.train_images.shape == (600, 8, 8) and result.train_images.max() == 16
    )  # the spec's display
    want = _api_scores(
        self_influence=True
    )  # the oracle: the same run (default curvature) through the API
    torch.testing.assert_close(
        result.scores, want.values, rtol=1e-4, atol=1e-5 * float(want.values.abs().max())
    )
    torch.testing.assert_close(
        result.self_influence,
        want.self_influence,
        rtol=1e-4,
        atol=1e-5 * float(want.self_influence.abs().max()),
    )
    lines = (out / "top_k.csv").read_text().splitlines()
    assert lines[0].startswith("query,")
    assert len(lines) == 1 + 40 * 2 * 5
    assert (out / "report" / "index.html").is_file()
    assert json.loads((out / "config.json").read_text())["args"]["spec"] == str(EXAMPLE)


def _api_scores(**kwargs):
    """The example spec loaded as ``headwater score`` does (seeds, one thread), scored with
    ``headwater.influence``."""
    import random

    import numpy as np

    from headwater.cli.score import load_spec

    torch.set_num_threads(1)  # as the command (--threads 1): the float32 training then runs alike
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)
    model, train, query, task = load_spec(str(EXAMPLE)).parts()
    return headwater.influence(model, train, query, task=task, **kwargs)


def test_score_with_a_projection_stores_and_reuses_the_projected_gradients(tmp_path):
    out = tmp_path / "projected"
    args = ["--quiet", "--threads", "1", "--no-report", "--projection", "8x8", "-o", str(out)]
    proc = headwater_cli("score", str(EXAMPLE), *args, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    first = load_result(out)
    assert first.settings["curvature"] == "projected"
    want = _api_scores(projection=KroneckerProjection(8, 8, seed=0), curvature="exact")
    torch.testing.assert_close(
        first.scores, want.values, rtol=1e-4, atol=1e-5 * float(want.values.abs().max())
    )
    assert first.settings["projection"] == {
        "type": "KroneckerProjection",
        "dim_out": 8,
        "dim_in": 8,
        "kind": "rademacher",
        "seed": 0,
    }
    stored = json.loads((out / "projected-train.json").read_text())
    assert stored["rows_done"] == 600
    proc = headwater_cli("score", str(EXAMPLE), *args, cwd=tmp_path)  # reuses the stores
    assert proc.returncode == 0, proc.stderr
    assert torch.equal(load_result(out).scores, first.scores)


def test_score_reuses_the_fitted_curvature_and_refits_for_other_settings(tmp_path):
    out = tmp_path / "resume"
    args = ["--threads", "1", "--no-report", "--curvature", "ekfac", "-o", str(out)]
    assert headwater_cli("score", str(EXAMPLE), *args, "--quiet", cwd=tmp_path).returncode == 0
    assert (out / "curvature.safetensors").is_file()
    first = load_result(out).scores
    stamp = (out / "curvature.json").stat().st_mtime_ns
    proc = headwater_cli("score", str(EXAMPLE), *args, "-v", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "curvature (loaded)" in proc.stderr
    assert (out / "curvature.json").stat().st_mtime_ns == stamp  # read, not rewritten
    assert torch.equal(load_result(out).scores, first)
    proc = headwater_cli("score", str(EXAMPLE), *args, "-v", "--damping", "0.5", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "refitting: curvature holds a fit of other damping" in proc.stderr
    assert json.loads((out / "curvature.json").read_text())["meta"]["damping"] == 0.5


def test_score_under_torchrun_matches_one_process(tmp_path):
    """`torchrun ... -m headwater score --distributed`: the ranks split the training data,
    rank 0 writes the outputs, and the scores are those of one process."""
    args = [str(EXAMPLE), "--curvature", "ekfac", "--threads", "1", "--no-report", "--quiet"]
    single = headwater_cli("score", *args, "-o", str(tmp_path / "single"), cwd=tmp_path)
    assert single.returncode == 0, single.stderr
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node=2",
            "-m",
            "headwater",
            "score",
            *args,
            "--distributed",
            "-o",
            str(tmp_path / "ranks"),
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.count("scores:") == 1  # rank 0 alone prints and writes
    expected, got = load_result(tmp_path / "single").scores, load_result(tmp_path / "ranks").scores
    assert got.shape == expected.shape == (40, 600)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5 * float(expected.abs().max()))
    assert "distributed" not in json.loads((tmp_path / "ranks" / "config.json").read_text())["args"]


def _bad_spec(tmp_path: Path) -> Path:
    spec = tmp_path / "bad_shapes.py"
    spec.write_text(
        "import torch\n"
        "model = torch.nn.Linear(4, 3)\n"
        "train = (torch.randn(10, 4), torch.randint(0, 3, (10,)))\n"
        "query = (torch.randn(2, 5), torch.tensor([0, 1]))\n"
    )
    return spec


USER_ERRORS = [
    "missing spec",
    "missing module",
    "unknown method",
    "negative damping",
    "empty store",
    "damaged store",
    "output is a file",
    "library error",
    "bad curvature option",
    "bad projection",
    "projection with cg",
    "plan without memory",
    "query batch with projection",
    "distributed without torchrun",
    "cuda this torch lacks",
    "mps this torch lacks",
    "unknown curvature option",
    "unknown projection option",
    "zero projection",
    "inf input",
]


def _error_args(case: str, tmp_path: Path) -> list[str]:
    (tmp_path / "empty").mkdir()
    damaged = tmp_path / "damaged"
    damaged.mkdir()
    (damaged / "results.json").write_text("{not json")
    (damaged / "results.safetensors").write_bytes(b"junk")
    (tmp_path / "a_file").write_text("")
    return {
        "missing spec": ["score", "no_such_spec.py"],
        "missing module": ["score", "no_such_package.spec"],
        "unknown method": ["demo", "--method", "no-such-method", "-o", "x"],
        "negative damping": ["score", str(EXAMPLE), "--damping", "-1", "-o", "x"],
        "empty store": ["report", str(tmp_path / "empty")],
        "damaged store": ["report", str(damaged)],
        "output is a file": ["demo", "-o", str(tmp_path / "a_file")],
        "bad curvature option": ["demo", "--curvature-option", "rank", "-o", "x"],
        "bad projection": ["demo", "--projection", "8y8", "-o", "x"],
        "projection with cg": ["demo", "--projection", "64", "--curvature", "cg", "-o", "x"],
        "plan without memory": ["plan", str(EXAMPLE), "--memory-gb", "0"],
        "query batch with projection": [
            "demo",
            "--projection",
            "64",
            "--query-batch",
            "8",
            "-o",
            "x",
        ],
        "distributed without torchrun": ["score", str(EXAMPLE), "--distributed", "-o", "x"],
        "library error": [
            "score",
            str(_bad_spec(tmp_path)),
            "--curvature",
            "exact",
            "-o",
            str(tmp_path / "x"),
        ],
        # checked before the spec runs: the spec leaves a marker file when it is executed
        "cuda this torch lacks": [
            "score",
            str(_marking_spec(tmp_path)),
            "--device",
            "cuda",
            "-o",
            "x",
        ],
        "mps this torch lacks": [
            "score",
            str(_marking_spec(tmp_path)),
            "--device",
            "mps",
            "-o",
            "x",
        ],
        "unknown curvature option": [
            "score",
            str(_marking_spec(tmp_path)),
            "--curvature",
            "arnoldi",
            "--curvature-option",
            "rnak=3",
            "-o",
            "x",
        ],
        "unknown projection option": [
            "score",
            str(_marking_spec(tmp_path)),
            "--projection",
            "8",
            "--curvature-option",
            "rank=3",
            "-o",
            "x",
        ],
        "zero projection": [
            "score",
            str(_marking_spec(tmp_path)),
            "--projection",
            "0x4",
            "-o",
            "x",
        ],
        "inf input": [
            "score",
            str(_marking_spec(tmp_path, bad="float('inf')")),
            "--curvature",
            "ekfac",
            "--quiet",
            "--no-report",
            "-o",
            str(tmp_path / "x"),
        ],
    }[case]


def _marking_spec(tmp_path: Path, bad: str | None = None) -> Path:
    """A valid spec that writes ``ran`` beside itself when executed (``bad``: a value put
    into training input 3)."""
    spec = tmp_path / "marking_spec.py"
    spec.write_text(
        "import pathlib, torch\n"
        "pathlib.Path(__file__).with_name('ran').write_text('')\n"
        "g = torch.Generator().manual_seed(0)\n"
        "model = torch.nn.Sequential(torch.nn.Linear(4, 5), torch.nn.Tanh(), torch.nn.Linear(5, 3))\n"
        "train = (torch.randn(20, 4, generator=g), torch.randint(0, 3, (20,), generator=g))\n"
        "query = (torch.randn(3, 4, generator=g), torch.tensor([0, 1, 2]))\n"
        + (f"train[0][3, 1] = {bad}\n" if bad else "")
    )
    return spec


def _assert_one_line(stderr: str) -> None:
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1, stderr
    assert lines[0].startswith("headwater") and "error" in lines[0]
    assert "Traceback" not in stderr


@pytest.mark.parametrize("case", USER_ERRORS)
def test_user_errors_print_one_line(case, tmp_path, monkeypatch, capsys):
    """In process (fast): main() returns non-zero and writes one line to stderr."""
    monkeypatch.chdir(tmp_path)
    code = main(_error_args(case, tmp_path))
    assert code == 2
    err = capsys.readouterr().err
    _assert_one_line(err)
    if "this torch lacks" in case or "option" in case or "projection" in case:
        assert not (tmp_path / "ran").exists(), "validated only after the spec was executed"
    if case == "unknown curvature option":
        assert "'rnak'" in err and "rank" in err  # the unknown key and the valid ones
    if case == "inf input":
        assert "train: the" in err and "example 3" in err


def test_a_bug_exits_1_with_a_note_above_the_traceback_and_debug_shows_user_errors(
    tmp_path, monkeypatch, capsys
):
    import headwater.cli.score as score

    monkeypatch.chdir(tmp_path)

    def broken(*args, **kwargs):
        raise RuntimeError("an internal invariant failed")

    monkeypatch.setattr(score, "check_attribution_options", broken)
    assert main(["score", "spec.py", "-o", "x"]) == 1
    err = capsys.readouterr().err
    assert err.splitlines()[0].startswith("headwater: this is a bug, please report it")
    assert "Traceback" in err and "an internal invariant failed" in err
    monkeypatch.undo()
    with pytest.raises(ValueError, match="--method"):  # --debug: the user error's traceback
        main(["demo", "--method", "no-such-method", "--debug", "-o", "x"])


@pytest.mark.parametrize("case", ["missing spec", "library error"])
def test_user_errors_from_the_console(case, tmp_path):
    """As a user runs it: a separate process, `python -m headwater`."""
    proc = subprocess.run(
        [sys.executable, "-m", "headwater", *_error_args(case, tmp_path)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode != 0
    _assert_one_line(proc.stderr)


def test_plan_prints_every_method(capsys):
    assert main(["plan", str(EXAMPLE), "--json", "--memory-gb", "1"]) == 0
    out = json.loads(capsys.readouterr().out)
    methods = {r["method"] for r in out["rows"]}
    assert {"exact", "ekfac", "cg", "projection 1024"} <= methods
    assert out["num_params"] == 2410 and out["n_train"] == 600 and out["seconds_per_pass"] > 0
    exact = next(r for r in out["rows"] if r["method"] == "exact")
    assert exact["stored_bytes"] == 8 * (2410**2 + 2410) and exact["fits"]
    assert out["recommended"] == "exact"
    assert (
        main(["plan", str(EXAMPLE), "--memory-gb", "0.02"]) == 0
    )  # exact (~90 MiB) no longer fits
    assert "recommended: cg" in capsys.readouterr().out


@pytest.mark.parametrize("command", [[], ["demo"], ["score"], ["plan"], ["report"], ["bench"]])
def test_help(command, capsys):
    with pytest.raises(SystemExit) as exit_:
        main([*command, "--help"])
    assert exit_.value.code == 0
    assert "usage: headwater" in capsys.readouterr().out


_RUN_SPEC = """
import torch
from torch import nn
from headwater.task import ClassificationTask
from headwater.train import Recorder

gen = torch.Generator().manual_seed(0)
x = torch.randn(40, 5, generator=gen)
y = (x[:, 0] > 0).long()
torch.manual_seed(0)
model = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 2))
task = ClassificationTask()
opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
recorder = Recorder(model, opt, n_train=40, checkpoint_every=4)
for idx in [i for _ in range(3) for i in torch.randperm(40, generator=gen).split(10)]:
    opt.zero_grad()
    task.train_loss(model, (x[idx], y[idx])).mean().backward()
    recorder.step(idx)
run = recorder.finish(RUN_PATH)
run = RUN_PATH
train = (x, y)
query = (x[:3].clone(), y[:3].clone())
"""


def test_score_with_a_recorded_run_in_the_spec(tmp_path, monkeypatch, capsys):
    """``headwater score --method metagradient`` reads the spec's ``run`` (a saved path) and
    gives the API's exact metagradient scores; without ``run`` it stops with one line."""
    from headwater.cli.score import load_spec
    from headwater.methods.metagradient import Metagradient
    from headwater.train import load_run

    run_path = tmp_path / "run"
    (tmp_path / "spec.py").write_text(f"RUN_PATH = {str(run_path)!r}\n" + _RUN_SPEC)
    (tmp_path / "norun.py").write_text(
        (tmp_path / "spec.py").read_text().replace("run = RUN_PATH\n", "del run\n")
    )
    monkeypatch.chdir(tmp_path)
    assert (
        main(
            [
                "score",
                "spec.py",
                "--method",
                "metagradient",
                "--no-self-influence",
                "--quiet",
                "-o",
                "out",
            ]
        )
        == 0
    )
    spec = load_spec(str(tmp_path / "spec.py"))
    model, train, query, task = spec.parts()
    want = Metagradient(model, task, load_run(run_path)).scores(query, train)
    got = load_result(tmp_path / "out").scores
    assert want.abs().max() > 0
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6 * float(want.abs().max()))
    assert list((tmp_path / "out").glob("metagradient-block0.*"))  # resumable reverse pass
    args = ["score", "spec.py", "--method", "metagradient", "--no-self-influence", "--quiet"]
    assert main([*args, "--method-option", "normalization=n", "-o", "n"]) == 0
    want = Metagradient(model, task, load_run(run_path), normalization="n").scores(query, train)
    got = load_result(tmp_path / "n").scores
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6 * float(want.abs().max()))
    assert main([*args, "--method-option", "normalisation=n", "-o", "bad"]) == 2
    assert "--method-option: unknown option 'normalisation'" in capsys.readouterr().err
    assert (
        main(
            [
                "score",
                "norun.py",
                "--method",
                "metagradient",
                "--no-self-influence",
                "--quiet",
                "-o",
                "o2",
            ]
        )
        == 2
    )
    assert "needs `run`" in capsys.readouterr().err
