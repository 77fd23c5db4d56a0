"""The findings page (analysis_kit.studies.findings): it quotes the chapters' published results, labels stale
chapters, gathers the summary figure's points; and the runner re-runs it when a quoted summary changes."""

from __future__ import annotations

import json

import nbformat
import pandas as pd
import pytest

from analysis_kit import plots, runner
from analysis_kit.errors import LayerwiseError
from analysis_kit.report import fmt_ci
from analysis_kit.studies import findings as F

PROFILE = "smoke"
ANSWER = "our answer (95% interval)"

ACC = {"minilm": {"mean": .889, "ci_low": .863, "ci_high": .912},
       "bow": {"mean": .812, "ci_low": .781, "ci_high": .843},
       "vader": {"mean": .701, "ci_low": .668, "ci_high": .734}}
SPEEDUP = {"mean": 1.843, "ci_low": 1.712, "ci_high": 1.968}
LOSS = {"mean": 0.61, "ci_low": -0.23, "ci_high": 1.38}
SECONDS = {"minilm": 12.0, "bow": 0.5, "vader": 1.5}
POLICIES = [
    {"model": "minilm", "task": "amazon", "policy": "patience 2", "b1_speedup": 1.843, "b1_low": 1.712,
     "b1_high": 1.968, "loss_points": 0.61, "loss_low": -0.23, "loss_high": 1.38},
    {"model": "minilm", "task": "amazon", "policy": "entropy 0.3", "b1_speedup": 1.31, "b1_low": 1.25,
     "b1_high": 1.37, "loss_points": 0.2, "loss_low": -0.4, "loss_high": 0.8},
    # no reference accuracy for this model: it has no point
    {"model": "tiny", "task": "amazon", "policy": "patience 1", "b1_speedup": 3.0, "b1_low": 2.9,
     "b1_high": 3.1, "loss_points": 5.0, "loss_low": 4.0, "loss_high": 6.0},
]


def write(results, slug: str, summary: dict, tables: dict[str, pd.DataFrame]) -> None:
    out = results / slug / PROFILE
    out.mkdir(parents=True, exist_ok=True)
    (out / "summary.json").write_text(json.dumps(summary))
    for name, df in tables.items():
        df.to_csv(out / f"{name}.csv", index=False)


@pytest.fixture()
def results(tmp_path, monkeypatch):
    """Published results of two chapters (baselines, dynamic_selection) in a private results tree."""
    root = tmp_path / "results"
    monkeypatch.setenv("LAYERWISE_RESULTS", str(root))
    monkeypatch.setattr(runner, "stale_chapters", lambda profile="default": {})
    write(root, "baselines",
          {"params": {"tasks": ["amazon"]},
           "metrics": {f"accuracy/{m}/amazon": rec for m, rec in ACC.items()}},
          {"comparisons": pd.DataFrame([
              {"a": "minilm", "b": "bow", "task": "amazon", "diff_points": 7.7, "ci_low": 4.1, "ci_high": 11.3},
              {"a": "minilm", "b": "vader", "task": "amazon", "diff_points": 18.8, "ci_low": 15.0, "ci_high": 22.6}]),
           "cost_summary": pd.DataFrame([{"task": "amazon", "model": m, "predict_seconds": s}
                                         for m, s in SECONDS.items()])})
    write(root, "dynamic_selection",
          {"params": {"goal_speedup": 1.5, "max_loss_points": 1.0},
           "metrics": {"headline/minilm/amazon/b1_speedup": SPEEDUP,
                       "headline/minilm/amazon/acc_loss_points": LOSS,
                       "reference/minilm/amazon/accuracy": ACC["minilm"]}},
          {"headline": pd.DataFrame([{"key": "minilm/amazon", "policies": "patience 2", "goal_met": True}]),
           "policies": pd.DataFrame(POLICIES)})
    return root


def stale(monkeypatch, *slugs: str) -> None:
    monkeypatch.setattr(runner, "stale_chapters", lambda profile="default": {s: "Stale page." for s in slugs})


def row(result, chapter: str) -> dict:
    table = result.tables["findings"]
    return table[table["chapter"] == chapter].iloc[0].to_dict()


def bullet_lines(text: str) -> list[str]:
    return [ln for ln in text.splitlines() if ln.startswith("- ")]


# ---------------------------------------------------------------------------------------------------------


def test_one_row_per_question_in_book_order(results):
    res = F.run(F.Params(profile=PROFILE))
    table = res.tables["findings"]
    assert list(table["chapter"]) == [q.chapter for q in F.QUESTIONS]
    assert list(table["question"]) == [q.question for q in F.QUESTIONS]
    assert {"original claim", "literature anchor", "verdict", "status", ANSWER} <= set(table.columns)
    assert res.values["n_fresh"] == 2
    assert set(F.ANSWERS) <= {q.chapter for q in F.QUESTIONS}


def test_fresh_answers_quote_the_chapters_numbers_in_the_book_format(results):
    res = F.run(F.Params(profile=PROFILE))
    base = row(res, "baselines")
    assert base["status"] == "measured under the evidence protocol"
    for m in ("minilm", "bow", "vader"):
        assert fmt_ci(ACC[m]) in base[ANSWER]
    assert "88.9 % [86.3, 91.2]" in base[ANSWER]
    assert base["verdict"] == "amazon: better than bag-of-words by +7.7 points [+4.1, +11.3]"

    dyn = row(res, "dynamic_selection")
    assert dyn["status"] == "measured under the evidence protocol"
    assert fmt_ci(SPEEDUP, 1, "×", 2) in dyn[ANSWER] and "1.84× [1.71, 1.97]" in dyn[ANSWER]
    assert fmt_ci(LOSS, 1, " points", 2, sign=True) in dyn[ANSWER] and "\u22120.23" in dyn[ANSWER]
    assert "minilm/amazon: goal met" in dyn["verdict"] and "1.5×" in dyn["verdict"]


@pytest.mark.parametrize("ci, word", [((-1.0, 3.0), "not distinguishable"), ((-5.0, -1.0), "worse")])
def test_the_baselines_verdict_follows_the_interval(results, ci, word):
    path = results / "baselines" / PROFILE / "comparisons.csv"
    pd.DataFrame([{"a": "minilm", "b": "bow", "task": "amazon", "diff_points": 1.0, "ci_low": ci[0],
                   "ci_high": ci[1]}]).to_csv(path, index=False)
    assert row(F.run(F.Params(profile=PROFILE)), "baselines")["verdict"].startswith(f"amazon: {word} than")


def test_a_stale_chapter_is_labelled_and_its_numbers_are_not_repeated(results, monkeypatch):
    stale(monkeypatch, "dynamic_selection")
    res = F.run(F.Params(profile=PROFILE))
    dyn = row(res, "dynamic_selection")
    assert dyn[ANSWER] == "not yet re-measured under the evidence protocol" and dyn["verdict"] == "open"
    assert dyn["status"].startswith("stale")
    everything = res.tables["findings"].to_csv() + res.values["key_findings"]
    for number in ("1.84", "1.71", "1.97", "0.61", "1.31"):
        assert number not in everything
    assert (res.tables["tradeoff"]["kind"] != "exit policy").all()
    assert res.values["n_fresh"] == 1
    assert row(res, "baselines")["status"] == "measured under the evidence protocol"


def test_a_chapter_never_run_is_not_run(results):
    res = F.run(F.Params(profile=PROFILE))
    qlora = row(res, "qlora")
    assert qlora["status"] == "not run" and qlora[ANSWER].startswith("not yet re-measured")


def test_tradeoff_points(results):
    pts = F.run(F.Params(profile=PROFILE)).tables["tradeoff"]
    assert list(pts.columns) == ["what", "kind", "task", "speedup", "speedup_low", "speedup_high", "kept",
                                 "kept_low", "kept_high"]
    ex = pts[pts["kind"] == "exit policy"].set_index("what")
    assert set(ex.index) == {"early exit: patience 2", "early exit: entropy 0.3"}  # "tiny" has no reference
    ref = ACC["minilm"]["mean"] * 100
    p2 = ex.loc["early exit: patience 2"]
    assert p2["kept"] == pytest.approx(100 * (ref - 0.61) / ref)
    assert p2["kept_low"] == pytest.approx(100 * (ref - 1.38) / ref)
    assert p2["kept_high"] == pytest.approx(100 * (ref + 0.23) / ref)
    assert (p2["speedup"], p2["speedup_low"], p2["speedup_high"]) == (1.843, 1.712, 1.968)

    simple = pts[pts["kind"] == "simple reference"].set_index("what")
    assert set(simple.index) == {"bag-of-words", "VADER"}
    assert simple.loc["bag-of-words", "speedup"] == pytest.approx(SECONDS["minilm"] / SECONDS["bow"])
    assert simple.loc["VADER", "speedup"] == pytest.approx(SECONDS["minilm"] / SECONDS["vader"])
    assert simple.loc["bag-of-words", "kept"] == pytest.approx(100 * ACC["bow"]["mean"] / ACC["minilm"]["mean"])
    assert simple["speedup_low"].isna().all()


def test_a_reference_without_timing_has_no_point(results):
    path = results / "baselines" / PROFILE / "cost_summary.csv"
    pd.DataFrame([{"task": "amazon", "model": "minilm", "predict_seconds": 12.0},
                  {"task": "amazon", "model": "bow", "predict_seconds": 0.0}]).to_csv(path, index=False)
    pts = F.run(F.Params(profile=PROFILE)).tables["tradeoff"]
    assert (pts["kind"] == "simple reference").sum() == 0


def test_key_findings_are_three_to_six_bullets_naming_the_fastest_policy(results):
    text = F.run(F.Params(profile=PROFILE)).values["key_findings"]
    lines = bullet_lines(text)
    assert 3 <= len(lines) <= 6 and len(lines) == len(text.splitlines())
    assert any("Fastest measured exit policy: early exit: patience 2 on amazon, 1.84× [1.71, 1.97]" in ln
               for ln in lines)
    assert lines[-1].startswith("- Also open, for the same reason:")


@pytest.mark.parametrize("stale_slugs", [("dynamic_selection",), ("baselines", "dynamic_selection")])
def test_key_findings_keep_three_bullets_when_chapters_are_stale(results, monkeypatch, stale_slugs):
    stale(monkeypatch, *stale_slugs)
    assert 3 <= len(bullet_lines(F.run(F.Params(profile=PROFILE)).values["key_findings"])) <= 6


def test_key_findings_fold_into_six_bullets_when_every_chapter_is_answered(results, monkeypatch):
    """The smoke book answers all seven questions: one bullet each would overflow the box, so the last bullet
    carries the rest."""
    stale(monkeypatch)
    monkeypatch.setattr(F, "_summary", lambda slug, profile: {"metrics": {}, "params": {}, "tests": []})
    monkeypatch.setattr(F, "ANSWERS", {q.chapter: (lambda s, p, c=q.chapter: (f"answer of {c}", "verdict"))
                                       for q in F.QUESTIONS})
    text = F.run(F.Params(profile=PROFILE)).values["key_findings"]
    lines = bullet_lines(text)
    assert len(lines) == 6 and len(lines) == len(text.splitlines())
    assert all(f"answer of {q.chapter}" in text for q in F.QUESTIONS)
    assert "answer of dynamic_selection" in lines[-1] and "answer of sensitivity" in lines[-1]


def test_no_results_at_all(tmp_path, monkeypatch):
    monkeypatch.setenv("LAYERWISE_RESULTS", str(tmp_path / "empty"))
    stale(monkeypatch)
    res = F.run(F.Params(profile=PROFILE))
    assert len(res.tables["findings"]) == len(F.QUESTIONS) and set(res.tables["findings"]["status"]) == {"not run"}
    assert res.tables["tradeoff"].empty and res.values["n_fresh"] == 0


def test_an_unknown_profile_is_refused():
    with pytest.raises(LayerwiseError, match="profile='huge'"):
        F.run(F.Params(profile="huge"))


# ---------------------------------------------------------------------------------------------------------
# plots.tradeoff


@pytest.mark.parametrize("with_anchors", [True, False])
def test_tradeoff_chart_builds(results, with_anchors):
    res = F.run(F.Params(profile=PROFILE))
    anchors = res.tables["anchors"] if with_anchors else pd.DataFrame(columns=["anchor", "speedup"])
    spec = plots.tradeoff(res.tables["tradeoff"], anchors).to_dict()
    marks = [layer["mark"]["type"] if isinstance(layer["mark"], dict) else layer["mark"] for layer in spec["layer"]]
    assert marks[0] == "point"
    assert ("text" in marks) is with_anchors
    assert len(marks) == (5 if with_anchors else 3)  # points, kept interval, speed-up interval (+ rule, label)


def test_tradeoff_chart_with_a_goal_and_no_intervals():
    pts = pd.DataFrame([{"what": "a", "kind": "exit policy", "task": "t", "speedup": 1.5, "speedup_low": None,
                         "speedup_high": None, "kept": 98.0, "kept_low": None, "kept_high": None}])
    spec = plots.tradeoff(pts, pd.DataFrame(columns=["anchor", "speedup"]), goal_kept=99.0).to_dict()
    assert len(spec["layer"]) == 2


# ---------------------------------------------------------------------------------------------------------
# runner: the findings page re-runs when a quoted chapter's results change


@pytest.fixture()
def nb_sandbox(tmp_path, monkeypatch):
    nbdir = tmp_path / "notebooks"
    nbdir.mkdir()
    for slug in ("findings", "baselines"):
        nb = nbformat.v4.new_notebook()
        nb.cells = [nbformat.v4.new_code_cell('profile = "default"'), nbformat.v4.new_code_cell("x = 1")]
        nbformat.write(nb, nbdir / f"{slug}.ipynb")
    monkeypatch.setattr(runner, "NOTEBOOKS", nbdir)
    monkeypatch.setattr(runner, "_source_fingerprint", lambda slug: "code")
    monkeypatch.setenv("LAYERWISE_RESULTS", str(tmp_path / "results"))
    return tmp_path / "results"


def put_summary(root, slug: str, profile: str, payload: dict) -> None:
    (root / slug / profile).mkdir(parents=True, exist_ok=True)
    (root / slug / profile / "summary.json").write_text(json.dumps(payload))


def test_findings_reads_every_chapter_but_itself():
    assert set(runner.READS_RESULTS["findings"]) == set(runner.EXPERIMENTS) - {"findings"}
    assert {q.chapter for q in F.QUESTIONS} <= set(runner.READS_RESULTS["findings"])


def test_findings_fingerprint_follows_the_quoted_summaries(nb_sandbox):
    params = {"profile": PROFILE}
    fp = lambda: runner.fingerprint("findings", PROFILE, params)  # noqa: E731
    before = fp()
    assert fp() == before
    put_summary(nb_sandbox, "baselines", PROFILE, {"metrics": {"m": 1}})
    created = fp()
    assert created != before
    put_summary(nb_sandbox, "dynamic_selection", PROFILE, {"metrics": {"m": 1}})
    second = fp()
    assert second != created
    put_summary(nb_sandbox, "baselines", PROFILE, {"metrics": {"m": 2}})
    assert fp() not in (before, created, second)
    put_summary(nb_sandbox, "baselines", PROFILE, {"metrics": {"m": 1}})
    assert fp() == second  # the same results give the same fingerprint


def test_other_profiles_and_own_results_do_not_change_the_fingerprint(nb_sandbox):
    params = {"profile": PROFILE}
    before = runner.fingerprint("findings", PROFILE, params)
    put_summary(nb_sandbox, "baselines", "full", {"metrics": {"m": 1}})
    put_summary(nb_sandbox, "findings", PROFILE, {"metrics": {"m": 1}})
    assert runner.fingerprint("findings", PROFILE, params) == before


def test_a_chapter_fingerprint_ignores_other_chapters_results(nb_sandbox):
    params = {"profile": PROFILE}
    before = runner.fingerprint("baselines", PROFILE, params)
    put_summary(nb_sandbox, "dynamic_selection", PROFILE, {"metrics": {"m": 1}})
    put_summary(nb_sandbox, "baselines", PROFILE, {"metrics": {"m": 1}})
    assert runner.fingerprint("baselines", PROFILE, params) == before


def test_importance_answer_quotes_reliability_best_method_and_the_drop_last_verdict(results):
    rec = {"mean": 0.91, "ci_low": 0.85, "ci_high": 0.95}
    rho = {"ablation": {"mean": 0.8, "ci_low": 0.6, "ci_high": 0.9}, "fisher": {"mean": 0.1, "ci_low": -0.3,
                                                                                 "ci_high": 0.4},
           "random": {"mean": 0.95, "ci_low": 0.9, "ci_high": 1.0}}  # a reference is never "the best method"
    tests = [{"name": "minilm: ablation vs_drop_last (pooled tasks)", "family": "minilm_vs_drop_last",
              "member": "ablation", "scope": "pooled tasks", "p_holm": 0.01, "effect_size": -0.9},
             {"name": "minilm: fisher vs_drop_last (pooled tasks)", "family": "minilm_vs_drop_last",
              "member": "fisher", "scope": "pooled tasks", "p_holm": 0.01, "effect_size": 0.9}]  # *worse*: no win
    metrics = {"reliability/minilm/amazon": rec,
               "regret/minilm/amazon/drop_last": {"mean": 0.012, "ci_low": 0.008, "ci_high": 0.016},
               **{f"spearman/minilm/amazon/{k}": v for k, v in rho.items()}}
    write(results, "theoretical_validation", {"params": {"models": ["minilm"], "tasks": ["amazon"]},
                                              "metrics": metrics, "tests": tests}, {})
    r = row(F.run(F.Params(profile=PROFILE)), "theoretical_validation")
    assert "reliability 0.91 [0.85, 0.95]" in r[ANSWER] and "best ρ ablation 0.80 [0.60, 0.90]" in r[ANSWER]
    assert r["verdict"] == "minilm: beats drop_last after Holm: ablation"


def test_importance_verdict_per_task_names_each_method_once_per_task(results):
    """A model tested per task (SmolLM2: one text sample per task) gets one verdict per task, each method once."""
    rec = {"mean": 0.99, "ci_low": 0.98, "ci_high": 1.0}
    tests = [{"name": f"smollm2: {m} vs_drop_last ({t})", "family": "smollm2_vs_drop_last", "member": m,
              "scope": t, "p_holm": p, "effect_size": -0.5} for m, t, p in (("ablation", "amazon", 0.001), ("ablation", "mr", 0.001),
                                                    ("fisher", "amazon", 0.001), ("fisher", "mr", 0.2))]
    metrics = {**{f"reliability/smollm2/{t}": rec for t in ("amazon", "mr")},
               **{f"regret/smollm2/{t}/drop_last": {"mean": 1.4, "ci_low": 1.3, "ci_high": 1.5} for t in ("amazon", "mr")},
               **{f"spearman/smollm2/{t}/ablation": rec for t in ("amazon", "mr")}}
    write(results, "theoretical_validation", {"params": {"models": ["smollm2"], "tasks": ["amazon", "mr"]},
                                              "metrics": metrics, "tests": tests}, {})
    r = row(F.run(F.Params(profile=PROFILE)), "theoretical_validation")
    assert r["verdict"] == ("smollm2 on amazon: beats drop_last after Holm: ablation, fisher; "
                            "smollm2 on mr: beats drop_last after Holm: ablation")
