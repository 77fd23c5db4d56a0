"""The depth chapter as a study: how many blocks does the task need, under equal tuned budgets?

For each task and seed the study fine-tunes the *pretrained* model's first k blocks with a new head, for every
depth k in ``depths`` (MiniLM: 1 to 6, so k = 6 is the whole pretrained model), all on one schedule (the
compression chapter's: whole training split, ``epochs`` epochs, early stopping on validation loss) with the
learning rate chosen on validation *per depth* (a cut model may want another rate than the full one; the old
chapter gave the cut models 3.75x the full model's). These are the compression chapter's ``first_k`` arms, so
the two chapters share their cache. It reports:

- the **depth curve**: test accuracy per depth with hierarchical intervals (seeds, then test examples), and the
  retention against the full fine-tuned model of the baselines chapter;
- **tests** of every depth against the deepest on the same seeds (paired hierarchical bootstrap pooled over
  the (task, seed) units), Holm within the family;
- **equivalence** with a margin chosen by a power analysis: the smallest margin a two one-sided test (level
  ``alpha``) detects with power ``power`` when the true difference is zero, given the design's standard error
  of a paired difference (the median over depths): margin = (z_{1-alpha} + z_{(1+power)/2}) x SE. A depth is
  *equivalent* when its 90 % interval lies inside +-margin, *worse* when its 95 % interval lies below zero;
- **from-scratch depths** only behind a gate: a from-scratch BERT of ``scratch_depth`` blocks trained with its
  recipe must beat tuned bag-of-words on validation on every task, else the from-scratch curve is dropped and
  the gate's measured numbers say why;
- **latency** of each depth (batch 1 and 64), so accuracy sits beside cost.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import pandas as pd
from scipy.stats import norm

from .. import compress, layers, references, stats, train
from ..errors import LayerwiseError
from ..report import fmt_ci
from . import LatencyParams, Result, ScheduleParams
from . import compression as cp
from . import units as units_mod

MODELS = ("minilm",)


@dataclass(frozen=True)
class Params(ScheduleParams, LatencyParams):
    """The chapter's parameters: the shared :class:`~analysis_kit.studies.TaskParams`, the depths, the shared
    healing schedule (the same names and defaults as the compression chapter's, so the arms are shared), the
    power analysis and the from-scratch gate (the notebook's parameters cell holds the same names and
    defaults)."""

    models: tuple[str, ...] = ("minilm",)
    depths: tuple[int, ...] = (1, 2, 3, 4, 5, 6)
    lr_full: tuple[float, ...] = (1e-4, 3e-4)
    alpha: float = 0.05
    power: float = 0.8
    scratch_depth: int = 4

    def validate(self) -> None:
        """Fail before any model loads on settings the chapter cannot use."""
        super().validate(MODELS)
        if len(self.depths) < 2 or min(self.depths) < 1 or len(set(self.depths)) != len(self.depths):
            raise LayerwiseError(f"depths={list(self.depths)}: give at least two distinct depths >= 1.")
        if not 0 < self.alpha < 0.5 or not 0.5 <= self.power < 1:
            raise LayerwiseError(f"alpha={self.alpha}, power={self.power}: use 0 < alpha < 0.5 and 0.5 <= power < 1.")
        if self.scratch_depth < 1:
            raise LayerwiseError(f"scratch_depth={self.scratch_depth} must be >= 1.")
        self.arm_params().validate()

    def arm_params(self) -> cp.Params:
        """The compression chapter's parameters with this chapter's schedule: its ``healed_arm`` entries (the
        ``first_k`` recipe) are the same cache entries whenever the schedules agree."""
        return replace(cp.Params(), tiny=self.tiny, seeds=self.seeds, tasks=self.tasks, models=self.models, sources=self.sources,
                       neutral_band=self.neutral_band, mr_max_train=self.mr_max_train, device=self.device,
                       lr_full=self.lr_full, **self.schedule_fields(), recipes=("first_k", "finetune"), base_recipe="finetune",
                       latency_repeats=self.latency_repeats,
                       latency_batches=self.latency_batches, latency_seq_len=self.latency_seq_len)


def _depths(params: Params, n_blocks: int) -> list[int]:
    bad = [k for k in params.depths if k > n_blocks]
    if bad:
        raise LayerwiseError(f"depths {bad} exceed the model's {n_blocks} blocks; use depths up to {n_blocks}.")
    return sorted(params.depths)


def _lr_per_depth(params: Params, name: str, task: str) -> tuple[dict[int, float], pd.DataFrame]:
    """Each depth's learning rate, chosen on validation loss on ``lr_search_seed``'s split."""
    ap = params.arm_params()
    ctx = cp._context(ap, name, task, params.lr_search_seed)
    rows, majority = [], train.majority_share(ctx["splits"]["val"]["label"])
    for k in _depths(params, layers.num_blocks(ctx["teacher"])):
        for lr in params.lr_full:
            arm = cp.healed_arm(ap, name, task, params.lr_search_seed, tuple(range(k)), "first_k", lr, ctx)
            rows.append({"model": name, "task": task, "depth": k, "lr": lr,
                         "val_loss": float(arm["history"]["val_loss"].min()),
                         "val_accuracy": float(arm["val_correct"].mean()), "steps": arm["steps"],
                         "failed": train.failed_accuracy(float(arm["val_correct"].mean()), majority),
                         "seconds": arm["seconds"]})
    table = pd.DataFrame(rows)
    best = units_mod.choose_lowest_val_loss(table, "depth")
    return dict(zip(best["depth"], best["lr"], strict=True)), table


def _unit(params: Params, name: str, task: str, seed: int, lrs: dict[int, float]) -> dict[str, Any]:
    """Every depth of one (task, seed), plus the full fine-tuned model's test correctness."""
    ap = params.arm_params()
    ctx = cp._context(ap, name, task, seed)
    out: dict[str, Any] = {"model": name, "task": task, "seed": seed, "failed": ctx["failed"],
                           "excluded": ctx["failed"] and not params.tiny}
    if out["excluded"]:
        return out
    test = ctx["splits"]["test"]
    full = train.predict(ctx["teacher"], ctx["tok"], test["text"].tolist(), max_length=params.max_length,
                         device=params.device).argmax(1) == test["label"].to_numpy()
    arms = {k: cp.healed_arm(ap, name, task, seed, tuple(range(k)), "first_k", lrs[k], ctx) for k in lrs}
    return {**out, "full_test": full, "arms": arms}


def _margin(se_points: list[float], params: Params) -> float:
    """The equivalence margin (points) a two one-sided test at level ``alpha`` meets with probability ``power``
    when the true difference is zero: (z_{1-alpha} + z_{(1+power)/2}) x the design's SE (median over depths)."""
    usable = [s for s in se_points if s and np.isfinite(s)]
    if not usable:  # every paired difference is exactly zero: no spread to plan with
        return float("nan")
    return (norm.ppf(1 - params.alpha) + norm.ppf((1 + params.power) / 2)) * float(np.median(usable))


def _scratch_gate(params: Params) -> pd.DataFrame:
    """From-scratch BERT of ``scratch_depth`` blocks with its recipe against tuned bag-of-words, on validation,
    per task (seed ``lr_search_seed``): the from-scratch curve is shown only when it wins on every task."""
    rows = []
    for task_name in params.tasks:
        task = params.task_spec(task_name)
        spec = train.standard_spec("scratch", params.tiny, num_layers=params.scratch_depth)
        cfg = train.recipe("scratch", task, params.tiny, params.device)
        model, tok, record = train.get_trained(spec, task, cfg, params.lr_search_seed, params.device)
        splits = train.load_task(task, params.lr_search_seed)
        bow = references.make_reference("bow").fit(splits["train"], splits["val"])
        bow_val = float((bow.predict_proba(splits["val"]["text"].tolist()).argmax(1)
                         == splits["val"]["label"].to_numpy()).mean())
        rows.append({"task": task_name, "scratch_depth": params.scratch_depth,
                     "scratch_val_accuracy": float(record["val"]["accuracy"]), "bow_val_accuracy": bow_val,
                     "failed": bool(record["failed"]), "train_seconds": record["train_seconds"],
                     "passes": float(record["val"]["accuracy"]) > bow_val and not record["failed"]})
    return pd.DataFrame(rows)


def _summarise(result: Result, units: list[dict[str, Any]], params: Params) -> None:
    ok = [u for u in units if not u["excluded"]]
    fam = stats.TestFamilies({
        "depth_vs_deepest": "is a model of k blocks less accurate than the deepest one on the same seeds (paired "
                            "accuracy difference, pooled over the (task, seed) units)?"})
    curve, cmp_rows = [], []
    for name, mu in units_mod.groups(ok, "model", params.models):
        ks = sorted(mu[0]["arms"])
        deepest = ks[-1]
        for task, tu in units_mod.groups(mu, "task", params.tasks):
            for k in ks:
                acc = stats.accuracy_ci([u["arms"][k]["test_correct"] for u in tu], n_resamples=params.n_bootstrap)
                ret = stats.retention_ci([u["full_test"] for u in tu], [u["arms"][k]["test_correct"] for u in tu],
                                         n_resamples=params.n_bootstrap)
                result.metrics[f"depth/{name}/{task}/k{k}"] = acc
                result.metrics[f"depth_retention/{name}/{task}/k{k}"] = ret
                curve.append({"model": name, "task": task, "depth": k, "accuracy": acc["mean"],
                              "ci_low": acc["ci_low"], "ci_high": acc["ci_high"], "retention": ret["mean"],
                              "retention_ci_low": ret["ci_low"], "retention_ci_high": ret["ci_high"],
                              "lr": tu[0]["arms"][k]["lr"], "steps": float(np.mean([u["arms"][k]["steps"] for u in tu])),
                              "train_seconds": float(np.mean([u["arms"][k]["seconds"] for u in tu]))})
            result.metrics[f"accuracy/{name}/{task}/full"] = stats.accuracy_ci(
                [u["full_test"] for u in tu], n_resamples=params.n_bootstrap)
        for k in ks[:-1]:
            a = [u["arms"][k]["test_correct"] for u in mu]
            b = [u["arms"][deepest]["test_correct"] for u in mu]
            d95 = stats.paired_difference(a, b, name=f"{name}: {k} vs {deepest} blocks", n_resamples=params.n_bootstrap)
            d90 = stats.paired_difference(a, b, name=f"{name}: {k} vs {deepest} blocks (equivalence interval)",
                                          n_resamples=params.n_bootstrap, confidence=1 - 2 * params.alpha)
            fam.add("depth_vs_deepest", d95["test"])
            cmp_rows.append({"model": name, "depth": k, "deepest": deepest, "diff_points": d95["diff_points"],
                             "ci_low": d95["ci_low"], "ci_high": d95["ci_high"], "ci90_low": d90["ci_low"],
                             "ci90_high": d90["ci_high"], "se_points": d95["se_points"],
                             "mde_points": d95["mde_points"], "p_value": d95["p_value"], "min_p": d95["min_p"]})
    cmp = pd.DataFrame(cmp_rows)
    if len(cmp):
        margin = _margin(cmp["se_points"].tolist(), params)
        cmp["margin_points"] = margin
        cmp["verdict"] = np.where((cmp["ci90_low"] > -margin) & (cmp["ci90_high"] < margin), "equivalent",
                                  np.where(cmp["ci_high"] < 0, "worse", "undecided"))
        result.values["margin_points"] = margin
        for r in cmp.itertuples():
            result.metrics[f"depth_vs_deepest/{r.model}/k{r.depth}"] = {
                "mean": r.diff_points / 100, "ci_low": r.ci_low / 100, "ci_high": r.ci_high / 100, "n": len(ok),
                "unit": "fraction", "verdict": r.verdict, "margin": margin / 100,
                "method": "paired hierarchical bootstrap of the accuracy difference, pooled over (task, seed) "
                          "units; equivalence when the 90% interval lies inside +-margin (power analysis)"}
    result.tables["curve"] = pd.DataFrame(curve)
    result.tables["comparisons"] = cmp
    tests = fam.results()
    result.tests.extend(tests)
    result.tables["tests"] = fam.table()
    result.tables["families"] = fam.declared()


def _latency(result: Result, params: Params, units: list[dict[str, Any]]) -> None:
    """Latency of the first k blocks for every depth against the full model (compression's cost table)."""
    u = next((u for u in units if not u["excluded"]), None)
    if u is None:
        return
    teacher, tok, _ = train.baseline(params.model_ref(u["model"]), u["seed"], params.tiny, task=params.task_spec(u["task"]),
                                     device=params.device)
    cost = compress.cost_table(teacher, tok, sorted(u["arms"]), batch_sizes=params.latency_batches,
                               seq_len=params.latency_seq_len, repeats=params.latency_repeats, device=params.device)
    result.tables["cost"] = cost.assign(model=u["model"])
    for r in cost.itertuples():
        result.metrics[f"latency_speedup/{u['model']}/keep{r.n_kept}/b{r.batch_size}"] = {
            "mean": r.speedup, "ci_low": r.speedup_ci_low, "ci_high": r.speedup_ci_high,
            "n": params.latency_repeats, "unit": "x",
            "method": f"median latency of the full model / of the first {r.n_kept} blocks; 95% percentile bootstrap "
                      f"over {params.latency_repeats} interleaved repeats (batch {r.batch_size}, "
                      f"{params.latency_seq_len} tokens)"}


def _key_findings(result: Result, params: Params) -> str:
    """The chapter's answer in at most six bullets, every number with its interval."""
    m, bullets = result.metrics, []
    curve, cmp = result.tables["curve"], result.tables["comparisons"]
    for task in params.tasks:
        c = curve[curve["task"] == task]
        if len(c):
            parts = [f"{int(r.depth)}: {fmt_ci(m[f'depth/{r.model}/{task}/k{int(r.depth)}'])}" for r in c.itertuples()]
            bullets.append(f"**{task}: test accuracy by blocks kept** (pretrained first k blocks, fine-tuned) — "
                           + "; ".join(parts) + ".")
    if len(cmp):
        eq = cmp[cmp["verdict"] == "equivalent"]["depth"].tolist()
        worse = cmp[cmp["verdict"] == "worse"]["depth"].tolist()
        margin = result.values["margin_points"]
        said = f"margin ±{margin:.2f} points from the power analysis" if np.isfinite(margin) else \
            "no margin: every paired difference is exactly zero"
        bullets.append(f"**Against the deepest model** ({said}): equivalent at {', '.join(map(str, eq)) or 'no depth'}; worse at "
                       f"{', '.join(map(str, worse)) or 'no depth'}; the rest undecided.")
    gate = result.tables.get("scratch_gate")
    if gate is not None and len(gate):
        lines = "; ".join(f"{r.task}: {100 * r.scratch_val_accuracy:.1f} % vs {100 * r.bow_val_accuracy:.1f} %"
                          for r in gate.itertuples())
        verdict = "shown" if gate["passes"].all() else "left out of this chapter"
        bullets.append(f"**From scratch** ({params.scratch_depth} blocks, validation accuracy against bag-of-words: "
                       f"{lines}): the from-scratch depths are {verdict}.")
    return "\n".join(f"- {b}" for b in bullets[:6])


def run(params: Params) -> Result:
    """Run the chapter: tune, train every depth, summarise, test, time."""
    units_mod.start(params)
    result, started = Result(), time.time()
    units = units_mod.tuned_units(params, result, lambda m, t: _lr_per_depth(params, m, t),
                                  lambda m, t, s, lrs: _unit(params, m, t, s, lrs), "depth")
    _summarise(result, units, params)
    result.tables["scratch_gate"] = _scratch_gate(params)
    _latency(result, params, units)
    result.values["seconds"] = time.time() - started
    result.values["key_findings"] = _key_findings(result, params)
    result.in_summary = ("families", "curve", "comparisons", "scratch_gate", "lr_search")
    return result
