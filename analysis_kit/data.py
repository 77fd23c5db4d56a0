"""Data: the human-rated snippets, Amazon Reviews 2023 JSONL, MovieLens; splits, batches, the dataset card.

The default task is the sentiment polarity of Amazon review snippets (Hutto & Gilbert, 2014): each
sentence carries the mean of ≥ 20 human ratings on −4…+4. ``polarity`` keeps snippets whose mean is
outside a neutral band; ``bins5`` cuts −4…+4 into five equal bins; ``regression`` predicts the mean.
Batches are padded to the longest sequence in the batch (dynamic padding) and, when ``bucket`` is on,
built from examples of similar length, which on CPU roughly halves the padding compute.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from sklearn.model_selection import train_test_split

from .errors import LayerwiseError

DOMAINS = ("amazon", "movie", "tweets", "nyt")
LABEL_MODES = ("polarity", "bins5", "regression")
_FILES = {"amazon": "amazonReviewSnippets", "movie": "movieReviewSnippets", "tweets": "tweets",
          "nyt": "nytEditorialSnippets"}


class DataError(LayerwiseError):
    """Malformed input data or impossible data settings; the message names the file/line or the fix."""


def _snippet_dir() -> Path:
    from .assets import locate

    return locate("snippets")


def _check_domain(domain: str) -> str:
    if domain not in DOMAINS:
        raise DataError(f"unknown domain {domain!r}; choose from {', '.join(DOMAINS)}.")
    return _FILES[domain]


def _read_ground_truth(path: Path) -> pd.DataFrame:
    rows = []
    text = path.read_bytes().decode("latin-1").replace("\r\n", "\n").replace("\r", "\n")
    for lineno, line in enumerate(text.split("\n"), 1):
        if not line.strip():
            continue
        parts = line.lstrip("\ufeff").split("\t", 2)
        if len(parts) != 3:
            raise DataError(f"{path}:{lineno}: expected 'id<TAB>score<TAB>text', got {line[:80]!r}")
        try:
            score = float(parts[1])
        except ValueError as exc:
            raise DataError(f"{path}:{lineno}: score {parts[1]!r} is not a number") from exc
        rows.append((parts[0].strip(), score, parts[2].strip()))
    return pd.DataFrame(rows, columns=["id", "score", "text"])


def label_scores(scores: np.ndarray, label_mode: str, neutral_band: float) -> tuple[np.ndarray, np.ndarray]:
    """Labels for mean ratings and a keep-mask (polarity drops |score| <= band)."""
    scores = np.asarray(scores, dtype=float)
    if label_mode == "polarity":
        keep = np.abs(scores) > neutral_band
        return (scores > 0).astype(int), keep
    if label_mode == "bins5":
        return np.clip(np.floor((scores + 4.0) / 1.6), 0, 4).astype(int), np.ones(len(scores), bool)
    if label_mode == "regression":
        return scores, np.ones(len(scores), bool)
    raise DataError(f"unknown label_mode {label_mode!r}; choose from {', '.join(LABEL_MODES)}.")


def load_snippets(domain: str = "amazon", label_mode: str = "polarity", neutral_band: float = 0.5) -> pd.DataFrame:
    """Snippets of one domain with columns ``id, text, score, label`` (see the module docstring)."""
    stem = _check_domain(domain)
    if neutral_band < 0 or neutral_band >= 4:
        raise DataError(f"neutral_band={neutral_band} must be in [0, 4); 0.5 leaves out near-neutral snippets.")
    df = _read_ground_truth(_snippet_dir() / f"{stem}_GroundTruth.txt")
    labels, keep = label_scores(df["score"].to_numpy(), label_mode, neutral_band)
    df = df.assign(label=labels)[keep].reset_index(drop=True)
    return df[["id", "text", "score", "label"]]


def load_ratings(domain: str = "amazon") -> pd.DataFrame:
    """Every rater's rating per snippet: columns ``id, score, sd, ratings`` (list of ints)."""
    path = _snippet_dir() / f"{_check_domain(domain)}_anonDataRatings.txt"
    rows = []
    text = path.read_bytes().decode("utf-8-sig", errors="replace").replace("\r\n", "\n")
    for lineno, line in enumerate(text.split("\n"), 1):
        if not line.strip():
            continue
        parts = line.split("\t")
        try:
            ratings = json.loads(parts[3])
            rows.append((parts[0].strip(), float(parts[1]), float(parts[2]), [int(r) for r in ratings]))
        except (IndexError, ValueError) as exc:
            raise DataError(f"{path}:{lineno}: expected 'id, mean, sd, [ratings]', got {line[:80]!r}") from exc
    return pd.DataFrame(rows, columns=["id", "score", "sd", "ratings"])


def split(df: pd.DataFrame, seed: int, fractions: tuple[float, float, float] = (0.7, 0.15, 0.15),
          stratify: bool = True) -> dict[str, pd.DataFrame]:
    """Seeded train/validation/test split, stratified by ``label`` when asked (and possible)."""
    if len(fractions) != 3 or any(f <= 0 for f in fractions) or abs(sum(fractions) - 1) > 1e-6:
        raise DataError(f"fractions {fractions} must be three positive numbers summing to 1, e.g. (0.7, 0.15, 0.15).")
    if len(df) < 10:
        raise DataError(f"only {len(df)} examples: too few to split; lower neutral_band or use more data.")
    strat = df["label"] if stratify and df["label"].value_counts().min() >= 3 else None
    train, rest = train_test_split(df, train_size=fractions[0], random_state=seed, stratify=strat)
    strat_rest = rest["label"] if strat is not None else None
    val, test = train_test_split(rest, train_size=fractions[1] / (fractions[1] + fractions[2]), random_state=seed,
                                 stratify=strat_rest)
    return {k: v.reset_index(drop=True) for k, v in (("train", train), ("val", val), ("test", test))}


def subsample(df: pd.DataFrame, n: int, seed: int, stratify: bool = True) -> pd.DataFrame:
    """A seeded sample of ``n`` rows (stratified by ``label`` when asked); all rows if ``n >= len(df)``."""
    if n <= 0:
        raise DataError(f"subsample size must be positive, got {n}.")
    if n >= len(df):
        return df.reset_index(drop=True)
    strat = df["label"] if stratify and "label" in df and df["label"].value_counts().min() >= 2 else None
    try:
        part, _ = train_test_split(df, train_size=n, random_state=seed, stratify=strat)
    except ValueError:  # too few rows per class for the requested size: fall back to a plain sample
        part = df.sample(n=n, random_state=seed)
    return part.reset_index(drop=True)


def batch_order(lengths: np.ndarray, batch_size: int, shuffle: bool, seed: int, bucket: bool) -> list[np.ndarray]:
    """Index batches: shuffled (seeded) and, with bucketing, grouped by similar length.

    Bucketing sorts by length inside chunks of 50 batches, so each batch has little padding while the
    order of batches stays random (shuffled with the same seed).
    """
    rng = np.random.default_rng(seed)
    idx = rng.permutation(len(lengths)) if shuffle else np.arange(len(lengths))
    if bucket:
        n_chunks = max(1, int(np.ceil(len(idx) / (batch_size * 50))))
        idx = np.concatenate([c[np.argsort(lengths[c], kind="stable")] for c in np.array_split(idx, n_chunks)])
    batches = [idx[i:i + batch_size] for i in range(0, len(idx), batch_size)]
    if shuffle:
        batches = [batches[i] for i in rng.permutation(len(batches))]
    return batches


def make_loader(tokenizer: Any, texts: list[str], labels: Any, batch_size: int = 32, shuffle: bool = False,
                seed: int = 0, max_length: int = 128, bucket: bool = True) -> list[dict[str, torch.Tensor]]:
    """Tokenize once and return batches (dicts of ``input_ids, attention_mask, labels``), dynamically padded.

    The result is a plain list (re-iterable, deterministic for a seed). Without shuffling and bucketing,
    examples keep their order, so predictions line up with ``texts``.
    """
    if len(texts) != len(labels):
        raise DataError(f"{len(texts)} texts but {len(labels)} labels.")
    if batch_size < 1:
        raise DataError(f"batch_size must be >= 1, got {batch_size}.")
    enc = tokenizer(list(texts), truncation=True, max_length=max_length)
    ids = enc["input_ids"]
    lengths = np.array([len(x) for x in ids])
    labels_t = torch.as_tensor(np.array(labels))  # a copy: pandas arrays may be read-only
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    out = []
    for b in batch_order(lengths, batch_size, shuffle, seed, bucket):
        width = int(lengths[b].max())
        input_ids = torch.full((len(b), width), pad, dtype=torch.long)
        mask = torch.zeros((len(b), width), dtype=torch.long)
        for row, i in enumerate(b):
            input_ids[row, :lengths[i]] = torch.as_tensor(ids[i])
            mask[row, :lengths[i]] = 1
        out.append({"input_ids": input_ids, "attention_mask": mask, "labels": labels_t[torch.as_tensor(b)]})
    return out


def load_amazon_reviews_2023(path: str | Path, label_mode: str = "polarity", limit: int | None = None) -> pd.DataFrame:
    """Amazon Reviews 2023 JSONL (one review per line: ``rating`` 1–5, ``title``, ``text``).

    Returns ``rating, title, text, label`` where polarity is rating ≥ 4 → 1, ≤ 2 → 0 (3 dropped),
    ``bins5`` is rating − 1, ``regression`` the rating. A malformed line raises :class:`DataError`
    naming the file and line.
    """
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path} does not exist; pass the path of an Amazon Reviews 2023 .jsonl file.")
    rows = []
    with open(path, encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{path}:{lineno}: not valid JSON ({exc.msg})") from exc
            missing = [k for k in ("rating", "title", "text") if k not in rec]
            if missing:
                raise DataError(f"{path}:{lineno}: missing field(s) {missing}")
            rating = rec["rating"]
            if not isinstance(rating, (int, float)) or isinstance(rating, bool) or not 1 <= rating <= 5:
                raise DataError(f"{path}:{lineno}: rating {rating!r} is not a number in 1..5")
            rows.append((float(rating), str(rec["title"]), str(rec["text"])))
            if limit and len(rows) >= limit:
                break
    df = pd.DataFrame(rows, columns=["rating", "title", "text"])
    if label_mode == "polarity":
        df = df[df["rating"] != 3].assign(label=lambda d: (d["rating"] >= 4).astype(int))
    elif label_mode == "bins5":
        df = df.assign(label=(df["rating"].round() - 1).astype(int))
    elif label_mode == "regression":
        df = df.assign(label=df["rating"])
    else:
        raise DataError(f"unknown label_mode {label_mode!r}; choose from {', '.join(LABEL_MODES)}.")
    return df.reset_index(drop=True)


def load_movielens() -> dict[str, pd.DataFrame]:
    """MovieLens 100K atomic files (``inter``, ``item``, ``user``) with the type suffixes stripped from columns."""
    from .assets import locate

    folder = locate("movielens")
    out = {}
    for part in ("inter", "item", "user"):
        df = pd.read_csv(folder / f"ml-100k.{part}", sep="\t", encoding="latin-1")
        df.columns = [c.split(":")[0] for c in df.columns]
        out[part] = df
    return out


def dataset_card(domains: tuple[str, ...] = DOMAINS, neutral_band: float = 0.5, tokenizer: Any = None) -> pd.DataFrame:
    """One row per domain: sizes, label balance, lengths and the spread between human raters."""
    rows = []
    for domain in domains:
        full = load_snippets(domain, "regression", 0.0)
        pol = load_snippets(domain, "polarity", neutral_band)
        words = full["text"].str.split().str.len()
        ratings = load_ratings(domain)
        dev = [np.abs(np.asarray(r) - np.mean(r)).mean() for r in ratings["ratings"]]
        row = {"domain": domain, "n_total": len(full), "n_after_band": len(pol),
               "share_positive": float(pol["label"].mean()),
               "words_mean": float(words.mean()), "words_median": float(words.median()),
               "words_p95": float(words.quantile(0.95)),
               "raters_per_snippet": float(ratings["ratings"].str.len().mean()),
               "rater_sd_mean": float(ratings["sd"].mean()), "rater_abs_dev_mean": float(np.mean(dev))}
        if tokenizer is not None:
            row["tokens_mean"] = float(np.mean([len(x) for x in tokenizer(full["text"].tolist())["input_ids"]]))
        rows.append(row)
    return pd.DataFrame(rows)
