"""Chapters as tested studies: one module per chapter with a ``Params`` dataclass and ``run(params) -> Result``.

A study does all the work of a chapter (data, models, metrics, tests) and returns a :class:`Result`, so
the chapter's notebook only narrates: parameters → ``run`` → ``result.record(report)`` → prose and
charts. Studies are unit-tested on tiny models without papermill.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import pandas as pd

from .. import data
from ..errors import LayerwiseError


@dataclass(frozen=True)
class TaskParams:
    """The parameters every fine-tuning chapter shares (a study's ``Params`` subclasses it and adds its own).

    ``tiny`` (the smoke profile: tiny random models, capped data), ``seeds`` (a seed fixes the split, the
    initialisation and the data order; intervals are taken over seeds), ``tasks`` (``amazon``, ``mr``),
    ``neutral_band`` (the polarity labels' neutral band), ``mr_max_train`` (mr's training split cap; 0 =
    none), ``n_bootstrap`` (resamples of every interval) and ``device``.
    """

    tiny: bool = False
    seeds: tuple[int, ...] = (0, 1, 2, 3, 4)
    tasks: tuple[str, ...] = ("amazon", "mr")
    neutral_band: float = 0.5
    mr_max_train: int = 3500
    n_bootstrap: int = 10_000
    device: str = "auto"

    def validate(self) -> None:
        """Fail before any training on seeds or tasks no chapter can use."""
        if len(set(self.seeds)) < 2:
            raise LayerwiseError(f"seeds={list(self.seeds)}: give at least two distinct seeds (intervals are "
                                 "taken over seeds; the protocol asks for five).")
        for task in self.tasks:
            data.task_domain(task)


@dataclass
class Result:
    """What a study computed: tidy tables, ``summary.json`` metric records, test records, values for prose."""

    tables: dict[str, pd.DataFrame] = field(default_factory=dict)
    metrics: dict[str, dict[str, Any]] = field(default_factory=dict)
    tests: list[Any] = field(default_factory=list)
    values: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    #: names of tables that also go inside summary.json (small ones that checks read), see ``Report.record``
    in_summary: tuple[str, ...] = ()

    def record(self, report: Any) -> None:
        """Hand everything to a :class:`analysis_kit.report.Report` (tables, metrics, tests, notes)."""
        for name, table in self.tables.items():
            report.table(name, table)
        for name, rec in self.metrics.items():
            report.metric(name, rec)
        for test in self.tests:
            report.test(test)
        for note in self.notes:
            report.note(note)
        for name in self.in_summary:
            report.record(name, self.tables[name])
