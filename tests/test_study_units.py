"""The steps every fine-tuning study's run() shares (analysis_kit.studies.units)."""

from __future__ import annotations

from dataclasses import dataclass

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
