"""The steps every fine-tuning study's run() shares (analysis_kit.studies.units)."""

from __future__ import annotations

from dataclasses import dataclass
from types import SimpleNamespace

import pandas as pd
import pytest

from analysis_kit.errors import LayerwiseError
from analysis_kit.studies import Result, TaskParams
from analysis_kit.studies import units as U


@dataclass(frozen=True)
class P(TaskParams):
    models: tuple[str, ...] = ("a", "b")
    torch_threads: int = 0


def test_per_task_and_run_units_visit_every_combination_in_order():
    p = P(seeds=(3, 4), tasks=("amazon", "mr"))
    chosen, table = U.per_task(p, lambda m, t: (f"{m}-{t}", pd.DataFrame([{"model": m, "task": t}])))
    assert chosen == {(m, t): f"{m}-{t}" for m in p.models for t in p.tasks} and len(table) == 4
    seen = U.run_units(p, lambda m, t, s: {"model": m, "task": t, "seed": s, "failed": s == 4}, "toy")
    assert [(u["model"], u["task"], u["seed"]) for u in seen] == [
        (m, t, s) for m in p.models for t in p.tasks for s in p.seeds]
    result = Result()
    U.failed_trainings(result, seen, p)
    assert result.metrics["failed_trainings/a/mr"]["mean"] == 1 and result.metrics["failed_trainings/a/mr"]["n"] == 2
    assert result.metrics["failed_trainings/b/amazon"]["method"] == U.FAILED_METHOD


def test_start_fails_before_any_model_loads():
    with pytest.raises(LayerwiseError, match="at least two distinct seeds"):
        U.start(P(seeds=(1,)))


def test_the_learning_rate_search_takes_the_lowest_loss_unless_it_failed():
    table = pd.DataFrame({"recipe": ["a", "a", "b", "b", "c"], "lr": [1, 2, 1, 2, 1],
                          "val_loss": [0.3, 0.2, 0.5, 0.5, 0.9], "failed": [False, True, False, False, True]})
    best = U.choose_lowest_val_loss(table, "recipe")
    assert dict(zip(best["recipe"], best["lr"], strict=True)) == {"a": 1, "b": 1, "c": 1}  # ties: the first
    assert table["chosen"].tolist() == [True, False, True, False, True]  # c: every row failed, so it still wins
    plain = table.drop(columns="failed")
    assert U.choose_lowest_val_loss(plain, "recipe")["lr"].tolist() == [2, 1, 1]  # no failed column: lowest loss


def test_the_three_schedule_chapters_share_one_schedule():
    """Compression, depth and QLoRA declare their schedule once (``ScheduleParams``); depth hands its own to the
    compression arms it shares, so a shared cache entry means the same schedule."""
    from analysis_kit.studies import ScheduleParams, compression, multilayer_exploration, qlora

    for cls in (compression.Params, multilayer_exploration.Params, qlora.Params):
        assert issubclass(cls, ScheduleParams)
    depth = multilayer_exploration.Params(epochs=3, patience=1, evals_per_epoch=4, batch_size=16)
    arms = depth.arm_params()
    assert arms.schedule_fields() == depth.schedule_fields()
    cfg = depth.schedule(n_train=100, lr=1e-4)
    assert (cfg.epochs, cfg.patience, cfg.batch_size, cfg.eval_every, cfg.lr) == (3, 1, 16, 2, 1e-4)  # 7 batches / 4
    assert qlora.Params().epochs == 4 and compression.Params().epochs == 2  # each chapter keeps its own default


def test_failed_search_runs_are_counted_per_model_and_task():
    from analysis_kit.studies import Result, units

    table = pd.DataFrame({"model": ["m"] * 3 + ["m"], "task": ["a"] * 3 + ["b"], "failed": [True, False, True, False]})
    result = Result()
    units.failed_search_runs(result, table)
    assert result.metrics["failed_search_runs/m/a"]["mean"] == 2 and result.metrics["failed_search_runs/m/a"]["n"] == 3
    assert result.metrics["failed_search_runs/m/b"]["mean"] == 0


def test_ci_view_shows_value_and_interval_as_one_column():
    from analysis_kit.report import ci_view

    df = pd.DataFrame({"method": ["a", "b", "c"], "rho": [0.5, -0.25, float("nan")], "ci_low": [0.25, None, 0.1],
                       "ci_high": [0.75, None, 0.2]})
    out = ci_view(df, "rho", digits=2, sign=True)
    assert list(out.columns) == ["method", "rho"]
    assert out["rho"].tolist() == ["+0.50 [+0.25, +0.75]", "−0.25", "–"]
    with pytest.raises(LayerwiseError, match="no column"):
        ci_view(df.drop(columns="ci_low"), "rho")


def test_ci_views_folds_every_interval_of_a_table():
    from analysis_kit.report import ci_views, interval_columns

    df = pd.DataFrame({"policy": ["a"], "b1_speedup": [1.5], "b1_low": [1.25], "b1_high": [1.75],
                       "retention": [0.9], "retention_ci_low": [0.85], "retention_ci_high": [0.95],
                       "accuracy": [0.8], "ci_low": [0.75], "ci_high": [0.85], "seeds": [5], "p": [0.012345]})
    assert interval_columns(df) == [("b1_speedup", "b1_low", "b1_high"),
                                    ("retention", "retention_ci_low", "retention_ci_high"),
                                    ("accuracy", "ci_low", "ci_high")]
    out = ci_views(df, digits=2)
    assert list(out.columns) == ["policy", "b1_speedup", "retention", "accuracy", "seeds", "p"]
    assert out.iloc[0].tolist() == ["a", "1.50 [1.25, 1.75]", "0.90 [0.85, 0.95]", "0.80 [0.75, 0.85]", 5, 0.01]
    plain = pd.DataFrame({"x": [1.23456]})
    assert ci_views(plain, digits=1)["x"].tolist() == [1.2]
    # a learning rate or a p-value that rounding would show as 0 keeps its significant figures; a true 0 stays 0
    small = ci_views(pd.DataFrame({"lr": [1e-4, 3e-4], "p": [3.21e-5, 0.0], "steps": [130.0, 0.25]}), digits=3)
    assert small["lr"].tolist() == [1e-4, 3e-4]
    assert small["p"].tolist() == [3.21e-5, 0.0]
    assert small["steps"].tolist() == [130.0, 0.25]


def test_run_units_takes_the_seeds_each_model_runs():
    """A pretrained model without a training seed runs once per task; the others run every seed."""
    p = SimpleNamespace(models=("lm", "clf"), tasks=("a", "b"), seeds=(0, 1, 2))
    seen = U.run_units(p, lambda m, t, s: (m, t, s), "toy", seeds=lambda m: p.seeds[:1] if m == "lm" else p.seeds)
    assert seen == [("lm", "a", 0), ("lm", "b", 0), *[("clf", t, s) for t in "ab" for s in (0, 1, 2)]]


def test_tuned_units_searches_once_per_task_then_runs_every_unit_with_its_choice():
    p = SimpleNamespace(models=("m",), tasks=("a", "b"), seeds=(0, 1, 2, 3, 4))
    result, searched = Result(), []

    def search(m, t):
        searched.append((m, t))
        return {"a": 1e-3, "b": 3e-4}[t], pd.DataFrame([{"model": m, "task": t, "lr": 1e-3, "failed": t == "b"}])

    units = U.tuned_units(p, result, search, lambda m, t, s, lr: {"model": m, "task": t, "seed": s, "lr": lr,
                                                                   "failed": s == 0}, "toy")
    assert searched == [("m", "a"), ("m", "b")]
    assert [u["lr"] for u in units] == [1e-3] * 5 + [3e-4] * 5
    assert list(result.tables["lr_search"]["task"]) == ["a", "b"]
    assert result.metrics["failed_search_runs/m/b"]["mean"] == 1 and result.metrics["failed_search_runs/m/a"]["mean"] == 0
    assert result.metrics["failed_trainings/m/a"]["mean"] == 1 and result.metrics["failed_trainings/m/a"]["n"] == 5


def test_groups_follow_the_declared_order_and_skip_what_has_no_units():
    units = [{"model": "b", "task": "mr"}, {"model": "a", "task": "mr"}, {"model": "a", "task": "amazon"}]
    got = [(name, [(t, len(tu)) for t, tu in U.groups(mu, "task", ("amazon", "mr", "yelp"))])
           for name, mu in U.groups(units, "model", ("a", "c", "b"))]
    assert got == [("a", [("amazon", 1), ("mr", 1)]), ("b", [("mr", 1)])]


def _stub_unit(*args):
    """Stands in for a chapter's unit: records that it ran."""
    _stub_unit.calls.append(args)
    return {"args": args}


@pytest.mark.parametrize("chapter", ["theoretical_validation", "sensitivity", "dynamic_selection"])
def test_a_unit_that_reads_a_baseline_is_recomputed_when_the_baseline_is_retrained(chapter, monkeypatch, tmp_path):
    """The importance, sensitivity and dynamic units hold the baseline's cache folder in their keys, as a healed
    arm holds its teacher's: the same folder reads the cache, a re-trained baseline (a new folder) re-computes."""
    import importlib

    from analysis_kit import train

    study = importlib.import_module(f"analysis_kit.studies.{chapter}")
    monkeypatch.setenv("LAYERWISE_CACHE", str(tmp_path))
    folder = {"name": "trained_classifier-aaa"}
    monkeypatch.setattr(train, "baseline_folder", lambda *a, **k: folder["name"])
    monkeypatch.setattr(study, "_unit", _stub_unit)
    _stub_unit.calls = []
    params = study.Params(tiny=True, seeds=(0,), tasks=("amazon",))
    args = (params, "amazon", 0) if chapter == "sensitivity" else (params, "minilm", "amazon", 0)
    study._cached_unit(*args)
    study._cached_unit(*args)
    assert len(_stub_unit.calls) == 1
    folder["name"] = "trained_classifier-bbb"
    assert study._cached_unit(*args)["args"] == args and len(_stub_unit.calls) == 2
