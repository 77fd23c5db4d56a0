"""Data: human-rated snippets, Amazon Reviews 2023 JSONL; splits, batches and the dataset card.

The default task is the sentiment of Amazon review snippets (Hutto & Gilbert, 2014): every sentence
carries the mean of ≥ 20 human ratings on −4…+4. Three label modes turn that mean into a target:

- ``polarity``: 1 when the mean is above ``neutral_band``, 0 when below ``-neutral_band``; sentences in
  between are left out, because a near-neutral mean says raters disagreed or the sentence is factual;
- ``bins5``: five equal-width bins over −4…+4 (edges −2.4, −0.8, 0.8, 2.4; an edge belongs to the
  bin above it), labels 0…4;
- ``regression``: the mean itself (a float).

Batches are padded only to the longest sequence in the batch (dynamic padding) and, with ``bucket``,
built from examples of similar length, so short sentences do not pay for long ones. Every random choice
(split, subsample, batch order) is driven by an explicit seed, so one seed gives the same data.
"""

from __future__ import annotations

import gzip
import io
import json
import zlib
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from sklearn.model_selection import train_test_split
from torch.utils.data import DataLoader, Dataset, Sampler

from .errors import LayerwiseError

DOMAINS = ("amazon", "movie", "tweets", "nyt")
#: Training tasks and the snippet domain each one is: ``amazon`` (the original project's domain) and ``mr``
#: (Pang & Lee's movie-review sentence-polarity set, the source of SST-2, so numbers sit next to the literature's).
TASKS = {"amazon": "amazon", "mr": "movie"}
LABEL_MODES = ("polarity", "bins5", "regression")
_STEMS = {"amazon": "amazonReviewSnippets", "movie": "movieReviewSnippets", "tweets": "tweets",
          "nyt": "nytEditorialSnippets"}
#: Interior edges of the five equal-width bins over the −4…+4 rating scale; a score on an edge goes up.
BIN_EDGES = np.array([-2.4, -0.8, 0.8, 2.4])
BUCKET_CHUNK = 50  # length bucketing sorts examples within chunks of this many batches


class DataError(LayerwiseError):
    """Malformed input data or impossible data settings; the message names the file and line, or the fix."""


# --------------------------------------------------------------------------------------------------
# Snippets (Hutto & Gilbert, 2014)


def _check_domain(domain: str) -> str:
    if domain not in DOMAINS:
        raise DataError(f"unknown domain {domain!r}; choose from {', '.join(DOMAINS)}.")
    return _STEMS[domain]


def task_domain(task: str) -> str:
    """The snippet domain of a training task name (``amazon`` → ``amazon``, ``mr`` → ``movie``)."""
    if task not in TASKS:
        raise DataError(f"unknown task {task!r}; choose from {', '.join(TASKS)} (mr = the movie-review snippets).")
    return TASKS[task]


def domain_task(domain: str) -> str:
    """The task name of a snippet domain (``movie`` → ``mr``); a domain that is no task keeps its name."""
    return {d: t for t, d in TASKS.items()}.get(domain, domain)


def _check_label_mode(label_mode: str) -> None:
    if label_mode not in LABEL_MODES:
        raise DataError(f"unknown label_mode {label_mode!r}; choose from {', '.join(LABEL_MODES)}.")


def _lines(path: Path) -> list[tuple[int, str]]:
    """Non-blank lines with their 1-based numbers; any line ending, an optional BOM, a missing final newline.

    The files are documented as latin-1 but are valid UTF-8 (``clichés``, ``Jirí``), so UTF-8 is tried first
    and latin-1, which can decode any byte, is the fallback.
    """
    raw = Path(path).read_bytes()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError:
        text = raw.decode("latin-1")
    lines = text.replace("\r\n", "\n").replace("\r", "\n").split("\n")  # not splitlines(): \x85, \u2028 are text
    return [(i, line) for i, line in enumerate(lines, 1) if line.strip()]


def read_ground_truth(path: str | Path) -> pd.DataFrame:
    """Read a ``*_GroundTruth.txt`` file (TSV ``id, mean rating, text``) into columns ``id, score, text``."""
    rows = []
    for lineno, line in _lines(Path(path)):
        parts = line.split("\t", 2)
        if len(parts) != 3:
            raise DataError(f"{path}:{lineno}: expected 'id<TAB>score<TAB>text', got {line[:80]!r}; "
                            f"the file is not a ground-truth file of the snippets asset.")
        try:
            score = float(parts[1])
        except ValueError as exc:
            raise DataError(f"{path}:{lineno}: score {parts[1]!r} is not a number.") from exc
        rows.append((parts[0].strip(), score, parts[2].strip()))
    return pd.DataFrame(rows, columns=["id", "score", "text"])


def read_ratings(path: str | Path) -> pd.DataFrame:
    """Read a ``*_anonDataRatings.txt`` file (``id, mean, sd, [r1, r2, ...]``) into ``id, score, sd, ratings``."""
    rows = []
    for lineno, line in _lines(Path(path)):
        parts = line.split("\t")
        try:
            if len(parts) != 4:
                raise ValueError(f"{len(parts)} fields")
            ratings = json.loads(parts[3])
            if not isinstance(ratings, list) or not ratings or not all(isinstance(r, int) for r in ratings):
                raise ValueError("ratings are not a non-empty list of integers")
            rows.append((parts[0].strip(), float(parts[1]), float(parts[2]), ratings))
        except ValueError as exc:  # json.JSONDecodeError is a ValueError
            raise DataError(f"{path}:{lineno}: expected 'id<TAB>mean<TAB>sd<TAB>[r1, r2, ...]' ({exc}), "
                            f"got {line[:80]!r}.") from exc
    return pd.DataFrame(rows, columns=["id", "score", "sd", "ratings"])


def label_scores(scores: np.ndarray, label_mode: str, neutral_band: float = 0.5) -> tuple[np.ndarray, np.ndarray]:
    """Labels for mean ratings and a keep-mask (only ``polarity`` drops rows: ``-band <= score <= band``)."""
    _check_label_mode(label_mode)
    scores = np.asarray(scores, dtype=float)
    if label_mode == "polarity":
        if neutral_band < 0:
            raise DataError(f"neutral_band={neutral_band} must be >= 0 (0 keeps every non-zero score).")
        return (scores > neutral_band).astype(np.int64), (scores > neutral_band) | (scores < -neutral_band)
    if label_mode == "bins5":
        if len(scores) and (scores.min() < -4 or scores.max() > 4):
            raise DataError(f"bins5 needs scores on -4..4; got {scores.min()}..{scores.max()}; use 'regression'.")
        # rounding first keeps float noise such as 0.7999999999999999 on its edge instead of below it
        return np.digitize(np.round(scores, 9), BIN_EDGES).astype(np.int64), np.ones(len(scores), bool)
    return scores, np.ones(len(scores), bool)


def _snippet_dir() -> Path:
    from .assets import locate  # lazy: importing data must not touch the network

    return locate("snippets")


def load_snippets(domain: str = "amazon", label_mode: str = "polarity", neutral_band: float = 0.5) -> pd.DataFrame:
    """Snippets of one domain, columns ``id, text, score, label`` (label rules in the module docstring).

    ``neutral_band`` only matters for ``polarity``; it must be in [0, 4).
    """
    stem = _check_domain(domain)
    _check_label_mode(label_mode)
    if not 0 <= neutral_band < 4:
        raise DataError(f"neutral_band={neutral_band} must be in [0, 4); 0.5 leaves out near-neutral snippets.")
    df = read_ground_truth(_snippet_dir() / f"{stem}_GroundTruth.txt")
    labels, keep = label_scores(df["score"].to_numpy(), label_mode, neutral_band)
    return df.assign(label=labels)[keep].reset_index(drop=True)[["id", "text", "score", "label"]]


def load_ratings(domain: str = "amazon") -> pd.DataFrame:
    """Every rater's rating per snippet: columns ``id, score, sd, ratings`` (list of ints on −4…+4)."""
    return read_ratings(_snippet_dir() / f"{_check_domain(domain)}_anonDataRatings.txt")


# --------------------------------------------------------------------------------------------------
# Splits and subsamples


def _strata(df: pd.DataFrame, stratify: bool) -> pd.Series | None:
    """What to stratify on: the label; for float labels (regression), five quantile bins of it."""
    if not stratify:
        return None
    if "label" not in df:
        raise DataError("stratify=True needs a 'label' column; add one or pass stratify=False.")
    if pd.api.types.is_float_dtype(df["label"]):
        return pd.qcut(df["label"], 5, labels=False, duplicates="drop")
    return df["label"]


def split(df: pd.DataFrame, seed: int, fractions: tuple[float, float, float] = (0.7, 0.15, 0.15),
          stratify: bool = True) -> dict[str, pd.DataFrame]:
    """Seeded train/val/test split (keys ``train, val, test``), stratified by label when asked.

    Uses scikit-learn's ``train_test_split`` twice (train vs rest, then val vs test), so the parts have
    the label shares of ``df`` up to rounding. A class too small to appear in every part is an error.
    """
    if len(fractions) != 3 or any(f <= 0 for f in fractions) or abs(sum(fractions) - 1) > 1e-6:
        raise DataError(f"fractions {fractions} must be three positive numbers summing to 1, e.g. (0.7, 0.15, 0.15).")
    if len(df) < 10:
        raise DataError(f"only {len(df)} examples: too few to split; lower neutral_band or use more data.")
    strata = _strata(df, stratify)
    if strata is not None and strata.value_counts().min() < 3:
        counts = strata.value_counts().to_dict()
        raise DataError(f"cannot stratify: a class has fewer than 3 examples ({counts}); pass stratify=False, "
                        f"or use more data or fewer classes.")
    try:
        train, rest = train_test_split(df, train_size=fractions[0], random_state=seed, stratify=strata)
        rest_strata = None if strata is None else strata.loc[rest.index]
        val, test = train_test_split(rest, train_size=fractions[1] / (fractions[1] + fractions[2]),
                                     random_state=seed, stratify=rest_strata)
    except ValueError as exc:
        raise DataError(f"cannot split {len(df)} rows with fractions {fractions} ({exc}); pass stratify=False "
                        f"or use more data.") from exc
    return {k: v.reset_index(drop=True) for k, v in (("train", train), ("val", val), ("test", test))}


def subsample(df: pd.DataFrame, n: int, seed: int, stratify: bool = True) -> pd.DataFrame:
    """A seeded sample of ``n`` rows keeping the label shares when ``stratify``; all rows when ``n >= len(df)``."""
    if n <= 0:
        raise DataError(f"subsample size must be positive, got {n}.")
    if n >= len(df):
        return df.reset_index(drop=True)
    strata = _strata(df, stratify)
    try:
        part, _ = train_test_split(df, train_size=n, random_state=seed, stratify=strata)
    except ValueError as exc:
        raise DataError(f"cannot draw a stratified sample of {n} from {len(df)} rows ({exc}); pass "
                        f"stratify=False or a larger n.") from exc
    return part.reset_index(drop=True)


# --------------------------------------------------------------------------------------------------
# Tokenized batches


def batch_order(lengths: np.ndarray, batch_size: int, shuffle: bool, seed: int, bucket: bool) -> list[np.ndarray]:
    """Index batches: shuffled with ``seed`` and, with ``bucket``, grouped by similar length.

    Bucketing sorts (stably) by length within chunks of :data:`BUCKET_CHUNK` batches, so a batch holds
    sentences of similar length, while the order of the batches is shuffled with the same seed.
    """
    rng = np.random.default_rng(seed)
    lengths = np.asarray(lengths)
    idx = rng.permutation(len(lengths)) if shuffle else np.arange(len(lengths))
    if bucket:
        n_chunks = max(1, int(np.ceil(len(idx) / (batch_size * BUCKET_CHUNK))))
        idx = np.concatenate([c[np.argsort(lengths[c], kind="stable")] for c in np.array_split(idx, n_chunks)])
    batches = [idx[i:i + batch_size] for i in range(0, len(idx), batch_size)]
    if shuffle:
        batches = [batches[i] for i in rng.permutation(len(batches))]
    return batches


class _Encoded(Dataset):
    """Token ids and labels of a tokenized text list (one item = ``(ids, label)``)."""

    def __init__(self, ids: list[list[int]], labels: torch.Tensor) -> None:
        self.ids, self.labels = ids, labels

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> tuple[list[int], torch.Tensor]:
        return self.ids[i], self.labels[i]


class _FixedBatches(Sampler[list[int]]):
    """A batch sampler that yields precomputed index batches, the same ones on every pass."""

    def __init__(self, batches: list[np.ndarray]) -> None:
        self.batches = [b.tolist() for b in batches]

    def __iter__(self):
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)


def _pad_collate(pad_id: int) -> Callable[[list[tuple[list[int], torch.Tensor]]], dict[str, torch.Tensor]]:
    """Collate ``(ids, label)`` items into right-padded tensors as wide as the longest item."""

    def collate(items: list[tuple[list[int], torch.Tensor]]) -> dict[str, torch.Tensor]:
        width = max(len(ids) for ids, _ in items)
        input_ids = torch.full((len(items), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(items), width), dtype=torch.long)
        for row, (ids, _) in enumerate(items):
            input_ids[row, :len(ids)] = torch.as_tensor(ids, dtype=torch.long)
            mask[row, :len(ids)] = 1
        return {"input_ids": input_ids, "attention_mask": mask, "labels": torch.stack([lab for _, lab in items])}

    return collate


def make_loader(tokenizer: Any, texts: Sequence[str], labels: Any, batch_size: int = 32, shuffle: bool = False,
                seed: int = 0, max_length: int = 128, bucket: bool = True) -> DataLoader:
    """A ``DataLoader`` of dicts ``input_ids, attention_mask, labels``, padded to the longest row of each batch.

    Texts are tokenized once (truncated to ``max_length`` tokens). The batches are fixed at construction
    by :func:`batch_order` and are the same on every pass, so a run is reproducible from ``seed``; pass a
    new seed per epoch for a new order. Without ``shuffle`` and ``bucket`` examples keep their order, so
    predictions line up with ``texts``. Padding is on the right (positions stay 0…n−1 without
    ``position_ids``). Integer labels become ``int64``, float labels ``float32``.
    """
    texts = list(texts)
    labels_np = np.array(labels)
    if len(texts) != len(labels_np):
        raise DataError(f"{len(texts)} texts but {len(labels_np)} labels; pass one label per text.")
    if not texts:
        raise DataError("no texts to batch; check the split or the neutral band.")
    if batch_size < 1 or max_length < 1:
        raise DataError(f"batch_size ({batch_size}) and max_length ({max_length}) must be >= 1.")
    pad_id = getattr(tokenizer, "pad_token_id", None)
    if pad_id is None:
        raise DataError("the tokenizer has no pad token; set tokenizer.pad_token = tokenizer.eos_token.")
    ids = tokenizer(texts, truncation=True, max_length=max_length)["input_ids"]
    labels_t = torch.tensor(labels_np)  # a copy: pandas hands out read-only arrays
    labels_t = labels_t.float() if labels_t.is_floating_point() else labels_t.long()
    order = batch_order(np.array([len(x) for x in ids]), batch_size, shuffle, seed, bucket)
    return DataLoader(_Encoded(ids, labels_t), batch_sampler=_FixedBatches(order), collate_fn=_pad_collate(pad_id))


# --------------------------------------------------------------------------------------------------
# Amazon Reviews 2023


def _review_label(rating: pd.Series, label_mode: str) -> tuple[pd.Series, pd.Series]:
    """(label, keep) for star ratings: polarity ≥ 4 → 1, ≤ 2 → 0, 3 dropped; bins5 rating − 1; regression."""
    if label_mode == "polarity":
        return (rating >= 4).astype(np.int64), rating != 3
    if label_mode == "bins5":
        return (rating - 1).astype(np.int64), pd.Series(True, index=rating.index)
    return rating.astype(float), pd.Series(True, index=rating.index)


def _review_row(rec: Any, where: str) -> tuple[float, str, str]:
    if not isinstance(rec, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(rec).__name__}.")
    missing = [k for k in ("rating", "title", "text") if k not in rec]
    if missing:
        raise DataError(f"{where}: missing field(s) {missing}; every review needs rating, title and text.")
    rating = rec["rating"]
    if isinstance(rating, bool) or not isinstance(rating, (int, float)) or rating not in (1, 2, 3, 4, 5):
        raise DataError(f"{where}: rating {rating!r} is not a whole number of stars in 1..5.")
    for field in ("title", "text"):
        if not isinstance(rec[field], str):
            raise DataError(f"{where}: {field} is {type(rec[field]).__name__}, expected a string.")
    return float(rating), rec["title"], rec["text"]


def _decode_review_line(raw: bytes, path: Path, lineno: int) -> str:
    """One line of a JSONL file as text; the JSONL format is UTF-8 (a leading BOM is tolerated)."""
    try:
        return raw.decode("utf-8-sig" if lineno == 1 else "utf-8")
    except UnicodeDecodeError as exc:
        hint = ("the file is gzip-compressed: name it *.jsonl.gz" if lineno == 1 and raw[:2] == b"\x1f\x8b"
                else "re-encode the file as UTF-8 (e.g. `iconv -f latin1 -t utf-8`)")
        raise DataError(f"{path}:{lineno}: byte {raw[exc.start]:#04x} at byte column {exc.start + 1} is not valid "
                        f"UTF-8; {hint}.") from exc


def load_amazon_reviews_2023(path: str | Path, limit: int | None = None, *,
                             label_mode: str = "polarity") -> pd.DataFrame:
    """Amazon Reviews 2023 (McAuley Lab) JSONL, one review per line (``.jsonl`` or ``.jsonl.gz``).

    Returns ``rating, title, text, label``. Labels: ``polarity`` rating ≥ 4 → 1, ≤ 2 → 0, 3-star reviews
    dropped; ``bins5`` rating − 1 (0…4); ``regression`` the rating. ``limit`` caps the rows returned (the
    file is read only as far as needed). Blank lines are skipped; a malformed line (bad JSON, a missing
    field, a rating outside 1…5), a byte that is not UTF-8 or a corrupt ``.gz`` raises :class:`DataError`
    naming the file and line. An empty file, or one whose reviews are all dropped (every review 3-star under
    ``polarity``), is a :class:`DataError` too, rather than an empty table.
    """
    path = Path(path)
    _check_label_mode(label_mode)
    if limit is not None and limit < 1:
        raise DataError(f"limit={limit} must be >= 1 (or None for every review).")
    if not path.is_file():
        raise DataError(f"{path} does not exist; pass the path of an Amazon Reviews 2023 .jsonl file.")
    rows: list[tuple[float, str, str]] = []
    kept = 0
    lineno = 0
    opener = gzip.open if path.name.endswith(".gz") else open
    try:  # bytes, decoded line by line, so that an encoding error names its own line
        with opener(path, "rb") as fh:
            for lineno, raw in enumerate(fh, 1):
                line = _decode_review_line(raw, path, lineno)
                if not line.strip():
                    continue
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise DataError(f"{path}:{lineno}: not valid JSON ({exc.msg} at column {exc.colno}).") from exc
                rows.append(_review_row(rec, f"{path}:{lineno}"))
                kept += label_mode != "polarity" or rows[-1][0] != 3
                if limit is not None and kept >= limit:
                    break
    except (gzip.BadGzipFile, EOFError, zlib.error) as exc:
        raise DataError(f"{path}:{lineno + 1}: the gzip data is corrupt or truncated ({exc}); download the file "
                        "again, or check it with `gzip -t`.") from exc
    if not rows:
        raise DataError(f"{path} holds no reviews; pass a JSONL file with one review object per line.")
    if kept == 0:
        raise DataError(f"{path}: all {len(rows)} reviews are 3-star (neutral), and label_mode='polarity' drops "
                        "3-star reviews, so no rows are left; pass label_mode='bins5' or 'regression', or a file "
                        "that also holds 1-2 and 4-5 star reviews.")
    df = pd.DataFrame(rows, columns=["rating", "title", "text"])
    label, keep = _review_label(df["rating"], label_mode)
    return df.assign(label=label)[keep].reset_index(drop=True)


# --------------------------------------------------------------------------------------------------
# Your own data: CSV, TSV, JSONL, Amazon Reviews 2023, a `datasets` folder

#: Formats of a data file (``auto`` picks by file name and content).
FORMATS = ("auto", "csv", "tsv", "jsonl", "amazon2023", "datasets")


def _decode(raw: bytes, path: Path) -> str:
    """UTF-8 text (a BOM is dropped), or an error naming the line and byte that is not UTF-8."""
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = raw.count(b"\n", 0, exc.start) + 1
        raise DataError(f"{path}: line {line} is not UTF-8 text (byte {raw[exc.start]:#04x}); re-encode the "
                               "file as UTF-8, e.g. `iconv -f latin1 -t utf-8 FILE > FILE.utf8`.") from exc


def format_of(path: Path, fmt: str, label_column: str) -> str:
    if fmt not in FORMATS:
        raise DataError(f"unknown data format {fmt!r}; choose from {', '.join(FORMATS)}.")
    if not path.exists():
        raise DataError(f"{path} does not exist; pass a CSV, TSV or JSONL file or a `datasets` folder (with text and label columns).")
    if fmt != "auto":
        return fmt
    if path.is_dir():
        return "datasets"
    name = path.name.lower()
    if name.endswith((".tsv", ".tab")):
        return "tsv"
    if name.endswith((".jsonl", ".jsonl.gz", ".ndjson", ".json")):
        if name.endswith(".gz"):
            return "amazon2023"
        with open(path, "rb") as fh:  # Amazon Reviews 2023: rating/title/text objects without the label column
            first = next((ln for ln in fh if ln.strip()), b"")
        try:
            rec = json.loads(first.decode("utf-8-sig"))
        except (UnicodeDecodeError, json.JSONDecodeError):
            return "jsonl"  # the JSONL reader reports the exact problem
        if isinstance(rec, dict) and {"rating", "title", "text"} <= set(rec) and label_column not in rec:
            return "amazon2023"
        return "jsonl"
    return "csv"


def _read_saved_dataset(path: Path) -> pd.DataFrame:
    """The table in a folder written by Hugging Face ``datasets``' ``save_to_disk``.

    The folder holds Arrow stream files listed in ``state.json`` (a ``DatasetDict`` one such folder per split,
    named in ``dataset_dict.json``; its ``train`` split is read, else its first: the kit makes its own
    held-out part). pyarrow reads them, so the ``datasets`` package and its pins (it needs another
    ``huggingface-hub`` than transformers 4.57) are not needed. ``ClassLabel`` columns come back as their
    label names, as ``datasets`` would show them.
    """
    import pyarrow as pa

    def fail(why: str) -> DataError:
        return DataError(f"{path} is a folder but {why}; pass a CSV, TSV or JSONL file, or a folder written by "
                         "datasets' save_to_disk (Dataset or DatasetDict).")

    try:
        if (path / "dataset_dict.json").is_file():
            splits = json.loads((path / "dataset_dict.json").read_text()).get("splits") or []
            if not splits:
                raise fail("its dataset_dict.json lists no splits")
            path = path / ("train" if "train" in splits else splits[0])
        if not (path / "state.json").is_file():
            raise fail("has no state.json or dataset_dict.json (not written by save_to_disk)")
        files = [path / f["filename"] for f in json.loads((path / "state.json").read_text()).get("_data_files", [])]
        info_file = path / "dataset_info.json"
        features = json.loads(info_file.read_text()).get("features") or {} if info_file.is_file() else {}
    except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as exc:
        raise fail(f"its save_to_disk metadata cannot be read ({exc})") from exc
    if not files:
        raise fail("its state.json lists no data files")
    tables = []
    for file in files:
        try:
            with pa.memory_map(str(file)) as source:
                tables.append(pa.ipc.open_stream(source).read_all())
        except (OSError, pa.ArrowInvalid) as exc:
            raise fail(f"{file.name} is not a readable Arrow stream ({exc})") from exc
    df = pa.concat_tables(tables).to_pandas()
    for column, feature in features.items():
        if isinstance(feature, dict) and feature.get("_type") == "ClassLabel" and feature.get("names") \
                and column in df:
            names = pd.Series(feature["names"], dtype=object)
            df[column] = df[column].map(lambda i, names=names: names.get(i))  # -1 (no label) becomes None
    return df


def _read_raw(path: Path, fmt: str) -> pd.DataFrame:
    """The raw table of a CSV/TSV/JSONL file or a ``save_to_disk`` folder (columns as in the file)."""
    if fmt == "amazon2023":
        return load_amazon_reviews_2023(path)
    if fmt == "datasets":
        return _read_saved_dataset(path)
    raw = path.read_bytes()
    if not raw.strip():
        raise DataError(f"{path} is empty; put one example per row (with a header row for CSV/TSV).")
    text = _decode(raw, path)
    if fmt == "jsonl":
        rows = []
        for lineno, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{path}:{lineno}: not valid JSON ({exc.msg} at column {exc.colno}); "
                                       "JSONL holds one JSON object per line.") from exc
            if not isinstance(rec, dict):
                raise DataError(f"{path}:{lineno}: expected a JSON object, got {type(rec).__name__}.")
            rows.append(rec)
        return pd.DataFrame(rows)
    try:
        return pd.read_csv(io.StringIO(text), sep="\t" if fmt == "tsv" else ",", keep_default_na=True)
    except pd.errors.EmptyDataError as exc:
        raise DataError(f"{path} is empty; put a header row and one example per row.") from exc
    except pd.errors.ParserError as exc:
        raise DataError(f"{path}: not a valid {fmt.upper()} file ({exc}).") from exc


def read_table(path: str | Path, fmt: str = "auto", label_column: str = "label") -> tuple[pd.DataFrame, str]:
    """The raw table of a data file (columns as in the file) and its format (``fmt``, or the one ``auto`` found).

    CSV, TSV, JSONL, Amazon Reviews 2023 JSONL (``.jsonl``/``.jsonl.gz`` of rating/title/text objects, read by
    :func:`load_amazon_reviews_2023`: polarity labels, 3-star reviews left out) or a folder written by
    ``datasets``' ``save_to_disk``. Raises :class:`DataError` naming the file (and line) for a missing or
    empty file, bad encoding, malformed rows, or an unknown format.
    """
    path = Path(path).expanduser()
    fmt = format_of(path, fmt, label_column)
    return _read_raw(path, fmt), fmt


#: A data file split 70/15/15 needs at least this many rows of every label (a stratified split puts some in
#: each part; fewer leaves a part without the label or a test share too small to mean anything).
MIN_ROWS_PER_LABEL = 10


def load_labelled_file(path: str | Path, text_column: str = "text", label_column: str = "label",
                       fmt: str = "auto") -> tuple[pd.DataFrame, tuple[str, ...]]:
    """A labelled text file as a task: ``(table with id, text and label columns, label names)``.

    What a chapter's ``task=`` parameter reads when it names a file instead of a built-in task. Labels are
    class ids ``0..k-1`` in the order of the sorted label names (integer labels ``0..k-1`` keep their ids).
    Rows without text or label are dropped. Checked before any model loads: missing columns (naming the ones
    present), fewer than two labels, fewer than :data:`MIN_ROWS_PER_LABEL` rows of a label.
    """
    df, _ = read_table(path, fmt, label_column)
    missing = [c for c in (text_column, label_column) if c not in df.columns]
    if missing:
        raise DataError(f"{path} has no column(s) {missing}; its columns are {list(map(str, df.columns))}. Rename "
                        "them to text and label, or name them (text_column= / label_column=).")
    keep = df[text_column].notna() & (df[text_column].astype(str).str.strip() != "") & df[label_column].notna()
    df = df[keep]
    raw = df[label_column]
    numeric = pd.to_numeric(raw, errors="coerce")
    if numeric.notna().all() and (numeric == numeric.round()).all():
        names = tuple(str(int(v)) for v in sorted(numeric.unique()))
        ids = numeric.astype(int)
        if names != tuple(str(i) for i in range(len(names))):  # e.g. 1..5 stars: ids in sorted order
            ids = numeric.map({v: i for i, v in enumerate(sorted(numeric.unique()))})
    else:
        names = tuple(sorted(raw.astype(str).unique()))
        ids = raw.astype(str).map({v: i for i, v in enumerate(names)})
    if len(names) < 2:
        raise DataError(f"{path}: {'no row has' if not names else 'every row has the same label ' + repr(names[0]) + ' in'}"
                        f" column {label_column!r} (with a text); a task needs at least two labels.")
    out = pd.DataFrame({"id": [f"row{i}" for i in df.index],
                        "text": df[text_column].astype(str).to_numpy(), "label": ids.to_numpy(np.int64)})
    counts = out["label"].value_counts()
    if counts.min() < MIN_ROWS_PER_LABEL:
        few = {names[i]: int(n) for i, n in counts.items() if n < MIN_ROWS_PER_LABEL}
        raise DataError(f"{path}: label(s) {few} have fewer than {MIN_ROWS_PER_LABEL} rows; the 70/15/15 split "
                        "needs more of each label. Add rows, or merge or drop the rare labels.")
    return out, names


# --------------------------------------------------------------------------------------------------
# Dataset card


def rater_spread(ratings: Sequence[Sequence[int]]) -> pd.DataFrame:
    """Per sentence: ``n`` raters, population ``sd``, ``abs_dev`` = mean |rating − mean|, ``pair_diff`` =
    mean |r_i − r_j| over pairs of raters (0 for a single rater). Vectorised over the flattened ratings."""
    counts = np.array([len(r) for r in ratings])
    if len(counts) == 0 or counts.min() < 1:
        raise DataError("every sentence needs at least one rating; check the *_anonDataRatings.txt file.")
    group = np.repeat(np.arange(len(counts)), counts)
    flat = np.concatenate([np.asarray(r, dtype=float) for r in ratings])
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    dev = flat - (np.add.reduceat(flat, starts) / counts)[group]
    order = np.lexsort((flat, group))  # sorted within each sentence
    rank = np.arange(len(flat)) - starts[group]
    # sum_{i<j} (x_(j) - x_(i)) = sum_k x_(k) (2k - n + 1) for the sorted ratings x_(0) <= ... <= x_(n-1)
    pair_sum = np.add.reduceat(flat[order] * (2 * rank - counts[group] + 1), starts)
    pairs = counts * (counts - 1) / 2
    return pd.DataFrame({"n": counts, "sd": np.sqrt(np.add.reduceat(dev**2, starts) / counts),
                         "abs_dev": np.add.reduceat(np.abs(dev), starts) / counts,
                         "pair_diff": np.divide(pair_sum, pairs, out=np.zeros(len(counts)), where=pairs > 0)})


def card_row(snippets: pd.DataFrame, ratings: pd.DataFrame, neutral_band: float = 0.5,
             tokenizer: Any = None) -> dict[str, float]:
    """The dataset-card numbers of one domain from its frames (``id, text, score`` and ``ratings`` lists).

    ``n_total`` sentences; ``n_after_band`` kept by the polarity rule; ``share_positive`` among them;
    whitespace word counts (mean, median, 95th percentile); ``tokens_mean`` (with special tokens, only
    when a tokenizer is given); ``raters_mean`` per sentence; and the spread between raters, averaged
    over sentences: ``rater_sd_mean`` (population SD), ``rater_abs_dev_mean`` (mean |rating − sentence
    mean|) and ``rater_pair_diff_mean`` (mean |r_i − r_j| over pairs of raters).
    """
    labels, keep = label_scores(snippets["score"].to_numpy(), "polarity", neutral_band)
    words = snippets["text"].str.split().str.len().to_numpy(dtype=float)
    spread = rater_spread(list(ratings["ratings"]))
    row = {"n_total": len(snippets), "n_after_band": int(keep.sum()),
           "share_positive": float(labels[keep].mean()) if keep.any() else float("nan"),
           "words_mean": float(words.mean()), "words_median": float(np.median(words)),
           "words_p95": float(np.percentile(words, 95))}
    if tokenizer is not None:
        row["tokens_mean"] = float(np.mean([len(x) for x in tokenizer(snippets["text"].tolist())["input_ids"]]))
    row.update({"raters_mean": float(spread["n"].mean()), "rater_sd_mean": float(spread["sd"].mean()),
                "rater_abs_dev_mean": float(spread["abs_dev"].mean()),
                "rater_pair_diff_mean": float(spread["pair_diff"].mean())})
    return row


def dataset_card(domains: Sequence[str] = DOMAINS, neutral_band: float = 0.5, tokenizer: Any = None) -> pd.DataFrame:
    """One row per domain (column ``domain`` first) with the numbers of :func:`card_row`."""
    for domain in domains:
        _check_domain(domain)
    if not 0 <= neutral_band < 4:
        raise DataError(f"neutral_band={neutral_band} must be in [0, 4).")
    rows = [{"domain": d, **card_row(load_snippets(d, "regression"), load_ratings(d), neutral_band, tokenizer)}
            for d in domains]
    return pd.DataFrame(rows)
