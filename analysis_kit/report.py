"""The notebook side of a run: provenance, metrics with intervals, tests, tables and glued numbers.

A notebook creates one :class:`Report`, records every number it shows through it, and calls
:meth:`Report.save` at the end. ``save`` writes ``results/<experiment>/<profile>/summary.json`` (the
contract of DESIGN.md) and one CSV per tidy table, atomically, so a crash never leaves a torn summary.
Prose quotes numbers with :meth:`Report.glue`, so text cannot drift from results.
"""

from __future__ import annotations

import datetime as _dt
import math
import os
import platform
import subprocess
import time
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from .cache import atomic_write_json, atomic_write_text
from .errors import LayerwiseError
from .paths import REPO_ROOT, published, results_dir, shown

#: Distributions whose versions are recorded with every result.
TRACKED_PACKAGES = (
    "analysis-kit", "torch", "transformers", "peft", "bitsandbytes", "captum", "shap", "statsmodels",
    "scipy", "numpy", "pandas", "scikit-learn", "altair", "papermill", "jupyter-book", "myst-nb",
)


def _git_commit() -> str:
    """The checked-out commit (with ``+dirty`` when the tree has uncommitted changes), or ``unknown``."""
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True,
                             check=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "analysis_kit", "notebooks"], cwd=REPO_ROOT,
                               capture_output=True, text=True, check=True, timeout=10).stdout.strip()
        return sha + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def hardware() -> dict[str, Any]:
    """CPU model, core count, memory and accelerator of this machine."""
    import psutil
    import torch

    cpu = platform.processor() or platform.machine()
    cpuinfo = Path("/proc/cpuinfo")  # Linux only; elsewhere platform.processor() is the best we have
    if cpuinfo.exists():
        names = [ln.split(":", 1)[1].strip() for ln in cpuinfo.read_text().splitlines() if ln.startswith("model name")]
        cpu = names[0] if names else cpu
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {
        "cpu": cpu,
        "cpu_cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
        "gpu": gpu,
        "device": "cuda" if gpu else "cpu",
        "platform": platform.platform(),
        "python": platform.python_version(),
    }


def versions() -> dict[str, str]:
    """Installed versions of the packages that determine results."""
    out = {}
    for name in TRACKED_PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out


def provenance(start: float | None = None) -> dict[str, Any]:
    """Everything needed to say where a number came from."""
    now = time.time()
    return {
        "git_commit": _git_commit(),
        "versions": versions(),
        "hardware": hardware(),
        "device": hardware()["device"],
        "start_time": _dt.datetime.fromtimestamp(start or now, _dt.timezone.utc).isoformat(timespec="seconds"),
        "duration_s": round(now - start, 1) if start else None,
    }


def fmt_ci(rec: dict[str, Any], scale: float = 100.0, unit: str = " %", digits: int = 1, sign: bool = False) -> str:
    """The book's one number format: ``"88.9 % [86.3, 91.2]"`` (mean, then the interval in brackets).

    ``rec`` is a metric record (``mean``, ``ci_low``, ``ci_high``) on a 0–1 or raw scale; ``scale`` turns
    it into the unit (100 for percent or points, 1 for ratios with ``unit="×"``); ``sign`` writes ``+``/``−``
    for differences. A record without an interval prints its mean alone.
    """
    f = f"{'+' if sign else ''}.{digits}f"

    def num(x: float) -> str:
        return format(x * scale, f).replace("-", "−")

    if rec.get("ci_low") is None or rec.get("ci_high") is None:
        return f"{num(rec['mean'])}{unit}"
    return f"{num(rec['mean'])}{unit} [{num(rec['ci_low'])}, {num(rec['ci_high'])}]"


def ci_view(df: pd.DataFrame, value: str, *, scale: float = 1.0, unit: str = "", digits: int = 3,
            sign: bool = False, low: str = "ci_low", high: str = "ci_high") -> pd.DataFrame:
    """``df`` for display: column ``value`` and its interval ends ``low``/``high`` become one column in the book's
    number format (:func:`fmt_ci`, e.g. ``"0.62 [0.41, 0.80]"``), so a rendered table never shows bare interval ends.

    Other columns are kept; a row without an interval shows its value alone, a row without a value ``–``.
    """
    missing = [c for c in (value, low, high) if c not in df.columns]
    if missing:
        raise LayerwiseError(f"ci_view: the table has no column(s) {missing}; its columns are {list(df.columns)}.")

    def one(v: Any, lo: Any, hi: Any) -> str:
        if v is None or pd.isna(v):
            return "–"
        ends = {} if lo is None or hi is None or pd.isna(lo) or pd.isna(hi) else {"ci_low": lo, "ci_high": hi}
        return fmt_ci({"mean": v, **ends}, scale, unit, digits, sign)

    out = df.drop(columns=[low, high])
    out[value] = [one(v, lo, hi) for v, lo, hi in zip(df[value], df[low], df[high], strict=True)]
    return out


def interval_columns(df: pd.DataFrame) -> list[tuple[str, str, str]]:
    """Every ``(value, low, high)`` triple of ``df``'s columns, in column order: ``P_low``/``P_high`` (or
    ``P_ci_low``/``P_ci_high``, or a lone ``ci_low``/``ci_high``) belong to column ``P`` if there is one, else to
    the column just before the low end (``b1_speedup, b1_low, b1_high``; ``accuracy, ci_low, ci_high``)."""
    cols = [str(c) for c in df.columns]
    found = []
    for i, low in enumerate(cols):
        if not low.endswith("_low") or i == 0:
            continue
        stem = low[: -len("_low")]
        high = f"{stem}_high"
        if high not in cols:
            continue
        prefix = stem[: -len("_ci")] if stem.endswith("_ci") else ("" if stem == "ci" else stem)
        before = cols[i - 1]
        value = prefix if prefix in cols else before if (not prefix or before.startswith(prefix + "_")) else None
        if value is not None and not value.endswith(("_low", "_high")):
            found.append((cols.index(value), value, low, high))
    return [(v, lo, hi) for _, v, lo, hi in sorted(found)]


def ci_views(df: pd.DataFrame, digits: int = 3) -> pd.DataFrame:
    """``df`` for display with every interval in it (see :func:`interval_columns`) folded into its value's
    column in the book's number format, each in the column's own scale; other numbers rounded to ``digits``."""
    out = df
    for value, low, high in interval_columns(df):
        out = ci_view(out, value, digits=digits, low=low, high=high)
    return out.apply(lambda col: _rounded(col, digits) if pd.api.types.is_float_dtype(col) else col)


def _rounded(col: pd.Series, digits: int) -> pd.Series:
    """``col`` rounded to ``digits`` decimals, except non-zero values that this would show as 0 (a learning rate
    of 1e-4, a p-value of 3e-5): those keep ``digits`` significant figures."""
    out = col.round(digits)
    tiny = (out == 0) & (col != 0) & col.notna()
    return out.where(~tiny, col.map(lambda v: float(f"{v:.{digits}g}")))


def _clean(x: Any) -> Any:
    """JSON-safe scalars: numpy to python, NaN/inf to None."""
    if isinstance(x, (np.floating, float)):
        x = float(x)
        return None if math.isnan(x) or math.isinf(x) else x
    if isinstance(x, np.integer):
        return int(x)
    if isinstance(x, np.bool_):
        return bool(x)
    if isinstance(x, dict):
        return {k: _clean(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_clean(v) for v in x]
    return x


class Report:
    """Collects the results of one notebook run and writes them to ``results/<experiment>/<profile>/``."""

    def __init__(self, experiment: str, profile: str, params: dict[str, Any]):
        self.experiment = experiment
        self.profile = profile
        self.params = {k: v for k, v in params.items() if not k.startswith("_")}
        self.start = time.time()
        self.metrics: dict[str, dict[str, Any]] = {}
        self.tests: list[dict[str, Any]] = []
        self.tables: dict[str, pd.DataFrame] = {}
        self.glued: dict[str, Any] = {}
        self.notes: list[str] = []
        self.records: dict[str, Any] = {}

    @property
    def out_dir(self) -> Path:
        """``results/<experiment>/<profile>/``, or the runner's staging folder (``LAYERWISE_RUN_DIR``).

        Under ``analysis-kit run`` the notebook writes into a staging folder that the runner publishes only
        when the whole notebook succeeded, so a failing cell never leaves half-replaced results.
        """
        staged = os.environ.get("LAYERWISE_RUN_DIR")
        return Path(staged) if staged else results_dir() / self.experiment / self.profile

    def header(self) -> pd.DataFrame:
        """A one-table view of profile, parameters, hardware, versions and commit for the notebook's top."""
        prov = provenance(self.start)
        rows = [("profile", self.profile), ("git commit", prov["git_commit"]), ("started", prov["start_time"])]
        rows += [(f"hardware: {k}", v) for k, v in prov["hardware"].items()]
        rows += [(f"param: {k}", v) for k, v in self.params.items()]
        rows += [(f"version: {k}", v) for k, v in prov["versions"].items()]
        return pd.DataFrame(rows, columns=["what", "value"]).astype({"value": str}).set_index("what")

    def footer(self, notebook: str | None = None) -> Any:
        """The chapter's last block: download links, then parameters and provenance in a collapsed box.

        Readers want the answer first; reviewers want to check where it came from. So the provenance that
        :meth:`header` lays out as one long table goes to the end of the page, folded (a ``dropdown``
        admonition), with the parameters as a compact two-column table, and the page links its
        ``summary.json``, its CSV tables and its executed notebook (``notebook``, default
        ``<experiment>.ipynb`` beside the page) so a reviewer can take the numbers away. Rendered as MyST
        Markdown by the book (``nb_render_markdown_format: myst``); the links are Sphinx ``{download}``
        roles relative to ``book/experiments/``, so they work in the committed and the smoke book alike.
        """
        from IPython.display import Markdown

        prov = provenance(self.start)
        where = Path(REPO_ROOT) / shown(published(self.out_dir))
        try:
            rel = "../../" + where.resolve().relative_to(REPO_ROOT).as_posix()
        except ValueError:  # results outside the repository (LAYERWISE_RESULTS): name the folder, no links
            rel = None
        notebook = notebook or f"{self.experiment}.ipynb"
        if rel:
            files = [f"{{download}}`summary.json <{rel}/summary.json>`"]
            files += [f"{{download}}`{n}.csv <{rel}/{n}.csv>`" for n in sorted(self.tables)]
            links = (f"**Downloads.** The executed notebook ({{download}}`{notebook} <{notebook}>`, code included) "
                     f"and this run's results: {', '.join(files)}.")
        else:
            links = f"**Results** of this run are in `{where}` (summary.json and one CSV per table)."

        def cell(v: Any) -> str:
            return "`" + str(v).replace("|", "\\|").replace("`", "'").replace("\n", " ") + "`"

        params = "\n".join(f"| `{k}` | {cell(v)} |" for k, v in self.params.items())
        facts = [("profile", self.profile), ("git commit", prov["git_commit"]), ("started", prov["start_time"])]
        facts += [(k, v) for k, v in prov["hardware"].items()]
        facts += [(k, v) for k, v in prov["versions"].items()]
        rows = "\n".join(f"| {k} | {cell(v)} |" for k, v in facts)
        text = (f"{links}\n\n:::{{admonition}} Parameters and provenance (click to open)\n:class: dropdown provenance\n\n"
                f"| parameter | value |\n|---|---|\n{params}\n\n"
                f"| profile, commit, hardware, versions | value |\n|---|---|\n{rows}\n:::\n")
        return Markdown(text)

    def metric(self, name: str, record: dict[str, Any]) -> dict[str, Any]:
        """Record a metric; ``record`` is a :func:`analysis_kit.stats.summarize` dict."""
        missing = {"mean", "ci_low", "ci_high", "n", "unit", "method"} - set(record)
        if missing:
            raise LayerwiseError(f"metric {name!r} lacks {sorted(missing)}; build it with stats.summarize().")
        self.metrics[name] = _clean(dict(record))
        return self.metrics[name]

    def test(self, result: Any) -> None:
        """Record a test (a ``stats.TestResult`` or a dict with name, statistic, p_value, p_holm, effect_size)."""
        rec = result.as_dict() if hasattr(result, "as_dict") else dict(result)
        missing = {"name", "statistic", "p_value", "p_holm", "effect_size"} - set(rec)
        if missing:
            raise LayerwiseError(f"test record lacks {sorted(missing)}; Holm-correct the family with stats.holm_family().")
        self.tests.append(_clean(rec))

    def table(self, name: str, df: pd.DataFrame) -> pd.DataFrame:
        """Keep a tidy table; it is written as ``<name>.csv`` beside summary.json."""
        self.tables[name] = df.reset_index(drop=True) if not isinstance(df.index, pd.RangeIndex) else df
        return df

    def glue(self, name: str, value: Any, fmt: str | None = None, display: bool = False) -> Any:
        """Glue a number for the prose (``{glue:text}`name```); ``fmt`` formats it (e.g. ``".1%"``)."""
        from myst_nb import glue

        shown = format(value, fmt) if fmt else value
        self.glued[name] = _clean(value)
        glue(name, shown, display=display)
        return shown

    def glue_md(self, name: str, text: str) -> str:
        """Glue a Markdown block (``{glue:md}`name```), e.g. findings written from the results by a study."""
        from IPython.display import Markdown
        from myst_nb import glue

        self.glued[name] = text
        glue(name, Markdown(text), display=False)
        return text

    def glue_metric(self, name: str, record: dict[str, Any], fmt: str = ".3f", scale: float = 1.0) -> str:
        """Record a metric and glue ``"<mean> (95% CI <lo>–<hi>)"`` under ``name``."""
        self.metric(name, record)
        lo, hi = record["ci_low"], record["ci_high"]
        ci = "" if lo is None or hi is None or (isinstance(lo, float) and math.isnan(lo)) else \
            f" (95% CI {format(lo * scale, fmt)}–{format(hi * scale, fmt)})"
        return self.glue(name, f"{format(record['mean'] * scale, fmt)}{ci}")

    def record(self, name: str, rows: pd.DataFrame | list | dict) -> None:
        """Keep a small table inside summary.json itself (``records``), for checks that read only that file."""
        self.records[name] = _clean(rows.to_dict(orient="records") if isinstance(rows, pd.DataFrame) else rows)

    def note(self, text: str) -> None:
        """A caveat that travels with the results."""
        self.notes.append(text)

    def summary(self) -> dict[str, Any]:
        """The summary.json payload."""
        return {
            "experiment": self.experiment,
            "profile": self.profile,
            "params": _clean(self.params),
            "provenance": provenance(self.start),
            "metrics": self.metrics,
            "tests": self.tests,
            "glued": self.glued,
            "notes": self.notes,
            "records": self.records,
            "tables": sorted(f"{n}.csv" for n in self.tables),
        }

    def save(self) -> str:
        """Write summary.json and the tables atomically; return where they are published, for the reader.

        That is ``results/<experiment>/<profile>`` (relative to the repository): under ``analysis-kit run``
        the files go to a staging folder first, which the runner publishes there when the notebook succeeds.
        """
        out = self.out_dir
        out.mkdir(parents=True, exist_ok=True)
        for name, df in self.tables.items():
            atomic_write_text(out / f"{name}.csv", df.to_csv(index=False))
        atomic_write_json(out / "summary.json", self.summary())
        return shown(published(out))
