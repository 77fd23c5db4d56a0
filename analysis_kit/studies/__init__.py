"""Chapters as tested studies: one module per chapter with a ``Params`` dataclass and ``run(params) -> Result``.

A study does all the work of a chapter (data, models, metrics, tests) and returns a :class:`Result`, so
the chapter's notebook only narrates: parameters → ``run`` → ``result.record(report)`` → prose and
charts. Studies are unit-tested on tiny models without papermill.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import pandas as pd


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
