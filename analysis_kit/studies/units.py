"""What every study's ``run()`` does around its own work, written once.

A study checks its parameters and tasks before any model loads and sets torch's thread count
(:func:`start`), runs one *unit* per (model, task, seed) with a progress bar (:func:`run_units`), and
reports what failed. A fine-tuning study also chooses a learning rate per (model, task) on validation first:
:func:`tuned_units` is that whole sequence (:func:`per_task` with :func:`choose_lowest_val_loss`,
:func:`failed_search_runs`, :func:`run_units`, :func:`failed_trainings`); the compression, depth and QLoRA
studies use it, the importance and dynamic-depth studies call :func:`run_units` with their cached units.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import pandas as pd

from ..device import progress
from . import Result

#: How ``failed_trainings/<model>/<task>`` is defined (evidence protocol, rule 3).
FAILED_METHOD = "count of runs within 1 point of the majority class on validation (excluded)"


def start(params: Any) -> None:
    """Validate ``params``, check that every task's data loads, and set torch's thread count
    (``params.torch_threads``; 0 keeps torch's default): all before any model loads."""
    import torch

    params.validate()
    for task in params.tasks:
        params.task_spec(task)
    if getattr(params, "torch_threads", 0):
        torch.set_num_threads(params.torch_threads)


def per_task(params: Any, fn: Callable[[str, str], tuple[Any, pd.DataFrame]]) -> tuple[dict[tuple[str, str], Any],
                                                                                        pd.DataFrame]:
    """``fn(model, task) -> (choice, table)`` for every (model, task) of ``params`` (e.g. a learning-rate search
    on validation): the choices by (model, task) and the tables stacked."""
    chosen, tables = {}, []
    for name in params.models:
        for task in params.tasks:
            chosen[(name, task)], table = fn(name, task)
            tables.append(table)
    return chosen, pd.concat(tables, ignore_index=True)


def choose_lowest_val_loss(table: pd.DataFrame, by: str | list[str]) -> pd.DataFrame:
    """The rows that win a learning-rate search: per group ``by``, the lowest ``val_loss`` (the first on a tie),
    where a failed training (a true ``failed`` column, when the table has one) wins only if its whole group
    failed. Returns the winning rows; ``table`` gets a ``chosen`` column marking them."""
    failed = table["failed"].astype(bool) if "failed" in table else False
    best = table.assign(_failed=failed).sort_values(["_failed", "val_loss"], kind="stable").groupby(by).head(1)
    table["chosen"] = table.index.isin(best.index)
    return best.drop(columns="_failed")


def failed_search_runs(result: Result, table: pd.DataFrame) -> None:
    """``failed_search_runs/<model>/<task>``: the learning-rate-search runs (a ``failed`` column per row of
    ``table``) that ended within 1 point of the majority class; :func:`choose_lowest_val_loss` never lets one
    win unless its whole group failed."""
    for (name, task), g in table.groupby(["model", "task"]):
        result.metrics[f"failed_search_runs/{name}/{task}"] = {
            "mean": int(g["failed"].astype(bool).sum()), "ci_low": None, "ci_high": None, "n": len(g),
            "unit": "runs", "method": FAILED_METHOD.replace("(excluded)", "(never chosen unless all failed)")}


def run_units(params: Any, fn: Callable[[str, str, int], dict[str, Any]], desc: str,
              seeds: Callable[[str], Sequence[int]] | None = None) -> list[dict[str, Any]]:
    """``fn(model, task, seed)`` for every unit, in (model, task, seed) order, with a progress bar.

    ``seeds(model)`` gives the seeds a model runs (default: every one of ``params.seeds``), e.g. one for a
    pretrained model that has no training seed."""
    todo = [(m, t, s) for m in params.models for t in params.tasks
            for s in (params.seeds if seeds is None else seeds(m))]
    units = []
    bar = progress(total=len(todo), desc=f"{desc} units (model x task x seed)")
    for name, task, seed in todo:
        units.append(fn(name, task, seed))
        bar.update(1)
    bar.close()
    return units


def tuned_units(params: Any, result: Result, search: Callable[[str, str], tuple[Any, pd.DataFrame]],
                unit: Callable[[str, str, int, Any], dict[str, Any]], desc: str) -> list[dict[str, Any]]:
    """A fine-tuning study's units: ``search(model, task) -> (choice, table)`` once per (model, task) (the
    stacked tables become ``result.tables["lr_search"]``, its failed runs ``failed_search_runs/...``), then
    ``unit(model, task, seed, choice)`` for every unit and their failed trainings counted
    (``failed_trainings/...``)."""
    chosen, result.tables["lr_search"] = per_task(params, search)
    failed_search_runs(result, result.tables["lr_search"])
    units = run_units(params, lambda m, t, s: unit(m, t, s, chosen[(m, t)]), desc)
    failed_trainings(result, units, params)
    return units


def groups(units: Iterable[dict[str, Any]], key: str, order: Sequence[str]) -> Iterator[tuple[str, list[dict[str, Any]]]]:
    """``(value, units whose [key] is value)`` for each value of ``order`` that has units, in that order: the
    per-model and per-task loops of a study's summary (``for name, mu in groups(ok, "model", params.models)``),
    written once, skipping a model or task whose every unit was left out."""
    units = list(units)
    for value in order:
        these = [u for u in units if u[key] == value]
        if these:
            yield value, these


def failed_trainings(result: Result, units: Iterable[dict[str, Any]], params: Any) -> None:
    """``failed_trainings/<model>/<task>``: how many units of each (model, task) were failed trainings."""
    units = list(units)
    for name in params.models:
        for task in params.tasks:
            these = [u for u in units if u["model"] == name and u["task"] == task]
            result.metrics[f"failed_trainings/{name}/{task}"] = {
                "mean": sum(bool(u["failed"]) for u in these), "ci_low": None, "ci_high": None, "n": len(these),
                "unit": "runs", "method": FAILED_METHOD}
