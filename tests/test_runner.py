"""Runner and CLI: parameter validation before execution, profiles, skipping, failure reporting."""

import json

import nbformat
import pytest

from analysis_kit import cli, runner

PARAMS = '''profile = "default"  # choices: smoke, default, full
n = 3  # how many; range: 1..10
mode = "a"  # choices: a, b
rate = 0.5
seeds = [0, 1]
fail = False'''

BODY = '''from analysis_kit.report import Report
from analysis_kit import stats
rep = Report("baselines", profile, dict(n=n, mode=mode, rate=rate, seeds=seeds))
if fail:
    raise RuntimeError("boom")
rep.metric("n_times_rate", {"mean": n * rate, "ci_low": n * rate, "ci_high": n * rate, "n": 1, "unit": "", "method": "exact"})
rep.save()'''


@pytest.fixture()
def sandbox(tmp_path, monkeypatch):
    nbdir = tmp_path / "notebooks"
    nbdir.mkdir()
    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    cell = nbformat.v4.new_code_cell(PARAMS)
    cell.metadata["tags"] = ["parameters"]
    nb.cells = [cell, nbformat.v4.new_code_cell(BODY)]
    nbformat.write(nb, nbdir / "baselines.ipynb")
    (nbdir / "baselines.profiles.yml").write_text("smoke:\n  n: 1\n  seeds: [0]\nfull:\n  n: 9\n")
    monkeypatch.setattr(runner, "NOTEBOOKS", nbdir)
    monkeypatch.setattr(runner, "BOOK", tmp_path / "book")
    monkeypatch.setattr(runner, "SMOKE_OUT", tmp_path / "smoke")
    monkeypatch.setenv("LAYERWISE_RESULTS", str(tmp_path / "results"))
    return tmp_path


def test_parameters_cell_is_parsed(sandbox):
    params = runner.notebook_params("baselines")
    assert params["n"].default == 3 and (params["n"].lo, params["n"].hi) == (1.0, 10.0)
    assert params["mode"].choices == ("a", "b")
    assert runner.available() == ["baselines"]


def test_profiles_then_overrides(sandbox):
    assert runner.resolve("baselines", "smoke")["n"] == 1
    assert runner.resolve("baselines", "full", {"n": 4})["n"] == 4
    resolved = runner.resolve("baselines", "default", {"rate": 2})
    assert resolved["rate"] == 2.0 and isinstance(resolved["rate"], float)
    assert resolved["profile"] == "default"


@pytest.mark.parametrize("override, message", [
    ({"nn": 3}, "has no parameter 'nn'"),
    ({"n": "three"}, "must be int"),
    ({"n": 11}, "outside its range"),
    ({"mode": "c"}, "not one of a, b"),
    ({"fail": 1}, "True or False"),
    ({"seeds": [0, 20]}, None),
])
def test_bad_overrides_fail_before_execution(sandbox, override, message):
    if message is None:
        assert runner.resolve("baselines", "default", override)["seeds"] == [0, 20]
        return
    with pytest.raises(runner.ParameterError, match=message):
        runner.run(["baselines"], "default", override)
    assert not (sandbox / "book").exists()  # nothing executed


def test_unknown_experiment_and_profile(sandbox):
    with pytest.raises(runner.LayerwiseError, match="unknown experiment"):
        runner.resolve("nope", "default")
    with pytest.raises(runner.ParameterError, match="unknown profile"):
        runner.resolve("baselines", "huge")


def test_parse_override():
    assert runner.parse_override("n=5") == ("n", 5)
    assert runner.parse_override("seeds=[1,2]") == ("seeds", [1, 2])
    assert runner.parse_override("mode=b") == ("mode", "b")
    with pytest.raises(runner.ParameterError):
        runner.parse_override("n5")


def test_run_writes_summary_then_skips_then_reports_failure(sandbox):
    first = runner.run(["baselines"], "smoke")[0]
    assert first.status == "ran", first.error
    summary = json.loads((sandbox / "results/baselines/smoke/summary.json").read_text())
    assert summary["profile"] == "smoke" and summary["params"]["n"] == 1
    assert summary["metrics"]["n_times_rate"]["mean"] == 0.5
    assert {"git_commit", "versions", "device", "start_time", "duration_s"} <= set(summary["provenance"])
    assert (sandbox / "smoke/baselines.ipynb").exists()

    assert runner.run(["baselines"], "smoke")[0].status == "skipped"
    assert runner.run(["baselines"], "smoke", {"n": 2})[0].status == "ran"

    failed = runner.run(["baselines"], "smoke", {"fail": True})[0]
    assert failed.status == "failed"
    assert "RuntimeError: boom" in failed.error and "cell" in failed.error
    assert failed.output.name == "baselines.failed.ipynb" and failed.output.exists()
    # what finished before is kept
    assert (sandbox / "smoke/baselines.ipynb").exists()
    assert json.loads((sandbox / "results/baselines/smoke/summary.json").read_text())["params"]["n"] == 2


def test_cli_reports_bad_parameter_with_exit_2(sandbox, capsys):
    assert cli.main(["run", "baselines", "-p", "n=0"]) == 2
    assert "outside its range" in capsys.readouterr().err


def test_cli_list(sandbox, capsys):
    assert cli.main(["list"]) == 0
    out = capsys.readouterr().out
    assert "n (int, default 3) how many; range: 1..10" in out and "[smoke] n=1" in out
    assert "range 1.0" not in out  # the range is stated once, as written in the notebook


def test_code_digest_ignores_comments_and_docstrings_but_not_code():
    base = 'def f(x):\n    """Double."""\n    return 2 * x  # twice\n'
    same = '"""Module doc."""\n\n\ndef f(x):\n    """Twice x, reworded."""\n    # a new comment\n    return 2 * x\n'
    other = 'def f(x):\n    """Double."""\n    return 3 * x\n'
    assert runner.code_digest(base) == runner.code_digest(same)
    assert runner.code_digest(base) != runner.code_digest(other)
    assert runner.code_digest("def f(:\n") != runner.code_digest("def f(): pass\n")  # unparsable: bytes
    only_doc = 'def g():\n    """Only a docstring."""\n'
    assert runner.code_digest(only_doc) == runner.code_digest("def g():\n    pass\n")


@pytest.mark.parametrize("slug", runner.EXPERIMENTS)
def test_every_profile_of_every_chapter_resolves(slug):
    """The real chapters' profile files name only existing parameters with valid types and ranges, so a
    `full` run (GPU) fails neither on a typo nor on an out-of-range value after hours of other work."""
    for profile in runner.PROFILES:
        params = runner.resolve(slug, profile)
        assert params.get("profile", profile) == profile
    smoke, default = runner.resolve(slug, "smoke"), runner.resolve(slug, "default")
    assert smoke != default, f"{slug}: the smoke profile overrides nothing"
