"""Eleven ways to score how much each transformer block matters, and the measured damage to check them against.

Every method answers "how important is block i?" with one number per block, behind one interface:
``compute(method, model, batches, seed=...)`` returns a tidy table ``method, layer, score, seed`` plus
method-specific columns and its cost (``seconds``, ``n_forward``, ``n_backward`` in full-model passes over
``batches``). **Higher score = more important, for every method.**

The methods, in the chapter's order (``METHODS``): ``fisher``, ``gradient``, ``ablation``,
``block_influence``, ``angular``, ``bi_shortgpt`` and ``angular_gromov`` (the two previous ones exactly as
ShortGPT's code and Gromov et al. compute them), ``activation``, ``mutual_info``, ``conductance``, ``shap``. Each is one
:class:`ImportanceMethod` subclass in this file, whose docstring defines it and whose class attributes declare
the shared pass it works from, the options it accepts and its cost. ``compute`` runs any registered method
the same way, so adding a method is one class with ``@register`` (see :class:`ImportanceMethod`).

Ground truth for validation: ``damage`` (any sets of blocks dropped), ``per_example_damage`` (the same per
example, streamed batch by batch so memory does not grow with the data), ``beam_oracle`` (the least damaging
k-set: exhaustive on small stacks, a beam search beyond), ``ablation_damage`` (one set),
``topk_damage`` (each method's choice of the k least important blocks, and random draws), ``oracle_subsets``
(exhaustive best subset per k, L <= 8). All of them run the stack through ``layers`` and share work through a
prefix tree: a set of blocks to skip is evaluated from the cached input of its first skipped block, and sets
that agree on their first blocks share those computations.

``batches`` is a list of dicts with ``input_ids``, ``attention_mask`` and ``labels``: class indices for a
``*ForSequenceClassification`` model (e.g. from ``data.make_loader``), the input ids for a causal LM
(``lm_batches``; the loss is next-token cross-entropy over non-padding tokens). Models are used in eval mode.
"""

from __future__ import annotations

import functools
import itertools
import math
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn

from . import layers
from .device import progress
from .errors import LayerwiseError


class ImportanceError(LayerwiseError):
    """Bad input to an importance method (unknown method, unusable batches, unsupported head)."""


# --------------------------------------------------------------------------------------------------
# Batches, task and loss


def task_of(model: nn.Module) -> str:
    """``"classifier"`` for a ``*ForSequenceClassification`` with >= 2 labels, ``"lm"`` for a decoder causal LM."""
    adapter = layers.adapter_for(model)  # refuses an unsupported family first
    name = type(model).__name__
    if name.endswith("ForSequenceClassification"):
        if getattr(model.config, "num_labels", 2) < 2:
            raise ImportanceError(f"{name} is a regression model (num_labels=1); the importance methods need a "
                                  "classifier (num_labels >= 2) or a causal LM. Use label_mode='polarity' or 'bins5'.")
        return "classifier"
    if not adapter.is_encoder and hasattr(model, "lm_head"):
        return "lm"
    raise ImportanceError(f"{name} has no head the importance methods know; load the model with "
                          "AutoModelForSequenceClassification (classifier) or AutoModelForCausalLM (decoder).")


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def prepare_batches(model: nn.Module, batches: Any) -> list[dict[str, torch.Tensor]]:
    """Check ``batches`` against the model's task and move them to its device (fails before any compute)."""
    task = task_of(model)
    if isinstance(batches, Mapping):
        batches = [batches]
    try:
        items = list(batches)
    except TypeError:
        raise ImportanceError(f"batches must be a list of dicts (input_ids, attention_mask, labels), got "
                              f"{type(batches).__name__}; e.g. list(data.make_loader(...)).") from None
    if not items:
        raise ImportanceError("batches is empty; pass at least one batch, e.g. list(data.make_loader(...)).")
    dev = _device(model)
    out = []
    for j, batch in enumerate(items):
        if not isinstance(batch, Mapping) or "input_ids" not in batch or "labels" not in batch:
            raise ImportanceError(f"batch {j} lacks 'input_ids' or 'labels' (keys: {list(batch)[:6]}); "
                                  "classifiers need class labels, LMs labels = input_ids (see lm_batches).")
        ids, labels = batch["input_ids"], batch["labels"]
        if task == "classifier" and tuple(labels.shape) != (ids.shape[0],):
            raise ImportanceError(f"batch {j}: a classifier needs one class label per row, got labels of shape "
                                  f"{tuple(labels.shape)} for input_ids {tuple(ids.shape)}.")
        if task == "lm" and tuple(labels.shape) != tuple(ids.shape):
            raise ImportanceError(f"batch {j}: a causal LM needs labels shaped like input_ids (the LM loss), got "
                                  f"{tuple(labels.shape)} vs {tuple(ids.shape)}; build batches with lm_batches().")
        b = {k: v.to(dev) for k, v in batch.items() if isinstance(v, torch.Tensor)}
        b.setdefault("attention_mask", torch.ones_like(b["input_ids"]))
        if task == "lm" and int(_lm_targets(b)[1].sum(1).min()) < 1:
            raise ImportanceError(f"batch {j} holds a text with fewer than 2 tokens, which has no next token to "
                                  "predict; drop texts that short.")
        out.append(b)
    return out


def lm_batches(tokenizer: Any, texts: Sequence[str], batch_size: int = 8, max_length: int = 64,
               ) -> list[dict[str, torch.Tensor]]:
    """Right-padded batches for a causal LM with ``labels`` = input ids (-100 at padding): the LM-loss task."""
    if not texts:
        raise ImportanceError("texts is empty; pass a few review texts for the language-model loss.")
    side = getattr(tokenizer, "padding_side", "right")
    tokenizer.padding_side = "right"
    try:
        out = []
        for s in range(0, len(texts), batch_size):
            enc = tokenizer(list(texts[s:s + batch_size]), padding=True, truncation=True, max_length=max_length,
                            return_tensors="pt")
            labels = enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)
            out.append({"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"], "labels": labels})
    finally:
        tokenizer.padding_side = side
    return out


def _lm_targets(batch: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Next-token targets (B, T-1) and their validity mask (label != -100 and target not padding)."""
    tgt = batch["labels"][:, 1:]
    valid = (tgt != -100) & (batch["attention_mask"][:, 1:] != 0)
    return tgt, valid


def _example_scores(task: str, logits: torch.Tensor, batch: Mapping[str, torch.Tensor],
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per example: summed negative log-likelihood, correct predictions, and the number of predictions.

    Classifier: one prediction per example. LM: one per valid next token of the text.
    """
    if task == "classifier":
        labels = batch["labels"].long()
        nll = F.cross_entropy(logits.float(), labels, reduction="none")
        return nll, (logits.argmax(-1) == labels).float(), torch.ones_like(nll)
    tgt, valid = _lm_targets(batch)
    lg = logits[:, :-1].float()
    tok = F.cross_entropy(lg.reshape(-1, lg.shape[-1]), tgt.clamp_min(0).reshape(-1), reduction="none")
    tok = tok.view(tgt.shape) * valid
    correct = ((lg.argmax(-1) == tgt) & valid).sum(1).float()
    return tok.sum(1), correct, valid.sum(1).float()


def _head(model: nn.Module, hidden: torch.Tensor, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
    return layers.classify(model, hidden, batch["attention_mask"])


# --------------------------------------------------------------------------------------------------
# The cached forward pass (trace) and the damage engine


#: Bytes of block boundaries a :class:`Trace` may hold. Above it the trace keeps only each batch's
#: embedding output and recomputes a batch's boundaries when a method reads them (one forward pass over the
#: data per reading method), so its memory stays flat as the calibration set grows; below it nothing changes.
TRACE_BUDGET_BYTES = 256 * 2**20


@dataclass
class Trace:
    """One forward pass over ``batches`` with the block boundaries at hand.

    ``hidden[b][i]`` is the input of block i for batch b (``hidden[b][L]`` the last block's output) when the
    boundaries fit in the memory budget (``complete``); otherwise ``hidden[b]`` holds only the embedding output
    and ``each()`` recomputes a batch's boundaries from it when read (``model`` is kept for that). Methods read
    the boundaries through ``each()``, batch by batch, so at most one batch's boundaries are recomputed and held
    at a time. ``nll``/``correct``/``units`` are per-example results of the full model (see
    ``_example_scores``); ``memo`` keeps the per-example results of every keep-mask evaluated on it, so no set
    of skipped blocks is run twice (single-block damage is reused by the top-k check and the oracle).
    """

    task: str
    batches: list[dict[str, torch.Tensor]]
    hidden: list[list[torch.Tensor]]
    nll: np.ndarray
    correct: np.ndarray
    units: np.ndarray
    seconds: float
    memo: dict[tuple[bool, ...], tuple[np.ndarray, np.ndarray]] = field(default_factory=dict, repr=False)
    model: nn.Module | None = field(default=None, repr=False)
    complete: bool = True
    recomputed: int = 0  # examples whose boundaries were recomputed (forward passes, counted per example)
    root: Trace | None = field(default=None, repr=False)  # the trace a ``subset`` was cut from (counts its work)

    @property
    def n_blocks(self) -> int:
        return len(self.hidden[0]) - 1 if self.complete else layers.num_blocks(self.model)

    @property
    def held_bytes(self) -> int:
        """Bytes of the hidden states the trace holds (the boundaries, or only the embedding outputs)."""
        return sum(h.numel() * h.element_size() for hs in self.hidden for h in hs)

    def each(self) -> Iterator[tuple[dict[str, torch.Tensor], list[torch.Tensor]]]:
        """``(batch, boundaries)`` for every batch in order; recomputed from the embedding output when the
        trace is not ``complete`` (then only the current batch's boundaries are held)."""
        for batch, hs in zip(self.batches, self.hidden, strict=True):
            if self.complete:
                yield batch, hs
                continue
            with torch.no_grad():
                outs = layers.run_blocks(self.model, batch, hidden=hs[0], return_all=True)
            (self.root or self).recomputed += int(batch["input_ids"].shape[0])
            yield batch, [hs[0], *outs]

    @property
    def n_examples(self) -> int:
        return int(self.nll.size)

    @property
    def loss(self) -> float:
        return float(self.nll.sum() / self.units.sum())

    @property
    def accuracy(self) -> float:
        return float(self.correct.sum() / self.units.sum())

    def subset(self, max_examples: int | None) -> Trace:
        """The trace restricted to the first ``max_examples`` examples (all when None or 0)."""
        if not max_examples or max_examples >= self.n_examples:
            return self
        batches, hidden, left = [], [], max_examples
        for batch, hs in zip(self.batches, self.hidden, strict=True):
            if left <= 0:
                break
            n = min(left, batch["input_ids"].shape[0])
            batches.append({k: v[:n] for k, v in batch.items()})
            hidden.append([h[:n] for h in hs])
            left -= n
        return Trace(self.task, batches, hidden, self.nll[:max_examples], self.correct[:max_examples],
                     self.units[:max_examples], self.seconds, model=self.model, complete=self.complete,
                     root=self.root or self)


def _fits(model: nn.Module, batches: list[dict[str, torch.Tensor]], h0: torch.Tensor, budget: int | None) -> bool:
    """Whether every block boundary of ``batches`` fits in ``budget`` bytes (``h0``: one batch's embedding output,
    for the width and element size)."""
    budget = TRACE_BUDGET_BYTES if budget is None else budget
    tokens = sum(int(b["input_ids"].numel()) for b in batches)
    return tokens * h0.shape[-1] * h0.element_size() * (layers.num_blocks(model) + 1) <= budget


class _Boundaries:
    """The block boundaries a trace keeps, batch by batch: all of them when the first batch shows that every
    batch's boundaries fit in the budget (``_fits``), else only the embedding output, from which
    ``Trace.each`` recomputes the rest. The one budget rule of ``trace`` and ``_grad_pass``."""

    def __init__(self, model: nn.Module, batches: list[dict[str, torch.Tensor]], budget_bytes: int | None):
        self.model, self.batches, self.budget_bytes = model, batches, budget_bytes
        self.hidden: list[list[torch.Tensor]] = []
        self.complete = True

    def add(self, h0: torch.Tensor, outs: Sequence[torch.Tensor]) -> None:
        if not self.hidden:
            self.complete = _fits(self.model, self.batches, h0, self.budget_bytes)
        self.hidden.append([h.detach() for h in (h0, *outs)] if self.complete else [h0.detach()])


@torch.no_grad()
def trace(model: nn.Module, batches: Any, budget_bytes: int | None = None) -> Trace:
    """Run the model once over ``batches`` and keep every block's input and output, or, when they do not fit in
    ``budget_bytes`` (default :data:`TRACE_BUDGET_BYTES`), only each batch's embedding output (see :class:`Trace`)."""
    task = task_of(model)
    prepared = prepare_batches(model, batches)
    model.eval()
    start = time.perf_counter()
    kept, scores = _Boundaries(model, prepared, budget_bytes), []
    for batch in prepared:
        h0 = layers.embed(model, batch)
        outs = layers.run_blocks(model, batch, hidden=h0, return_all=True)
        kept.add(h0, outs)
        scores.append(_example_scores(task, _head(model, outs[-1], batch), batch))
    nll, correct, units = (torch.cat(x).cpu().numpy().astype(np.float64) for x in zip(*scores, strict=True))
    return Trace(task, prepared, kept.hidden, nll, correct, units, time.perf_counter() - start, model=model,
                 complete=kept.complete)


def _ensure_trace(model: nn.Module, batches: Any, tr: Trace | None) -> Trace:
    if tr is None:
        return trace(model, batches)
    if tr.n_blocks != layers.num_blocks(model):
        raise ImportanceError(f"the trace has {tr.n_blocks} blocks but the model {layers.num_blocks(model)}; "
                              "pass trace(model, batches) of this model.")
    return tr


@dataclass
class _Counter:
    """Work done: block evaluations and head evaluations, each counted per example (one block run on a batch
    of 8 examples counts 8), so that ``blocks / (L * examples)`` is the number of full passes through the stack."""

    blocks: int = 0
    heads: int = 0


@torch.no_grad()
def _evaluate_keeps(model: nn.Module, tr: Trace, keeps: Sequence[tuple[bool, ...]], counter: _Counter | None = None,
                    ) -> tuple[np.ndarray, np.ndarray]:
    """Per-example (nll, correct) for every keep-mask, shape (masks, examples).

    A depth-first walk of the prefix tree of the masks: the hidden state after a prefix is computed once and
    shared by every mask with that prefix; while the prefix keeps every block it is read from the trace.
    """
    todo = list(dict.fromkeys(k for k in keeps if k not in tr.memo))
    if todo:
        nll, correct = _walk_keeps(model, tr, todo, counter or _Counter())
        for j, k in enumerate(todo):
            tr.memo[k] = (nll[j], correct[j])
    return (np.stack([tr.memo[k][0] for k in keeps]), np.stack([tr.memo[k][1] for k in keeps]))


def _walk_keeps(model: nn.Module, tr: Trace, keeps: Sequence[tuple[bool, ...]], counter: _Counter,
                ) -> tuple[np.ndarray, np.ndarray]:
    """The prefix-tree walk behind ``_evaluate_keeps`` (distinct masks, none of them memoised)."""
    n_layers = tr.n_blocks
    nll = np.zeros((len(keeps), tr.n_examples))
    correct = np.zeros_like(nll)

    def walk(depth: int, h: torch.Tensor, group: list[int], on_trace: bool, batch: dict[str, torch.Tensor],
             hs: list[torch.Tensor], cols: slice) -> None:
        size = h.shape[0]
        if depth == n_layers:
            a, c, _ = _example_scores(tr.task, _head(model, h, batch), batch)
            counter.heads += size
            nll[group, cols] = a.cpu().numpy()
            correct[group, cols] = c.cpu().numpy()
            return
        if not on_trace and len({keeps[m][depth:] for m in group}) == 1:  # one path left: run it in one go
            rest = keeps[group[0]][depth:]
            skip = {depth + j for j, keep in enumerate(rest) if not keep}
            counter.blocks += size * (len(rest) - len(skip))
            out = layers.run_blocks(model, batch, skip=skip, start=depth, hidden=h) if len(skip) < len(rest) else h
            walk(n_layers, out, group, False, batch, hs, cols)
            return
        kept = [m for m in group if keeps[m][depth]]
        skipped = [m for m in group if not keeps[m][depth]]
        if kept:
            if on_trace:
                nxt = hs[depth + 1]
            else:
                nxt = layers.block_forward(model, depth, h, batch["attention_mask"])
                counter.blocks += size
            walk(depth + 1, nxt, kept, on_trace, batch, hs, cols)
        if skipped:
            walk(depth + 1, h, skipped, False, batch, hs, cols)

    offset = 0
    for batch, hs in tr.each():
        size = batch["input_ids"].shape[0]
        walk(0, hs[0], list(range(len(keeps))), True, batch, hs, slice(offset, offset + size))
        offset += size
    return nll, correct


def _as_drop_set(drop: Iterable[int], n_layers: int) -> tuple[int, ...]:
    if isinstance(drop, (str, bytes)) or not isinstance(drop, Iterable):
        raise ImportanceError(f"a drop set must be a collection of block indices, got {drop!r}.")
    idx = sorted({int(i) for i in drop})
    bad = [i for i in idx if not 0 <= i < n_layers]
    if bad:
        raise ImportanceError(f"drop set {sorted(drop)} has blocks {bad} outside 0..{n_layers - 1}.")
    return tuple(idx)


def damage(model: nn.Module, batches: Any, drop_sets: Sequence[Iterable[int]], *, trace: Trace | None = None,
           _counter: _Counter | None = None) -> pd.DataFrame:
    """Measured effect of skipping each set of blocks: one row per set.

    Columns ``drop`` (sorted tuple), ``k``, ``loss``, ``accuracy`` (with the blocks skipped), ``d_loss`` (loss
    increase over the full model: the damage), ``d_accuracy`` (accuracy lost), ``se_d_loss`` (standard error
    of ``d_loss`` over examples). Pass ``trace`` (of the same model and batches) to reuse the cached pass.
    """
    model.eval()
    n_layers = layers.num_blocks(model)
    sets = [_as_drop_set(d, n_layers) for d in drop_sets]
    if not sets:
        raise ImportanceError("drop_sets is empty; pass e.g. [{0}, {1, 2}].")
    tr = _ensure_trace(model, batches, trace)
    keeps = [tuple(i not in set(s) for i in range(n_layers)) for s in sets]
    nll, correct = _evaluate_keeps(model, tr, keeps, _counter)
    units = tr.units.sum()
    diff = nll - tr.nll[None, :]
    se = diff.std(1, ddof=1) * math.sqrt(tr.n_examples) / units if tr.n_examples > 1 else np.full(len(sets), np.nan)
    loss = nll.sum(1) / units
    acc = correct.sum(1) / units
    return pd.DataFrame({"drop": sets, "k": [len(s) for s in sets], "loss": loss, "accuracy": acc,
                         "d_loss": loss - tr.loss, "d_accuracy": tr.accuracy - acc, "se_d_loss": se})


@dataclass
class PerExampleDamage:
    """Per-example results of skipping each of several block sets, from ``per_example_damage``.

    ``sets`` (sorted tuples of dropped blocks), ``nll`` (sets, examples): summed negative log-likelihood of each
    example with the set skipped; ``correct`` (sets, examples): correct predictions (LM: correctly predicted
    tokens); ``full_nll``/``full_correct`` (examples,): the full model; ``units`` (examples,): predictions per
    example (1 for a classifier, the valid next tokens of a text for an LM). The damage of set j on any subset
    of examples is ``(nll[j] - full_nll)[idx].sum() / units[idx].sum()``: a ratio of sums, so resampling
    examples resamples it exactly.
    """

    sets: list[tuple[int, ...]]
    nll: np.ndarray
    correct: np.ndarray
    full_nll: np.ndarray
    full_correct: np.ndarray
    units: np.ndarray
    seconds: float
    block_passes: float  # block evaluations / (blocks x examples): full passes through the stack spent

    def d_loss(self) -> np.ndarray:
        """Damage of every set on all examples: loss increase (nats per prediction) over the full model."""
        return (self.nll - self.full_nll[None, :]).sum(1) / self.units.sum()

    def index(self, drop: Iterable[int]) -> int:
        """Row of the set ``drop`` in ``sets``."""
        return self.sets.index(tuple(sorted(int(i) for i in drop)))


@torch.no_grad()
def per_example_damage(model: nn.Module, batches: Any, drop_sets: Sequence[Iterable[int]]) -> PerExampleDamage:
    """Per-example loss and correctness with each set of blocks skipped, streamed batch by batch.

    The same prefix-tree walk as ``damage`` (a set is evaluated from the cached input of its first skipped
    block; sets that share their first blocks share that work), but only one batch's block boundaries are held
    at a time, so memory does not grow with the number of examples: the ground truth can use a whole test split.
    """
    model.eval()
    n_layers = layers.num_blocks(model)
    sets = list(dict.fromkeys(_as_drop_set(d, n_layers) for d in drop_sets))
    if not sets:
        raise ImportanceError("drop_sets is empty; pass e.g. [{0}, {1, 2}].")
    task = task_of(model)
    keeps = [tuple(i not in set(s) for i in range(n_layers)) for s in sets]
    counter, parts = _Counter(), []
    start = time.perf_counter()
    for batch in prepare_batches(model, batches):
        h0 = layers.embed(model, batch)
        hs = [h0, *layers.run_blocks(model, batch, hidden=h0, return_all=True)]
        counter.blocks += n_layers * h0.shape[0]
        full = [x.cpu().numpy().astype(np.float64) for x in _example_scores(task, _head(model, hs[-1], batch), batch)]
        one = Trace(task, [batch], [hs], *full, 0.0)
        nll, correct = _walk_keeps(model, one, keeps, counter)
        parts.append((nll, correct, *full))
        del hs, one
    nll, correct = (np.concatenate([p[i] for p in parts], axis=1) for i in (0, 1))
    full_nll, full_correct, units = (np.concatenate([p[i] for p in parts]) for i in (2, 3, 4))
    n = full_nll.size
    return PerExampleDamage(sets, nll, correct, full_nll, full_correct, units, time.perf_counter() - start,
                            counter.blocks / (n_layers * n))


def beam_oracle(model: nn.Module, batches: Any, ks: Iterable[int], *, width: int = 4, exhaustive_max: int = 64,
                ) -> tuple[PerExampleDamage, pd.DataFrame]:
    """The least damaging set of k blocks to drop, for each k in ``ks``, measured on ``batches``.

    Exhaustive while C(L, k) <= ``exhaustive_max`` (every set of 6 blocks; k = 1 for any L), else a beam
    search: the ``width`` best sets of k - 1 blocks, each grown by every other block, evaluated together.
    Returns every evaluated set's per-example damage and a table ``k, drop, d_loss, search`` of the best set
    per k (``search``: "exhaustive" or "beam (width w)": a beam's best is an upper bound on the true best).
    """
    n_layers = layers.num_blocks(model)
    ks = sorted({int(k) for k in ks})
    if not ks or ks[0] < 1 or ks[-1] >= n_layers:
        raise ImportanceError(f"ks={ks} must lie in 1..{n_layers - 1} (the model has {n_layers} blocks).")
    prepared = prepare_batches(model, batches)
    found: dict[tuple[int, ...], float] = {}
    parts: list[PerExampleDamage] = []

    def evaluate(sets: list[tuple[int, ...]]) -> None:
        new = [s for s in dict.fromkeys(sets) if s not in found]
        if new:
            res = per_example_damage(model, prepared, new)
            parts.append(res)
            found.update(zip(res.sets, res.d_loss(), strict=True))

    rows, beam = [], [()]
    for k in range(1, ks[-1] + 1):
        if math.comb(n_layers, k) <= exhaustive_max:
            cands, how = list(itertools.combinations(range(n_layers), k)), "exhaustive"
        else:
            cands = sorted({tuple(sorted({*b, j})) for b in beam for j in range(n_layers) if j not in b})
            how = f"beam (width {width})"
        evaluate(cands)
        ranked = sorted(cands, key=lambda c: (found[c], c))
        beam = ranked[:width]
        if k in ks:
            rows.append({"k": k, "drop": ranked[0], "d_loss": found[ranked[0]], "search": how,
                         "n_evaluated": len(cands)})
    merged = PerExampleDamage(
        [s for p in parts for s in p.sets], np.concatenate([p.nll for p in parts]),
        np.concatenate([p.correct for p in parts]), parts[0].full_nll, parts[0].full_correct, parts[0].units,
        sum(p.seconds for p in parts), sum(p.block_passes for p in parts))
    return merged, pd.DataFrame(rows)


def ablation_damage(model: nn.Module, batches: Any, drop: Iterable[int], *, trace: Trace | None = None,
                    ) -> dict[str, float]:
    """Loss and accuracy with the blocks in ``drop`` skipped, and their change from the full model.

    Returns ``{loss, accuracy, d_loss, d_accuracy}``; computed from the cached input of the first dropped
    block (pass ``trace`` to share that pass between calls).
    """
    row = damage(model, batches, [drop], trace=trace).iloc[0]
    return {k: float(row[k]) for k in ("loss", "accuracy", "d_loss", "d_accuracy")}


# --------------------------------------------------------------------------------------------------
# Per-example gradients (Fisher, gradient) with hooks


def _param_modules(block: nn.Module) -> list[tuple[nn.Module, str]]:
    """Every module of ``block`` that owns parameters, with the rule for its per-example gradient."""
    found, covered = [], 0
    for module in block.modules():
        own = list(module.parameters(recurse=False))
        if not own:
            continue
        name = type(module).__name__
        if isinstance(module, nn.Linear):
            kind = "linear"
        elif name == "Conv1D":  # GPT-2's transposed linear layer
            kind = "linear"
        elif isinstance(module, nn.LayerNorm):
            kind = "layernorm"
        elif name.endswith("RMSNorm") and hasattr(module, "weight"):
            kind = "rmsnorm"
        else:
            raise ImportanceError(f"block parameters in a {name} module: the per-example gradient hooks know "
                                  "Linear, Conv1D, LayerNorm and RMSNorm only (the supported families).")
        found.append((module, kind))
        covered += sum(p.numel() for p in own)
    total = sum(p.numel() for p in block.parameters())
    if covered != total:
        raise ImportanceError(f"per-example gradients cover {covered} of {total} block parameters; an unknown "
                              "parameter layout (shared parameters?) is not supported.")
    return found


def _weight_sq_norms(x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """Per-example ||sum_t g_t x_t^T||_F^2 for inputs x (B, S, i) and output gradients g (B, S, o).

    Uses the Gram form sum((g g^T) * (x x^T)) when it is cheaper than building the (B, o, i) gradients.
    """
    s, i, o = x.shape[1], x.shape[2], g.shape[2]
    if s * s * (i + o) < s * i * o:
        return ((g @ g.transpose(1, 2)) * (x @ x.transpose(1, 2))).sum((1, 2))
    return torch.einsum("bso,bsi->boi", g, x).pow(2).sum((1, 2))


def _module_sq_norm(module: nn.Module, kind: str, x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """Per-example squared norm of the gradient of all of ``module``'s own parameters."""
    b = x.shape[0]
    x = x.reshape(b, -1, x.shape[-1]).float()
    g = g.reshape(b, -1, g.shape[-1]).float()
    if kind == "linear":
        out = _weight_sq_norms(x, g)
    else:
        if kind == "layernorm":
            xhat = F.layer_norm(x, module.normalized_shape, eps=module.eps)
        else:
            eps = getattr(module, "variance_epsilon", getattr(module, "eps", 1e-6))
            xhat = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
        out = (g * xhat).sum(1).pow(2).sum(1)
    bias = getattr(module, "bias", None)
    if isinstance(bias, torch.Tensor):
        out = out + g.sum(1).pow(2).sum(1)
    return out


@dataclass
class _Grads:
    """Per-example results of one forward + backward pass (examples in batch order)."""

    sq_param: np.ndarray  # (N, L) squared gradient norm of each block's parameters
    out_norm: np.ndarray  # (N, L) gradient norm w.r.t. each block's output
    batch: np.ndarray  # (N,) batch index of each example
    seconds: float
    trace: Trace | None = None  # the same forward pass as a Trace, when asked for (keep_trace)


def _grad_pass(model: nn.Module, batches: list[dict[str, torch.Tensor]], keep_trace: bool = False,
               budget_bytes: int | None = None) -> _Grads:
    """Per-example gradients of the loss w.r.t. every block's parameters and output, in one batched pass.

    Each example's loss is its mean negative log-likelihood (LM: per valid token), so the gradient of the
    batch's summed loss w.r.t. a parameter is, example by example, the per-example gradient. Hooks read each
    parameterised module's input and output gradient and compute per-example squared norms of its parameter
    gradients exactly (Linear: ||sum_t g_t x_t^T||^2; norms: the elementwise rule); the ordinary parameter
    gradients are never formed. Padding positions get zero gradient and so contribute nothing. With
    ``keep_trace`` the block boundaries of the same forward pass are kept as a :class:`Trace` (within
    ``budget_bytes``, as ``trace`` does), so the methods that need one get it without a second forward pass.
    """
    task = task_of(model)
    model.eval()
    blocks = layers.get_blocks(model)
    n_layers = len(blocks)
    modules = [_param_modules(block) for block in blocks]
    start = time.perf_counter()
    sq_rows, out_rows, batch_idx, scores = [], [], [], []
    kept = _Boundaries(model, batches, budget_bytes)
    for j, batch in enumerate(batches):
        size = batch["input_ids"].shape[0]
        keep = batch["attention_mask"].bool()
        acc = torch.zeros(size, n_layers, dtype=torch.float64, device=keep.device)
        handles = []

        def hook(module: nn.Module, args: tuple, output: torch.Tensor, layer: int, kind: str,
                 acc: torch.Tensor = acc, keep: torch.Tensor = keep) -> None:
            if not args:
                raise ImportanceError(f"{type(module).__name__} was called without positional input; the "
                                      "per-example gradient hooks need it.")
            x = args[0].detach()

            def on_grad(grad: torch.Tensor, x: torch.Tensor = x) -> None:
                # Padding positions get exactly zero gradient (no real token attends to them), so they add
                # nothing; only if their activations are not finite (fully masked rows) are they zeroed first.
                value = _module_sq_norm(module, kind, x, grad)
                if not torch.isfinite(value).all() and x.dim() == 3 and x.shape[:2] == keep.shape:
                    pos = keep[..., None]
                    value = _module_sq_norm(module, kind, torch.where(pos, x, 0.0), torch.where(pos, grad, 0.0))
                acc[:, layer] += value.double()

            output.register_hook(on_grad)

        try:
            for layer, mods in enumerate(modules):
                for module, kind in mods:
                    handles.append(module.register_forward_hook(
                        lambda m, a, o, layer=layer, kind=kind: hook(m, a, o, layer, kind)))
            h0 = layers.embed(model, batch).detach().requires_grad_(True)
            outs = layers.run_blocks(model, batch, hidden=h0, return_all=True)
            nll, correct, units = _example_scores(task, _head(model, outs[-1], batch), batch)
            grads = torch.autograd.grad((nll / units).sum(), [h0, *outs])
            if keep_trace:
                kept.add(h0, outs)
                scores.append((nll.detach(), correct, units))
        finally:
            for handle in handles:
                handle.remove()
        sq_rows.append(acc.cpu().numpy())
        out_rows.append(torch.stack([g.float().flatten(1).norm(dim=1) for g in grads[1:]], 1).detach().cpu().numpy())
        batch_idx.append(np.full(size, j))
    seconds = time.perf_counter() - start
    tr = None
    if keep_trace:
        nll, correct, units = (torch.cat(x).cpu().numpy().astype(np.float64) for x in zip(*scores, strict=True))
        tr = Trace(task, batches, kept.hidden, nll, correct, units, 0.0, model=model,
                   complete=kept.complete)  # its cost is inside this pass
    return _Grads(np.concatenate(sq_rows), np.concatenate(out_rows).astype(np.float64), np.concatenate(batch_idx),
                  seconds, tr)


def _block_param_counts(model: nn.Module) -> list[int]:
    return [sum(p.numel() for p in block.parameters()) for block in layers.get_blocks(model)]


def _se(values: np.ndarray, axis: int = 0) -> np.ndarray:
    n = values.shape[axis]
    return values.std(axis, ddof=1) / math.sqrt(n) if n > 1 else np.full(np.delete(values.shape, axis), np.nan)


def _fisher_rows(model: nn.Module, grads: _Grads) -> pd.DataFrame:
    counts = _block_param_counts(model)
    per_batch = [[float(grads.sq_param[grads.batch == b, i].mean()) for b in np.unique(grads.batch)]
                 for i in range(len(counts))]
    score = grads.sq_param.mean(0)
    return pd.DataFrame({"layer": range(len(counts)), "score": score, "se": _se(grads.sq_param),
                         "per_param": np.divide(score, counts, out=np.zeros_like(score), where=np.asarray(counts) > 0),
                         "n_params": counts,
                         "n_examples": grads.sq_param.shape[0], "per_batch": per_batch})


def _gradient_rows(grads: _Grads) -> pd.DataFrame:
    norms = np.sqrt(grads.sq_param)
    return pd.DataFrame({"layer": range(norms.shape[1]), "score": norms.mean(0), "se": _se(norms),
                         "output_grad": grads.out_norm.mean(0), "output_grad_se": _se(grads.out_norm),
                         "n_examples": norms.shape[0]})


# --------------------------------------------------------------------------------------------------
# Representation-based methods (from the trace)


_TokenFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def _token_stats(tr: Trace, pairs: Sequence[tuple[int, int]], fn: _TokenFn | Sequence[_TokenFn],
                 ) -> tuple[list[torch.Tensor], torch.Tensor]:
    """``fn(x, y)`` on the hidden states at boundaries a and b of every non-padding token (float32, one row per
    token), for every ``(a, b)`` in ``pairs`` (``fn`` may be one function per pair): one tensor per pair (the
    per-token results of all batches in order), and each token's example index. One pass over the trace, batch
    by batch, aggregating as it streams: only per-token results are kept, never a boundary of more than one
    batch."""
    fns = list(fn) if isinstance(fn, Sequence) else [fn] * len(pairs)
    outs: list[list[torch.Tensor]] = [[] for _ in pairs]
    ex, offset = [], 0
    for batch, hs in tr.each():
        keep = batch["attention_mask"].bool()
        for j, (a, b) in enumerate(pairs):
            outs[j].append(fns[j](hs[a][keep].float(), hs[b][keep].float()))
        rows = torch.arange(keep.shape[0], device=keep.device)[:, None].expand_as(keep)[keep]
        ex.append(rows + offset)
        offset += keep.shape[0]
    return [torch.cat(o) for o in outs], torch.cat(ex)


def _cosine(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-row cosine in float64 (arccos near 1 amplifies rounding: sqrt(2 eps))."""
    return F.cosine_similarity(x.double(), y.double(), dim=-1, eps=1e-12).clamp(-1.0, 1.0)


def _per_example_mean(values: torch.Tensor, ex: torch.Tensor, n: int) -> np.ndarray:
    sums = torch.zeros(n, dtype=torch.float64, device=values.device).index_add_(0, ex, values.double())
    counts = torch.zeros(n, dtype=torch.float64, device=values.device).index_add_(0, ex, torch.ones_like(values,
                                                                                                   dtype=torch.float64))
    return (sums / counts).cpu().numpy()


def _block_cosines(tr: Trace) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Per-token cosine between each block's input and output (one tensor per block), and the example index."""
    return _token_stats(tr, [(i, i + 1) for i in range(tr.n_blocks)], _cosine)


def _block_influence_rows(tr: Trace, cosines: tuple[list[torch.Tensor], torch.Tensor] | None = None) -> pd.DataFrame:
    """1 - cosine(input, output) per block over non-padding tokens (``cosines``: ``_block_cosines(tr)`` if
    already computed)."""
    rows = []
    coss, ex = cosines or _block_cosines(tr)
    for i, cos in enumerate(coss):
        per_ex = 1.0 - _per_example_mean(cos, ex, tr.n_examples)
        rows.append({"layer": i, "score": float(1.0 - cos.double().mean()), "se": float(_se(per_ex))})
    return pd.DataFrame(rows)


def angular_runs(model: nn.Module, batches: Any, *, trace: Trace | None = None, max_n: int | None = None,
                 token: str = "all") -> pd.DataFrame:
    """Angular distance arccos(cos)/pi between the input of block ``start`` and the output of block
    ``start + n - 1``, for n = 1 .. L//2 (or ``max_n``): averaged over non-padding tokens (``token="all"``), or
    at the token the head reads (``"read"``: the last token of a decoder, as Gromov et al. do; [CLS] of an
    encoder). Columns ``start``, ``n``, ``distance`` and ``se``, the standard error over examples (of each
    example's mean over its tokens for ``"all"``).

    The ``angular`` and ``angular_gromov`` scores are its n = 1 rows. ``compress.angular_distances`` computes
    the same token-averaged distance for every run of any model without a trace (no head, no labels: the
    angular strategy runs on bare models too); ``tests/test_analyze.py`` checks the two agree. Gromov et al.
    drop the run of n blocks with the smallest distance (``best_run``).
    """
    if token not in ("all", "read"):
        raise ImportanceError(f"token={token!r}; choose 'all' (every non-padding token) or 'read' (the read-out token).")
    tr = _ensure_trace(model, batches, trace)
    top = max(1, min(max_n or tr.n_blocks // 2, tr.n_blocks))
    runs = [(s, n) for n in range(1, top + 1) for s in range(tr.n_blocks - n + 1)]
    ex = None
    if token == "all":
        coss, ex = _token_stats(tr, [(s, s + n) for s, n in runs], _cosine)
    else:  # one pass over the trace: the read-out token of every example at every boundary pair
        parts: list[list[torch.Tensor]] = [[] for _ in runs]
        for batch, hs in tr.each():
            pos = _read_positions(model, batch)
            rows = torch.arange(hs[0].shape[0], device=pos.device)
            for j, (s, n) in enumerate(runs):
                parts[j].append(_cosine(hs[s][rows, pos], hs[s + n][rows, pos]))
        coss = [torch.cat(p) for p in parts]
    out = []
    for (s, n), cos in zip(runs, coss, strict=True):
        dist = torch.arccos(cos.double()) / math.pi
        per_ex = dist.cpu().numpy() if ex is None else _per_example_mean(dist, ex, tr.n_examples)
        out.append({"start": s, "n": n, "distance": float(dist.mean()), "se": float(_se(per_ex))})
    return pd.DataFrame(out)


def _single_block_rows(model: nn.Module, tr: Trace, token: str) -> pd.DataFrame:
    """``angular_runs``' n = 1 rows as a score table (layer, score, se)."""
    runs = angular_runs(model, None, trace=tr, max_n=1, token=token)
    return runs.rename(columns={"start": "layer", "distance": "score"})[["layer", "score", "se"]]


def best_run(runs: pd.DataFrame, n: int) -> tuple[int, ...]:
    """Blocks of the run of ``n`` consecutive blocks with the smallest angular distance (``angular_runs``)."""
    sub = runs[runs["n"] == n]
    if sub.empty:
        raise ImportanceError(f"no runs of n={n} blocks in the table (n goes to {int(runs['n'].max())}).")
    start = int(sub.sort_values(["distance", "start"]).iloc[0]["start"])
    return tuple(range(start, start + n))


def _final_states(model: nn.Module, h: torch.Tensor) -> torch.Tensor:
    """What Hugging Face's ``output_hidden_states`` returns as the last hidden state: the last block's output
    through the final norm for decoders that have one, the raw output otherwise (BERT, MPNet: post-norm)."""
    norm = layers.adapter_for(model).final_norm(model)
    return norm(h) if norm is not None else h


@torch.no_grad()
def _shortgpt_rows(model: nn.Module, tr: Trace) -> pd.DataFrame:
    """ShortGPT's Block Influence as its code computes it: 1 - cosine between consecutive entries of the
    model's ``hidden_states`` over non-padding tokens, whose last entry is the final-normed output."""
    last = tr.n_blocks - 1
    pairs = [(i, i + 1) for i in range(tr.n_blocks)] + [(last, last + 1)]  # one pass: ours, then the normed last
    fns = [_cosine] * tr.n_blocks + [lambda x, y: _cosine(x, _final_states(model, y))]
    coss, ex = _token_stats(tr, pairs, fns)
    rows = _block_influence_rows(tr, (coss[:-1], ex)).to_dict("records")
    cos = coss[-1]
    rows[last].update(score=float(1.0 - cos.mean()), se=float(cos.std() / math.sqrt(max(cos.numel(), 1))))
    return pd.DataFrame(rows)


def _read_positions(model: nn.Module, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """The token the head reads: [CLS] (position 0) for encoders, the last real token for decoders."""
    mask = batch["attention_mask"]
    if layers.adapter_for(model).is_encoder:
        return torch.zeros(mask.shape[0], dtype=torch.long, device=mask.device)
    positions = torch.arange(mask.shape[1], device=mask.device)
    return (positions * (mask != 0)).argmax(-1)


def _activation_stats(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per token: relative update |y - x| / |x|, output norm, output variance, update norm (float64 columns)."""
    update = (y - x).norm(dim=-1)
    return torch.stack([(update / x.norm(dim=-1).clamp_min(1e-12)).double(), y.norm(dim=-1).double(),
                        y.double().var(-1), update.double()], 1)


def _activation_rows(tr: Trace) -> pd.DataFrame:
    rows = []
    stats, ex = _token_stats(tr, [(i, i + 1) for i in range(tr.n_blocks)], _activation_stats)
    for i, st in enumerate(stats):
        ratio, out_norm, out_var, update_norm = (st[:, k].contiguous() for k in range(4))
        per_ex = _per_example_mean(ratio, ex, tr.n_examples)
        rows.append({"layer": i, "score": float(ratio.mean()), "se": float(_se(per_ex)),
                     "out_norm": float(out_norm.mean()), "out_var": float(out_var.mean()),
                     "update_norm": float(update_norm.mean())})
    return pd.DataFrame(rows)


# --------------------------------------------------------------------------------------------------
# Mutual information (probe cross-entropy)


def _pooled(tr: Trace) -> list[np.ndarray]:
    """Mean over non-padding tokens of every boundary's hidden states (one (examples, width) array per
    boundary), in one pass over the trace."""
    out: list[list[np.ndarray]] = [[] for _ in range(tr.n_blocks + 1)]
    for batch, hs in tr.each():
        m = batch["attention_mask"].float()[..., None]
        for i, h in enumerate(hs):
            out[i].append(((h.float() * m).sum(1) / m.sum(1).clamp_min(1)).cpu().numpy())
    return [np.concatenate(o) for o in out]


def _probe_ce(features: np.ndarray, labels: np.ndarray, seed: int, folds: int, components: int, c: float) -> float:
    """Cross-validated cross-entropy (nats) of a logistic probe on PCA-reduced, standardised features."""
    from sklearn.decomposition import PCA
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold, cross_val_predict
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    k = max(1, min(components, features.shape[1], int(features.shape[0] * (folds - 1) / folds) - 1))
    probe = make_pipeline(StandardScaler(), PCA(n_components=k, random_state=seed),
                          LogisticRegression(C=c, max_iter=2000))
    cv = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)
    proba = cross_val_predict(probe, features, labels, cv=cv, method="predict_proba")
    classes = np.unique(labels)
    idx = np.searchsorted(classes, labels)
    return float(-np.log(np.clip(proba[np.arange(labels.size), idx], 1e-12, 1.0)).mean())


def _mutual_info_rows(model: nn.Module, tr: Trace, seed: int, *, folds: int, components: int, c: float,
                      counter: _Counter | None = None) -> pd.DataFrame:
    if tr.task == "classifier":
        labels = np.concatenate([b["labels"].cpu().numpy() for b in tr.batches])
        _, counts = np.unique(labels, return_counts=True)
        if counts.size < 2 or counts.min() < 2:
            raise ImportanceError(f"mutual_info needs >= 2 examples of each of >= 2 classes; label counts are "
                                  f"{counts.tolist()}. Use more calibration examples.")
        folds = int(min(folds, counts.min()))
        p = counts / counts.sum()
        h_y = float(-(p * np.log(p)).sum())
        ce = [_probe_ce(features, labels, seed, folds, components, c) for features in _pooled(tr)]
        estimator = f"{folds}-fold CV logistic probe (C={c:g}), PCA {components}, mean-pooled"
    else:
        nll = np.zeros(tr.n_blocks + 1)
        with torch.no_grad():
            for b, hs in tr.each():
                nll += [float(_example_scores("lm", _head(model, h, b), b)[0].sum()) for h in hs]
        ce = list(nll / tr.units.sum())
        if counter is not None:
            counter.heads += tr.n_examples * (tr.n_blocks + 1)
        tgts = torch.cat([_lm_targets(b)[0][_lm_targets(b)[1]] for b in tr.batches]).cpu().numpy()
        _, counts = np.unique(tgts, return_counts=True)
        p = counts / counts.sum()
        h_y = float(-(p * np.log(p)).sum())  # plug-in unigram entropy: biased low on few tokens
        estimator = "logit lens (model's final norm + LM head), plug-in unigram H(Y)"
    ce_arr = np.asarray(ce)
    return pd.DataFrame({"layer": range(tr.n_blocks), "score": ce_arr[:-1] - ce_arr[1:],
                         "mi_in": h_y - ce_arr[:-1], "mi_out": h_y - ce_arr[1:], "h_y": h_y,
                         "estimator": estimator})


# --------------------------------------------------------------------------------------------------
# Layer conductance (captum)


class _Tap(nn.Module):
    """Identity on (block input, block update): the cut captum attributes to (fresh tensors, so gradients
    w.r.t. the tap's outputs follow only the paths through the residual sum)."""

    def forward(self, h_in: torch.Tensor, update: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return h_in.clone(), update.clone()


def _baseline_embedding(model: nn.Module, batch: Mapping[str, torch.Tensor], baseline: str) -> torch.Tensor:
    """The reference point of the integration path: the embedding output of the same positions with every
    token replaced by the pad token (``"pad"``), or the zero vector (``"zero"``)."""
    if baseline == "zero":
        return torch.zeros_like(layers.embed(model, batch))
    pad = getattr(model.config, "pad_token_id", None)
    ids = torch.full_like(batch["input_ids"], 0 if pad is None else int(pad))
    return layers.embed(model, {"input_ids": ids, "attention_mask": batch["attention_mask"]})


def _conductance_target(model: nn.Module, task: str, h: torch.Tensor, mask: torch.Tensor, labels: torch.Tensor,
                        target: torch.Tensor | None) -> torch.Tensor:
    """The attributed output per row: the probability of class ``target`` (classifier), or the text's mean
    token log-likelihood (LM)."""
    logits = layers.classify(model, h, mask)
    if task == "classifier":
        return torch.softmax(logits.float(), -1).gather(1, target[:, None])[:, 0]
    nll, _, units = _example_scores("lm", logits, {"labels": labels, "attention_mask": mask})
    return -nll / units


class _PathPoint(NamedTuple):
    """One point of the integration path: alpha, the gradient of the target at every block output, the block
    outputs and updates (float32, real positions only, on CPU) and the target's value."""

    alpha: float
    grad: torch.Tensor
    out: torch.Tensor
    update: torch.Tensor
    value: float


def _path_points(model: nn.Module, task: str, x0: torch.Tensor, base: torch.Tensor, mask: torch.Tensor,
                 labels: torch.Tensor, target: torch.Tensor | None, alphas: Sequence[float],
                 chunk: int) -> list[_PathPoint]:
    """One forward and one backward per alpha (``chunk`` alphas per pass), for every block at once."""
    n_layers, keep = layers.num_blocks(model), mask[0].bool()
    points = []
    for a in torch.tensor(list(alphas), dtype=torch.float64).split(chunk):
        m = a.shape[0]
        h = (base + a.to(device=x0.device, dtype=x0.dtype)[:, None, None] * (x0 - base)).requires_grad_(True)
        mk, lb = mask.expand(m, -1), labels.expand(m, *labels.shape[1:])
        outs, cur = [], h
        for i in range(n_layers):
            nxt = layers.block_forward(model, i, cur, mk)
            nxt.retain_grad()
            outs.append((cur, nxt))
            cur = nxt
        f = _conductance_target(model, task, cur, mk, lb, None if target is None else target.expand(m))
        f.sum().backward()
        grad = torch.stack([o.grad.detach()[:, keep] for _, o in outs], 1).float().cpu()
        out = torch.stack([o.detach()[:, keep] for _, o in outs], 1).float().cpu()
        update = torch.stack([(o - c).detach()[:, keep] for c, o in outs], 1).float().cpu()
        values = f.detach().double().cpu()
        points += [_PathPoint(float(a[j]), grad[j], out[j], update[j], float(values[j])) for j in range(m)]
    return points


def _interval(p: _PathPoint, q: _PathPoint) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per block, over the path interval from ``p`` to ``q``: the trapezoid conductance through the update and
    through the input (gradient averaged over the two ends times the change), and the local error estimate
    |trapezoid - left Riemann| = |(change of gradient) x (change of output)| / 2."""
    g_mid = (p.grad.double() + q.grad.double()) / 2
    d_o, d_u = q.out.double() - p.out.double(), q.update.double() - p.update.double()
    err = ((q.grad.double() - p.grad.double()) * d_o).sum((1, 2)).abs() / 2
    return (g_mid * d_u).sum((1, 2)), (g_mid * (d_o - d_u)).sum((1, 2)), err


def _conductance_rows(model: nn.Module, tr: Trace, *, n_steps: int, internal_batch_size: int,
                      max_examples: int | None, baseline: str, tolerance: float | None, max_points: int,
                      counter: _Counter | None = None) -> pd.DataFrame:
    """Layer conductance of every block in one integration pass (see :class:`Conductance`).

    Along the straight path from the baseline embedding to the input, one forward and one backward per point
    give, for *every* block at once, the gradient of the target with respect to the block's output and the
    block's input and update at that point: a block's conductance is the path integral of gradient x
    d(update) (and of gradient x d(input) through the residual branch). captum's ``LayerConductance``
    computes the same integral one block at a time with a left Riemann sum; here the gradient is averaged
    over each interval's two ends (the trapezoid rule), and one pass serves all L blocks instead of L passes.

    The path starts as ``n_steps`` equal intervals. With a ``tolerance``, the quadrature is then adaptive:
    while some block's completeness gap exceeds it, the ``internal_batch_size`` intervals with the largest
    local error estimate are bisected (one more batched pass), up to ``max_points`` points per example. Where
    the integrand turns sharply over a short stretch of the path (a decoder's massive activations switching
    on), uniform steps converge only as 1/n_steps; bisecting where the error is resolves the turn at the
    cost of a few points. ``gap``: the completeness gap per block, |conductance of input + update - (F(x) -
    F(baseline))| / |F(x) - F(baseline)|, averaged over examples (0 for the exact integral); ``gap_uniform``:
    the same on the ``n_steps`` equal intervals alone (what bisection bought); ``n_points``: the points
    evaluated per example, averaged.
    """
    if n_steps < 2:
        raise ImportanceError(f"conductance n_steps={n_steps}; use at least 2 integration steps.")
    if baseline not in ("pad", "zero"):
        raise ImportanceError(f"conductance baseline={baseline!r}; choose 'pad' (pad-token embeddings) or 'zero'.")
    if tolerance is not None and not (0 < tolerance < 1 and max_points > n_steps + 1):
        raise ImportanceError(f"conductance tolerance={tolerance}, max_points={max_points}: the tolerance is a "
                              f"fraction in (0, 1) and max_points must exceed n_steps + 1 = {n_steps + 1}.")
    tr = tr.subset(max_examples)
    n_layers, task = tr.n_blocks, tr.task
    upd = np.zeros((tr.n_examples, n_layers))
    inp = np.zeros_like(upd)
    gap = np.zeros_like(upd)
    gap_uniform = np.zeros_like(upd)
    total = np.zeros(tr.n_examples)
    used = np.zeros(tr.n_examples)
    chunk = max(1, int(internal_batch_size))
    params = [p for p in model.parameters() if p.requires_grad]
    for p in params:
        p.requires_grad_(False)
    try:
        row = 0
        for batch, hs in tr.each():
            base_all = _baseline_embedding(model, batch, baseline).detach()
            for b in range(hs[0].shape[0]):
                sl = slice(b, b + 1)
                x0, base = hs[0][sl].detach(), base_all[sl]
                mask, labels = batch["attention_mask"][sl], batch["labels"][sl]
                with torch.no_grad():
                    logits = layers.classify(model, hs[-1][sl], mask)
                target = logits.argmax(-1) if task == "classifier" else None

                evaluate = functools.partial(_path_points, model, task, x0, base, mask, labels, target, chunk=chunk)
                points = evaluate(np.linspace(0.0, 1.0, n_steps + 1).tolist())
                diff = points[-1].value - points[0].value
                parts = {(p.alpha, q.alpha): _interval(p, q) for p, q in itertools.pairwise(points)}
                while True:
                    c_u = torch.stack([c[0] for c in parts.values()]).sum(0)
                    c_i = torch.stack([c[1] for c in parts.values()]).sum(0)
                    block_gap = (c_u + c_i - diff).abs().numpy() / max(abs(diff), 1e-12)
                    if len(points) == n_steps + 1:
                        gap_uniform[row] = block_gap
                    room = 0 if tolerance is None else max_points - len(points)
                    if room <= 0 or block_gap.max() <= tolerance:
                        break
                    ranked = sorted(parts, key=lambda ab: -float(parts[ab][2].max()))[:min(chunk, room)]
                    by_alpha = {p.alpha: p for p in points}
                    for (a, b), mid in zip(ranked, evaluate([(a + b) / 2 for a, b in ranked]), strict=True):
                        del parts[(a, b)]
                        parts[(a, mid.alpha)] = _interval(by_alpha[a], mid)
                        parts[(mid.alpha, b)] = _interval(mid, by_alpha[b])
                        points.append(mid)
                upd[row], inp[row], total[row] = c_u.numpy(), c_i.numpy(), diff
                gap[row], used[row] = block_gap, len(points)
                row += 1
    finally:
        for p in params:
            p.requires_grad_(True)
    if counter is not None:  # every point is one pass through the stack (its backward is n_backward)
        counter.blocks += int(used.sum()) * n_layers
    return pd.DataFrame({"layer": range(n_layers), "score": np.abs(upd).mean(0), "se": _se(np.abs(upd)),
                         "signed": upd.mean(0), "via_input": inp.mean(0),
                         "update_share": upd.sum(0) / total.sum() if total.sum() != 0 else np.nan,
                         "total": total.mean(), "gap": gap.mean(0), "gap_max": gap.max(0),
                         "gap_uniform": gap_uniform.mean(0),
                         "n_steps": n_steps, "n_points": used.mean(), "n_examples": tr.n_examples,
                         "tolerance": np.nan if tolerance is None else tolerance,
                         "quadrature": "trapezoid" if tolerance is None else "trapezoid, adaptive bisection",
                         "baseline": "pad-token embeddings" if baseline == "pad" else "zero embedding output"})


# --------------------------------------------------------------------------------------------------
# Shapley values of blocks


def _value(tr: Trace, nll: np.ndarray, correct: np.ndarray, value: str) -> np.ndarray:
    """Game value per row: accuracy, or minus the loss (higher = better either way)."""
    units = tr.units.sum()
    return correct.sum(-1) / units if value == "accuracy" else -nll.sum(-1) / units


def _shap_exact(values: np.ndarray, n_layers: int) -> np.ndarray:
    """Shapley values from the game table via ``shap.explainers.Exact`` (players = blocks kept or skipped)."""
    import shap

    powers = 1 << np.arange(n_layers)

    def game(x: np.ndarray) -> np.ndarray:
        return values[(np.asarray(x) > 0.5).astype(np.int64) @ powers]

    masker = shap.maskers.Independent(np.zeros((1, n_layers)), max_samples=1)
    explanation = shap.explainers.Exact(game, masker)(np.ones((1, n_layers)), max_evals=2**n_layers + 1, silent=True)
    return np.asarray(explanation.values[0], dtype=float)


def warm_up_shap() -> float:
    """Import shap and compile its numba kernels on a 2-player game; returns the seconds it took.

    The first exact Shapley computation in a process pays a one-off JIT compilation (seconds to tens of
    seconds on a busy CPU); call this first when the cost of the method itself is being timed.
    """
    start = time.perf_counter()
    _shap_exact(np.arange(4.0), 2)
    return time.perf_counter() - start


@torch.no_grad()
def _shap_permutation(model: nn.Module, tr: Trace, value: str, n_permutations: int, seed: int,
                      counter: _Counter) -> tuple[np.ndarray, np.ndarray, int, float]:
    """Antithetic permutation sampling: each sampled order and its reverse; SE over the pairs' means.

    The game's value is a sum over examples, so each marginal contribution is the sum of its batches'
    contributions: the orders are drawn once and every batch walks all of them in turn, holding only its own
    states (memory does not grow with the number of batches)."""
    n_layers = tr.n_blocks
    rng = np.random.default_rng(seed)
    pairs = max(1, math.ceil(n_permutations / 2))
    perms = [rng.permutation(n_layers) for _ in range(pairs)]
    units = float(tr.units.sum())

    def v_of(h: torch.Tensor, batch: dict[str, torch.Tensor]) -> float:
        a, c, _ = _example_scores(tr.task, _head(model, h, batch), batch)
        counter.heads += a.shape[0]
        return float(c.sum()) / units if value == "accuracy" else -float(a.sum()) / units

    v_empty = 0.0
    marg = np.zeros((2 * pairs, n_layers))
    for batch, hs in zip(tr.batches, tr.hidden, strict=True):  # only the embedding output is read
        empty = v_of(hs[0], batch)
        v_empty += empty
        for p, perm in enumerate(perms):
            for r, order in enumerate((perm, perm[::-1])):
                kept: set[int] = set()
                st = [hs[0]] * (n_layers + 1)
                prev = empty
                for j in order:
                    kept.add(int(j))
                    h = st[j]
                    for i in range(j, n_layers):
                        if i in kept:
                            h = layers.block_forward(model, i, h, batch["attention_mask"])
                            counter.blocks += h.shape[0]
                        st[i + 1] = h
                    cur = v_of(st[-1], batch)
                    marg[2 * p + r, j] += cur - prev
                    prev = cur
    pair_means = (marg[0::2] + marg[1::2]) / 2
    se = pair_means.std(0, ddof=1) / math.sqrt(pairs) if pairs > 1 else np.full(n_layers, np.nan)
    return marg.mean(0), se, 2 * pairs, v_empty


def _shap_rows(model: nn.Module, tr: Trace, seed: int, *, value: str | None, exact_max_blocks: int,
               n_permutations: int, max_examples: int | None, counter: _Counter | None = None) -> pd.DataFrame:
    value = value or ("accuracy" if tr.task == "classifier" else "loss")
    if value not in ("accuracy", "loss"):
        raise ImportanceError(f"shap value={value!r}; choose 'accuracy' or 'loss' (the value is minus the loss).")
    counter = counter or _Counter()
    tr = tr.subset(max_examples)
    n_layers = tr.n_blocks
    if n_layers <= exact_max_blocks:
        keeps = [tuple(bool(m >> i & 1) for i in range(n_layers)) for m in range(2**n_layers)]
        nll, correct = _evaluate_keeps(model, tr, keeps, counter)
        values = _value(tr, nll, correct, value)
        phi, se, how, n_perm = _shap_exact(values, n_layers), np.zeros(n_layers), "exact (shap.explainers.Exact)", 0
        v_all, v_none = values[-1], values[0]
    else:
        phi, se, n_perm, v_none = _shap_permutation(model, tr, value, n_permutations, seed, counter)
        how = f"antithetic permutation sampling ({n_perm} orders)"
        v_all = _value(tr, tr.nll[None, :], tr.correct[None, :], value)[0]
    return pd.DataFrame({"layer": range(n_layers), "score": phi, "se": se, "value": value, "estimator": how,
                         "n_permutations": n_perm, "v_all": v_all, "v_none": v_none, "n_examples": tr.n_examples})


# --------------------------------------------------------------------------------------------------
# The family: one class per method, and the registry

#: The shared passes a method can declare in ``needs``: ``trace`` = one forward pass with every block boundary
#: kept (:class:`Trace`), ``gradients`` = one forward + backward with per-example gradients (its forward pass
#: also yields the trace).
SHARED_PASSES = ("trace", "gradients")


@dataclass
class Passes:
    """What ``ImportanceMethod.score`` works from.

    ``model`` (eval mode) and ``batches`` (prepared: on the model's device, with an attention mask); the shared
    pass the method declared in ``needs``, ``trace`` or ``grads`` (the other is None: a method sees only what
    it declared, so the cost columns stay true); ``counter``, to which a method adds the block and head
    evaluations it runs beyond the shared pass (they become ``n_forward``).
    """

    model: nn.Module
    batches: list[dict[str, torch.Tensor]]
    trace: Trace | None = None
    grads: _Grads | None = None
    counter: _Counter = field(default_factory=_Counter)

    @property
    def n_layers(self) -> int:
        return layers.num_blocks(self.model)


class ImportanceMethod:
    """One way to score every block: subclass it, fill in the class attributes and ``score``, decorate with
    ``@register``; ``compute(name, ...)`` and ``compute_all`` then run it like the built-in methods.

    Class attributes:

    - ``name``: the method's name in ``compute`` and in the ``method`` column.
    - ``description``: what its score means, one line (higher = more important); ``SIGN_CONVENTION`` lists them.
    - ``needs``: the one shared pass it works from, ``("trace",)`` or ``("gradients",)`` (see ``SHARED_PASSES``);
      ``compute_all`` computes it once for every method that declares it. It is reported in the ``shared``
      column and counted as one forward pass (and one backward for ``gradients``) in ``n_forward``/``n_backward``.
    - ``options``: the keyword options ``score`` accepts, with their defaults; any other option is refused
      before compute, naming these.
    - ``cheap``: costs about one forward/backward pass (``CHEAP_METHODS``, the performance target).

    ``score(passes, seed, **options)`` returns one row per block with ``layer`` and ``score`` (higher = more
    important) and any method-specific columns (``se`` by convention); ``compute`` adds ``method``, ``seed``
    and the cost columns. ``n_backward`` says how many full backward passes over the batches it costs.
    """

    name: str = ""
    description: str = ""
    needs: tuple[str, ...] = ("trace",)
    options: Mapping[str, Any] = {}
    cheap: bool = False

    def score(self, passes: Passes, seed: int, **options: Any) -> pd.DataFrame:
        raise NotImplementedError(f"{type(self).__name__} must define score(passes, seed, **options).")

    def n_backward(self, rows: pd.DataFrame, passes: Passes, options: Mapping[str, Any]) -> float:
        """Full-model backward passes over the batches, the shared pass included (default: the gradient pass's
        one, if declared)."""
        return 1.0 if "gradients" in self.needs else 0.0


_REGISTRY: dict[str, type[ImportanceMethod]] = {}


def register(cls: type[ImportanceMethod]) -> type[ImportanceMethod]:
    """Class decorator: make ``cls`` available to ``compute``/``compute_all`` under ``cls.name``.

    Checks the declaration here, so a mistake fails at import rather than in the middle of a run.
    """
    if not (isinstance(cls, type) and issubclass(cls, ImportanceMethod)):
        raise ImportanceError(f"register takes an ImportanceMethod subclass, got {cls!r}.")
    name = cls.name
    if not isinstance(name, str) or not name.isidentifier():
        raise ImportanceError(f"{cls.__name__}.name={name!r}; set it to the method's name, e.g. name = 'my_method'.")
    if name in _REGISTRY:
        raise ImportanceError(f"an importance method named {name!r} is registered already ({_REGISTRY[name].__name__})"
                              "; choose another name, or unregister the old one first.")
    if not cls.description:
        raise ImportanceError(f"{cls.__name__}.description is empty; say in one line what its score means "
                              "(higher = more important).")
    if len(cls.needs) != 1 or cls.needs[0] not in SHARED_PASSES:
        raise ImportanceError(f"{cls.__name__}.needs={cls.needs!r}; declare the one shared pass it works from, "
                              f"one of {[(p,) for p in SHARED_PASSES]}.")
    if not isinstance(cls.options, Mapping):
        raise ImportanceError(f"{cls.__name__}.options must map each accepted option to its default, "
                              f"got {type(cls.options).__name__}.")
    _REGISTRY[name] = cls
    return cls


def unregister(name: str) -> type[ImportanceMethod]:
    """Remove a method added with ``register`` (e.g. a test's); the built-in ``METHODS`` cannot be removed."""
    if name in METHODS:
        raise ImportanceError(f"{name!r} is a built-in method (METHODS); only methods registered later can be removed.")
    if name not in _REGISTRY:
        raise ImportanceError(f"no importance method {name!r} is registered; registered: {', '.join(_REGISTRY)}.")
    return _REGISTRY.pop(name)


@contextmanager
def registered(cls: type[ImportanceMethod]) -> Iterator[type[ImportanceMethod]]:
    """``with registered(MyMethod): ...``: the method is available inside the block only."""
    register(cls)
    try:
        yield cls
    finally:
        unregister(cls.name)


def available_methods() -> tuple[str, ...]:
    """Every registered method's name: ``METHODS`` plus any registered since, in registration order."""
    return tuple(_REGISTRY)


@register
class Fisher(ImportanceMethod):
    """Diagonal empirical Fisher of the block's parameters: mean over examples of the squared per-example
    gradient of the log-likelihood of the true label (LM: of the text's mean token log-likelihood), summed over
    the block's parameters (``per_param``: divided by their number; ``per_batch``: the mean per batch)."""

    name = "fisher"
    description = "mean squared per-example log-likelihood gradient of the block's parameters"
    needs = ("gradients",)
    cheap = True

    def score(self, passes: Passes, seed: int, **options: Any) -> pd.DataFrame:
        return _fisher_rows(passes.model, passes.grads)


@register
class Gradient(ImportanceMethod):
    """Mean over examples of the norm of the per-example loss gradient w.r.t. the block's parameters
    (``output_grad``: w.r.t. the block's output hidden states)."""

    name = "gradient"
    description = "mean per-example loss-gradient norm of the block's parameters"
    needs = ("gradients",)
    cheap = True

    def score(self, passes: Passes, seed: int, **options: Any) -> pd.DataFrame:
        return _gradient_rows(passes.grads)


@register
class Ablation(ImportanceMethod):
    """Damage: loss with the block skipped (identity) minus the full model's loss (``delta_accuracy``: the
    accuracy lost). Computed from cached block inputs: skipping block i runs blocks i+1.. only."""

    name = "ablation"
    description = "loss increase when the block is skipped (damage)"
    cheap = True

    def score(self, passes: Passes, seed: int, **options: Any) -> pd.DataFrame:
        n_layers = passes.n_layers
        rows = damage(passes.model, passes.batches, [{i} for i in range(n_layers)], trace=passes.trace,
                      _counter=passes.counter)
        rows = rows.drop(columns=["drop", "k"]).rename(
            columns={"d_loss": "score", "d_accuracy": "delta_accuracy", "se_d_loss": "se"})
        rows.insert(0, "layer", range(n_layers))
        return rows


@register
class BlockInfluence(ImportanceMethod):
    """ShortGPT's block influence: 1 - mean cosine(input, output) of the block over non-padding tokens."""

    name = "block_influence"
    description = "1 - mean cosine(input, output)"
    cheap = True

    def score(self, passes: Passes, seed: int, **options: Any) -> pd.DataFrame:
        return _block_influence_rows(passes.trace)


@register
class Angular(ImportanceMethod):
    """Gromov et al.: arccos(cosine)/pi between the block's input and output, per token, averaged over
    non-padding tokens; ``angular_runs`` gives the distance across runs of n blocks."""

    name = "angular"
    description = "mean arccos(cosine(input, output)) / pi"
    cheap = True

    def score(self, passes: Passes, seed: int, **options: Any) -> pd.DataFrame:
        return _single_block_rows(passes.model, passes.trace, "all")


@register
class BlockInfluenceShortGPT(ImportanceMethod):
    """Block influence exactly as ShortGPT's code computes it (Men et al. 2024): consecutive entries of
    ``output_hidden_states``, so for the *last* block of a decoder the output side is the final-normed state.
    Identical to ``block_influence`` on every other block, and on every block of a post-norm encoder."""

    name = "bi_shortgpt"
    description = "1 - mean cosine(input, output), last decoder block against the final-normed output"
    cheap = True

    def score(self, passes: Passes, seed: int, **options: Any) -> pd.DataFrame:
        return _shortgpt_rows(passes.model, passes.trace)


@register
class AngularGromov(ImportanceMethod):
    """Gromov et al. 2024's angular distance for single blocks: arccos(cosine)/pi between a block's input and
    output at the one token the model reads out (last token of a decoder, [CLS] of an encoder), not averaged
    over every token as ``angular`` does; ``angular_runs`` gives their n-block runs."""

    name = "angular_gromov"
    description = "arccos(cosine(input, output)) / pi at the read-out token"
    cheap = True

    def score(self, passes: Passes, seed: int, **options: Any) -> pd.DataFrame:
        return _single_block_rows(passes.model, passes.trace, "read")


@register
class Activation(ImportanceMethod):
    """Relative update ||out - in|| / ||in|| per token (the share of the residual stream the block rewrites);
    also output norm and variance."""

    name = "activation"
    description = "mean ||output - input|| / ||input||"
    cheap = True

    def score(self, passes: Passes, seed: int, **options: Any) -> pd.DataFrame:
        return _activation_rows(passes.trace)


@register
class MutualInfo(ImportanceMethod):
    """Information the block adds about the target: CE(probe on block input) - CE(probe on block output), a
    difference of variational lower bounds I(Y; Z) >= H(Y) - CE. Classifiers: ``folds``-fold cross-validated
    logistic probe (C = ``c``) on PCA-reduced (``components``) mean-pooled states. LMs: the model's own final
    norm + LM head on every layer (logit lens), which needs no fitting."""

    name = "mutual_info"
    description = "probe cross-entropy before the block minus after it (nats of label information added)"
    options = {"folds": 5, "components": 16, "c": 0.1}

    def score(self, passes: Passes, seed: int, **options: Any) -> pd.DataFrame:
        return _mutual_info_rows(passes.model, passes.trace, seed, counter=passes.counter, **options)


@register
class Conductance(ImportanceMethod):
    """Layer conductance (Dhamdhere et al. 2019, captum's ``LayerConductance``), from the embedding output, of
    the predicted class's probability (LM: the text's mean token log-likelihood) through the block's *update*
    (output - input): |sum of the update's conductance|, averaged over examples.

    All blocks are integrated in one pass along the path, with the trapezoid rule (see ``_conductance_rows``;
    ``tests/test_importance.py`` checks it against captum's per-block result). The block output is split into
    (input, update), a cut of the network, so completeness is a real check: ``gap`` reports it, and should stay
    under 5 % for the scores to mean what they say. So the quadrature is adaptive: intervals are bisected where
    the error is until every block's gap is under ``tolerance`` (2 %) or ``max_points`` are spent
    (``tolerance=None``: the ``n_steps`` uniform intervals only, as captum). Baseline: the embedding output of
    the same positions with every token replaced by the pad token. (The zero embedding output, ``baseline="zero"``, is a poor reference
    here: LayerNorm/RMSNorm are scale-invariant, so the path from 0 has a near-discontinuity at the origin.)
    """

    name = "conductance"
    description = "mean |conductance through the block's update| of the predicted-class probability"
    options = {"n_steps": 32, "internal_batch_size": 33, "max_examples": None, "baseline": "pad",
               "tolerance": 0.02, "max_points": 512}

    def score(self, passes: Passes, seed: int, **options: Any) -> pd.DataFrame:
        return _conductance_rows(passes.model, passes.trace, counter=passes.counter, **options)

    def n_backward(self, rows: pd.DataFrame, passes: Passes, options: Mapping[str, Any]) -> float:
        """One backward per point of the path (``n_points`` per example, for all blocks at once), over the
        examples it used."""
        return float(rows["n_points"].iloc[0]) * int(rows["n_examples"].iloc[0]) / passes.trace.n_examples


@register
class Shap(ImportanceMethod):
    """Shapley value of the block in the game "blocks kept vs skipped", value = task metric on the calibration
    set (accuracy, or minus the loss). Exact with ``shap.explainers.Exact`` up to ``exact_max_blocks`` blocks,
    antithetic permutation sampling (``n_permutations`` orders) with standard errors beyond."""

    name = "shap"
    description = "Shapley value of keeping the block (task metric on the calibration set)"
    options = {"value": None, "exact_max_blocks": 12, "n_permutations": 16, "max_examples": None}

    def score(self, passes: Passes, seed: int, **options: Any) -> pd.DataFrame:
        return _shap_rows(passes.model, passes.trace, seed, counter=passes.counter, **options)


#: The built-in methods, in the order of the chapter (those registered above; ``available_methods`` adds any
#: registered later).
METHODS = tuple(_REGISTRY)
#: The methods that cost about one forward/backward pass each (the performance target is about these).
CHEAP_METHODS = tuple(name for name, cls in _REGISTRY.items() if cls.cheap)
#: What each method's score means (higher = more important).
SIGN_CONVENTION = {name: cls.description for name, cls in _REGISTRY.items()}


# --------------------------------------------------------------------------------------------------
# The interface


@dataclass
class _Shared:
    """Work shared between methods within one ``compute_all`` call (computed on first use).

    ``used`` holds the wall time of each shared pass a method relied on; ``spent`` the time spent computing
    shared passes in this call (a trace handed in from outside was paid for elsewhere).
    """

    model: nn.Module
    batches: list[dict[str, torch.Tensor]]
    trace: Trace | None = None
    grads: _Grads | None = None
    used: dict[str, float] = field(default_factory=dict)
    spent: float = 0.0
    want_grads: bool = False  # the gradient pass will run anyway: take the trace from it

    def get_trace(self) -> Trace:
        if self.trace is None and self.want_grads:
            self.get_grads()
        if self.trace is None:
            self.trace = trace(self.model, self.batches)
            self.spent += self.trace.seconds
        self.used.setdefault("trace", self.trace.seconds)
        return self.trace

    def get_grads(self) -> _Grads:
        if self.grads is None:
            self.grads = _grad_pass(self.model, self.batches, keep_trace=self.trace is None)
            self.spent += self.grads.seconds
            if self.trace is None:
                self.trace = self.grads.trace
        self.used.setdefault("gradients", self.grads.seconds)
        return self.grads


def _shared(model: nn.Module, batches: Any, tr: Trace | None) -> _Shared:
    prepared = prepare_batches(model, batches)
    if tr is not None:
        _ensure_trace(model, prepared, tr)
        same = len(tr.batches) == len(prepared) and all(
            torch.equal(a["input_ids"], b["input_ids"]) for a, b in zip(tr.batches, prepared, strict=True))
        if not same:
            raise ImportanceError("the trace was computed on other batches; pass trace(model, batches) of these.")
    return _Shared(model, prepared, trace=tr)


def _check_methods(methods: Iterable[str]) -> list[str]:
    methods = [methods] if isinstance(methods, str) else list(methods)
    unknown = [m for m in methods if m not in _REGISTRY]
    if unknown or not methods:
        raise ImportanceError(f"unknown importance method(s) {unknown or methods}; choose from "
                              f"{', '.join(_REGISTRY)}.")
    return methods


def _run(method: str, shared: _Shared, seed: int, kw: dict[str, Any]) -> pd.DataFrame:
    """One method's rows and cost (seconds of its own work; shared passes are accounted separately)."""
    cls = _REGISTRY[method]
    extra = set(kw) - set(cls.options)
    if extra:
        raise ImportanceError(f"{method} takes no option(s) {sorted(extra)}; it accepts "
                              f"{sorted(cls.options) or 'none'}.")
    options = {**cls.options, **kw}
    instance = cls()
    model = shared.model
    n_layers = layers.num_blocks(model)
    (shared_name,) = cls.needs
    passes = Passes(model, shared.batches)
    spent_before = shared.spent
    recomputed_before = shared.trace.recomputed if shared.trace is not None else 0
    start = time.perf_counter()
    if shared_name == "gradients":
        passes.grads = shared.get_grads()
    else:
        passes.trace = shared.get_trace()
    rows = instance.score(passes, seed, **options)
    if not isinstance(rows, pd.DataFrame) or not {"layer", "score"} <= set(rows.columns):
        raise ImportanceError(f"{cls.__name__}.score must return a DataFrame with one row per block and columns "
                              f"'layer' and 'score'; got {getattr(rows, 'columns', type(rows).__name__)!r}.")
    backward = instance.n_backward(rows, passes, options)
    seconds = time.perf_counter() - start - (shared.spent - spent_before)
    n_examples = sum(b["input_ids"].shape[0] for b in shared.batches)
    recomputed = (passes.trace.recomputed - recomputed_before) if passes.trace is not None else 0
    # + the shared pass, + the boundaries recomputed for this method when the trace is over its memory budget
    forward = (passes.counter.blocks + recomputed * n_layers) / (n_layers * n_examples) + 1.0
    rows = rows.assign(method=method, seed=seed, seconds=seconds, shared=shared_name,
                       shared_seconds=shared.used[shared_name], n_forward=forward, n_backward=backward)
    front = ["method", "layer", "score", "seed"]
    return rows[front + [c for c in rows.columns if c not in front]]


def compute(method: str, model: nn.Module, batches: Any, *, seed: int = 0, trace: Trace | None = None,
            **kw: Any) -> pd.DataFrame:
    """Importance of every block of ``model`` by ``method`` on ``batches``: one row per block.

    Columns: ``method, layer, score, seed`` (higher score = more important; see ``SIGN_CONVENTION``), the
    method's own columns (e.g. ``se``, ``delta``, ``per_param``), and cost: ``seconds`` (this method's own
    work), ``shared``/``shared_seconds`` (the pass it reuses: ``trace`` = one forward with every block
    boundary kept, ``gradients`` = one forward + backward with per-example gradients), ``n_forward`` and
    ``n_backward`` (full-model passes over ``batches``, shared pass included). ``method`` is any registered
    method (``available_methods()``); its options are those its class declares: ``mutual_info`` (``folds``,
    ``components``, ``c``), ``conductance`` (``n_steps``, ``internal_batch_size``, ``max_examples``,
    ``baseline``), ``shap`` (``value``, ``exact_max_blocks``, ``n_permutations``, ``max_examples``). ``trace``: a
    ``trace(model, batches)`` computed beforehand, to share it (its time then counts as shared, not own).
    """
    (method,) = _check_methods([method])
    shared = _shared(model, batches, trace)
    return _run(method, shared, seed, kw)


def compute_all(model: nn.Module, batches: Any, methods: Iterable[str] = METHODS, seed: int = 0, *,
                options: Mapping[str, Mapping[str, Any]] | None = None, trace: Trace | None = None) -> pd.DataFrame:
    """Every method in ``methods`` on the same batches, sharing the forward trace and the gradient pass.

    ``options`` maps a method to its keyword options (see ``compute``); ``trace`` as in ``compute``. Without a
    trace, and with Fisher or gradient among the methods, the trace is taken from the gradient pass's own
    forward pass (cost 0 s: the ``shared: trace`` row then shows 0). The cost columns let ``cost_table``
    count each shared pass once.
    """
    methods = _check_methods(methods)
    options = dict(options or {})
    unknown = set(options) - set(methods)
    if unknown:
        raise ImportanceError(f"options given for {sorted(unknown)}, which are not among the methods {methods}.")
    shared = _shared(model, batches, trace)
    shared.want_grads = any("gradients" in _REGISTRY[m].needs for m in methods)
    return pd.concat([_run(m, shared, seed, dict(options.get(m, {})))
                      for m in progress(methods, desc=f"importance methods (seed {seed})")], ignore_index=True)


def cost_table(scores: pd.DataFrame) -> pd.DataFrame:
    """One row per (seed, method) from ``compute``/``compute_all`` output, plus per seed a ``shared: <pass>``
    row for each shared pass, so that ``seconds`` sums to the total wall time without double counting."""
    keys = [c for c in ("model", "seed") if c in scores.columns]
    cols = keys + ["method", "seconds", "shared", "shared_seconds", "n_forward", "n_backward"]
    per = scores[cols].drop_duplicates(subset=keys + ["method"]).copy()
    per["standalone_seconds"] = per["seconds"] + per["shared_seconds"]
    shared = per[per["shared"] != ""].drop_duplicates(subset=keys + ["shared"])
    derived = (shared["shared"] == "trace") & (shared["shared_seconds"] == 0.0)  # taken from the gradient pass
    extra = shared[keys].assign(method="shared: " + shared["shared"], seconds=shared["shared_seconds"].to_numpy(),
                                shared="", shared_seconds=0.0, n_forward=np.where(derived, 0.0, 1.0),
                                n_backward=(shared["shared"] == "gradients").astype(float).to_numpy(),
                                standalone_seconds=shared["shared_seconds"].to_numpy())
    return pd.concat([per, extra], ignore_index=True)


# --------------------------------------------------------------------------------------------------
# Validation: top-k choices, random draws, the oracle


def choose(scores: pd.DataFrame, k: int) -> dict[str, tuple[int, ...]]:
    """Each method's choice of the k blocks to drop: its k lowest scores (ties: earlier block first)."""
    from .strategies import top_k  # the one top-k rule every module shares

    out = {}
    for method, g in scores.groupby("method", sort=False):
        if g["layer"].duplicated().any():
            raise ImportanceError(f"{method} has several rows per layer (several seeds?); pass one seed's scores.")
        out[str(method)] = top_k(dict(zip(g["layer"], g["score"], strict=True)), k, largest=False)
    return out


def topk_damage(model: nn.Module, batches: Any, scores: pd.DataFrame, ks: Iterable[int], *, n_random: int = 20,
                seed: int = 0, runs: pd.DataFrame | None = None, trace: Trace | None = None) -> pd.DataFrame:
    """Damage of dropping each method's k least important blocks, and of ``n_random`` random k-sets, per k.

    ``scores`` holds one seed's scores (``method, layer, score``). With ``runs`` (``angular_runs``) the
    Gromov choice, the best run of k consecutive blocks, is added as method ``angular_run``. Columns:
    ``method, k, draw`` (0 for methods, 0..n_random-1 for ``random``) plus those of ``damage``.
    """
    n_layers = layers.num_blocks(model)
    ks = sorted({int(k) for k in ks})
    if not ks or ks[0] < 1 or ks[-1] >= n_layers:
        raise ImportanceError(f"ks={ks} must lie in 1..{n_layers - 1} (the model has {n_layers} blocks).")
    rng = np.random.default_rng(seed)
    labels, sets = [], []
    for k in ks:
        for method, drop in choose(scores, k).items():
            labels.append((method, k, 0))
            sets.append(drop)
        if runs is not None and k <= int(runs["n"].max()):
            labels.append(("angular_run", k, 0))
            sets.append(best_run(runs, k))
        for d in range(n_random):
            labels.append(("random", k, d))
            sets.append(tuple(sorted(rng.choice(n_layers, size=k, replace=False).tolist())))
    out = damage(model, batches, sets, trace=trace)
    meta = pd.DataFrame(labels, columns=["method", "k", "draw"])
    return pd.concat([meta, out.drop(columns=["k"])], axis=1)


def oracle_subsets(model: nn.Module, batches: Any, ks: Iterable[int] | None = None, *, by: str = "d_loss",
                   trace: Trace | None = None, max_blocks: int = 8) -> pd.DataFrame:
    """Damage of every subset of k blocks, for k in ``ks`` (default 1..L//2), flagging the best per k.

    ``best`` marks the subset with the least damage by ``by`` (``d_loss`` or ``d_accuracy``). Exhaustive,
    so only for models with at most ``max_blocks`` blocks.
    """
    n_layers = layers.num_blocks(model)
    if n_layers > max_blocks:
        raise ImportanceError(f"an exhaustive search over {n_layers} blocks is too large (limit {max_blocks}); "
                              "use topk_damage with random draws instead.")
    if by not in ("d_loss", "d_accuracy"):
        raise ImportanceError(f"by={by!r}; choose 'd_loss' or 'd_accuracy'.")
    ks = sorted({int(k) for k in (ks if ks is not None else range(1, n_layers // 2 + 1))})
    if not ks or ks[0] < 1 or ks[-1] >= n_layers:
        raise ImportanceError(f"ks={ks} must lie in 1..{n_layers - 1}.")
    sets = [c for k in ks for c in itertools.combinations(range(n_layers), k)]
    out = damage(model, batches, sets, trace=trace)
    best = out.sort_values(by, kind="stable").groupby("k").head(1).index
    return out.assign(best=out.index.isin(best))


def versus_random(topk: pd.DataFrame, metric: str = "d_loss") -> pd.DataFrame:
    """Per (method, k, and any grouping columns such as seed): the method's damage, the mean of the random
    draws, and the share of random draws that did at least as well (a rank, 0 = better than every draw)."""
    group = [c for c in topk.columns if c in ("model", "seed")]
    rand = topk[topk["method"] == "random"]
    ref = rand.groupby(group + ["k"])[metric].agg(random_mean="mean", random_n="size").reset_index()
    meth = topk[topk["method"] != "random"][group + ["method", "k", metric]].merge(ref, on=group + ["k"])
    shares = []
    for _, row in meth.iterrows():
        sel = rand["k"] == row["k"]
        for g in group:
            sel &= rand[g] == row[g]
        shares.append(float((rand.loc[sel, metric] <= row[metric] + 1e-12).mean()))
    return meth.assign(random_at_least_as_good=shares)


def spearman_vs_damage(scores: pd.DataFrame, single: pd.DataFrame) -> pd.DataFrame:
    """Spearman rho between each method's scores and the measured single-block damage, per seed (and model).

    ``single`` has ``layer`` and ``d_loss`` (and ``seed``/``model`` when ``scores`` has them).
    """
    from scipy.stats import spearmanr

    group = [c for c in ("model", "seed") if c in scores.columns and c in single.columns]
    merged = scores[group + ["method", "layer", "score"]].merge(single[group + ["layer", "d_loss"]],
                                                               on=group + ["layer"])
    rows = []
    for key, g in merged.groupby(group + ["method"], sort=False):
        constant = g["score"].nunique() < 2 or g["d_loss"].nunique() < 2
        rho = np.nan if constant else float(spearmanr(g["score"], g["d_loss"]).statistic)
        rows.append({**dict(zip(group + ["method"], key if isinstance(key, tuple) else (key,), strict=True)),
                     "rho": rho, "n_layers": len(g)})
    return pd.DataFrame(rows)


def kendall_matrix(scores: pd.DataFrame, n_resamples: int = 2000, seed: int = 0,
                   confidence: float = 0.95) -> pd.DataFrame:
    """Kendall tau-b between every pair of methods' block rankings: mean over seeds, with a percentile
    bootstrap CI that resamples layers (the same layers for every seed; resamples with a tie-only ranking
    are dropped). One row per ordered pair (``method_a, method_b, tau, ci_low, ci_high, n_seeds``)."""
    seeds = sorted(scores["seed"].unique()) if "seed" in scores.columns else [None]
    methods = list(dict.fromkeys(scores["method"]))
    mats = []
    for s in seeds:
        sub = scores if s is None else scores[scores["seed"] == s]
        mats.append(sub.pivot_table(index="method", columns="layer", values="score").loc[methods].to_numpy(float))
    x = np.stack(mats)  # (seeds, methods, layers)
    n_layers = x.shape[2]
    rng = np.random.default_rng(seed)
    idx = np.vstack([np.arange(n_layers), rng.integers(0, n_layers, size=(n_resamples, n_layers))])

    def taus(cols: np.ndarray) -> np.ndarray:
        sx = np.sign(x[:, :, cols, None] - x[:, :, None, cols])  # (seeds, methods, l, l)
        num = np.einsum("samn,sbmn->sab", sx, sx)
        den = np.einsum("samn,samn->sa", sx, sx)
        with np.errstate(invalid="ignore", divide="ignore"):
            return (num / np.sqrt(den[:, :, None] * den[:, None, :])).mean(0)

    boot = np.stack([taus(cols) for cols in idx])  # (1 + resamples, methods, methods)
    alpha = (1 - confidence) / 2
    rows = []
    for a, ma in enumerate(methods):
        for b, mb in enumerate(methods):
            vals = boot[1:, a, b]
            vals = vals[np.isfinite(vals)]
            low, high = (np.quantile(vals, [alpha, 1 - alpha]) if vals.size >= n_resamples / 2 else (np.nan, np.nan))
            rows.append({"method_a": ma, "method_b": mb, "tau": float(boot[0, a, b]), "ci_low": float(low),
                         "ci_high": float(high), "n_seeds": len(seeds), "n_layers": n_layers})
    return pd.DataFrame(rows)


# --------------------------------------------------------------------------------------------------
# Uncertainty


def _variance_split(values: Sequence[np.ndarray]) -> tuple[float, float, float, float]:
    """(grand mean, between-group variance, within-group variance, total variance), every value weighted equally."""
    all_v = np.concatenate(values)
    weights = np.array([v.size for v in values], dtype=float) / all_v.size
    means = np.array([v.mean() for v in values])
    grand = float((weights * means).sum())
    between = float((weights * (means - grand) ** 2).sum())
    within = float((weights * np.array([v.var() for v in values])).sum())
    return grand, between, within, float(all_v.var())


def fisher_uncertainty(fisher: pd.DataFrame, by: Sequence[str] = (), n_resamples: int = 2000, seed: int = 0,
                       confidence: float = 0.95) -> pd.DataFrame:
    """Split the variance of each block's per-batch Fisher score by the law of total variance.

    ``fisher`` holds ``compute("fisher")`` rows of several seeds (columns ``seed, layer, per_batch``).
    Var(F) = E_seed[Var_batch(F | seed)] + Var_seed(E_batch[F | seed]): the within-seed, between-batch part
    (which data you sampled: aleatoric) and the between-seed part (which model you trained: epistemic).
    Population variances with every batch weighted equally, so the two parts add up to ``var_total``.
    ``share_ci_low``/``share_ci_high``: percentile bootstrap of the between-seed share, resampling seeds and,
    within each, batches (``n_resamples = 0`` skips it).
    """
    need = {"seed", "layer", "per_batch"}
    if not need <= set(fisher.columns):
        raise ImportanceError(f"fisher_uncertainty needs columns {sorted(need)} (rows of compute('fisher')); "
                              f"got {list(fisher.columns)}.")
    rng = np.random.default_rng(seed)
    alpha = (1 - confidence) / 2
    rows = []
    for key, g in fisher.groupby(list(by) + ["layer"], sort=True):
        if g["seed"].nunique() < 2:
            raise ImportanceError("fisher_uncertainty needs Fisher scores of >= 2 seeds to estimate the between-seed "
                                  f"part; {dict(zip(list(by) + ['layer'], np.atleast_1d(key), strict=False))} has one.")
        values = [np.asarray(v, dtype=float) for v in g["per_batch"]]
        grand, between, within, total = _variance_split(values)
        shares = []
        for _ in range(n_resamples):
            pick = rng.integers(0, len(values), len(values))
            res = [values[i][rng.integers(0, values[i].size, values[i].size)] for i in pick]
            _, b, _, t = _variance_split(res)
            if t > 0:
                shares.append(b / t)
        low, high = np.quantile(shares, [alpha, 1 - alpha]) if shares else (np.nan, np.nan)
        rows.append({**dict(zip(list(by) + ["layer"], key if isinstance(key, tuple) else (key,), strict=True)),
                     "mean": grand, "var_total": total, "var_between_seed": between, "var_within_seed": within,
                     "share_between_seed": between / total if total > 0 else np.nan, "share_ci_low": float(low),
                     "share_ci_high": float(high), "n_seeds": len(values),
                     "n_batches": int(sum(v.size for v in values))})
    return pd.DataFrame(rows)


def entropy_vs_disagreement(entropy: Sequence[float], ids: Sequence[Any], ratings: pd.DataFrame,
                            n_resamples: int = 2000, seed: int = 0) -> dict[str, float]:
    """Spearman rho between per-example predictive entropy and the human raters' disagreement (their SD).

    ``ratings`` is ``data.load_ratings(...)`` (columns ``id, sd``); examples are matched by ``id``. Returns
    ``{rho, ci_low, ci_high, p, n}`` with a bootstrap CI over examples (``stats.spearman_ci``).
    """
    from . import stats

    if "id" not in ratings.columns or "sd" not in ratings.columns:
        raise ImportanceError("ratings needs columns 'id' and 'sd' (data.load_ratings).")
    left = pd.DataFrame({"id": list(ids), "entropy": np.asarray(entropy, dtype=float)})
    merged = left.merge(ratings[["id", "sd"]], on="id", how="inner")
    if len(merged) < 3:
        raise ImportanceError(f"only {len(merged)} examples matched the ratings by id; pass the test frame's ids.")
    rho, low, high, p = stats.spearman_ci(merged["entropy"], merged["sd"], n_resamples=n_resamples, seed=seed)
    return {"rho": rho, "ci_low": low, "ci_high": high, "p": p, "n": len(merged)}


# --------------------------------------------------------------------------------------------------
# Benchmarks (numbers for the chapter; scripts/bench_importance.py is the command-line front end)


def _timed(fn: Callable[[], Any], repeats: int) -> tuple[float, Any]:
    times, out = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - start)
    return float(np.median(times)), out


@torch.no_grad()
def naive_ablation(model: nn.Module, batches: Any) -> np.ndarray:
    """Single-block damage (d_loss per block) the naive way: one full forward for the full model and one
    per skipped block, every block run from the embeddings (the reference ``ablation`` must equal)."""
    task = task_of(model)
    prepared = prepare_batches(model, batches)
    model.eval()
    n_layers = layers.num_blocks(model)
    losses = []
    for skip in [set(), *({i} for i in range(n_layers))]:
        nll, units = [], []
        for batch in prepared:
            a, _, u = _example_scores(task, _head(model, layers.run_blocks(model, batch, skip=skip), batch), batch)
            nll.append(a.cpu().numpy())
            units.append(u.cpu().numpy())
        # aggregated exactly as ``damage`` does (float64 sums of per-example values), so scores can match bitwise
        losses.append(np.concatenate(nll).astype(np.float64).sum() / np.concatenate(units).astype(np.float64).sum())
    return np.asarray(losses[1:]) - losses[0]


def bench_ablation(model: nn.Module, batches: Any, repeats: int = 3) -> dict[str, Any]:
    """Single-block ablation from cached block inputs vs the naive L + 1 full forward passes.

    Both sides include the unablated pass (the trace on the cached side); ``cached_seconds_no_trace`` leaves
    the trace out (it is shared with block influence, angular distance and activation statistics). The two
    are timed alternately ``repeats`` times; per-repeat times and speed-ups are returned with their medians,
    and whether the damage scores are identical (max absolute difference).
    """
    prepared = prepare_batches(model, batches)
    n_layers = layers.num_blocks(model)
    naive_t, cached_t, damage_t, diffs = [], [], [], []
    for _ in range(repeats):
        start = time.perf_counter()
        naive = naive_ablation(model, prepared)
        naive_t.append(time.perf_counter() - start)
        start = time.perf_counter()
        tr = trace(model, prepared)
        mid = time.perf_counter()
        fast = damage(model, prepared, [{i} for i in range(n_layers)], trace=tr)["d_loss"].to_numpy()
        end = time.perf_counter()
        cached_t.append(end - start)
        damage_t.append(end - mid)
        diffs.append(float(np.abs(naive - fast).max()))
    speed = [n / c for n, c in zip(naive_t, cached_t, strict=True)]
    return {"n_blocks": n_layers, "n_examples": int(sum(b["input_ids"].shape[0] for b in prepared)),
            "naive_seconds": float(np.median(naive_t)), "cached_seconds": float(np.median(cached_t)),
            "cached_seconds_no_trace": float(np.median(damage_t)), "speedup": float(np.median(speed)),
            "speedups": speed, "speedups_no_trace": [n / d for n, d in zip(naive_t, damage_t, strict=True)],
            "naive_times": naive_t, "cached_times": cached_t, "max_abs_diff": max(diffs),
            "identical": max(diffs) == 0.0, "repeats": repeats}


def forward_backward_seconds(model: nn.Module, batches: Any, repeats: int = 3) -> float:
    """Median wall time of one ordinary forward + backward pass (parameter gradients) over ``batches``."""
    task = task_of(model)
    prepared = prepare_batches(model, batches)
    model.eval()

    def once() -> None:
        for batch in prepared:
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            nll, _, units = _example_scores(task, logits, batch)
            (nll.sum() / units.sum()).backward()
        model.zero_grad(set_to_none=True)

    return _timed(once, repeats)[0]


def bench_cheap_cost(model: nn.Module, batches: Any, methods: Sequence[str] = CHEAP_METHODS, repeats: int = 3,
                     seed: int = 0) -> dict[str, Any]:
    """Total wall time of ``methods`` (shared passes counted once) vs one forward + backward over the data.

    The reference and ``compute_all`` are timed alternately ``repeats`` times; per-repeat ratios are returned
    with the medians and the last repeat's per-method split.
    """
    prepared = prepare_batches(model, batches)
    reference, totals, per_method = [], [], None
    for _ in range(repeats):
        reference.append(forward_backward_seconds(model, prepared, 1))
        start = time.perf_counter()
        scores = compute_all(model, prepared, methods=methods, seed=seed)
        totals.append(time.perf_counter() - start)
        per_method = cost_table(scores)
    ratios = [t / r for t, r in zip(totals, reference, strict=True)]
    return {"methods": list(methods), "forward_backward_seconds": float(np.median(reference)),
            "methods_seconds": float(np.median(totals)), "ratio": float(np.median(ratios)), "ratios": ratios,
            "repeats": repeats, "per_method": per_method[["method", "seconds", "n_forward", "n_backward"]]
            .to_dict(orient="records")}
