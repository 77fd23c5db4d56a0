"""How deep does a transformer need to be? Depth grids, truncated pretrained models and equivalence tests.

The chapter ``multilayer_exploration`` trains from-scratch classifiers at many depths, fine-tunes pretrained
models cut to k blocks (the first k, or the k that matter most), measures truncated decoders by their
language-model loss, and asks two questions of the results: which depth is best, and which is the smallest
depth that is *as good* within a stated margin (TOST equivalence). This module holds what ``train``,
``measure``, ``stats`` and ``importance`` do not:

- :class:`TrainJob` names one trained model (spec, task, config, seed, and optionally the blocks of the
  pretrained model kept before fine-tuning); :func:`prepare_all` trains a grid of them through the cache,
  optionally in parallel worker processes. Small models on a few cores train faster as several one-thread
  processes than as one multi-thread process, whose matrices are too small to split well.
- :func:`measure_runs` / :func:`learning_curves`: test metrics and cost (parameters, latency at batch 1 and
  64, training time) per run, and the training histories, as tidy frames.
- :func:`omnibus`, :func:`best_group`, :func:`compare_to_best`: does depth matter, which depth is best
  (chosen on validation, tested on test), Holm-corrected paired tests against it, and the smallest depth
  whose TOST equivalence test against the best rejects non-equivalence.
- :func:`truncated_lm_nll`: per-text language-model loss of a decoder cut to a set of blocks.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from . import importance, layers, measure, models, stats, train
from .cache import atomic_write_json, cached_dir, cached_json
from .device import pick, seed_everything
from .errors import LayerwiseError
from .models import ModelSpec
from .stats import DegenerateDataError, TestResult
from .train import TaskSpec, TrainConfig

#: Bump when the code below changes what is cached (kept-block training, test metrics, ablation scores).
CODE_VERSION = 1


class DepthError(LayerwiseError):
    """Bad input to a depth experiment (inconsistent grid, missing seeds, bad block selection)."""


# --------------------------------------------------------------------------------------------------
# Trained models of a depth grid


def _check_keep(keep: Sequence[int]) -> tuple[int, ...]:
    out = tuple(int(i) for i in keep)
    if not out or list(out) != sorted(set(out)) or out[0] < 0:
        raise DepthError(f"keep={keep!r} must be distinct, increasing, non-negative block indices (at least one), "
                         "e.g. (0, 2, 5).")
    return out


@dataclass(frozen=True)
class TrainJob:
    """One fine-tuned classifier: ``spec`` trained on ``task`` with ``cfg`` and ``seed``.

    With ``keep`` (block indices, increasing) the model of ``spec`` is built first (pretrained weights and a
    fresh head) and cut to those blocks with ``layers.keep_blocks`` before fine-tuning; without it the job is
    exactly ``train.get_trained(spec, task, cfg, seed)`` and shares its cache entry with every chapter.
    """

    spec: ModelSpec
    task: TaskSpec
    cfg: TrainConfig
    seed: int
    keep: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        if self.keep is not None:
            object.__setattr__(self, "keep", _check_keep(self.keep))

    def run(self, device: str | torch.device = "auto") -> tuple[Any, Any, dict[str, Any]]:
        """``(model, tokenizer, record)``, trained on first use and loaded from the cache afterwards."""
        if self.keep is None:
            return train.get_trained(self.spec, self.task, self.cfg, self.seed, device)
        return fine_tune_kept(self.spec, self.keep, self.task, self.cfg, self.seed, device)


def fine_tune_kept(spec: ModelSpec, keep: Sequence[int], task: TaskSpec, cfg: TrainConfig, seed: int,
                   device: str | torch.device = "auto") -> tuple[Any, Any, dict[str, Any]]:
    """Build ``spec``'s classifier, keep only blocks ``keep``, fine-tune it, and cache the result.

    The record has the fields of ``train.get_trained``'s (history, train_seconds, device, val, n_train,
    steps) plus ``keep``. The head is initialised from ``seed`` exactly as in ``get_trained``, so a model
    cut to its first k blocks here and ``get_trained(ModelSpec(kind, num_layers=k))`` start from the same
    weights.
    """
    from transformers import AutoModelForSequenceClassification

    keep = list(_check_keep(keep))
    key = {"kind": "trained_kept", "model": asdict(spec), "keep": keep, "task": asdict(task), "train": asdict(cfg),
           "seed": seed, "code": train.TRAIN_CODE_VERSION, "depth_code": CODE_VERSION}
    tokenizer = models.load_tokenizer(spec)

    def build(folder: Path) -> None:
        splits = train.load_task(task, seed)
        seed_everything(seed)
        model = layers.keep_blocks(models.build_classifier(spec, task.num_labels, seed=seed), keep)
        start = time.time()
        model, hist = train.fine_tune(model, tokenizer, splits["train"], splits["val"], cfg, seed, device)
        secs = time.time() - start
        val = train.evaluate(model, tokenizer, splits["val"], max_length=cfg.max_length, device=device)
        model.cpu().save_pretrained(folder)
        tokenizer.save_pretrained(folder)
        atomic_write_json(folder / "record.json", {
            "history": hist.to_dict(orient="records"), "train_seconds": secs, "device": str(pick(device)),
            "val": {k: v for k, v in val.items() if isinstance(v, float)}, "n_train": len(splits["train"]),
            "steps": int(hist["step"].max()) if len(hist) else 0, "keep": keep})

    folder = cached_dir("trained_kept", key, build)
    model = AutoModelForSequenceClassification.from_pretrained(folder).eval()
    record = json.loads((folder / "record.json").read_text())
    record["folder"] = str(folder)
    return model, tokenizer, record


def job_test_metrics(job: TrainJob, device: str | torch.device = "auto") -> dict[str, float]:
    """Accuracy, macro-F1 and loss of ``job``'s model on its seed's test split (cached with the job)."""

    def compute() -> dict[str, float]:
        model, tok, _ = job.run(device)
        test = train.load_task(job.task, job.seed)["test"]
        res = train.evaluate(model, tok, test, max_length=job.cfg.max_length, device=device)
        return {"accuracy": res["accuracy"], "macro_f1": res["macro_f1"], "loss": res["loss"], "n": len(test)}

    return cached_json("depth_test_metrics", {"job": job, "code": CODE_VERSION}, compute)


@dataclass(frozen=True)
class AblationJob:
    """Block importance of ``job``'s fine-tuned model on its seed's ``split`` by ``importance.compute(method)``."""

    job: TrainJob
    method: str = "ablation"
    split: str = "val"
    batch_size: int = 64

    def scores(self, device: str | torch.device = "auto") -> pd.DataFrame:
        """One row per block: ``layer, score`` (higher = more important) and the method's own columns."""
        if self.split not in ("train", "val", "test"):
            raise DepthError(f"split={self.split!r} must be 'train', 'val' or 'test' (use 'val' to select blocks).")

        def compute() -> list[dict[str, Any]]:
            model, tok, _ = self.job.run(device)
            model.to(pick(device))
            df = train.load_task(self.job.task, self.job.seed)[self.split]
            from . import data

            batches = list(data.make_loader(tok, df["text"].tolist(), df["label"].to_numpy(), self.batch_size,
                                            max_length=self.job.cfg.max_length))
            return importance.compute(self.method, model, batches, seed=self.job.seed).to_dict(orient="records")

        key = {"ablation_of": self.job, "method": self.method, "split": self.split, "batch_size": self.batch_size,
               "code": CODE_VERSION}
        return pd.DataFrame(cached_json("depth_block_scores", key, compute))


def _prepare(item: TrainJob | AblationJob) -> Any:
    """Make sure ``item`` is in the cache (train and test-evaluate a job; score an ablation)."""
    if isinstance(item, AblationJob):
        return item.scores()
    _, _, record = item.run()
    job_test_metrics(item)
    return record["train_seconds"]


def _prepare_with_threads(item: TrainJob | AblationJob, threads: int) -> Any:
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        return _prepare(item)
    finally:
        torch.set_num_threads(before)


def prepare_all(items: Sequence[TrainJob | AblationJob], workers: int = 1, threads: int = 1) -> list[Any]:
    """Train/evaluate (or score) every item once, through the cache; returns each item's result in order.

    ``workers > 1`` runs the items in that many worker processes (joblib/loky), longest first if you list
    them so; ``workers == 1`` runs them here. Either way torch uses ``threads`` threads per process while
    training: the matrices of small models are too small to split across threads, and on a busy machine
    two spinning OpenMP threads per process made tiny-model training several times slower than one (20× the
    CPU time in one measurement while writing this module). Results land in the shared on-disk cache, so the caller then loads every
    model with ``job.run()`` at no cost. A model trained on one thread can differ in the last bits from one
    trained on two (summation order); whichever run fills the cache first is the one kept.
    """
    if workers < 1 or threads < 1:
        raise DepthError(f"workers={workers} and threads={threads} must be >= 1 (workers=1: train in this process).")
    bad = [type(i).__name__ for i in items if not isinstance(i, (TrainJob, AblationJob))]
    if bad:
        raise DepthError(f"prepare_all takes TrainJob/AblationJob items, got {sorted(set(bad))}.")
    if workers == 1 or len(items) <= 1:
        return [_prepare_with_threads(i, threads) for i in items]
    from joblib import Parallel, delayed

    return list(Parallel(n_jobs=workers, backend="loky")(delayed(_prepare_with_threads)(i, threads) for i in items))


def process_cpu_seconds() -> float:
    """CPU seconds used so far by this process and its descendants (worker processes included, living or reaped).

    The difference over a phase, divided by the number of cores, is what that phase would take on an
    otherwise idle machine: the honest budget figure when the machine running it is shared.
    """
    import psutil

    proc = psutil.Process()
    t = proc.cpu_times()
    total = t.user + t.system + t.children_user + t.children_system
    for child in proc.children(recursive=True):
        try:
            c = child.cpu_times()
        except psutil.NoSuchProcess:  # ended between listing and reading: its time is in children_* once reaped
            continue
        total += c.user + c.system
    return total


def keep_top(scores: pd.DataFrame, k: int) -> tuple[int, ...]:
    """The ``k`` blocks with the highest ``score`` (ties: the earlier block), in increasing order."""
    if "layer" not in scores or "score" not in scores:
        raise DepthError("scores needs columns 'layer' and 'score' (one row per block, e.g. importance.compute).")
    if scores["layer"].duplicated().any():
        raise DepthError("scores has several rows per layer (several seeds or methods?); pass one set of scores.")
    if not 1 <= k <= len(scores):
        raise DepthError(f"k={k} must lie in 1..{len(scores)} (the number of scored blocks).")
    from .strategies import top_k  # the one top-k rule every module shares

    return top_k(dict(zip(scores["layer"], scores["score"], strict=True)), k)


# --------------------------------------------------------------------------------------------------
# Measuring the runs


def _history_summary(history: list[dict[str, Any]]) -> dict[str, float]:
    hist = pd.DataFrame(history)
    if hist.empty:
        return {"epochs_run": 0.0, "best_epoch": float("nan"), "val_loss": float("nan")}
    best = hist.loc[hist["val_loss"].idxmin()]
    return {"epochs_run": float(hist["epoch"].max()), "best_epoch": float(best["epoch"]),
            "val_loss": float(best["val_loss"])}


def measure_runs(runs: Sequence[Mapping[str, Any]], seq_len: int = 32, repeats: int = 10,
                 device: str | torch.device = "auto") -> pd.DataFrame:
    """One row per run: its labels, test metrics, validation loss/accuracy at the kept step, cost.

    ``runs`` are mappings with a ``job`` (:class:`TrainJob`) and any label columns (e.g. ``family, depth,
    seed``). Cost columns: ``train_seconds`` (wall time of the fine-tuning on the device it was trained on),
    ``parameters`` (all), ``block_parameters`` (the transformer blocks only), ``latency_b1_ms`` and
    ``latency_b64_ms`` (median of ``repeats`` timed forward passes of a random batch of ``seq_len`` tokens,
    after warm-up, on ``device``). Run it when nothing else is training: latency is wall time.
    """
    if seq_len < 2 or repeats < 1:
        raise DepthError(f"seq_len={seq_len} must be >= 2 and repeats={repeats} >= 1.")
    rows = []
    for run in runs:
        job = run.get("job")
        if not isinstance(job, TrainJob):
            raise DepthError("every run needs a 'job' (TrainJob); build runs as dict(job=..., family=..., depth=...).")
        model, tok, record = job.run(device)
        lat = {b: measure.latency(model, measure.fixed_batch(tok, b, seq_len), repeats=repeats, warmup=2,
                                  device=device)["median_ms"] for b in (1, 64)}
        model.cpu()
        test = job_test_metrics(job, device)
        rows.append({**{k: v for k, v in run.items() if k != "job"},
                     "accuracy": test["accuracy"], "macro_f1": test["macro_f1"], "test_loss": test["loss"],
                     "val_accuracy": record["val"].get("accuracy", float("nan")),
                     **_history_summary(record["history"]),
                     "train_seconds": record["train_seconds"], "steps": record["steps"],
                     "parameters": measure.count_parameters(model),
                     "block_parameters": sum(p.numel() for p in layers.get_blocks(model).parameters()),
                     "latency_b1_ms": lat[1], "latency_b64_ms": lat[64],
                     "keep": "all" if job.keep is None else " ".join(map(str, job.keep))})
    return pd.DataFrame(rows)


def learning_curves(runs: Sequence[Mapping[str, Any]]) -> pd.DataFrame:
    """The training history of every run (step, epoch, train_loss, val_loss, val_accuracy, ...) with its labels."""
    frames = []
    for run in runs:
        _, _, record = run["job"].run()
        hist = pd.DataFrame(record["history"])
        for k, v in run.items():
            if k != "job":
                hist[k] = v
        frames.append(hist)
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


# --------------------------------------------------------------------------------------------------
# Does depth matter, which depth is best, which is the smallest as good?


def wide(runs: pd.DataFrame, metric: str, group: str = "depth") -> pd.DataFrame:
    """``metric`` as a seeds × groups table (paired by seed); every group must have every seed."""
    missing = {metric, group, "seed"} - set(runs.columns)
    if missing:
        raise DepthError(f"runs lacks columns {sorted(missing)}; pass measure_runs() output.")
    if runs.duplicated([group, "seed"]).any():
        raise DepthError(f"runs has several rows per ({group}, seed); filter to one model family first.")
    table = runs.pivot(index="seed", columns=group, values=metric).sort_index(axis=0).sort_index(axis=1)
    if table.isna().any().any():
        holes = [(s, g) for s in table.index for g in table.columns if pd.isna(table.loc[s, g])]
        raise DepthError(f"{metric} is missing for (seed, {group}) {holes[:5]}; paired tests need every {group} "
                         "trained with every seed.")
    return table


def omnibus(runs: pd.DataFrame, metric: str = "accuracy", group: str = "depth") -> tuple[list[TestResult], list[str]]:
    """Does ``group`` matter for ``metric``? One-way ANOVA over seeds, and Friedman's test with seeds as blocks
    (the seed fixes the split, so groups are paired; via ``stats.kendalls_w``). Holm-corrected as one family.

    Returns the tests and notes for tests that could not run (too few seeds/groups, zero spread).
    """
    table = wide(runs, metric, group)
    tests, notes = [], []
    if table.shape[1] < 2:
        return [], [f"only one {group}: nothing to compare."]
    try:
        tests.append(stats.anova_oneway(*[table[c].to_numpy() for c in table.columns],
                                        name=f"{metric} by {group}: one-way ANOVA over seeds"))
    except (DegenerateDataError, stats.StatsError) as exc:
        notes.append(f"one-way ANOVA not run: {exc}")
    try:
        tests.append(stats.kendalls_w(table.to_numpy(), name=f"{metric} by {group}: Friedman test, seeds as blocks"))
    except (DegenerateDataError, stats.StatsError) as exc:
        notes.append(f"Friedman test not run: {exc}")
    return (stats.holm_family(tests) if tests else []), notes


def best_group(runs: pd.DataFrame, by: str = "val_accuracy", group: str = "depth", higher: bool = True) -> Any:
    """The ``group`` value with the best mean ``by`` over seeds; ties go to the smaller (cheaper) value.

    Choose on validation (the default) and test on the test split, so that the choice of "best" does not
    inflate the comparisons made against it.
    """
    if by not in runs or group not in runs:
        raise DepthError(f"runs lacks {by!r} or {group!r}; pass measure_runs() output.")
    means = runs.groupby(group)[by].mean().sort_index()
    target = means.max() if higher else means.min()
    return means.index[np.isclose(means.to_numpy(), target, rtol=0, atol=1e-12)][0]


def _constant_diff(name: str, a: np.ndarray, b: np.ndarray, alternative: str, effect: str) -> TestResult:
    d = float((a - b).mean())
    return TestResult(name, 0.0, 1.0, 0.0, effect, int(a.size), alternative,
                      extras={"mean_diff": d, "note": f"every paired difference equals {d:.6g}; the statistic is "
                              "undefined (zero spread), p set to 1: not counted as evidence either way"})


def safe_paired_ttest(a: np.ndarray, b: np.ndarray, name: str) -> TestResult:
    """``stats.paired_ttest``, but constant non-zero differences give p = 1 with a note instead of an error."""
    try:
        return stats.paired_ttest(a, b, name=name)
    except DegenerateDataError:
        return _constant_diff(name, np.asarray(a, float), np.asarray(b, float), "two-sided", "Cohen's d_z")


def safe_tost(a: np.ndarray, b: np.ndarray, margin: float, name: str) -> TestResult:
    """``stats.tost_paired``, but constant differences give p = 1 with a note instead of an error (conservative:
    zero spread cannot be tested, so it is never reported as shown equivalence)."""
    try:
        return stats.tost_paired(a, b, margin, name=name)
    except DegenerateDataError:
        res = _constant_diff(name, np.asarray(a, float), np.asarray(b, float), "equivalence", "Cohen's d_z")
        res.extras["margin"] = float(margin)
        return res


def holm_or_empty(tests: list[TestResult]) -> list[TestResult]:
    """``stats.holm_family`` that accepts an empty family."""
    return stats.holm_family(tests) if tests else []


def compare_to_best(runs: pd.DataFrame, best: Any, metric: str = "accuracy", margin: float = 0.02,
                    group: str = "depth", alpha: float = 0.05) -> dict[str, Any]:
    """Every other ``group`` value against ``best`` on ``metric``, paired by seed.

    - ``difference``: paired t-tests of (other - best), Holm-corrected as one family;
    - ``equivalence``: TOST tests that |mean(other - best)| < ``margin``, Holm-corrected as one family;
    - ``smallest_equivalent``: the smallest value that is ``best`` itself or whose Holm-adjusted TOST
      p < ``alpha`` (equivalence shown);
    - ``table``: one row per value with mean difference, both p-values and the verdict.
    """
    if not (0 < alpha < 1) or not (margin > 0):
        raise DepthError(f"alpha={alpha} must lie in (0, 1) and margin={margin} be > 0 (in {metric}'s units).")
    table = wide(runs, metric, group)
    if best not in table.columns:
        raise DepthError(f"best={best!r} is not among the {group} values {list(table.columns)}.")
    others = [g for g in table.columns if g != best]
    ref = table[best].to_numpy()
    diff = holm_or_empty([safe_paired_ttest(table[g].to_numpy(), ref, f"{metric}: {group} {g} vs best {best} "
                                            "(paired t over seeds)") for g in others])
    equiv = holm_or_empty([safe_tost(table[g].to_numpy(), ref, margin, f"{metric}: {group} {g} within ±{margin:g} "
                                     f"of best {best} (TOST over seeds)") for g in others])
    rows = [{group: best, "mean": float(ref.mean()), "mean_diff": 0.0, "p_diff": np.nan, "p_diff_holm": np.nan,
             "p_equiv": np.nan, "p_equiv_holm": np.nan, "different": False, "equivalent": True, "is_best": True}]
    for g, d, e in zip(others, diff, equiv, strict=True):
        rows.append({group: g, "mean": float(table[g].mean()), "mean_diff": float((table[g].to_numpy() - ref).mean()),
                     "p_diff": d.p_value, "p_diff_holm": d.p_holm, "p_equiv": e.p_value, "p_equiv_holm": e.p_holm,
                     "different": bool(d.p_holm < alpha), "equivalent": bool(e.p_holm < alpha), "is_best": False})
    out = pd.DataFrame(rows).sort_values(group, ignore_index=True)
    return {"difference": diff, "equivalence": equiv, "table": out,
            "smallest_equivalent": out.loc[out["equivalent"], group].min()}


# --------------------------------------------------------------------------------------------------
# Truncated decoders: language-model loss per text


@torch.no_grad()
def lm_nll(model: Any, tokenizer: Any, texts: Sequence[str], batch_size: int = 8, max_length: int = 64,
           device: str | torch.device = "auto") -> tuple[np.ndarray, np.ndarray]:
    """Mean next-token negative log-likelihood (nats) of each text, and its number of predicted tokens.

    Texts are right-padded (``importance.lm_batches``); padding is never predicted or conditioned on. A text
    with fewer than two tokens has nothing to predict and is an error (drop it first).
    """
    dev = pick(device)
    model.eval().to(dev)
    nll, count = [], []
    for batch in importance.lm_batches(tokenizer, list(texts), batch_size, max_length):
        ids, mask = batch["input_ids"].to(dev), batch["attention_mask"].to(dev)
        logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1].float()
        tgt, valid = ids[:, 1:], mask[:, 1:].bool()
        if int(valid.sum(1).min()) < 1:
            raise DepthError("a text has fewer than 2 tokens (nothing to predict); drop very short texts.")
        tok = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), tgt.reshape(-1), reduction="none")
        tok = tok.view(tgt.shape) * valid
        nll.append((tok.sum(1) / valid.sum(1)).cpu().numpy())
        count.append(valid.sum(1).cpu().numpy())
    return np.concatenate(nll), np.concatenate(count)


def truncated_lm_nll(model: Any, tokenizer: Any, texts: Sequence[str], keeps: Mapping[tuple[str, int], Sequence[int]],
                     batch_size: int = 8, max_length: int = 64, device: str | torch.device = "auto") -> pd.DataFrame:
    """Per-text LM loss of ``model`` cut to each block set: one row per (selection, k, text).

    ``keeps`` maps ``(selection, k)`` (e.g. ``("first", 12)``) to the kept block indices. Each cut model is a
    real ``layers.keep_blocks`` copy (built, measured, dropped), so memory holds at most two models; a block
    set named by two selections (e.g. first and best at k = n) is measured once.
    Columns: ``selection, k, keep, text, nll, tokens, parameters``.
    """
    if not keeps:
        raise DepthError("keeps is empty; map (selection, k) to block indices, e.g. {('first', 2): [0, 1]}.")
    n = layers.num_blocks(model)
    for (selection, k), keep in keeps.items():
        if len(keep) != k:
            raise DepthError(f"keeps[{(selection, k)!r}] has {len(keep)} blocks, not k={k}.")
    done: dict[tuple[int, ...], tuple[np.ndarray, np.ndarray, int]] = {}  # a block set shared by two selections
    frames = []
    for (selection, k), keep in keeps.items():
        keep = tuple(int(i) for i in keep)
        if keep not in done:
            cut = model if keep == tuple(range(n)) else layers.keep_blocks(model, keep)
            done[keep] = (*lm_nll(cut, tokenizer, texts, batch_size, max_length, device), measure.count_parameters(cut))
            del cut
        nll, tokens, params = done[keep]
        frames.append(pd.DataFrame({"selection": selection, "k": k, "keep": " ".join(map(str, keep)),
                                    "text": np.arange(len(nll)), "nll": nll, "tokens": tokens, "parameters": params}))
    return pd.concat(frames, ignore_index=True)


def lm_scores(model: Any, tokenizer: Any, texts: Sequence[str], method: str = "block_influence", batch_size: int = 8,
              max_length: int = 64) -> pd.DataFrame:
    """Block importance of a decoder on the LM loss of ``texts`` (``importance.compute``; higher = keep)."""
    return importance.compute(method, model, importance.lm_batches(tokenizer, list(texts), batch_size, max_length))


def first_and_best(scores: pd.DataFrame, ks: Sequence[int]) -> dict[tuple[str, int], tuple[int, ...]]:
    """``{("first", k): 0..k-1, ("best", k): keep_top(scores, k)}`` for every k."""
    n = len(scores)
    bad = [k for k in ks if not 1 <= k <= n]
    if bad:
        raise DepthError(f"ks {bad} outside 1..{n} (the model has {n} blocks).")
    out: dict[tuple[str, int], tuple[int, ...]] = {}
    for k in sorted(set(ks)):
        out[("first", k)] = tuple(range(k))
        out[("best", k)] = keep_top(scores, k)
    return out


def scratch_spec(depth: int, hidden: int, heads: int, tiny: bool = False) -> ModelSpec:
    """The from-scratch BERT-style classifier of the depth sweep: ``depth`` blocks at fixed width."""
    return ModelSpec("scratch", num_layers=depth, hidden=hidden, heads=heads, tiny=tiny)
