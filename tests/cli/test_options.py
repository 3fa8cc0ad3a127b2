"""The command line's options: defaults that depend on the method, `--config` files checked as
the flags are, options checked before any long step, and the help and errors of each command.

In process (`main([...])`, which returns the exit status) on tiny specs, so they run in seconds.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

import headwater.cli.demo as demo_cli
import headwater.cli.score as score_cli
from headwater.cli.common import seed_all
from headwater.cli.main import build_parser, main
from headwater.report import load_result

ROOT = Path(__file__).resolve().parents[2]

_SPEC = """
import torch
from torch import nn
from headwater.task import ClassificationTask

gen = torch.Generator().manual_seed(0)
x = torch.randn(30, 4, generator=gen)
y = (x[:, 0] > 0).long()
torch.manual_seed(0)
model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 2))
task = ClassificationTask()
train = (x, y)
query = (x[:4].clone(), y[:4].clone())
"""

_RUN = """
from headwater.train import Recorder

opt = torch.optim.SGD(model.parameters(), lr=0.1)
recorder = Recorder(model, opt, n_train=30, checkpoint_every=3)
for idx in [i for _ in range(2) for i in torch.randperm(30, generator=gen).split(10)]:
    opt.zero_grad()
    task.train_loss(model, (x[idx], y[idx])).mean().backward()
    recorder.step(idx)
run = recorder.finish()
"""

_TRAJECTORY = """
from headwater.train import SGDConfig, train_sgd

trajectory = train_sgd(model, task, train, SGDConfig(lr=0.1, epochs=2, batch_size=10))
"""


def _spec(tmp_path: Path, extra: str = "", name: str = "spec.py") -> Path:
    path = tmp_path / name
    path.write_text(_SPEC + extra)
    return path


def _one_line_error(capsys) -> str:
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and "error" in lines[0] and "Traceback" not in err, err
    return lines[0]


def _no_long_step(monkeypatch) -> None:
    """Fail the test if the command reaches the attribution (score) or the training (demo)."""

    def reached(*args, **kwargs):
        pytest.fail("an option was checked only after the long step began")

    monkeypatch.setattr(score_cli, "attribute", reached)
    monkeypatch.setattr(demo_cli, "train_model", reached)
    monkeypatch.setattr(demo_cli, "attribute", reached)


# -- D9: self-influence follows the method -------------------------------------------


def _scores_as_the_estimator(tmp_path, spec, args, estimator, recorded: str) -> None:
    """``headwater score spec args`` succeeds without self-influence and its scores equal
    ``estimator(model, task, spec's <recorded>)`` called directly."""
    assert main(["score", str(spec), *args]) == 0
    result = load_result(tmp_path / args[-1])
    assert result.self_influence is None
    loaded = score_cli.load_spec(str(spec))
    model, train, query, task = loaded.parts()
    want = estimator(model, task, loaded.get(recorded)).scores(query, train)
    torch.testing.assert_close(result.scores, want, rtol=1e-5, atol=1e-6 * float(want.abs().max()))


def test_metagradient_runs_without_self_influence_by_default(tmp_path, monkeypatch, capsys):
    """README's `headwater score spec.py --method metagradient` as written: no self-influence
    flag needed; an explicit --self-influence is refused in one line naming the way out."""
    from headwater.methods.metagradient import Metagradient

    spec = _spec(tmp_path, _RUN)
    monkeypatch.chdir(tmp_path)
    args = ["--method", "metagradient", "--quiet", "-o", "mg"]
    _scores_as_the_estimator(tmp_path, spec, args, Metagradient, "run")

    args = ["score", str(spec), "--method", "metagradient", "--self-influence", "-o", "bad"]
    assert main(args) == 2
    line = _one_line_error(capsys)
    assert "--self-influence: not defined for method='metagradient'" in line
    assert "--no-self-influence" in line


def test_hydra_runs_on_the_specs_trajectory_without_self_influence(tmp_path, monkeypatch, capsys):
    from headwater.methods.hydra import Hydra

    spec = _spec(tmp_path, _TRAJECTORY)
    monkeypatch.chdir(tmp_path)
    args = ["--method", "hydra", "--quiet", "--no-report", "-o", "h"]
    _scores_as_the_estimator(tmp_path, spec, args, Hydra, "trajectory")
    # without a trajectory in the spec: one line, before anything is fitted
    assert main(["score", str(_spec(tmp_path, name="plain.py")), "--method", "hydra"]) == 2
    assert "spec: --method hydra needs `trajectory`" in _one_line_error(capsys)


def test_influence_still_scores_self_influence_by_default(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    args = ["score", str(_spec(tmp_path)), "--curvature", "exact", "--quiet", "--no-report"]
    assert main([*args, "-o", "on"]) == 0
    assert load_result(tmp_path / "on").self_influence.shape == (30,)
    assert main([*args, "--no-self-influence", "-o", "off"]) == 0
    assert load_result(tmp_path / "off").self_influence is None


# -- D10: --config files ------------------------------------------------------------------

BAD_CONFIGS = {
    "array": ([], "expected a JSON object (a run's config.json), got an array"),
    "string": ("x", 'expected a JSON object (a run\'s config.json), got the string "x"'),
    "null": (None, "expected a JSON object (a run's config.json), got null"),
    "no command": ({"args": {"damping": 0.1}}, 'no "command" (expected "score")'),
    "other command": ({"command": "demo", "args": {}}, "is a 'demo' run, not 'score'"),
    "command not a string": ({"command": 3, "args": {}}, '"command": expected "score"'),
    "args not an object": ({"command": "score", "args": [1]}, '"args": expected an object'),
    "no args": ({"command": "score"}, '"args": expected an object'),
    "options not a list": (
        {"command": "score", "args": {"curvature_options": "rank=3"}},
        "args.curvature_options (--curvature-option): expected an array of strings KEY=VALUE",
    ),
    "option not KEY=VALUE": (
        {"command": "score", "args": {"curvature_options": [1, 2]}},
        "args.curvature_options (--curvature-option): expected KEY=VALUE, got '1'",
    ),
    "damping not a number": (
        {"command": "score", "args": {"damping": "x"}},
        'args.damping (--damping): expected a number, got the string "x"',
    ),
    "top-k not an integer": (
        {"command": "score", "args": {"top_k": 2.5}},
        "args.top_k (--top-k): expected an integer, got the number 2.5",
    ),
    "projection not K or KOUTxKIN": (
        {"command": "score", "args": {"projection": [512]}},
        "args.projection (--projection): expected a string K or KOUTxKIN",
    ),
    "projection malformed": (
        {"command": "score", "args": {"projection": "3x"}},
        "args.projection (--projection): expected K or KOUTxKIN (positive integers",
    ),
    "switch not a bool": (
        {"command": "score", "args": {"report": "yes"}},
        'args.report (--no-report): expected true or false, got the string "yes"',
    ),
    "queries not integers": (
        {"command": "score", "args": {"queries": [1, "a"]}},
        'args.queries (--queries): expected an integer, got the string "a"',
    ),
    "unknown option": (
        {"command": "score", "args": {"dampin": 0.1}},
        "args.dampin: not an option of `headwater score`",
    ),
    "not an option at all": (
        {"command": "score", "args": {"func": "x"}},
        "args.func: not an option of `headwater score`",
    ),
}


@pytest.mark.parametrize("case", BAD_CONFIGS)
def test_a_damaged_config_ends_in_one_line(case, tmp_path, monkeypatch, capsys):
    content, message = BAD_CONFIGS[case]
    (tmp_path / "c.json").write_text(json.dumps(content))
    monkeypatch.chdir(tmp_path)
    _no_long_step(monkeypatch)
    assert main(["score", str(_spec(tmp_path)), "--config", "c.json", "-o", "x"]) == 2
    line = _one_line_error(capsys)
    assert line.startswith("headwater: error: --config: c.json: ")
    assert message in line


def test_config_values_go_through_the_flags_conversion(tmp_path, monkeypatch):
    """A hand-written config's values are read as the flags read their text (a number for
    --projection, a string for --damping), then checked by the flags' own rules."""
    spec = _spec(tmp_path)
    config = {"command": "score", "args": {"projection": 8, "damping": "0.5", "top_k": "2"}}
    (tmp_path / "c.json").write_text(json.dumps(config))
    monkeypatch.chdir(tmp_path)
    assert (
        main(["score", str(spec), "--config", "c.json", "--quiet", "--no-report", "-o", "o"]) == 0
    )
    saved = json.loads((tmp_path / "o" / "config.json").read_text())["args"]
    assert (saved["projection"], saved["damping"], saved["top_k"]) == ("8", 0.5, 2)
    assert load_result(tmp_path / "o").settings["projection"]["dim"] == 8


def test_a_score_run_reruns_from_its_config_alone(tmp_path, monkeypatch):
    """The `reproduce` line of a score run's config.json (`headwater score --config ...`, no
    spec) reruns it: the spec comes from the config."""
    spec = _spec(tmp_path)
    monkeypatch.chdir(tmp_path)
    args = ["--curvature", "exact", "--damping", "0.1", "--quiet", "--no-report"]
    assert main(["score", str(spec), *args, "-o", "first"]) == 0
    config = json.loads((tmp_path / "first" / "config.json").read_text())
    assert config["reproduce"] == f"headwater score --config {Path('first') / 'config.json'}"
    assert main(["score", "--config", "first/config.json", "--quiet", "-o", "again"]) == 0
    assert torch.equal(
        load_result(tmp_path / "again").scores, load_result(tmp_path / "first").scores
    )


# -- D11: flags checked early, with messages that name them ------------------------------


@pytest.mark.parametrize(
    ("flag", "value", "message"),
    [
        ("--curvature-option", "nokey", "argument --curvature-option: expected KEY=VALUE"),
        ("--method-option", "nokey", "argument --method-option: expected KEY=VALUE"),
        ("--projection", "abc", "argument --projection: expected K or KOUTxKIN"),
        ("--projection", "3x", "argument --projection: expected K or KOUTxKIN"),
        ("--projection", "0", "argument --projection: expected K or KOUTxKIN"),
    ],
)
def test_malformed_flags_name_the_flag_and_the_expected_form(
    flag, value, message, tmp_path, monkeypatch, capsys
):
    monkeypatch.chdir(tmp_path)
    assert main(["score", str(_spec(tmp_path)), flag, value, "-o", "x"]) == 2
    line = _one_line_error(capsys)
    assert message in line and "---" not in line and "int()" not in line
    assert line.startswith("headwater score: error:") and "(see headwater score --help)" in line


@pytest.mark.parametrize(
    ("command", "args", "message"),
    [
        ("score", ["--queries", "9999"], "--queries: indices [9999] are outside [0, 4)"),
        (
            "score",
            ["--top-k", "1000"],
            "--top-k: asked for 1000 but there are only 30 training examples",
        ),
        ("demo", ["--queries", "40"], "--queries: indices [40] are outside [0, 40)"),
        (
            "demo",
            ["--top-k", "301"],
            "--top-k: asked for 301 but there are only 300 training examples",
        ),
    ],
)
def test_queries_and_top_k_are_checked_before_the_long_step(
    command, args, message, tmp_path, monkeypatch, capsys
):
    monkeypatch.chdir(tmp_path)
    _no_long_step(monkeypatch)
    where = [str(_spec(tmp_path))] if command == "score" else ["--n-train", "300", "--n-test", "40"]
    assert main([command, *where, *args, "-o", "x"]) == 2
    assert message in _one_line_error(capsys)


@pytest.mark.parametrize("method", ["tracin", "metagradient", "hydra"])
def test_a_curvature_given_to_a_method_without_one_is_refused(
    method, tmp_path, monkeypatch, capsys
):
    monkeypatch.chdir(tmp_path)
    _no_long_step(monkeypatch)
    spec = _spec(tmp_path, _RUN + _TRAJECTORY)
    assert main(["score", str(spec), "--method", method, "--curvature", "ekfac", "-o", "x"]) == 2
    assert f"--curvature: not used by method={method!r}" in _one_line_error(capsys)


def test_the_log_names_a_curvature_only_for_methods_that_use_one(tmp_path, monkeypatch, capsys):
    spec = _spec(tmp_path, _RUN)
    monkeypatch.chdir(tmp_path)
    assert main(["score", str(spec), "--method", "tracin", "--no-report", "-o", "t"]) == 0
    line = next(x for x in capsys.readouterr().err.splitlines() if x.startswith("scoring with"))
    assert line == "scoring with method=tracin"
    assert main(["score", str(spec), "--curvature", "exact", "--no-report", "-o", "i"]) == 0
    line = next(x for x in capsys.readouterr().err.splitlines() if x.startswith("scoring with"))
    assert line.startswith("scoring with method=influence, curvature=exact (ggn)")
    saved = json.loads((tmp_path / "t" / "config.json").read_text())["args"]
    assert saved["curvature"] == "auto"  # no curvature recorded for TracIn: its config reruns


def test_score_help_gives_the_default_output_folder(capsys):
    _, commands = build_parser()
    (out,) = [a for a in commands["score"]._actions if a.dest == "out"]
    assert out.default is None and not out.required  # derived from the spec at run time
    assert "(required)" not in out.help
    assert out.help.endswith("(default: headwater-out/<spec name>)")
    assert "(default: headwater-out/<spec name>)" in " ".join(
        commands["score"].format_help().split()
    )


def test_a_directory_is_not_a_spec(tmp_path, capsys):
    assert main(["score", str(tmp_path), "-o", str(tmp_path / "x")]) == 2
    assert f"spec: {tmp_path} is a directory; expected a spec file" in _one_line_error(capsys)


def _readme_options() -> dict[str, set[str]]:
    """README's list of the options each command takes: ``{command: {--flag, ...}}``."""
    text = (ROOT / "README.md").read_text()
    start = text.index("<!-- cli-options -->")
    end = text.index("<!-- /cli-options -->")
    options: dict[str, set[str]] = {}
    for line in text[start:end].splitlines():
        if line.startswith("| `"):
            commands, flags = line.split("|")[1:3]
            for command in re.findall(r"`([a-z]+)`", commands):
                options.setdefault(command, set()).update(re.findall(r"`(--[a-z-]+)", flags))
    return options


def test_the_readme_lists_the_options_each_command_takes():
    _, commands = build_parser()
    listed = _readme_options()
    assert set(listed) == {"demo", "score", "plan", "report"}
    for command, flags in listed.items():
        taken = {s for a in commands[command]._actions for s in a.option_strings}
        taken = {s for s in taken if s.startswith("--")} - {"--traceback"}  # --debug's alias
        assert flags == taken, (command, flags ^ taken)
    for command in ("demo", "score", "plan"):  # the commands that run the user's model
        assert {"--seed", "--device", "--threads"} <= listed[command]


def test_plan_takes_the_seed_device_and_threads_of_score(tmp_path, capsys):
    """plan runs the spec after seeding as score does: a spec drawing its size at random plans
    the data score would attribute."""
    spec = tmp_path / "random_size.py"
    spec.write_text("import torch\nn = int(torch.randint(10, 30, (1,)))\n" + _SPEC)
    spec.write_text(spec.read_text() + "train = (x[:n], y[:n])\n")
    args = ["plan", str(spec), "--json", "--threads", "1", "--device", "cpu"]
    planned = []
    for seed in (1, 2):
        assert main([*args, "--seed", str(seed)]) == 0
        planned.append(json.loads(capsys.readouterr().out)["n_train"])
        seed_all(seed)
        assert planned[-1] == score_cli.load_spec(str(spec)).module.n
    assert planned[0] != planned[1]


@pytest.mark.parametrize(
    ("argv", "command"),
    [
        (["report", "somewhere", "--threads", "2"], "report"),
        (["plan", "spec.py", "--method", "tracin"], "plan"),
        (["score", "spec.py", "--no-such-flag"], "score"),
    ],
)
def test_argument_errors_point_at_the_commands_help(argv, command, capsys):
    assert main(argv) == 2
    line = _one_line_error(capsys)
    assert line.startswith(f"headwater {command}: error: unrecognized arguments")
    assert line.endswith(f"(see headwater {command} --help)")
