"""Runner and CLI: parameter validation before execution, profiles, skipping, failure reporting."""

import json
import re

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
    monkeypatch.setattr(runner, "RUNS", tmp_path / "runs")
    monkeypatch.setattr(runner, "FAILED", tmp_path / "failed")
    monkeypatch.setenv("LAYERWISE_RESULTS", str(tmp_path / "results"))
    monkeypatch.setenv("LAYERWISE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("LAYERWISE_PROGRESS", "0")
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

    skipped = runner.run(["baselines"], "smoke")[0]
    assert skipped.status == "skipped" and "unchanged" in skipped.reason and "--force" in skipped.reason
    assert runner.run(["baselines"], "smoke", {"n": 2})[0].status == "ran"

    failed = runner.run(["baselines"], "smoke", {"fail": True})[0]
    assert failed.status == "failed"
    assert "RuntimeError: boom" in failed.error and "cell" in failed.error
    assert failed.output.parent == sandbox / "failed" and failed.output.exists()
    # what finished before is kept, and the profile's own results were never touched by the override runs
    assert (sandbox / "smoke/baselines.ipynb").exists()
    assert json.loads((sandbox / "results/baselines/smoke/summary.json").read_text())["params"]["n"] == 1


def _tree(folder):
    return {p.relative_to(folder): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_override_and_failed_runs_never_replace_the_profile_results(sandbox):
    """Issue 13.4: a run with -p overrides, or a failed one, leaves results/<slug>/<profile>/ and the book alone."""
    assert runner.run(["baselines"], "default")[0].status == "ran"
    committed = sandbox / "results/baselines/default"
    book_nb = sandbox / "book/experiments/baselines.ipynb"
    before, nb_before = _tree(committed), book_nb.read_bytes()

    over = runner.run(["baselines"], "default", {"n": 2})[0]
    assert over.status == "ran" and over.label.startswith("default+") and len(over.label) == len("default+") + 8
    own = sandbox / "results/baselines" / over.label
    assert json.loads((own / "summary.json").read_text())["params"]["n"] == 2
    assert (own / "baselines.ipynb").exists() and over.output == own / "baselines.ipynb"
    assert json.loads((own / "run.json").read_text())["overrides"] == {"n": 2}
    assert runner.run(["baselines"], "default", {"n": 2})[0].status == "skipped"  # the override run is cached too

    failed = runner.run(["baselines"], "default", force=True, overrides=None)[0]
    assert failed.status == "ran"  # a plain forced re-run republishes
    before, nb_before = _tree(committed), book_nb.read_bytes()
    failed = runner.run(["baselines"], "default", {"fail": True})[0]
    assert failed.status == "failed"
    assert _tree(committed) == before and book_nb.read_bytes() == nb_before
    assert not list((sandbox / "book/experiments").glob("*.failed.ipynb"))
    assert not list((sandbox / "book/experiments").glob(".*"))  # nothing half-run inside the book
    assert runner.run(["baselines"], "default")[0].status == "skipped"  # still the last good run


def test_a_later_success_removes_the_failure_record(sandbox):
    assert runner.run(["baselines"], "default", {"fail": True})[0].status == "failed"
    assert list((sandbox / "failed").glob("baselines-*.ipynb"))
    # once the same parameters succeed (here: the notebook no longer fails), the stale record goes
    nb = sandbox / "notebooks/baselines.ipynb"
    nb.write_text(nb.read_text().replace("raise RuntimeError", "print"))
    assert runner.run(["baselines"], "default", {"fail": True})[0].status == "ran"
    assert not list((sandbox / "failed").glob("baselines-*"))


LIST_PARAMS = PARAMS + '''
ks = [3, 2]  # blocks kept; range: 1..6
grid = [0.5, 1.0]  # values tried; range: 0.001..100
extra = []  # optional sizes; range: 1..6; items: int; length: 0..
names = ["a", "b"]  # choices: a, b, c
pair = [0, 1]  # at least two; range: 0..1000; length: 2..3'''


@pytest.fixture()
def list_sandbox(sandbox):
    nb = nbformat.read(sandbox / "notebooks/baselines.ipynb", as_version=4)
    nb.cells[0].source = LIST_PARAMS
    nbformat.write(nb, sandbox / "notebooks/baselines.ipynb")
    return sandbox


@pytest.mark.parametrize("override, message", [
    ({"ks": []}, "has 0 element(s) but needs at least 1"),
    ({"ks": [-1]}, "outside its range"),
    ({"ks": [7]}, "outside its range 1..6"),
    ({"ks": ["a"]}, "every element of ks must be int"),
    ({"ks": [1.5]}, "every element of ks must be int"),
    ({"ks": [2, 2]}, "repeats an element"),
    ({"grid": []}, "needs at least 1"),
    ({"names": ["z"]}, "not one of a, b, c"),
    ({"pair": [0]}, "needs between 2 and 3"),
    ({"pair": [0, 1, 2, 3]}, "needs between 2 and 3"),
    ({"extra": ["x"]}, "every element of extra must be int"),
    ({"ks": 3}, "must be list[int]"),
])
def test_list_parameters_are_validated(list_sandbox, override, message):
    """Issue 13.3: list length, element type and element range are checked before anything runs."""
    with pytest.raises(runner.ParameterError, match=re.escape(message)):
        runner.run(["baselines"], "default", override)
    assert not (list_sandbox / "book").exists()


def test_valid_lists_are_accepted_and_normalised(list_sandbox):
    got = runner.resolve("baselines", "default", {"grid": [1, 2], "extra": [], "ks": (4, 5)})
    assert got["grid"] == [1.0, 2.0] and all(isinstance(v, float) for v in got["grid"])
    assert got["extra"] == [] and got["ks"] == [4, 5]


def test_an_empty_list_default_must_name_its_element_type(sandbox):
    nb = nbformat.read(sandbox / "notebooks/baselines.ipynb", as_version=4)
    nb.cells[0].source = PARAMS + "\nextra = []  # no element type"
    nbformat.write(nb, sandbox / "notebooks/baselines.ipynb")
    with pytest.raises(runner.LayerwiseError, match="items: int"):
        runner.notebook_params("baselines")


@pytest.mark.parametrize("args", [
    ["-p", "seeds=[]"], ["-p", "seeds=[-1]"], ["-p", 'seeds=["a"]'], ["-p", "bow_c_grid=[]"], ["-p", "seeds=[0]"],
])
def test_real_chapters_refuse_bad_lists_fast(args, capsys):
    """The issue's cases on the real notebooks: exit 2 with a message naming the parameter, before any work."""
    import time

    start = time.perf_counter()
    assert cli.main(["run", "baselines", *args]) == 2
    err = capsys.readouterr().err
    assert time.perf_counter() - start < 5 and args[1].split("=")[0] in err
    for slug, arg in (("theoretical_validation", "lm_ks=[100]"), ("compression", "minilm_keeps=[]"),
                      ("theoretical_validation", "seeds=[0]")):
        assert cli.main(["run", slug, "-p", arg]) == 2
    assert "at least two" in capsys.readouterr().err  # a single seed is refused with the reason


def test_unwritable_cache_fails_before_running_and_names_the_variable(sandbox, monkeypatch, capsys):
    blocker = sandbox / "a-file"
    blocker.write_text("")
    monkeypatch.setenv("LAYERWISE_CACHE", str(blocker / "cache"))
    assert cli.main(["run", "baselines"]) == 2
    err = capsys.readouterr().err
    assert "LAYERWISE_CACHE" in err and "writable" in err and "Traceback" not in err
    assert not (sandbox / "results/baselines").exists() and not (sandbox / "book").exists()


def test_ctrl_c_prints_one_line_saying_what_was_kept(sandbox, monkeypatch, capsys):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(runner, "run_one", interrupted)
    assert cli.main(["run", "baselines"]) == 130
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "interrupted during baselines" in err[0] and "again to resume" in err[0]


def test_stale_staging_and_leftovers_are_cleaned_at_the_next_start(sandbox):
    stage = sandbox / "runs/baselines/default"
    stage.mkdir(parents=True)
    (stage / "baselines.ipynb").write_text("{}")
    (sandbox / "runs/baselines/default.lock").write_text("")
    half = sandbox / "results/baselines/.default.incoming"
    half.mkdir(parents=True)
    old_style = sandbox / "book/experiments/.baselines.running.ipynb"
    old_style.parent.mkdir(parents=True)
    old_style.write_text("{}")
    removed = runner.clean_stale()
    assert {stage, half, old_style} <= set(removed)
    assert not stage.exists() and not half.exists() and not old_style.exists()


def test_book_no_run_refuses_overrides(sandbox, capsys):
    assert cli.main(["book", "--no-run", "-p", "n=2"]) == 2
    assert "no effect with --no-run" in capsys.readouterr().err


def test_list_examples_are_shell_quoted(sandbox):
    with pytest.raises(runner.ParameterError, match=re.escape("Example: -p 'seeds=[0, 1]'")):
        runner.resolve("baselines", "default", {"seeds": "x"})
    with pytest.raises(runner.ParameterError, match="n_bootstrap=2000") as err:
        runner.parse_override("n5")
    assert "n_seeds" not in str(err.value)


def test_progress_relay_shows_kernel_loops_on_the_console(tmp_path, monkeypatch, capsys):
    """Issue 13.2: inside a notebook, loop bars go to the relay file (not the page); the runner prints them."""
    import time

    from analysis_kit import device

    relay = tmp_path / "progress"
    monkeypatch.setenv("LAYERWISE_PROGRESS", "0")  # the kernel's own stderr stays quiet
    monkeypatch.setenv("LAYERWISE_PROGRESS_FILE", str(relay))
    with runner._ProgressRelay(relay, every=0.05):
        for _ in device.progress(range(3), desc="fine-tune seed 0", mininterval=0):
            time.sleep(0.02)
        time.sleep(0.3)
    assert "fine-tune seed 0" in relay.read_text()
    assert "fine-tune seed 0" in capsys.readouterr().err


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


def test_kernel_notices_stay_off_the_console(sandbox, capfd):
    """Issue 13.2: the kernel's "TCP without encryption" start-up notice does not reach the console."""
    assert runner.run(["baselines"], "default")[0].status == "ran"
    captured = capfd.readouterr()
    assert "without encryption" not in captured.err + captured.out


def test_published_paths_name_the_final_place_not_the_staging_folder(sandbox, monkeypatch):
    """Paths a notebook records while it runs in staging must point where the results are published."""
    from analysis_kit import paths

    stage = sandbox / "runs/baselines/default"
    monkeypatch.setenv("LAYERWISE_RUN_DIR", str(stage))
    monkeypatch.setenv("LAYERWISE_PUBLISH_AS", "baselines/default+abc")
    assert paths.published(stage / "models" / "m1") == sandbox / "results/baselines/default+abc/models/m1"
    assert paths.published(sandbox / "elsewhere") == sandbox / "elsewhere"
    assert paths.shown(paths.REPO_ROOT / "results" / "x") == "results/x"


def test_executed_notebooks_record_repository_relative_paths(sandbox):
    import nbformat as nbf

    res = runner.run(["baselines"], "default")[0]
    meta = nbf.read(res.output, as_version=4).metadata["papermill"]
    assert meta["input_path"] == "notebooks/baselines.ipynb" and "runs" not in meta["output_path"]


def test_imports_follow_subpackages_and_relative_imports():
    assert {"studies", "studies.baselines"} <= runner._imports("from analysis_kit.studies import baselines")
    got = runner._imports("from .. import dynamic\nfrom . import Result\nfrom .baselines import _task\n",
                          current="studies.dynamic_selection")
    assert {"dynamic", "studies", "studies.baselines"} <= got
    assert "x" in runner._imports("import analysis_kit.x")
    assert runner._imports("from ... import deep", current="a.b") == {"__init__"}  # above the package: ignored


def test_fingerprint_changes_with_the_code_of_a_study_module_and_what_it_imports(tmp_path, monkeypatch):
    import nbformat

    pkg = tmp_path / "analysis_kit"
    (pkg / "studies").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "helper.py").write_text("def f():\n    return 1\n")
    (pkg / "studies" / "__init__.py").write_text("")
    (pkg / "studies" / "chapter.py").write_text("from .. import helper\n\ndef run():\n    return helper.f()\n")
    nbs = tmp_path / "notebooks"
    nbs.mkdir()
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell("from analysis_kit.studies import chapter\nchapter.run()")]
    nbformat.write(nb, nbs / "x.ipynb")
    monkeypatch.setattr(runner, "REPO_ROOT", tmp_path)
    monkeypatch.setattr(runner, "NOTEBOOKS", nbs)
    first = runner._source_fingerprint("x")
    (pkg / "studies" / "chapter.py").write_text('"""Doc."""\nfrom .. import helper\n\ndef run():\n    return helper.f()\n')
    assert runner._source_fingerprint("x") == first  # a docstring is not code
    (pkg / "studies" / "chapter.py").write_text("from .. import helper\n\ndef run():\n    return helper.f() + 1\n")
    second = runner._source_fingerprint("x")
    assert second != first  # the study module's code
    (pkg / "helper.py").write_text("def f():\n    return 2\n")
    assert runner._source_fingerprint("x") != second  # what the study imports, transitively


@pytest.mark.parametrize("slug", runner.available())
def test_papermill_reads_every_parameter_of_the_cell(slug):
    """papermill must see each parameter (it warns "Passed unknown parameter" for a line it cannot parse, e.g. one
    whose comment holds an "="), or `-p` values would be injected without the cell's defaults being overridden
    visibly (the runner parses the cell itself, so this guards papermill's own view)."""
    import papermill as pm

    assert set(pm.inspect_notebook(str(runner.NOTEBOOKS / f"{slug}.ipynb"))) == set(runner.notebook_params(slug))
