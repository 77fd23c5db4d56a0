"""Your own model and data: from a Hugging Face folder to an importance report, a plan and a smaller model.

``analysis-kit analyze MODEL_DIR --data FILE --out DIR`` and this module's API do the same work:

1. **check** every option, the model's config (no weights read: an unsupported family or a head that does not
   fit the task is refused here) and the data (missing columns, empty file, bad encoding, one label only,
   too few rows for the split), all before any model loads;
2. **score** every block with each importance method on several calibration batches drawn from the
   training part of the data, and summarise the per-batch scores into a mean with a 95% interval
   (``stats.summarize`` over calibration batches);
3. **plan**: pick the blocks to keep with a ``compress`` strategy (``importance`` ranks blocks by the first
   method's mean score) at a target ratio ``L / L'`` or a number of blocks;
4. **compress** (``compress.compact``), optionally **heal** (``heal``: ``finetune`` = all weights on the task
   loss, ``distill`` from the full model, ``lora`` merged back), and save a plain Hugging Face folder with its
   tokenizer (``compress.save_folder``) that ``transformers`` alone loads;
5. **measure** on the held-out part: accuracy (classification) or loss and perplexity (causal LM) of the
   full and the compressed model, retention with a bootstrap interval over held-out examples, and latency
   before and after (``measure.latency``);
6. **report**: ``report.json`` (every number), ``report.md`` and ``report.html`` (the same numbers, the
   importance chart and the plan).

Every finished stage (scores per method and calibration batch, the selection, the healed weights, the
evaluation) is kept in ``OUT/.analyze/`` under a key of everything it depends on (the model's files, the
data, the settings), written atomically; a run that was interrupted, or re-run with other settings,
recomputes only what changed.

Example (a tiny random BERT classifier; runs in a few seconds on a CPU)::

    >>> import tempfile, pathlib, pandas as pd, torch
    >>> from transformers import BertConfig, BertForSequenceClassification, BertTokenizerFast
    >>> from analysis_kit import analyze
    >>> tmp = pathlib.Path(tempfile.mkdtemp())
    >>> words = ["good", "bad", "great", "awful", "fine", "the", "phone", "was"]
    >>> _ = (tmp / "vocab.txt").write_text("\\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words]))
    >>> tok = BertTokenizerFast(vocab_file=str(tmp / "vocab.txt"))
    >>> torch.manual_seed(0) and None
    >>> model = BertForSequenceClassification(BertConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=4,
    ...     num_attention_heads=4, intermediate_size=64, max_position_embeddings=64, pad_token_id=0))
    >>> model.save_pretrained(tmp / "model"); _ = tok.save_pretrained(tmp / "model")
    >>> rows = [(f"the phone was {w}", int(w in ("good", "great", "fine"))) for w in words[:5]] * 8
    >>> pd.DataFrame(rows, columns=["text", "label"]).to_csv(tmp / "reviews.csv", index=False)
    >>> a = analyze.Analyzer(tmp / "model", tmp / "reviews.csv", tmp / "out", latency_rounds=2)
    >>> table = a.importance(["block_influence", "ablation"])     # one row per method and block, with intervals
    >>> plan = a.plan(target_ratio=2.0)                          # keep 2 of the 4 blocks
    >>> small = a.compress(heal="none")                          # the model, also saved to out/model
    >>> result = a.report()                                      # out/report.{json,md,html}
    >>> result["plan"]["n_kept"], (tmp / "out" / "model" / "config.json").is_file()
    (2, True)

``analyze.run(model_dir, data, out, ...)`` does all of it in one call and returns the report record.
"""

from __future__ import annotations

import hashlib
import html
import json
import math
import os
import shutil
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from . import cache, compress, data, layers, measure, stats
from .cache import atomic_write_json, atomic_write_text, temp_dir
from .device import progress
from .errors import LayerwiseError

#: Tasks: a sequence classifier scored on its labels, or a causal LM scored on its next-token loss.
TASKS = ("auto", "classification", "lm")
#: Data formats (``auto`` picks by file name and content).
FORMATS = data.FORMATS
#: Healing after compression (``finetune`` = every weight trained on the task loss, no teacher).
HEAL = ("none", "finetune", "distill", "lora")
#: Importance methods computed when none are named: the measured damage and two cheap geometric scores.
DEFAULT_METHODS = ("ablation", "block_influence", "fisher")
#: How one calibration batch runs through the model: its texts, sorted by length, in forward batches of at most
#: ``MICRO_BATCH`` texts, each closed early when padding to its longest text would exceed ``PAD_SLACK`` times
#: their real tokens. One padded batch of 32 Amazon snippets held about 3.5 times their real tokens under
#: SmolLM2's tokenizer (a seeded sample; most snippets are short, a few long). The scores do not depend on the
#: grouping: every method sums or averages per example or per token; the calibration batch stays the unit the
#: interval is over.
MICRO_BATCH = 16
PAD_SLACK = 1.25
STAGES_DIR = ".analyze"
MODEL_DIR = "model"


class AnalyzeError(LayerwiseError):
    """An ``analyze`` request that cannot run: bad option, unsupported model, or data that cannot be used."""


class AnalyzeDataError(AnalyzeError):
    """The data file cannot be used (missing columns, empty, bad encoding, one label only, too few rows)."""


# --------------------------------------------------------------------------------------------------
# Data: read a table, check it, split it (no model involved)


def _labels_for_head(values: pd.Series, config: Any, where: str) -> tuple[np.ndarray, dict[str, int]]:
    """Class ids for the model's head: by name (``config.label2id``) or as integer ids in ``0..num_labels-1``."""
    n = int(config.num_labels)
    label2id = {str(k): int(v) for k, v in (getattr(config, "label2id", None) or {}).items()}
    named = {k: v for k, v in label2id.items() if not k.startswith("LABEL_")}
    distinct = sorted(values.astype(str).unique().tolist())
    if named and all(v in named for v in distinct):
        return values.astype(str).map(named).to_numpy(np.int64), {v: named[v] for v in distinct}
    numeric = pd.to_numeric(values, errors="coerce")
    if numeric.notna().all() and (numeric == numeric.round()).all() and numeric.between(0, n - 1).all():
        ids = numeric.to_numpy(np.int64)
        return ids, {str(i): int(i) for i in sorted(set(ids.tolist()))}
    names = ", ".join(f"{i}={name}" for name, i in sorted(label2id.items(), key=lambda kv: kv[1]))
    raise AnalyzeDataError(f"{where}: labels {distinct[:8]}{' ...' if len(distinct) > 8 else ''} do not fit the "
                           f"model's head with {n} outputs ({names}); use class ids 0..{n - 1} or the label names "
                           "of config.id2label.")


@dataclass
class Data:
    """The user's examples after checks: ``train`` (calibration and healing) and ``held_out`` (evaluation).

    Both have columns ``text`` and (classification) ``label`` (class ids of the model's head).
    """

    path: str
    format: str
    train: pd.DataFrame
    held_out: pd.DataFrame
    n_rows: int
    dropped_rows: int
    text_column: str
    label_column: str | None
    label_ids: dict[str, int]

    def fingerprint(self) -> str:
        """SHA-256 of the texts, labels and split: part of every stage key."""
        h = hashlib.sha256()
        for name, df in (("train", self.train), ("held_out", self.held_out)):
            h.update(name.encode())
            h.update(pd.util.hash_pandas_object(df, index=False).to_numpy().tobytes())
        return h.hexdigest()

    def describe(self) -> dict[str, Any]:
        return {"path": self.path, "format": self.format, "n_rows": self.n_rows, "dropped_rows": self.dropped_rows,
                "n_train": len(self.train), "n_held_out": len(self.held_out), "text_column": self.text_column,
                "label_column": self.label_column, "labels": self.label_ids or None}


def load_data(path: str | Path | pd.DataFrame, task: str, config: Any = None, *, text_column: str = "text",
              label_column: str = "label", fmt: str = "auto", held_out: float = 0.2, seed: int = 0) -> Data:
    """Read, check and split the user's data for ``task`` (``classification`` or ``lm``); no model is loaded.

    Formats: CSV, TSV, JSONL (any column names: ``text_column``, ``label_column``), Amazon Reviews 2023 JSONL
    (``data.load_amazon_reviews_2023``: polarity labels, 3-star reviews left out), a folder written by
    ``datasets``' ``save_to_disk`` (read with pyarrow), or a pandas DataFrame. Rows without text (or label) are dropped
    and counted. Classification labels are mapped to the head's class ids through ``config.label2id``
    (names) or taken as ids ``0..num_labels-1``. The split is seeded and stratified by label.

    Raises :class:`AnalyzeDataError` for a missing file, an empty file, bad encoding (file and line), missing
    columns (naming the ones present), one label only, labels that do not fit the head, too few rows.
    """
    if task not in ("classification", "lm"):
        raise AnalyzeError(f"task={task!r}; load_data needs 'classification' or 'lm'.")
    if not 0 < held_out < 1:
        raise AnalyzeError(f"held_out={held_out} must be a share in (0, 1), e.g. 0.2.")
    if isinstance(path, pd.DataFrame):  # the Python API also takes a table in memory
        df, path, fmt = path, "<DataFrame>", "dataframe"
    else:
        path = Path(path).expanduser()
        try:
            df, fmt = data.read_table(path, fmt, label_column)
        except data.DataError as exc:
            raise AnalyzeDataError(str(exc)) from exc
    if df.empty:
        raise AnalyzeDataError(f"{path} holds no rows; put one example per row.")
    need = [text_column] + ([label_column] if task == "classification" else [])
    missing = [c for c in need if c not in df.columns]
    if missing:
        flag = " / ".join(f"--{'text' if c == text_column else 'label'}-column" for c in missing)
        raise AnalyzeDataError(f"{path} has no column(s) {missing}; its columns are {list(map(str, df.columns))}. "
                               f"Name the right ones with {flag} (text_column= / label_column=).")
    keep = df[text_column].notna() & (df[text_column].astype(str).str.strip() != "")
    if task == "classification":
        keep &= df[label_column].notna()
    n_rows = len(df)
    df = df[keep]
    if df.empty:
        raise AnalyzeDataError(f"{path}: none of its {n_rows} rows has a text (and label); check the column names.")
    out = pd.DataFrame({"text": df[text_column].astype(str).to_numpy()})
    label_ids: dict[str, int] = {}
    strata = None
    if task == "classification":
        distinct = df[label_column].astype(str).unique()
        if len(distinct) < 2:
            raise AnalyzeDataError(f"{path}: every row has the same label {distinct[0]!r} in column {label_column!r}; "
                                   "retention needs at least two classes. Check --label-column, or use more data.")
        if config is not None:
            out["label"], label_ids = _labels_for_head(df[label_column], config, str(path))
        else:
            names = sorted(distinct.tolist())
            label_ids = {v: i for i, v in enumerate(names)}
            out["label"] = df[label_column].astype(str).map(label_ids).to_numpy(np.int64)
        strata = out["label"]
        counts = out["label"].value_counts()
        n_classes = len(counts)
        n_test = round(len(out) * held_out)
        if counts.min() < 2 or n_test < n_classes or len(out) - n_test < n_classes:
            need_rows = max(math.ceil(n_classes / min(held_out, 1 - held_out)), 2 * n_classes)
            raise AnalyzeDataError(
                f"{path}: {len(out)} usable rows ({', '.join(f'label {k}: {v}' for k, v in counts.items())}) are too "
                f"few for a held-out split of {held_out:.0%}: every label needs at least 2 rows and each part one row "
                f"per label, so at least {need_rows} rows. Use more data or another --held-out share.")
    elif len(out) < 4 or round(len(out) * held_out) < 2 or len(out) - round(len(out) * held_out) < 2:
        raise AnalyzeDataError(f"{path}: {len(out)} usable texts are too few for a held-out split of {held_out:.0%} "
                               "(each part needs at least 2); use more data.")
    from sklearn.model_selection import train_test_split

    train, test = train_test_split(out, test_size=held_out, random_state=seed, stratify=strata)
    return Data(str(path), fmt, train.reset_index(drop=True), test.reset_index(drop=True), n_rows,
                n_rows - len(out), text_column, label_column if task == "classification" else None, label_ids)


# --------------------------------------------------------------------------------------------------
# The model: inspect the config (no weights), then load


def inspect_model(model_dir: str | Path, task: str = "auto") -> tuple[Any, str]:
    """``(config, task)`` of a model folder from its config alone (no weights are read).

    Refuses an unsupported family (naming the supported ones, ``layers.SUPPORTED``), a bare model without a
    head, and a head that does not fit ``task`` (a classifier for ``lm`` or a causal LM for ``classification``).
    """
    if task not in TASKS:
        raise AnalyzeError(f"unknown task {task!r}; choose from {', '.join(TASKS)}.")
    folder = Path(model_dir).expanduser()
    try:
        config, kind = compress._inspect(folder)
    except compress.CompressError as exc:
        raise AnalyzeError(f"{exc} Supported families: {', '.join(layers.SUPPORTED)}, each with a sequence-"
                           "classification head or as a causal LM.") from exc
    arch = "/".join(config.architectures or [config.model_type])
    if kind == "bare":
        raise AnalyzeError(f"{folder} holds a bare {arch} without a task head; analyze needs a sequence classifier "
                           "(fine-tune one, e.g. with AutoModelForSequenceClassification) or a causal LM.")
    found = "classification" if kind == "classifier" else "lm"
    if task != "auto" and task != found:
        fix = "--task lm" if found == "lm" else "--task classification"
        raise AnalyzeError(f"--task {task} does not fit {folder}: it holds {arch} ({found}); use {fix}, or a folder "
                           f"with a {'causal LM' if task == 'lm' else 'sequence-classification head'}.")
    if found == "classification" and int(config.num_labels) < 2:
        raise AnalyzeError(f"{folder} holds a regression head (num_labels=1); analyze measures accuracy and needs a "
                           "classifier with at least two classes.")
    return config, found


def _load_model(model_dir: Path, task: str) -> tuple[Any, Any]:
    """The model and its tokenizer (the one place weights are read; tests replace it to prove the order)."""
    model, tokenizer = compress._load_any(model_dir, "classifier" if task == "classification" else "lm")
    if task == "classification" and model.config.pad_token_id is None and tokenizer.pad_token_id is not None:
        model.config.pad_token_id = tokenizer.pad_token_id  # decoder classifiers find the last token with it
    return model, tokenizer


# --------------------------------------------------------------------------------------------------
# Stages cached in the output folder


def _read_json(path: Path) -> Any:
    """The JSON in ``path``, or None when it is missing or unreadable (then the stage is recomputed)."""
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


class _Stages:
    """JSON stage results in ``OUT/.analyze/<name>.json``, each valid only for the key it was computed under."""

    def __init__(self, out: Path) -> None:
        self.root = out / STAGES_DIR
        self.status: dict[str, str] = {}

    def get(self, name: str, key: str) -> Any:
        rec = _read_json(self.root / f"{name}.json")
        return rec["value"] if rec is not None and rec.get("key") == key else None

    def put(self, name: str, key: str, value: Any) -> Any:
        atomic_write_json(self.root / f"{name}.json", {"key": key, "value": value})
        return value

    def cached(self, name: str, key: str, compute: Callable[[], Any], stage: str | None = None) -> Any:
        """The stored value under ``key``, else ``compute()`` stored; ``status[stage]`` says which."""
        value = self.get(name, key)
        stage = stage or name
        if value is not None:
            self.status.setdefault(stage, "cached")
            return value
        self.status[stage] = "computed"
        return self.put(name, key, compute())


@dataclass(frozen=True)
class Plan:
    """Which blocks to keep: the strategy's choice for a model of ``n_blocks`` blocks."""

    strategy: str
    method: str | None
    n_blocks: int
    keep: tuple[int, ...]

    @property
    def drop(self) -> tuple[int, ...]:
        return tuple(i for i in range(self.n_blocks) if i not in self.keep)

    @property
    def ratio(self) -> float:
        return self.n_blocks / len(self.keep)

    def as_dict(self) -> dict[str, Any]:
        return {"strategy": self.strategy, "method": self.method, "n_blocks": self.n_blocks, "keep": list(self.keep),
                "drop": list(self.drop), "n_kept": len(self.keep), "ratio": self.ratio}


# --------------------------------------------------------------------------------------------------
# The analyzer


def _check_methods(methods: Sequence[str] | str) -> tuple[str, ...]:
    from .importance import METHODS

    methods = (methods,) if isinstance(methods, str) else tuple(methods)
    bad = [m for m in methods if m not in METHODS]
    if bad or not methods:
        raise AnalyzeError(f"unknown importance method(s) {bad or list(methods)}; choose from {', '.join(METHODS)}.")
    if len(set(methods)) != len(methods):
        raise AnalyzeError(f"methods {list(methods)} repeat a method; name each once.")
    return methods


def _check_strategy(strategy: str, method: str | None, methods: Sequence[str]) -> Any:
    """The registered strategy (``strategies.lookup``), or a clear error; ``method`` must be a computed one."""
    from .strategies import lookup, names

    if strategy not in names():
        raise AnalyzeError(f"unknown strategy {strategy!r}; choose from {', '.join(names())}.")
    chosen = lookup(strategy)
    if method is not None and not chosen.needs_importance:
        raise AnalyzeError(f"method {method!r} (--method) ranks blocks only for a strategy that uses importance "
                           f"scores (e.g. 'importance'); strategy {strategy!r} ignores it. Drop --method.")
    if method is not None and method not in methods:
        raise AnalyzeError(f"method {method!r} is not among the computed importance methods {list(methods)}.")
    return chosen


def _check_heal(heal: str, heal_steps: int | None) -> None:
    if heal not in HEAL:
        raise AnalyzeError(f"unknown healing {heal!r}; choose from {', '.join(HEAL)}.")
    if heal_steps is not None and (isinstance(heal_steps, bool) or not isinstance(heal_steps, int) or heal_steps < 1):
        raise AnalyzeError(f"heal_steps={heal_steps!r} must be a positive number of optimizer steps.")


def _fmt(x: Any) -> str:
    """How every number appears in report.md and report.html (the test reads them back)."""
    if x is None:
        return "–"
    if isinstance(x, (int, np.integer)) and not isinstance(x, bool):
        return f"{int(x):,}"
    return f"{float(x):.4g}"


class Analyzer:
    """The analysis of one model folder on one data file, written to one output folder ``out``.

    Steps, each a call (later steps run the earlier ones they need with their defaults)::

        a = Analyzer("my-model", "reviews.csv", "out")   # checks options, config and data; no weights yet
        a.importance(["ablation", "block_influence"])    # per-block scores with 95% intervals (a DataFrame)
        a.plan(target_ratio=2.0)                         # or keep=K; strategy="importance" by default
        a.compress(heal="distill")                       # the smaller model, saved to out/model
        a.report()                                       # out/report.json, report.md, report.html

    Options: ``task`` (``auto`` from the config, ``classification`` or ``lm``), ``text_column``,
    ``label_column``, ``data_format`` (``FORMATS``), ``held_out`` (share of rows for evaluation), ``seed``
    (split, calibration draw, random strategy, healing), ``device``, ``max_length`` (tokens per text),
    ``batch_size`` (evaluation), ``calib_examples`` and ``calib_batch_size`` (importance is computed per
    calibration batch; the interval is over these batches), ``max_eval`` (cap on held-out examples),
    ``latency_batch``/``latency_rounds`` (timing), ``log`` (a callable for stage messages).
    """

    def __init__(self, model_dir: str | Path, data: str | Path | pd.DataFrame, out: str | Path, *, task: str = "auto",
                 text_column: str = "text", label_column: str = "label", data_format: str = "auto",
                 held_out: float = 0.2, seed: int = 0, device: str = "auto", max_length: int = 128,
                 batch_size: int = 32, calib_examples: int = 256, calib_batch_size: int = 32,
                 max_eval: int | None = None, latency_batch: int = 8, latency_rounds: int = 5,
                 log: Callable[[str], None] | None = None) -> None:
        self.start = time.time()
        self.log = log or (lambda msg: None)
        for name, value, low in (("max_length", max_length, 8), ("batch_size", batch_size, 1),
                                 ("calib_examples", calib_examples, 2), ("calib_batch_size", calib_batch_size, 2),
                                 ("latency_batch", latency_batch, 1), ("latency_rounds", latency_rounds, 1),
                                 ("seed", seed, 0)):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise AnalyzeError(f"{name}={value!r} must be an integer >= {low}.")
        if max_eval is not None and (not isinstance(max_eval, int) or max_eval < 2):
            raise AnalyzeError(f"max_eval={max_eval!r} must be an integer >= 2 (or None for the whole held-out part).")
        compress._check_device(device)
        self.out = Path(out).expanduser()
        if self.out.exists() and (not self.out.is_dir() or (any(self.out.iterdir()) and not (
                (self.out / STAGES_DIR).is_dir() or (self.out / "report.json").is_file()))):
            raise AnalyzeError(f"output folder {self.out} exists and is not an analyze output folder; choose a new "
                               "folder (an earlier analyze output folder is resumed).")
        self.model_dir = Path(model_dir).expanduser()
        self.config, self.task = inspect_model(self.model_dir, task)
        self.data = load_data(data, self.task, self.config if self.task == "classification" else None,
                              text_column=text_column, label_column=label_column, fmt=data_format,
                              held_out=held_out, seed=seed)
        self.settings = {"task": self.task, "held_out": held_out, "seed": seed, "device": device,
                         "max_length": max_length, "batch_size": batch_size, "calib_examples": calib_examples,
                         "calib_batch_size": calib_batch_size, "max_eval": max_eval, "latency_batch": latency_batch,
                         "latency_rounds": latency_rounds}
        self.n_blocks = int(self.config.num_hidden_layers)
        self.stages = _Stages(self.out)
        self.model = self.tokenizer = None
        self._base_key: str | None = None
        self.scores: pd.DataFrame | None = None
        self.batch_scores: pd.DataFrame | None = None
        self._plan: Plan | None = None
        self._plan_key: str | None = None
        self.compressed = None
        self._heal: dict[str, Any] | None = None
        self._heal_key: str | None = None
        self.evaluation: dict[str, Any] | None = None

    # ---------------------------------------------------------------------------------- plumbing

    @property
    def base_key(self) -> dict[str, Any]:
        if self._base_key is None:
            self._base_key = cache.key_of({"model": cache.file_digest(self.model_dir), "data": self.data.fingerprint(),
                                           "settings": {k: v for k, v in self.settings.items()
                                                        if k not in ("device", "latency_batch", "latency_rounds")},
                                           "code": cache.code_key(*_key_modules())})
        return {"base": self._base_key}

    def load(self) -> Any:
        """Load the model and tokenizer (once); returns the model."""
        if self.model is None:
            self._lock()
            self.log(f"loading {self.model_dir}")
            self.model, self.tokenizer = _load_model(self.model_dir, self.task)
            from .device import pick

            # importance methods run on the model's own device: put it where the user asked once, here
            self.model.to(pick(self.settings["device"]))
            if self.tokenizer.pad_token is None:
                raise AnalyzeError(f"the tokenizer in {self.model_dir} has no pad token and no EOS token to use as "
                                   "one; set tokenizer.pad_token and save it into the folder.")
            if self.task == "lm":  # texts need two tokens to have a next token to predict
                for part in ("train", "held_out"):
                    df = getattr(self.data, part)
                    ids = self.tokenizer(df["text"].tolist(), truncation=True, max_length=self.settings["max_length"])
                    ok = np.array([len(x) >= 2 for x in ids["input_ids"]])
                    if ok.sum() < 2:
                        raise AnalyzeDataError(f"{self.data.path}: fewer than 2 texts of the {part} part have two "
                                               "tokens or more; a causal LM needs longer texts.")
                    self.data.dropped_rows += int((~ok).sum())
                    setattr(self.data, part, df[ok].reset_index(drop=True))
        return self.model

    def _lock(self) -> None:
        """Hold ``OUT/.analyze/lock`` for this analyzer's lifetime: one run writes an output folder at a time."""
        import fcntl

        (self.out / STAGES_DIR).mkdir(parents=True, exist_ok=True)
        if getattr(self, "_lock_file", None) is not None:
            return
        self._lock_file = open(self.out / STAGES_DIR / "lock", "a+")  # noqa: SIM115 (held until the analyzer goes)
        try:
            fcntl.flock(self._lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._lock_file.close()
            self._lock_file = None
            raise AnalyzeError(f"another analyze run is writing to {self.out}; wait for it to finish, or choose "
                               "another --out folder.") from None

    def _encode(self, df: pd.DataFrame, batch_size: int) -> compress.Encoded:
        labels = df["label"].to_numpy() if self.task == "classification" else None
        return compress.encode(self.tokenizer, df["text"].tolist(), labels, batch_size=batch_size,
                               max_length=self.settings["max_length"])

    def _calibration(self) -> pd.DataFrame:
        n = min(self.settings["calib_examples"], len(self.data.train))
        return self.data.train.sample(n=n, random_state=self.settings["seed"]).reset_index(drop=True)

    def _grouped(self, df: pd.DataFrame, max_size: int | None = None) -> compress.Encoded:
        """``df`` as the model's input batches of at most ``max_size`` (:data:`MICRO_BATCH`) texts with little padding
        (:func:`_length_groups`): labelled batches for a classifier (``compress.encode``), next-token batches for
        a causal LM (``importance.lm_batches``); ``order`` maps them back to ``df``'s rows."""
        from . import importance

        ids = self.tokenizer(df["text"].tolist(), truncation=True, max_length=self.settings["max_length"])
        groups = _length_groups([len(x) for x in ids["input_ids"]], max_size or MICRO_BATCH, PAD_SLACK)
        batches = []
        for group in groups:
            part = df.iloc[group]
            batches.extend(importance.lm_batches(self.tokenizer, part["text"].tolist(), batch_size=len(part),
                                                 max_length=self.settings["max_length"]) if self.task == "lm"
                           else self._encode(part, len(part)).batches)
        return compress.Encoded(batches, np.concatenate(groups))

    def _n_calib_batches(self) -> int:
        return max(1, round(min(self.settings["calib_examples"], len(self.data.train))
                            / self.settings["calib_batch_size"]))

    def _calib_key(self, stage: str, batch: int, **extra: Any) -> str:
        """The key of one calibration batch's stage result (``scores`` per method, ``runs``)."""
        return cache.key_of({**self.base_key, "stage": stage, **extra, "batch": batch, "calib": [
            self.settings["calib_examples"], self.settings["calib_batch_size"]]})

    def _angular_runs(self) -> pd.DataFrame | None:
        """The angular distance of every run of blocks over all calibration tokens (the token-weighted mean of
        the per-batch means that ``importance`` kept), as ``compress.angular_distances`` gives it; None unless
        every calibration batch's runs are stored."""
        got = [self.stages.get(f"runs/batch{j:03d}", self._calib_key("runs", j))
               for j in range(self._n_calib_batches())]
        if any(g is None for g in got):
            return None
        tokens = np.array([g["tokens"] for g in got], dtype=float)
        distance = tokens @ np.array([g["distance"] for g in got]) / tokens.sum()
        return pd.DataFrame({"start": got[0]["start"], "n": got[0]["n"], "distance": distance})

    def _calib_batches(self) -> list[list[dict[str, Any]]]:
        """``calib_examples`` random training examples in calibration batches of about ``calib_batch_size``,
        each as a list of forward batches with little padding (:data:`MICRO_BATCH`, :data:`PAD_SLACK`).

        A classifier's batches are stratified: the examples, sorted by label, are dealt out in turn, so every
        batch holds each label in about its share of the data (per-batch scores then vary by sampling, not by
        which labels a batch happened to get, and probes such as ``mutual_info`` see every class).
        """
        calib = self._calibration()
        n_batches = self._n_calib_batches()
        if self.task == "classification":
            order = calib.sort_values("label", kind="stable").index.to_numpy()
        else:
            order = calib.index.to_numpy()
        return [self._grouped(calib.loc[order[b::n_batches]]).batches for b in range(n_batches)]

    # ---------------------------------------------------------------------------------- steps

    def importance(self, methods: Sequence[str] = DEFAULT_METHODS) -> pd.DataFrame:
        """Score every block with each method on every calibration batch; summarise over batches.

        Returns one row per method and block: ``method, layer, score`` (mean over calibration batches;
        higher = more important, see ``importance.SIGN_CONVENTION``), ``ci_low, ci_high`` (95%: Student t
        over fewer than 10 batches, BCa bootstrap otherwise), ``n`` (batches) and ``interval`` (how). The
        per-batch scores are in ``self.batch_scores``. Each (method, batch) is cached in the output folder; the
        methods still to compute on a batch run together (``importance.compute_all``), so they share one trace
        and one gradient pass instead of a forward pass each.

        With ``angular`` among the methods, the same trace also gives the angular distance of every run of
        consecutive blocks (``importance.angular_runs``), kept per batch with its token count: ``plan`` with
        the ``angular`` strategy then reads them instead of running the model over the calibration texts again.
        """
        from . import importance

        methods = _check_methods(methods)
        model = self.load()
        batches = self._calib_batches()
        self.log(f"importance: {', '.join(methods)} on {len(batches)} calibration batches")
        found: dict[tuple[str, int], list[float]] = {}
        for j in progress(range(len(batches)), desc="importance (calibration batches, all methods at once)"):
            keys = {m: self._calib_key("scores", j, method=m) for m in methods}
            todo = []
            for m in methods:
                value = self.stages.get(f"scores/{m}/batch{j:03d}", keys[m])
                if value is None:
                    todo.append(m)
                else:
                    found[m, j] = value
            runs_key = self._calib_key("runs", j)
            want_runs = "angular" in methods and self.stages.get(f"runs/batch{j:03d}", runs_key) is None
            if not todo and not want_runs:
                self.stages.status.setdefault("importance", "cached")
                continue
            self.stages.status["importance"] = "computed"
            try:
                tr = importance.trace(model, batches[j]) if want_runs else None
                table = importance.compute_all(model, batches[j], todo, seed=self.settings["seed"], trace=tr) \
                    if todo else pd.DataFrame(columns=["method", "layer", "score"])
                if want_runs:
                    runs = importance.angular_runs(model, batches[j], trace=tr, max_n=self.n_blocks - 1)
                    self.stages.put(f"runs/batch{j:03d}", runs_key, {
                        "tokens": sum(int(b["attention_mask"].sum()) for b in batches[j]),
                        **{c: runs[c].tolist() for c in ("start", "n", "distance")}})
            except importance.ImportanceError as exc:
                size = sum(b["input_ids"].shape[0] for b in batches[j])
                raise AnalyzeError(f"importance ({', '.join(todo)}) failed on calibration batch {j} ({size} examples): "
                                   f"{exc} Larger calibration batches help: raise calib_batch_size "
                                   "(--calib-batch-size), or drop the method.") from exc
            for m, part in table.groupby("method", sort=False):
                scores = part.sort_values("layer")["score"].astype(float).tolist()
                found[m, j] = self.stages.put(f"scores/{m}/batch{j:03d}", keys[m], scores)
        rows = [{"method": m, "batch": j, "layer": i, "score": s}
                for m in methods for j in range(len(batches)) for i, s in enumerate(found[m, j])]
        self.batch_scores = pd.DataFrame(rows)
        summary = []
        for (m, layer), g in self.batch_scores.groupby(["method", "layer"], sort=False):
            rec = _summarize_batches(g["score"].to_numpy())
            summary.append({"method": m, "layer": int(layer), "score": rec["mean"], "ci_low": rec["ci_low"],
                            "ci_high": rec["ci_high"], "n": rec["n"], "interval": rec["method"]})
        self.scores = pd.DataFrame(summary)
        self._plan = None
        return self.scores

    def plan(self, target_ratio: float | None = None, keep: int | None = None, strategy: str = "importance",
             method: str | None = None) -> Plan:
        """The blocks to keep: ``keep`` blocks, or ``round(L / target_ratio)`` (2.0 when neither is given).

        ``strategy``: a registered strategy (``strategies.names()``); one that uses importance (``importance``) keeps
        the blocks that ``method`` (default: the first computed method) ranks highest; one that needs data
        (``angular``, ``greedy``) gets the calibration examples (``angular`` reads the run distances that
        ``importance`` kept when ``angular`` was among its methods).
        """
        if target_ratio is None and keep is None:
            target_ratio = 2.0
        k = compress.n_keep(self.n_blocks, keep=keep, ratio=target_ratio)
        if self.scores is None:
            self.importance()
        methods = tuple(self.scores["method"].unique())
        chosen = _check_strategy(strategy, method, methods)
        method = (method or methods[0]) if chosen.needs_importance else None
        key = cache.key_of({**self.base_key, "stage": "plan", "strategy": strategy, "k": k, "method": method,
                            "scores": self.scores[self.scores["method"] == method]["score"].round(12).tolist()
                            if method else None, "calib": [self.settings["calib_examples"]]})

        def compute() -> list[int]:
            runs = self._angular_runs() if strategy == "angular" else None
            if runs is not None:  # the importance stage's trace gave them: no second pass over the texts
                return list(compress.keep_angular(self.model, None, k, table=runs))
            data = self._grouped(self._calibration()) if chosen.needs_data else None
            return list(compress.select(strategy, self.model, k, scores=self.scores, method=method, data=data,
                                        seed=self.settings["seed"], device=self.settings["device"]))

        kept = self.stages.cached("plan", key, compute)
        self._plan = Plan(strategy, method, self.n_blocks, tuple(int(i) for i in kept))
        self._plan_key = key
        self.compressed = None
        self.log(f"plan: keep blocks {list(self._plan.keep)} of {self.n_blocks} ({strategy}"
                 f"{f', {method}' if method else ''})")
        return self._plan

    def compress(self, heal: str = "none", heal_steps: int | None = None, heal_epochs: float = 2.0) -> Any:
        """The compressed (and, if asked, healed) model; also saved with its tokenizer to ``out/model``.

        ``heal``: ``none``; ``finetune`` (every weight on the task loss: ``heal.distill`` with only the label /
        next-token loss); ``distill`` (from the full model, ``heal.distill``); ``lora`` (``heal.lora``, merged).
        Steps: ``heal_steps``, else ``heal_epochs`` passes over the training part in batches of 16.
        """
        from . import heal as heal_mod

        _check_heal(heal, heal_steps)
        if self._plan is None:
            self.plan()
        plan = self._plan
        small = compress.compact(self.model, plan.keep)
        cfg = None
        if heal != "none":
            n_batches = math.ceil(len(self.data.train) / 16)
            steps = heal_steps or max(1, math.ceil(heal_epochs * n_batches))
            extra = {"kd_weight": 0.0, "hidden_weight": 0.0, "ce_weight": 1.0} if heal == "finetune" else {}
            cfg = heal_mod.HealConfig(steps=steps, batch_size=16, **extra)
        key = cache.key_of({"plan": self._plan_key, "stage": "heal", "heal": heal,
                            "cfg": heal_mod.describe(cfg) if cfg else None})
        folder = self.out / STAGES_DIR / "healed"
        info: dict[str, Any] = {"method": heal, "steps": cfg.steps if cfg else 0}
        if heal != "none":
            stored = _read_json(folder / "stage.json")  # written inside the folder: weights and key move together
            if stored is not None and stored.get("key") == key:
                self.stages.status["heal"] = "cached"
                small = type(small).from_pretrained(folder).eval()
                info = stored["value"]
            else:
                self.stages.status["heal"] = "computed"
                self.log(f"healing: {heal}, {cfg.steps} steps")
                train = self._train_batches()
                t0 = time.perf_counter()
                method = "distill" if heal == "finetune" else heal
                small, hist = heal_mod.heal(method, small, self.model, plan.keep, train, cfg,
                                            seed=self.settings["seed"], device=self.settings["device"])
                small = small.cpu().eval()
                info = {"method": heal, "steps": cfg.steps, "seconds": time.perf_counter() - t0,
                        "first_loss": float(hist["loss"].iloc[0]), "last_loss": float(hist["loss"].iloc[-1]),
                        "config": heal_mod.describe(cfg)}
                _remove_stale(folder.parent, ".healed.")
                tmp = temp_dir(folder.parent, ".healed.")
                try:
                    small.save_pretrained(tmp)
                    atomic_write_json(tmp / "stage.json", {"key": key, "value": info})
                    if folder.exists():
                        shutil.rmtree(folder)
                    os.replace(tmp, folder)
                except BaseException:
                    shutil.rmtree(tmp, ignore_errors=True)
                    raise
        self.compressed = small
        self._heal, self._heal_key = info, key
        self._save_model(small, plan, info, key)
        return small

    def _train_batches(self) -> list[dict[str, Any]]:
        from . import importance

        if self.task == "lm":
            return importance.lm_batches(self.tokenizer, self.data.train["text"].tolist(), batch_size=16,
                                         max_length=self.settings["max_length"])
        return self._encode(self.data.train, 16).batches

    def _save_model(self, small: Any, plan: Plan, info: dict[str, Any], key: str) -> None:
        target = self.out / MODEL_DIR
        record_file = target / "compression.json"
        if record_file.is_file():
            try:
                if json.loads(record_file.read_text()).get("analyze_key") == key:
                    return
            except (OSError, json.JSONDecodeError):
                pass
        if target.exists():  # an earlier plan's folder, written by us (compression.json) or half-empty
            if any(target.iterdir()) and not record_file.is_file():
                raise AnalyzeError(f"{target} exists and was not written by analyze; move it away.")
            shutil.rmtree(target)
        _remove_stale(self.out, f".{MODEL_DIR}.")  # compress.save_folder's temporary folder of a killed run
        record = {"source": str(self.model_dir), **plan.as_dict(), "heal": info["method"],
                  "params_before": measure.count_parameters(self.model),
                  "params_after": measure.count_parameters(small), "analyze_key": key}
        compress.save_folder(small, self.tokenizer, target, record)

    def evaluate(self) -> dict[str, Any]:
        """Retention on the held-out part and latency before and after (cached under the model's key)."""
        if self.compressed is None:
            self.compress()
        key = cache.key_of({"heal": self._heal_key, "stage": "evaluate", "max_eval": self.settings["max_eval"],
                            "latency": [self.settings["latency_batch"], self.settings["latency_rounds"],
                                        self.settings["device"]]})
        self.evaluation = self.stages.cached("evaluate", key, self._evaluate)
        return self.evaluation

    def _evaluate(self) -> dict[str, Any]:
        df = self.data.held_out
        cap = self.settings["max_eval"]
        if cap is not None and len(df) > cap:
            df = df.sample(n=cap, random_state=self.settings["seed"])
        self.log(f"evaluating on {len(df)} held-out examples")
        enc = self._grouped(df, self.settings["batch_size"])
        dev = self.settings["device"]
        readout = compress.logits_readout if self.task == "classification" else compress.lm_nll_readout
        outs = {}
        for name, model in (("full", self.model), ("compressed", self.compressed)):
            n = layers.num_blocks(model)
            outs[name] = compress.subset_outputs(model, enc, [range(n)], readout, dev,
                                                 desc=f"held-out ({name})")[tuple(range(n))]
        metrics: dict[str, Any] = {}
        if self.task == "classification":
            labels = df["label"].to_numpy()
            correct = {k: (v.argmax(1) == labels).astype(float) for k, v in outs.items()}
            for k, v in correct.items():
                metrics[f"accuracy/{k}"] = stats.summarize(v, unit="share", over="examples", bounds=(0, 1))
            if correct["full"].mean() > 0:
                metrics["retention"] = _paired_ratio(correct["compressed"], correct["full"], lambda c, f: c / f,
                                                     "compressed accuracy / full accuracy")
        else:
            for k, v in outs.items():
                rec = stats.summarize(v, unit="nats/token", over="examples")
                rec["method"] += "; each text's mean next-token loss, averaged over texts"
                metrics[f"loss/{k}"] = rec
                metrics[f"perplexity/{k}"] = {**rec, "mean": math.exp(rec["mean"]), "unit": "",
                                              "ci_low": _exp(rec["ci_low"]), "ci_high": _exp(rec["ci_high"]),
                                              "method": f"exp of the loss interval ({rec['method']})"}
            metrics["retention"] = _paired_ratio(np.asarray(outs["compressed"]), np.asarray(outs["full"]),
                                                 lambda c, f: np.exp(f - c), "full perplexity / compressed perplexity")
        metrics.update(self._latency())
        return {"n_examples": len(df), "metrics": metrics}

    def _latency(self) -> dict[str, Any]:
        max_pos = getattr(self.config, "max_position_embeddings", None) or getattr(self.config, "n_positions", 512)
        seq = max(2, min(64, self.settings["max_length"], int(max_pos) - 2))
        batch = measure.fixed_batch(self.tokenizer, self.settings["latency_batch"], seq, seed=self.settings["seed"])
        times: dict[str, list[float]] = {"full": [], "compressed": []}
        ratios = []
        for _ in progress(range(self.settings["latency_rounds"]), desc="latency"):  # interleaved rounds
            med = {}
            for name, model in (("full", self.model), ("compressed", self.compressed)):
                res = measure.latency(model, batch, repeats=5, warmup=1, device=self.settings["device"])
                times[name].extend(res["times_ms"])
                med[name] = res["median_ms"]
            ratios.append(med["full"] / med["compressed"])
        out = {}
        shape = f"batch {self.settings['latency_batch']} x {seq} tokens"
        for name, t in times.items():  # quartiles as measure.latency defines them
            q = statistics.quantiles(t, n=4) if len(t) > 1 else [t[0]] * 3
            out[f"latency_ms/{name}"] = {"mean": statistics.median(t), "ci_low": q[0], "ci_high": q[2],
                                         "n": len(t), "unit": "ms",
                                         "method": f"median and inter-quartile range of {len(t)} timed forward "
                                                   f"passes ({shape})"}
        out["speedup"] = stats.ratio_summary(ratios, unit="x", over="interleaved timing rounds")
        return out

    def report(self) -> dict[str, Any]:
        """Write ``report.json``, ``report.md``, ``report.html`` and ``importance.svg``; return the record."""
        if self.evaluation is None:
            self.evaluate()
        from . import report as report_mod

        plan = self._plan
        record = {
            "model": {"path": str(self.model_dir), "family": self.config.model_type,
                      "architecture": "/".join(self.config.architectures or []), "task": self.task,
                      "n_blocks": self.n_blocks,
                      "params_before": measure.count_parameters(self.model),
                      "params_after": measure.count_parameters(self.compressed)},
            "data": self.data.describe(),
            "settings": self.settings,
            "importance": self.scores.to_dict("records"),
            "plan": plan.as_dict(),
            "heal": self._heal,
            "evaluation": {"n_examples": self.evaluation["n_examples"]},
            "metrics": self.evaluation["metrics"],
            "outputs": {"model": str(self.out / MODEL_DIR), "report_md": str(self.out / "report.md"),
                        "report_html": str(self.out / "report.html"), "chart": str(self.out / "importance.svg")},
            "run": {"stages": dict(self.stages.status), "seconds": round(time.time() - self.start, 2)},
            "provenance": report_mod.provenance(self.start),
        }
        atomic_write_json(self.out / "report.json", record)
        record = json.loads((self.out / "report.json").read_text())  # the pages show exactly what the JSON holds
        svg = _chart_svg(self.batch_scores, self.scores, plan)
        atomic_write_text(self.out / "importance.svg", svg)
        atomic_write_text(self.out / "report.md", _markdown(record))
        atomic_write_text(self.out / "report.html", _html(record, svg))
        self.log(f"report: {self.out / 'report.html'}")
        return record


def _length_groups(lengths: Sequence[int], max_size: int, slack: float) -> list[np.ndarray]:
    """Positions of ``lengths`` from the longest to the shortest, cut into groups of at most ``max_size`` whose
    padded size (the group's size times its longest length) stays within ``slack`` times their summed lengths;
    a group of one always fits."""
    groups: list[np.ndarray] = []
    current: list[int] = []
    real = 0
    for i in np.argsort(-np.asarray(lengths), kind="stable"):
        n = int(lengths[i])
        if current and (len(current) == max_size or (len(current) + 1) * lengths[current[0]] > slack * (real + n)):
            groups.append(np.asarray(current))
            current, real = [], 0
        current.append(int(i))
        real += n
    if current:
        groups.append(np.asarray(current))
    return groups


def _remove_stale(parent: Path, prefix: str) -> None:
    """Remove temporary folders that a killed run left behind (one run writes an output folder at a time)."""
    for stale in parent.glob(f"{prefix}*"):
        if stale.is_dir():
            shutil.rmtree(stale, ignore_errors=True)


def _exp(x: float | None) -> float | None:
    return None if x is None else math.exp(x)


def _summarize_batches(values: np.ndarray) -> dict[str, Any]:
    """Mean and 95% interval of one block's score over calibration batches (t below 10 batches, else BCa)."""
    ci = "t" if len(values) < stats.T_CI_BELOW else "bootstrap"
    rec = stats.summarize(values, over="examples", ci=ci, n_resamples=2000)
    rec["method"] = rec["method"].replace("examples", "calibration batches").replace("example", "calibration batch")
    return rec


def _paired_ratio(compressed: np.ndarray, full: np.ndarray, ratio: Callable[[Any, Any], Any],
                  what: str) -> dict[str, Any]:
    """A ratio of means of paired per-example values with a BCa bootstrap interval over examples.

    ``stats.bootstrap_ci`` resamples example indices; the statistic recomputes the ratio on each resample.
    """
    c, f = np.asarray(compressed, dtype=float), np.asarray(full, dtype=float)

    def stat(idx: np.ndarray, axis: int = -1) -> np.ndarray:
        i = np.asarray(idx).astype(int)
        return ratio(c[i].mean(axis), f[i].mean(axis))

    with np.errstate(divide="ignore", invalid="ignore"):
        est, low, high = stats.bootstrap_ci(np.arange(len(c), dtype=float), stat, n_resamples=2000)
    how = f"BCa bootstrap 95% CI over {len(c)} held-out examples (paired, 2000 resamples)"
    if not (math.isfinite(low) and math.isfinite(high)):
        low = high = math.nan
        how = f"no interval: the bootstrap over {len(c)} held-out examples is degenerate (too few examples)"
    return {"mean": float(est), "ci_low": None if math.isnan(low) else float(low),
            "ci_high": None if math.isnan(high) else float(high), "n": len(c), "unit": "ratio",
            "method": f"{what}; {how}"}


#: The kit's modules whose code computes what the stages cache (importance scores, the plan, the healed model, the
#: evaluation), with everything they import. A cached stage is reused only if none of them changed: a new
#: importance method or a fixed healing loss re-computes a user's run instead of serving the old result. Left out:
#: :data:`KEY_EXEMPT`.
KEY_MODULES = ("analyze", "compress", "data", "device", "heal", "importance", "layers", "measure", "models", "stats",
               "strategies", "train")
#: Modules analyze reaches that cannot change a cached number: ``assets``, ``cache`` and ``paths`` find, verify and
#: store files (the data and the model are keyed by their own digests), ``errors`` words failures, and ``report``
#: and ``plots`` render the record on every run, uncached.
KEY_EXEMPT = ("assets", "cache", "errors", "paths", "plots", "report")


def _key_modules() -> tuple[Any, ...]:
    """The modules of :data:`KEY_MODULES` (imported here: ``heal`` and ``importance`` load lazily elsewhere)."""
    import importlib

    return tuple(importlib.import_module(f"{__package__}.{name}") for name in KEY_MODULES)

# --------------------------------------------------------------------------------------------------
# The report files


def _chart_svg(batch_scores: pd.DataFrame, scores: pd.DataFrame, plan: Plan) -> str:
    """Per-batch scores (points), mean and 95% interval per block, one panel per method; SVG, offline."""
    import altair as alt

    from . import plots

    plots.theme()
    panels = []
    for m in scores["method"].unique():
        pts = batch_scores[batch_scores["method"] == m].merge(
            scores[scores["method"] == m][["layer", "ci_low", "ci_high"]], on="layer")
        pts = pts.assign(ci_low=pts["ci_low"].fillna(pts["score"]), ci_high=pts["ci_high"].fillna(pts["score"]))
        title = f"{m} (kept: {', '.join(map(str, plan.keep))})" if m == plan.method else m
        panels.append(plots.points_with_ci(pts, "layer", "score", ci=("ci_low", "ci_high"), title=title,
                                           x_title="block", y_title="importance score").properties(height=160))
    return plots.to_svg(alt.vconcat(*panels))


def _metric_rows(record: dict[str, Any]) -> list[list[str]]:
    rows = []
    for name, m in record["metrics"].items():
        interval = "–" if m.get("ci_low") is None else f"[{_fmt(m['ci_low'])}, {_fmt(m['ci_high'])}]"
        rows.append([name, _fmt(m["mean"]), interval, _fmt(m["n"]), m.get("unit") or "", m["method"]])
    return rows


def _importance_rows(record: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    df = pd.DataFrame(record["importance"])
    methods = list(dict.fromkeys(df["method"]))
    keep = set(record["plan"]["keep"])
    rows = []
    for layer in sorted(df["layer"].unique()):
        row = [str(layer), "kept" if layer in keep else "removed"]
        for m in methods:
            r = df[(df["method"] == m) & (df["layer"] == layer)].iloc[0]
            interval = "" if r["ci_low"] is None or pd.isna(r["ci_low"]) else \
                f" [{_fmt(r['ci_low'])}, {_fmt(r['ci_high'])}]"
            row.append(f"{_fmt(r['score'])}{interval}")
        rows.append(row)
    return ["block", "plan", *methods], rows


def _summary_rows(record: dict[str, Any]) -> list[list[str]]:
    mod, data, plan = record["model"], record["data"], record["plan"]
    heal = record["heal"] or {"method": "none"}
    return [["model", f"{mod['path']} ({mod['architecture'] or mod['family']}, task {mod['task']})"],
            ["blocks", f"{_fmt(plan['n_kept'])} of {_fmt(plan['n_blocks'])} kept (ratio {_fmt(plan['ratio'])})"],
            ["parameters", f"{_fmt(mod['params_before'])} → {_fmt(mod['params_after'])}"],
            ["strategy", plan["strategy"] + (f" (by {plan['method']})" if plan["method"] else "")],
            ["healing", f"{heal['method']}" + (f", {_fmt(heal['steps'])} steps" if heal.get("steps") else "")],
            ["data", f"{data['path']} ({data['format']}): {_fmt(data['n_train'])} train, "
                     f"{_fmt(data['n_held_out'])} held out, {_fmt(data['dropped_rows'])} rows dropped"],
            ["kept blocks", ", ".join(map(str, plan["keep"]))],
            ["removed blocks", ", ".join(map(str, plan["drop"])) or "none"],
            ["compressed model", record["outputs"]["model"]]]


def _md_table(header: list[str], rows: list[list[str]]) -> str:
    esc = [[c.replace("|", "\\|") for c in r] for r in rows]
    return "\n".join(["| " + " | ".join(header) + " |", "|" + "---|" * len(header),
                      *("| " + " | ".join(r) + " |" for r in esc)])


def _markdown(record: dict[str, Any]) -> str:
    head, imp = _importance_rows(record)
    return "\n\n".join([
        "# Block importance and compression report",
        _md_table(["", ""], _summary_rows(record)),
        "## Retention and latency",
        _md_table(["metric", "value", "95% interval", "n", "unit", "how"], _metric_rows(record)),
        "## Importance of each block",
        "Mean score over calibration batches with its 95% interval (higher = more important); the points in the "
        "chart are the individual calibration batches.",
        "![importance of each block](importance.svg)",
        _md_table(head, imp),
        "## Load the compressed model",
        "```python\nfrom transformers import AutoModelFor{}, AutoTokenizer\nmodel = AutoModelFor{}.from_pretrained"
        "({!r})\ntokenizer = AutoTokenizer.from_pretrained({!r})\n```".format(
            *(["SequenceClassification"] * 2 if record["model"]["task"] == "classification" else ["CausalLM"] * 2),
            record["outputs"]["model"], record["outputs"]["model"]),
        f"Every number here is in `report.json` beside this file. Run took {record['run']['seconds']} s "
        f"(stages: {', '.join(f'{k} {v}' for k, v in record['run']['stages'].items()) or 'none'}).",
    ]) + "\n"


def _html_table(header: list[str], rows: list[list[str]]) -> str:
    th = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table><thead><tr>{th}</tr></thead><tbody>{body}</tbody></table>"


def _html(record: dict[str, Any], svg: str) -> str:
    head, imp = _importance_rows(record)
    style = ("body{font-family:DejaVu Sans,Helvetica,Arial,sans-serif;max-width:960px;margin:2em auto;color:#222}"
             "table{border-collapse:collapse;margin:1em 0}td,th{border-bottom:1px solid #ddd;padding:4px 10px;"
             "text-align:left;font-size:14px}th{background:#f4f4f4}")
    return (f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>analyze report</title><style>{style}</style>"
            f"</head><body><h1>Block importance and compression report</h1>{_html_table(['', ''], _summary_rows(record))}"
            f"<h2>Retention and latency</h2>"
            f"{_html_table(['metric', 'value', '95% interval', 'n', 'unit', 'how'], _metric_rows(record))}"
            f"<h2>Importance of each block</h2><p>Mean score over calibration batches with its 95% interval (higher "
            f"= more important); points are individual calibration batches.</p><figure>{svg}</figure>"
            f"{_html_table(head, imp)}<p>Every number here is in <code>report.json</code> beside this file.</p>"
            f"</body></html>\n")


# --------------------------------------------------------------------------------------------------
# One call


def run(model_dir: str | Path, data: str | Path | pd.DataFrame, out: str | Path, *, methods: Sequence[str] = DEFAULT_METHODS,
        strategy: str = "importance", method: str | None = None, target_ratio: float | None = None,
        keep: int | None = None, heal: str = "none", heal_steps: int | None = None,
        **options: Any) -> dict[str, Any]:
    """The whole analysis in one call (what ``analysis-kit analyze`` runs); returns the report record.

    Every option is checked, then the config and the data, before the model is loaded. ``options`` go to
    :class:`Analyzer` (``task``, ``text_column``, ``label_column``, ``data_format``, ``held_out``, ``seed``,
    ``device``, ...). Example: ``analyze.run("my-model", "reviews.csv", "out", target_ratio=2.0)``.
    """
    methods = _check_methods(methods)
    _check_strategy(strategy, method, methods)
    _check_heal(heal, heal_steps)
    if target_ratio is not None and keep is not None:
        raise AnalyzeError("give target_ratio (--target-ratio) or keep (--keep), not both.")
    config, _ = inspect_model(model_dir, options.get("task", "auto"))
    compress.n_keep(int(config.num_hidden_layers), keep=keep, ratio=2.0 if keep is None and target_ratio is None
                    else target_ratio)  # the size fits the model: checked before the data is read
    analyzer = Analyzer(model_dir, data, out, **options)
    analyzer.importance(methods)
    analyzer.plan(target_ratio=target_ratio, keep=keep, strategy=strategy, method=method)
    analyzer.compress(heal=heal, heal_steps=heal_steps)
    analyzer.evaluate()
    return analyzer.report()


def stderr_log(msg: str) -> None:
    """Stage messages for the command line."""
    print(f"[analyze] {msg}", file=sys.stderr, flush=True)


__all__ = ["Analyzer", "AnalyzeDataError", "AnalyzeError", "Data", "Plan", "inspect_model", "load_data", "run",
           "DEFAULT_METHODS", "FORMATS", "HEAL", "TASKS"]
