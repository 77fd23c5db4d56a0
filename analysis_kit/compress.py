"""Layer removal: which blocks to keep, the smaller model, how good it is and what it costs.

Every selection strategy answers one question, "which ``k`` of the ``L`` blocks do we keep?", and
returns the kept indices in increasing order:

- ``keep_top_k``: the ``k`` blocks an importance score ranks highest (any table from ``importance``);
- ``keep_distributed``: ``k`` blocks spread evenly over depth, first and last included (the original
  research's "distributed" pick);
- ``keep_angular``: drop the contiguous run of ``L - k`` blocks whose input and output representations
  are closest in angular distance (Gromov et al., 2024);
- ``keep_drop_last``: drop the last ``L - k`` blocks (the best simple strategy of Sajjad et al., 2023);
- ``greedy_removal``: repeatedly drop the block whose removal hurts a calibration set least, re-scoring
  after every removal;
- ``random_keeps``: uniformly random subsets, the null distribution every strategy is compared with.

Each is also one ``strategies.Strategy`` class with one call, ``select(model, k, calib)``, in a registry
(``strategies.names()``, hence ``STRATEGIES`` and the CLI's ``--strategy`` choices); ``select(strategy, model,
k, ...)`` below is the thin by-name wrapper, and the classes' declarations (``needs_data``,
``needs_importance``) drive every check of what a strategy needs.

``compact(model, keep)`` turns a choice into a plain Hugging Face model (``layers.keep_blocks``).
Candidate subsets are *evaluated* without building models: ``subset_outputs`` runs the kept blocks of
the full model and shares the work of common prefixes (the hidden states after blocks ``(0, 1)`` serve
every subset that starts with them), which is what makes the greedy search and the random null cheap.
The result equals the compacted model's output (a test proves it).
"""

from __future__ import annotations

import itertools
import math
import os
import shutil
import statistics
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from . import layers, measure, stats
from .cache import atomic_write_json, honour_umask, temp_dir
from .device import pick, progress
from .errors import LayerwiseError
from .strategies import Calibration, lookup, top_k
from .strategies import names as strategy_names

#: The registered strategies (``strategies.names()`` when this module was imported): importance,
#: distributed, angular, drop_last, greedy, random. Validation reads the live registry, so a strategy
#: registered later is accepted too.
STRATEGIES = strategy_names()


Keep = tuple[int, ...]
Readout = Callable[[torch.nn.Module, torch.Tensor, Mapping[str, torch.Tensor]], torch.Tensor]


class CompressError(LayerwiseError):
    """A compression request that cannot be met (bad ratio, missing scores or calibration data)."""


# --------------------------------------------------------------------------------------------------
# How many blocks to keep


def n_keep(n_blocks: int, *, keep: int | None = None, ratio: float | None = None,
           drop_fraction: float | None = None) -> int:
    """Blocks to keep, from exactly one of: ``keep`` (a count), ``ratio`` (L / L', e.g. 2.0 keeps half),
    or ``drop_fraction`` (share of blocks removed, e.g. 0.25). Rounded to the nearest count, at least 1."""
    given = [x is not None for x in (keep, ratio, drop_fraction)]
    if sum(given) != 1:
        raise CompressError("give exactly one of keep= (blocks kept), ratio= (L/L') or drop_fraction= "
                            f"(share removed); got keep={keep}, ratio={ratio}, drop_fraction={drop_fraction}.")
    if keep is not None:
        k = keep
    elif ratio is not None:
        if not ratio >= 1:
            raise CompressError(f"ratio={ratio} must be >= 1 (L/L': 2.0 keeps half the blocks).")
        k = round(n_blocks / ratio)
    else:
        if not 0 <= drop_fraction < 1:
            raise CompressError(f"drop_fraction={drop_fraction} must be in [0, 1) (0.25 removes a quarter).")
        k = n_blocks - round(n_blocks * drop_fraction)
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or not 1 <= k <= n_blocks:
        raise CompressError(f"cannot keep {k} of {n_blocks} blocks; keep between 1 and {n_blocks}.")
    return int(k)


def _check_k(n_blocks: int, k: int) -> int:
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or not 1 <= k <= n_blocks:
        raise CompressError(f"k={k!r} blocks to keep is impossible for a model with {n_blocks} blocks; "
                            f"use 1..{n_blocks}.")
    return int(k)


# --------------------------------------------------------------------------------------------------
# Strategies that need no data


def _score_vector(scores: pd.DataFrame | Mapping[int, float] | Sequence[float], n_blocks: int,
                  method: str | None) -> np.ndarray:
    """One score per block (higher = more important), averaging rows of the same layer (e.g. seeds)."""
    if isinstance(scores, pd.DataFrame):
        missing = {"layer", "score"} - set(scores.columns)
        if missing:
            raise CompressError(f"the score table lacks columns {sorted(missing)}; pass importance.compute(...) "
                                "output (method, layer, score, ...).")
        df = scores
        if "method" in df.columns:
            methods = df["method"].unique().tolist()
            if method is None and len(methods) > 1:
                raise CompressError(f"the score table holds several methods {methods}; pass method= to choose one.")
            if method is not None:
                if method not in methods:
                    raise CompressError(f"method {method!r} is not in the score table (it has {methods}).")
                df = df[df["method"] == method]
        series = df.groupby("layer")["score"].mean()
    elif isinstance(scores, Mapping):
        series = pd.Series(dict(scores), dtype=float)
    else:
        series = pd.Series(list(scores), dtype=float)
    if sorted(series.index.tolist()) != list(range(n_blocks)):
        raise CompressError(f"scores cover layers {sorted(series.index.tolist())}, but the model has blocks "
                            f"0..{n_blocks - 1}; score every block once.")
    vec = series.sort_index().to_numpy(dtype=float)
    if not np.isfinite(vec).all():
        raise CompressError("scores contain NaN/inf; recompute the importance table.")
    return vec


def keep_top_k(scores: pd.DataFrame | Mapping[int, float] | Sequence[float], k: int, n_blocks: int | None = None,
               method: str | None = None) -> Keep:
    """The ``k`` blocks with the highest importance score (ties broken towards the earlier block;
    ``strategies.top_k``, the rule every module shares).

    ``scores``: an ``importance.compute`` table (``layer``, ``score``; rows of one layer are averaged, so
    several seeds may be passed), a ``{layer: score}`` mapping or a sequence indexed by layer.
    """
    n = n_blocks if n_blocks is not None else (
        int(scores["layer"].nunique()) if isinstance(scores, pd.DataFrame) else len(scores))
    k = _check_k(n, k)
    return top_k(_score_vector(scores, n, method), k)


def keep_distributed(n_blocks: int, k: int) -> Keep:
    """``k`` blocks spread evenly over depth: ``round(linspace(0, L-1, k))``, so the first and last stay."""
    k = _check_k(n_blocks, k)
    if k == 1:
        return (n_blocks - 1,)
    picks = np.floor(np.linspace(0, n_blocks - 1, k) + 0.5).astype(int)  # round half up, no banker's rounding
    return tuple(int(i) for i in picks)


def keep_drop_last(n_blocks: int, k: int) -> Keep:
    """The first ``k`` blocks (drop the last ``L - k``)."""
    return tuple(range(_check_k(n_blocks, k)))


def random_keeps(n_blocks: int, k: int, n_draws: int = 20, seed: int = 0) -> list[Keep]:
    """Distinct uniformly random ``k``-subsets: the null distribution of "any ``k`` blocks".

    When there are at most ``n_draws`` subsets in all (``C(L, k) <= n_draws``) every subset is returned,
    so the null is exact rather than sampled; otherwise ``n_draws`` distinct subsets, seeded.
    """
    k = _check_k(n_blocks, k)
    if n_draws < 1:
        raise CompressError(f"n_draws={n_draws} must be at least 1 (20 or more for a usable null).")
    if math.comb(n_blocks, k) <= n_draws:
        return [tuple(c) for c in itertools.combinations(range(n_blocks), k)]
    rng = np.random.default_rng(seed)
    seen: dict[Keep, None] = {}
    while len(seen) < n_draws:
        seen.setdefault(tuple(sorted(int(i) for i in rng.choice(n_blocks, size=k, replace=False))), None)
    return list(seen)


def compact(model: torch.nn.Module, keep: Iterable[int]) -> torch.nn.Module:
    """A new Hugging Face model holding only blocks ``keep`` (``layers.keep_blocks``; ``model`` unchanged)."""
    return layers.keep_blocks(model, sorted(keep))


# --------------------------------------------------------------------------------------------------
# Tokenized data, and evaluating many subsets of one model


@dataclass
class Encoded:
    """Tokenized examples in length-sorted batches (little padding), and the way back to input order.

    ``batches[i]`` holds ``input_ids``, ``attention_mask`` (and ``token_type_ids``, ``labels`` when
    present); ``order[j]`` is the input position of the ``j``-th example in batch order.
    """

    batches: list[dict[str, torch.Tensor]]
    order: np.ndarray

    def __len__(self) -> int:
        return len(self.order)

    def restore(self, values: np.ndarray) -> np.ndarray:
        """Per-example values in batch order → input order."""
        values = np.asarray(values)
        out = np.empty_like(values)
        out[self.order] = values
        return out


def encode(tokenizer: Any, texts: Sequence[str], labels: Sequence[Any] | None = None, batch_size: int = 32,
           max_length: int = 64) -> Encoded:
    """Tokenize ``texts`` into length-sorted batches with dynamic padding (see ``Encoded``)."""
    texts = list(texts)
    if not texts:
        raise CompressError("no texts to encode; pass at least one example.")
    if labels is not None and len(labels) != len(texts):
        raise CompressError(f"{len(texts)} texts but {len(labels)} labels; pass one label per text.")
    if batch_size < 1 or max_length < 2:
        raise CompressError(f"batch_size={batch_size} and max_length={max_length} must be >= 1 and >= 2.")
    if tokenizer.pad_token is None:
        raise CompressError("the tokenizer has no pad token; set tokenizer.pad_token = tokenizer.eos_token.")
    lengths = [len(ids) for ids in tokenizer(texts, truncation=True, max_length=max_length)["input_ids"]]
    order = np.argsort(-np.asarray(lengths), kind="stable")
    batches = []
    side = getattr(tokenizer, "padding_side", "right")
    tokenizer.padding_side = "right"  # positions 0..n-1 for every text, as in training
    try:
        for start in range(0, len(texts), batch_size):
            idx = order[start:start + batch_size]
            enc = tokenizer([texts[i] for i in idx], padding=True, truncation=True, max_length=max_length,
                            return_tensors="pt")
            batch = {k: v for k, v in enc.items() if k in ("input_ids", "attention_mask", "token_type_ids")}
            if labels is not None:
                lab = np.asarray(labels)[idx]
                batch["labels"] = torch.as_tensor(lab, dtype=torch.float32 if lab.dtype.kind == "f" else torch.long)
            batches.append(batch)
    finally:
        tokenizer.padding_side = side
    return Encoded(batches, order)


def logits_readout(model: torch.nn.Module, hidden: torch.Tensor, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """The task head's logits (classifiers: (B, C)); ``layers.classify``."""
    return layers.classify(model, hidden, batch.get("attention_mask"))


def lm_nll_readout(model: torch.nn.Module, hidden: torch.Tensor, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """Per-text mean next-token negative log-likelihood (nats) of a causal LM over its real tokens."""
    logits = layers.classify(model, hidden, batch.get("attention_mask"))[:, :-1].float()
    target = batch["input_ids"][:, 1:].to(logits.device)
    mask = batch["attention_mask"][:, 1:].to(logits.device).float()
    nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1), reduction="none")
    nll = nll.view_as(mask) * mask
    return nll.sum(1) / mask.sum(1).clamp_min(1.0)


def _as_keep(keep: Iterable[int], n: int) -> Keep:
    """A non-empty, strictly increasing tuple of block indices in 0..n-1, or a clear error."""
    try:
        idx = tuple(int(i) for i in keep)
    except (TypeError, ValueError):
        raise CompressError(f"keep={keep!r} must be block indices such as (0, 2, 5).") from None
    if not idx or list(idx) != sorted(set(idx)) or idx[0] < 0 or idx[-1] >= n:
        raise CompressError(f"keep={idx} must be distinct increasing block indices in 0..{n - 1}, at least one.")
    return idx


def _to(batch: Mapping[str, torch.Tensor], dev: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.to(dev) for k, v in batch.items()}


@torch.no_grad()
def subset_outputs(model: torch.nn.Module, data: Encoded, keeps: Iterable[Iterable[int]],
                   readout: Readout = logits_readout, device: str | torch.device = "auto",
                   desc: str | None = None) -> dict[Keep, np.ndarray]:
    """``readout`` of the model that keeps only blocks ``keep``, for every ``keep`` in ``keeps``.

    The full model runs its kept blocks in order, the others treated as removed; this equals the output of
    ``compact(model, keep)``. Subsets are visited in lexicographic order and the hidden states of the
    current prefix are kept on a stack, so blocks shared by a common prefix run once per batch. Values
    are returned per example in input order, as float numpy arrays.
    """
    n = layers.num_blocks(model)
    todo = sorted({_as_keep(k, n) for k in keeps})
    if not todo:
        raise CompressError("keeps is empty; pass at least one subset of block indices.")
    dev = pick(device)
    model.eval().to(dev)
    parts: dict[Keep, list[np.ndarray]] = {k: [] for k in todo}
    batches = progress(data.batches, desc=desc) if desc else data.batches
    for batch in batches:
        batch = _to(batch, dev)
        hidden0 = layers.embed(model, batch)
        stack: list[tuple[int, torch.Tensor]] = []  # (block index, hidden after it) along the current prefix
        for keep in todo:
            common = 0
            while common < min(len(stack), len(keep)) and stack[common][0] == keep[common]:
                common += 1
            del stack[common:]
            hidden = stack[-1][1] if stack else hidden0
            rest = keep[common:]
            if rest:  # one call runs the rest of the subset (mask and positions prepared once)
                outs = layers.run_blocks(model, batch, skip=set(range(rest[0], n)) - set(rest), start=rest[0],
                                         hidden=hidden, return_all=True)
                stack.extend((b, outs[b - rest[0]]) for b in rest)
                hidden = stack[-1][1]
            parts[keep].append(readout(model, hidden, batch).float().cpu().numpy())
    return {k: data.restore(np.concatenate(v)) for k, v in parts.items()}


# --------------------------------------------------------------------------------------------------
# Strategies that look at data


def _labels(data: Encoded) -> np.ndarray | None:
    if not all("labels" in b for b in data.batches):
        return None
    return data.restore(np.concatenate([b["labels"].numpy() for b in data.batches]))


def _is_causal_lm(model: torch.nn.Module) -> bool:
    return hasattr(model, "lm_head") and not type(model).__name__.endswith("ForSequenceClassification")


def _is_bare(model: torch.nn.Module) -> bool:
    """A model without a task head (``BertModel``, ``LlamaModel``, ...): its output is hidden states."""
    return not _is_causal_lm(model) and not type(model).__name__.endswith("ForSequenceClassification")


def pooled_readout(model: torch.nn.Module, hidden: torch.Tensor, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """A bare model's text embedding: its output hidden states (decoders: after the final norm, as their
    ``last_hidden_state``) averaged over real tokens, (B, d); the pooling of sentence encoders such as
    all-MiniLM-L6-v2."""
    norm = layers.adapter_for(model).final_norm(model)
    if norm is not None:
        hidden = norm(hidden)
    mask = batch["attention_mask"].to(hidden.device).unsqueeze(-1).to(hidden.dtype)
    return (hidden * mask).sum(1) / mask.sum(1).clamp_min(1.0)


def _criterion(model: torch.nn.Module, data: Encoded, criterion: str, device: str | torch.device,
               ) -> tuple[Readout, Callable[[np.ndarray], float], str]:
    """(readout, reducer, name): how much a subset hurts on the calibration set; lower is better."""
    if criterion not in ("auto", "loss", "kl", "cosine"):
        raise CompressError(f"criterion={criterion!r}; choose 'auto', 'loss' (labels / LM loss), 'kl' "
                            "(divergence from the full model, no labels needed) or 'cosine' (bare models).")
    if _is_bare(model):  # no head, no logits: stay close to the full model's text embeddings
        if criterion not in ("auto", "cosine"):
            raise CompressError(f"criterion={criterion!r} needs a task head, but {type(model).__name__} is a bare "
                                "model; use criterion='cosine' (distance from the full model's embeddings).")
        full = subset_outputs(model, data, [range(layers.num_blocks(model))], pooled_readout, device)
        ref = F.normalize(torch.as_tensor(next(iter(full.values()))), dim=-1)

        def distance(emb: np.ndarray) -> float:
            return float((1 - (F.normalize(torch.as_tensor(emb), dim=-1) * ref).sum(-1)).mean())

        return pooled_readout, distance, "cosine_from_full"
    if criterion == "cosine":
        raise CompressError("criterion='cosine' is for bare models (no task head); use 'auto', 'loss' or 'kl'.")
    if _is_causal_lm(model):
        if criterion == "kl":
            raise CompressError("criterion='kl' is for classifiers; a causal LM uses its own loss ('loss').")
        return lm_nll_readout, lambda v: float(np.mean(v)), "lm_nll"
    labels = _labels(data)
    if criterion == "loss" and labels is None:
        raise CompressError("criterion='loss' needs labels in the calibration batches; encode them with labels= "
                            "or use criterion='kl'.")
    if criterion in ("auto", "loss") and labels is not None:
        lab = torch.as_tensor(labels)

        def ce(logits: np.ndarray) -> float:
            t = torch.as_tensor(logits)
            if t.shape[1] == 1:
                return float(F.mse_loss(t[:, 0], lab.float()))
            return float(F.cross_entropy(t, lab.long()))

        return logits_readout, ce, "loss"
    full = subset_outputs(model, data, [range(layers.num_blocks(model))], device=device)
    ref = torch.log_softmax(torch.as_tensor(next(iter(full.values()))), -1)

    def kl(logits: np.ndarray) -> float:
        return float(F.kl_div(torch.log_softmax(torch.as_tensor(logits), -1), ref, log_target=True,
                              reduction="batchmean"))

    return logits_readout, kl, "kl_from_full"


def greedy_removal(model: torch.nn.Module, data: Encoded, k: int, criterion: str = "auto",
                   device: str | torch.device = "auto") -> tuple[Keep, pd.DataFrame]:
    """Remove blocks one at a time, each time the one whose removal hurts the calibration set least.

    ``criterion``: ``"loss"`` (cross-entropy on the batches' labels; a causal LM's own next-token loss),
    ``"kl"`` (KL divergence from the full model's predictions, needs no labels), ``"cosine"`` (a bare model
    without a head: mean cosine distance of ``pooled_readout`` from the full model's) or ``"auto"`` (loss
    when labels are there; cosine for a bare model). After every removal all remaining candidates are
    re-scored. Returns the kept blocks and a trace (step, removed, n_kept, value of the criterion after
    the removal, candidates).
    """
    n = layers.num_blocks(model)
    k = _check_k(n, k)
    readout, reduce, name = _criterion(model, data, criterion, device)
    kept = list(range(n))
    rows = []
    while len(kept) > k:
        candidates = {c: tuple(b for b in kept if b != c) for c in kept}
        outs = subset_outputs(model, data, candidates.values(), readout, device)
        values = {c: reduce(outs[sub]) for c, sub in candidates.items()}
        worst_first = min(values, key=lambda c: (values[c], c))
        kept.remove(worst_first)
        rows.append({"step": len(rows) + 1, "removed": worst_first, "n_kept": len(kept), "criterion": name,
                     "value": values[worst_first], "candidates": len(candidates)})
    return tuple(kept), pd.DataFrame(rows, columns=["step", "removed", "n_kept", "criterion", "value", "candidates"])


@torch.no_grad()
def angular_distances(model: torch.nn.Module, data: Encoded, device: str | torch.device = "auto") -> pd.DataFrame:
    """Mean angular distance arccos(cos)/π between the residual stream entering block ``start`` and the
    one leaving block ``start + n - 1``, for every run (start, n), averaged over all real tokens.

    Gromov et al. (2024) drop the run of ``n`` blocks with the smallest distance (their input already
    resembles their output). Columns: ``start``, ``n``, ``distance``, ``tokens``.
    """
    dev = pick(device)
    model.eval().to(dev)
    n_blocks = layers.num_blocks(model)
    total = torch.zeros(n_blocks + 1, n_blocks + 1, dtype=torch.float64)
    count = 0
    for batch in data.batches:
        batch = _to(batch, dev)
        states = [layers.embed(model, batch)] + layers.run_blocks(model, batch, return_all=True)
        mask = batch["attention_mask"].bool()
        h = torch.stack([s[mask] for s in states]).float()  # (L+1, tokens, d)
        h = F.normalize(h, dim=-1)
        cos = torch.einsum("atd,btd->abt", h, h).clamp(-1.0, 1.0)
        total += (torch.arccos(cos) / math.pi).sum(-1).double().cpu()
        count += int(mask.sum())
    dist = (total / max(count, 1)).numpy()
    rows = [{"start": s, "n": m, "distance": float(dist[s, s + m]), "tokens": count}
            for m in range(1, n_blocks) for s in range(0, n_blocks - m + 1)]
    return pd.DataFrame(rows)


def keep_angular(model: torch.nn.Module, data: Encoded, k: int, table: pd.DataFrame | None = None,
                 device: str | torch.device = "auto") -> Keep:
    """Keep all blocks except the contiguous run of ``L - k`` with the smallest angular distance."""
    n = layers.num_blocks(model)
    k = _check_k(n, k)
    if k == n:
        return tuple(range(n))
    table = angular_distances(model, data, device) if table is None else table
    run = table[table["n"] == n - k]
    if run.empty:
        raise CompressError(f"the angular-distance table has no runs of {n - k} blocks; recompute it for this model.")
    best = run.sort_values(["distance", "start"]).iloc[0]
    start = int(best["start"])
    return tuple(i for i in range(n) if not start <= i < start + n - k)


def select(strategy: str, model: torch.nn.Module, k: int, *, scores: pd.DataFrame | None = None,
           method: str | None = None, data: Encoded | None = None, seed: int = 0, criterion: str = "auto",
           device: str | torch.device = "auto") -> Keep:
    """The blocks ``strategy`` keeps: the registered strategy of that name (``strategies.names()``; ``random``
    gives one seeded draw), called with these arguments gathered into one ``strategies.Calibration``."""
    chosen = lookup(strategy)
    k = _check_k(layers.num_blocks(model), k)
    calib = Calibration(data=data, scores=scores, method=method, seed=seed, criterion=criterion, device=device)
    chosen.check(calib)
    return chosen.select(model, k, calib)


# --------------------------------------------------------------------------------------------------
# Quality and cost


def retention(compressed: Any, full: Any) -> np.ndarray:
    """Compressed metric / full metric (per seed, or per anything aligned)."""
    c, f = np.asarray(compressed, dtype=float), np.asarray(full, dtype=float)
    if c.shape != f.shape:
        raise CompressError(f"compressed {c.shape} and full {f.shape} metrics are not aligned; pass one per seed.")
    if (f <= 0).any():
        raise CompressError("a full-model metric is <= 0; retention is undefined. Check the evaluation.")
    return c / f


def cost_table(model: torch.nn.Module, tokenizer: Any, kept_counts: Sequence[int],
               batch_sizes: Sequence[int] = (1, 64), seq_len: int = 64, repeats: int = 10, warmup: int = 2,
               device: str | torch.device = "auto") -> pd.DataFrame:
    """Parameters, file size, latency (median of ``repeats`` after ``warmup``) and peak memory of the
    model with ``k`` blocks kept, for each ``k`` in ``kept_counts`` (the full model included).

    Cost depends on how many blocks remain, not which, so the first ``k`` blocks stand in for any
    ``k``-subset. ``speedup`` = full latency / compressed latency; ``ideal`` = L / k; ``efficiency`` =
    speedup / ideal (1.0 means the saving is exactly proportional to the blocks removed).

    The sizes are timed interleaved (repeat r times every size once before repeat r + 1), so that a burst
    of load on a shared machine slows all sizes alike instead of one size's whole timing window; timing
    each size in its own window made efficiencies swing by tens of points between identical runs.
    """
    n = layers.num_blocks(model)
    counts = sorted({n, *(_check_k(n, k) for k in kept_counts)}, reverse=True)
    subs = {k: model if k == n else compact(model, range(k)) for k in counts}
    rows = []
    for bs in progress(batch_sizes, desc="cost"):
        batch = measure.fixed_batch(tokenizer, bs, seq_len)
        for sub in subs.values():
            measure.latency(sub, batch, repeats=1, warmup=warmup, device=device)
        times: dict[int, list[float]] = {k: [] for k in counts}
        for _ in range(repeats):
            for k, sub in subs.items():
                times[k] += measure.latency(sub, batch, repeats=1, warmup=0, device=device)["times_ms"]
        for k, sub in subs.items():
            q = statistics.quantiles(times[k], n=4) if len(times[k]) > 1 else times[k] * 3  # as measure.latency
            mem = measure.peak_memory(lambda sub=sub, batch=batch: _forward(sub, batch, device), device=device)
            rows.append({"n_blocks": n, "n_kept": k, "batch_size": bs, "seq_len": seq_len,
                         "params": measure.count_parameters(sub), "file_bytes": measure.file_size(sub),
                         "median_ms": statistics.median(times[k]), "p25_ms": q[0], "p75_ms": q[2],
                         "times_ms": times[k], "peak_mib": mem["peak_mib"], "memory_kind": mem["kind"]})
    del subs
    df = pd.DataFrame(rows).sort_values(["n_kept", "batch_size"], ascending=[False, True], ignore_index=True)
    full = df[df["n_kept"] == n].set_index("batch_size")
    df["speedup"] = df["batch_size"].map(full["median_ms"]) / df["median_ms"]
    bounds = [_median_ratio_ci(full.loc[r.batch_size, "times_ms"], r.times_ms) for r in df.itertuples()]
    df["speedup_ci_low"], df["speedup_ci_high"] = zip(*bounds, strict=True) if bounds else ([], [])
    df["ideal"] = n / df["n_kept"]
    df["efficiency"] = df["speedup"] / df["ideal"]
    df["efficiency_ci_low"] = df["speedup_ci_low"] / df["ideal"]
    df["efficiency_ci_high"] = df["speedup_ci_high"] / df["ideal"]
    df["param_ratio"] = df["params"].max() / df["params"]
    return df.drop(columns=["times_ms"])


def _median_ratio_ci(full_ms: Sequence[float], ms: Sequence[float], n_resamples: int = 2000,
                     seed: int = 0) -> tuple[float, float]:
    """95% percentile-bootstrap interval of median(full) / median(compressed), resampling each set of
    timed runs independently."""
    rng = np.random.default_rng(seed)
    a, b = np.asarray(full_ms, dtype=float), np.asarray(ms, dtype=float)
    ra = np.median(rng.choice(a, (n_resamples, a.size)), axis=1)
    rb = np.median(rng.choice(b, (n_resamples, b.size)), axis=1)
    low, high = np.percentile(ra / rb, [2.5, 97.5])
    return float(low), float(high)


@torch.no_grad()
def _forward(model: torch.nn.Module, batch: Mapping[str, torch.Tensor], device: str | torch.device) -> None:
    dev = pick(device)
    model.eval().to(dev)
    model(**_to(batch, dev))


# --------------------------------------------------------------------------------------------------
# Statistics: strategies against a reference


def paired_tests(df: pd.DataFrame, value: str, reference: str, by: Sequence[str] = ("n_kept",),
                 pair_on: Sequence[str] = ("seed",), strategy: str = "strategy", alternative: str = "greater",
                 label: str = "") -> list[stats.TestResult]:
    """Paired t-test of every strategy against ``reference`` within each group ``by``, pairing rows on
    ``pair_on`` (seeds, or examples), with Cohen's d_z and the probability of improvement (in ``extras``).

    ``alternative="greater"``: is the strategy's ``value`` higher than the reference's (use "less" for
    losses). Not Holm-corrected: pass the family to ``stats.holm_family``. When every paired difference
    is the same non-zero number the t statistic is undefined; the Wilcoxon signed-rank test is used instead.
    """
    need = {value, strategy, *by, *pair_on}
    missing = need - set(df.columns)
    if missing:
        raise CompressError(f"paired_tests: columns {sorted(missing)} missing (have {list(df.columns)}).")
    out: list[stats.TestResult] = []
    for key, g in df.groupby(list(by), sort=True):
        key = key if isinstance(key, tuple) else (key,)
        where = ", ".join(f"{b}={v}" for b, v in zip(by, key, strict=True))
        ref = g[g[strategy] == reference].set_index(list(pair_on))[value]
        if ref.empty:
            continue
        if ref.index.duplicated().any():
            raise CompressError(f"reference {reference!r} has several rows per {list(pair_on)} at {where}; "
                                "average them first (e.g. the random draws of one seed).")
        for name, s in g[g[strategy] != reference].groupby(strategy, sort=False):
            s = s.set_index(list(pair_on))[value]
            common = s.index.intersection(ref.index)
            a, b = s.loc[common].to_numpy(float), ref.loc[common].to_numpy(float)
            title = f"{label}{where}: {name} vs {reference}"
            if len(common) < 2:
                continue
            try:
                res = stats.paired_ttest(a, b, alternative=alternative, name=title)
            except stats.DegenerateDataError:
                res = stats.wilcoxon(a, b, alternative=alternative, name=title)
            sign = 1.0 if alternative != "less" else -1.0
            pi, lo, hi = stats.prob_improvement(sign * a, sign * b, paired=True, n_resamples=2000)
            res.extras.update({"strategy": name, "reference": reference, **dict(zip(by, key, strict=True)),
                               "mean_a": float(a.mean()), "mean_b": float(b.mean()), "prob_improvement": pi,
                               "prob_improvement_ci_low": lo, "prob_improvement_ci_high": hi})
            out.append(res)
    return out


def tests_table(tests: Sequence[stats.TestResult]) -> pd.DataFrame:
    """A tidy frame of test records (one row per test, extras as columns; the standard columns even when
    there are no tests, e.g. with a single seed)."""
    cols = ["name", "statistic", "p_value", "p_holm", "effect_size", "effect_name", "n", "alternative", "strategy",
            "reference", "n_kept", "mean_a", "mean_b", "prob_improvement", "prob_improvement_ci_low",
            "prob_improvement_ci_high"]
    df = pd.DataFrame([t.as_dict() for t in tests])
    return df.reindex(columns=list(dict.fromkeys(cols + list(df.columns))))


# --------------------------------------------------------------------------------------------------
# Compress any folder (the `analysis-kit compress` command)


def _inspect(folder: Path) -> tuple[Any, str]:
    """The folder's config and what it holds, without loading any weights.

    The kind is ``"classifier"`` (``*ForSequenceClassification``), ``"lm"`` (``*ForCausalLM``,
    ``*LMHeadModel``) or ``"bare"`` (anything else, e.g. ``BertModel`` of a sentence encoder, loaded with
    ``AutoModel``). An unsupported family is refused here, before the weights are read.
    """
    from transformers import AutoConfig

    if not (folder / "config.json").is_file():
        raise CompressError(f"{folder} is not a Hugging Face model folder (no config.json); point at a folder "
                            "written by save_pretrained.")
    try:
        config = AutoConfig.from_pretrained(folder)
    except (OSError, ValueError) as exc:
        raise CompressError(f"{folder}/config.json cannot be read as a transformers config ({exc}); point at a "
                            "folder written by save_pretrained.") from exc
    if config.model_type not in layers.SUPPORTED:
        raise CompressError(f"{folder} holds a {config.model_type!r} model; only these families can be cut: "
                            f"{', '.join(layers.SUPPORTED)}.")
    archs = config.architectures or []
    if any(a.endswith("ForSequenceClassification") for a in archs):
        return config, "classifier"
    if any(a.endswith("ForCausalLM") or a.endswith("LMHeadModel") for a in archs):
        return config, "lm"
    return config, "bare"


def _load_any(folder: Path, kind: str) -> tuple[torch.nn.Module, Any]:
    """The folder's tokenizer and its model with the head ``kind`` names (see ``_inspect``).

    The tokenizer is read first: a folder without one fails before the (slower) weights are loaded.
    """
    from transformers import AutoModel, AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(folder)
    except (OSError, ValueError) as exc:
        raise CompressError(f"{folder} has no usable tokenizer ({exc}); save it into the folder with "
                            "tokenizer.save_pretrained(folder).") from exc
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    cls = {"classifier": AutoModelForSequenceClassification, "lm": AutoModelForCausalLM}.get(kind, AutoModel)
    return cls.from_pretrained(folder).eval(), tokenizer


def _check_device(device: str | torch.device) -> None:
    """Fail before any model is loaded when ``device`` is unknown, or CUDA is asked for but absent."""
    try:
        pick(device)
    except RuntimeError as exc:  # torch.device("gpu") and other names torch does not know
        raise CompressError(f"device={device!r} is not a device torch knows ({exc}); use 'auto', 'cpu' or "
                            "'cuda'.") from exc


def compress_folder(src: str | Path, out: str | Path, strategy: str = "drop_last", *, keep: int | None = None,
                    ratio: float | None = None, drop_fraction: float | None = None, method: str | None = None,
                    texts: Sequence[str] | None = None, seed: int = 0, max_length: int = 64,
                    device: str | torch.device = "auto") -> dict[str, Any]:
    """Compress the model in folder ``src`` and save a plain Hugging Face folder at ``out``.

    ``src`` holds a sequence classifier, a causal LM or a bare model (e.g. the ``BertModel`` of a sentence
    encoder such as all-MiniLM-L6-v2); ``out`` holds the same kind, loadable with the matching ``Auto*``
    class (``AutoModel`` for a bare model). ``strategy`` is one of ``STRATEGIES``; the size is one of
    ``keep``/``ratio``/``drop_fraction``. ``importance``, ``angular`` and ``greedy`` need calibration
    ``texts``, which carry no labels: greedy uses KL from the full model (classifiers), the LM loss (causal
    LMs) or the cosine distance from the full model's mean-pooled embeddings (bare models), and importance
    methods score a classifier against its own predictions (a bare model has no head to score, so
    ``importance`` is refused for it). ``method`` is for ``importance`` only. Every argument (output
    folder, strategy, size, method, texts, device) is checked before the model is loaded. ``out``
    receives the model, its tokenizer and ``compression.json`` (source, strategy, kept blocks). Returns
    that record.
    """
    src, out = Path(src).expanduser(), Path(out).expanduser()
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise CompressError(f"output folder {out} exists and is not empty; choose a new folder or delete it.")
    chosen = lookup(strategy)
    if method is not None and not chosen.needs_importance:
        users = [s for s in strategy_names() if lookup(s).needs_importance]
        raise CompressError(f"method={method!r} (--method) is used only by strategy "
                            f"{' or '.join(map(repr, users))}; strategy {strategy!r} ignores it. Drop --method, or "
                            f"use --strategy {' or '.join(users)}.")
    if chosen.data_guided and not texts:
        raise CompressError(f"strategy {strategy!r} needs calibration texts (--texts FILE, one text per line).")
    if texts and not chosen.data_guided:
        guided = ", ".join(s for s in strategy_names() if lookup(s).data_guided)
        raise CompressError(f"strategy {strategy!r} chooses blocks without data and ignores --texts; drop --texts, "
                            f"or use a data-guided strategy ({guided}).")
    if chosen.needs_importance:
        from .importance import METHODS

        if not method:
            raise CompressError(f"strategy 'importance' needs --method (one of {', '.join(METHODS)}).")
        if method not in METHODS:
            raise CompressError(f"unknown importance method {method!r}; choose from {', '.join(METHODS)}.")
    _check_device(device)
    config, kind = _inspect(src)
    if chosen.needs_importance and kind == "bare":
        raise CompressError(f"{src} holds a bare model ({'/'.join(config.architectures or [config.model_type])}) "
                            "without a task head, which the importance methods need to score blocks; use "
                            "--strategy greedy (keeps the embeddings closest to the full model's), angular, "
                            "distributed, drop_last or random.")
    n_keep(config.num_hidden_layers, keep=keep, ratio=ratio, drop_fraction=drop_fraction)  # fail before loading
    model, tokenizer = _load_any(src, kind)
    n = layers.num_blocks(model)
    k = n_keep(n, keep=keep, ratio=ratio, drop_fraction=drop_fraction)
    data = encode(tokenizer, texts, batch_size=16, max_length=max_length) if texts else None
    scores = None
    if chosen.needs_importance:
        from . import importance

        if _is_causal_lm(model):
            batches = importance.lm_batches(tokenizer, texts, 16, max_length)
        else:  # no labels given: score against the model's own predictions
            logits = subset_outputs(model, data, [range(n)], device=device)[tuple(range(n))]
            batches = encode(tokenizer, texts, logits.argmax(1), batch_size=16, max_length=max_length).batches
        scores = importance.compute(method, model, batches, seed=seed)
    kept = select(strategy, model, k, scores=scores, method=method, data=data, seed=seed,
                  criterion={"lm": "auto", "bare": "cosine"}.get(kind, "kl"), device=device)
    small = compact(model, kept)
    record = {"source": str(src), "strategy": strategy, "method": method, "n_blocks": n, "kept": list(kept),
              "n_kept": len(kept), "ratio": n / len(kept), "seed": seed,
              "params_before": measure.count_parameters(model), "params_after": measure.count_parameters(small)}
    save_folder(small, tokenizer, out, record)
    return record


def save_folder(model: torch.nn.Module, tokenizer: Any, out: str | Path, record: Mapping[str, Any]) -> Path:
    """Save ``model`` + ``tokenizer`` + ``compression.json`` (``record``) as a plain Hugging Face folder.

    Written to a temporary sibling and renamed into place, so ``out`` is never half-written; an existing
    empty ``out`` is replaced, a non-empty one is an error. The folder and its files get the permissions
    the umask gives (``cache.temp_dir``), not ``mkdtemp``'s owner-only 0700, so a group-writable umask on
    a shared machine yields a folder the group can use.
    """
    out = Path(out).expanduser()
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise CompressError(f"output folder {out} exists and is not empty; choose a new folder or delete it.")
    tmp = temp_dir(out.parent, f".{out.name}.")
    try:
        model.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        atomic_write_json(tmp / "compression.json", dict(record))
        for path in tmp.rglob("*"):  # safetensors writes its weights file 0600 whatever the umask
            honour_umask(path)
        if out.exists():
            out.rmdir()
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out
