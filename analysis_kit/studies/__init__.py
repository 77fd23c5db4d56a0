"""Chapters as tested studies: one module per chapter with a ``Params`` dataclass and ``run(params) -> Result``.

A study does all the work of a chapter (data, models, metrics, tests) and returns a :class:`Result`, so
the chapter's notebook only narrates: parameters → ``run`` → ``result.record(report)`` → prose and
charts. Studies are unit-tested on tiny models without papermill.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import pandas as pd

from .. import data
from ..errors import LayerwiseError
from ..train import STANDARD_MODELS


def parse_source(entry: str, named: tuple[str, ...], what: str) -> tuple[str, str | None]:
    """A ``tasks``/``models`` entry as ``(name, path or None)``.

    ``"amazon"`` → ``("amazon", None)`` (a built-in name); ``"reviews=/data/r.csv"`` → ``("reviews",
    "/data/r.csv")``; ``"/data/r.csv"`` → ``("r", "/data/r.csv")`` (the name is the file or folder name, made
    safe for metric keys: lower case, letters, digits, ``_`` and ``-``).
    """
    if entry in named:
        return entry, None
    name, sep, path = entry.partition("=")
    if not sep:
        if "/" not in entry and not Path(entry).expanduser().exists():
            return entry, None  # an unknown name: the chapter's check lists the choices
        path, name = entry, Path(entry.rstrip("/")).stem
    name = re.sub(r"[^a-z0-9_-]+", "_", name.strip().lower()).strip("_")
    if not name or not path.strip():
        raise LayerwiseError(f"{what} entry {entry!r}: give a built-in name ({', '.join(named)}), a path, or "
                             "NAME=PATH.")
    if name in named:
        raise LayerwiseError(f"{what} entry {entry!r}: the name {name!r} is a built-in {what[:-1]}; call yours "
                             f"something else (NAME=PATH), e.g. my_{name}={path}.")
    return name, str(Path(path.strip()).expanduser())


@dataclass(frozen=True)
class TaskParams:
    """The parameters every fine-tuning chapter shares (a study's ``Params`` subclasses it and adds its own).

    ``tiny`` (the smoke profile: tiny random models, capped data), ``seeds`` (a seed fixes the split, the
    initialisation and the data order; intervals are taken over seeds), ``tasks`` (``amazon``, ``mr``, or your
    data file: a path or ``NAME=PATH``, see :func:`parse_source`; a chapter's ``models`` take your Hugging Face
    folder the same way), ``neutral_band`` (the polarity labels' neutral band), ``mr_max_train`` (mr's training split cap; 0 =
    none), ``n_bootstrap`` (resamples of every interval) and ``device``.
    """

    tiny: bool = False
    seeds: tuple[int, ...] = (0, 1, 2, 3, 4)
    tasks: tuple[str, ...] = ("amazon", "mr")
    neutral_band: float = 0.5
    mr_max_train: int = 3500
    n_bootstrap: int = 10_000
    device: str = "auto"
    #: ``(name, path)`` of every task or model given as a file or folder; filled from ``tasks``/``models``
    #: (whose entries become the names), so keys, tables and the cache see one name per task and model.
    sources: tuple[tuple[str, str], ...] = ()

    def __post_init__(self) -> None:
        found = dict(self.sources)
        for attr, named, what in (("tasks", tuple(data.TASKS), "tasks"), ("models", STANDARD_MODELS, "models")):
            entries = getattr(self, attr, None)
            if entries is None:
                continue
            names = []
            for entry in entries:
                name, path = (entry, None) if entry in found else parse_source(entry, named, what)
                if path is not None:
                    if found.get(name, path) != path:
                        raise LayerwiseError(f"{what}: the name {name!r} is given to two paths ({found[name]} and "
                                             f"{path}); name them apart with NAME=PATH.")
                    found[name] = path
                names.append(name)
            object.__setattr__(self, attr, tuple(names))
        object.__setattr__(self, "sources", tuple(sorted(found.items())))

    def source(self, name: str) -> str | None:
        """The file or folder behind task or model ``name`` (None for a built-in one)."""
        return dict(self.sources).get(name)

    def model_ref(self, name: str) -> str:
        """What ``train`` builds model ``name`` from: the built-in name, or the path of your folder."""
        return self.source(name) or name

    def task_spec(self, name: str) -> Any:
        """The ``train.TaskSpec`` of task ``name``: a built-in task (mr's training split capped at ``mr_max_train``)
        or your data file (read and checked here, before any model loads)."""
        from .. import train

        path = self.source(name)
        if path is not None:
            return train.file_task(name, path, self.tiny)
        spec = train.task_spec(name, self.tiny, neutral_band=self.neutral_band)
        if name == "mr" and self.mr_max_train and not self.tiny:
            spec = replace(spec, max_train=self.mr_max_train)
        return spec

    def validate(self, allowed_models: tuple[str, ...] | None = None) -> None:
        """Fail before any training on seeds, tasks or models no chapter can use.

        Your data files are read and checked here; your model folders must hold a ``config.json`` of a
        supported family (``allowed_models``: the chapter's built-in models; a folder is accepted when the
        chapter takes models at all).
        """
        if len(set(self.seeds)) < 2:
            raise LayerwiseError(f"seeds={list(self.seeds)}: give at least two distinct seeds (intervals are "
                                 "taken over seeds; the protocol asks for five).")
        for task in self.tasks:
            if self.source(task) is None:
                data.task_domain(task)
            self.task_spec(task)
        models = getattr(self, "models", None)
        if models is None or allowed_models is None:
            return
        from .. import train

        unknown = [m for m in models if self.source(m) is None and m not in allowed_models]
        if unknown or not models:
            raise LayerwiseError(f"models={list(models)}: choose one or more of {', '.join(allowed_models)}, or "
                                 "your Hugging Face folder (a path, or NAME=PATH).")
        for m in models:
            if self.source(m) is not None:
                train.model_folder(self.source(m))


@dataclass(frozen=True)
class ScheduleParams(TaskParams):
    """The training schedule the compression, depth and QLoRA chapters share (each ``Params`` subclasses it):
    up to ``epochs`` epochs over the training split in batches of ``batch_size``, validation
    ``evals_per_epoch`` times per epoch, early stopping after ``patience`` validations without progress, the
    learning rate searched on seed ``lr_search_seed``; texts cut at ``max_length`` tokens; torch runs on
    ``torch_threads`` threads (0: torch's default)."""

    lr_search_seed: int = 0
    epochs: int = 2
    patience: int = 2
    evals_per_epoch: int = 2
    batch_size: int = 32
    max_length: int = 64
    torch_threads: int = 2

    def schedule(self, n_train: int, lr: float) -> Any:
        """The ``train.TrainConfig`` of one run at ``lr`` on a training split of ``n_train`` examples."""
        from .. import train

        per_epoch = -(-n_train // self.batch_size)
        return train.TrainConfig(epochs=self.epochs, lr=lr, batch_size=self.batch_size, patience=self.patience,
                                 max_length=self.max_length, eval_every=-(-per_epoch // self.evals_per_epoch))

    def schedule_fields(self) -> dict[str, Any]:
        """These fields by name, to hand one chapter's schedule to another's ``Params`` (``replace``)."""
        return {f: getattr(self, f) for f in ScheduleParams.__dataclass_fields__ if f not in
                TaskParams.__dataclass_fields__}


@dataclass(frozen=True)
class LatencyParams:
    """How a chapter times its models (the compression and depth chapters mix it in): batches of
    ``latency_batches`` sequences of ``latency_seq_len`` tokens, ``latency_repeats`` interleaved passes each
    (``compress.cost_table``)."""

    latency_batches: tuple[int, ...] = (1, 64)
    latency_seq_len: int = 32
    latency_repeats: int = 30


class Labels(dict):
    """Display names of a chapter's models; a model without one (your folder) shows under its own name."""

    def __missing__(self, key: str) -> str:
        return key


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
