"""The QLoRA chapter as a study: does a 4-bit base with low-rank adapters keep full fine-tuning's accuracy?

For each task and seed the study starts from the *pretrained* model with a new head (seeded) and trains
low-rank adapters plus the head on the whole training split, with the base in full precision (``lora``) or
stored in 4-bit NF4 (``qlora``, Dettmers et al. 2023), at every rank in ``ranks``. Adapters are trained to
convergence: up to ``epochs`` epochs with validation ``evals_per_epoch`` times per epoch, early stopping on
validation loss and the best weights restored, with the learning rate chosen on validation *per method and
rank* on one seed (a rank-64 adapter and a rank-4 one need not share a rate). It reports:

- each adapter's test accuracy and its retention against the full fine-tuned model of the baselines chapter
  (hierarchical intervals: seeds, then test examples);
- ``accuracy/<model>/<task>/nf4_no_adapter``: the full fine-tuned model with its blocks quantized to NF4 and no
  adapter, the cost of 4-bit storage alone;
- the **rank sweep**: the rank with the best mean validation accuracy, and whether the largest rank is
  distinguishable from the next (a plateau) or the grid's edge won;
- the declared **tests**: QLoRA against LoRA at each rank, the best adapter of each method against full
  fine-tuning, and NF4 storage against the fp32 model (paired hierarchical bootstrap pooled over the (task,
  seed) units);
- **cost**: trainable parameters, weight bytes, peak training memory (the CUDA allocator's peak on a GPU, the
  torch CPU allocation trace on a CPU; the table says which) and time per optimizer step.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from .. import models, quantize, stats, train
from ..errors import LayerwiseError
from ..report import fmt_ci
from . import Result, ScheduleParams
from . import units as units_mod

MODELS = ("minilm",)


@dataclass(frozen=True)
class Params(ScheduleParams):
    """The chapter's parameters: the shared :class:`~analysis_kit.studies.TaskParams`, the adapters (methods,
    ranks, targets), the learning-rate grid, the schedule and the 4-bit storage (the notebook's parameters cell
    holds the same names and defaults)."""

    models: tuple[str, ...] = ("minilm",)
    methods: tuple[str, ...] = ("lora", "qlora")
    ranks: tuple[int, ...] = (4, 16, 64)
    targets: str = "all_linear"
    lrs: tuple[float, ...] = (3e-4, 1e-3)
    epochs: int = 4
    quant_type: str = "nf4"
    double_quant: bool = True
    compute_dtype: str = "float32"
    cost_batch_size: int = 32
    cost_seq_len: int = 64

    def validate(self) -> None:
        """Fail before any model loads on settings the chapter cannot use."""
        super().validate(MODELS)
        if not self.methods or any(m not in ("lora", "qlora") for m in self.methods):
            raise LayerwiseError(f"methods={list(self.methods)}: choose from lora, qlora.")
        if len(self.ranks) < 2 or min(self.ranks) < 1 or len(set(self.ranks)) != len(self.ranks):
            raise LayerwiseError(f"ranks={list(self.ranks)}: give at least two distinct ranks >= 1 (a sweep).")
        if not self.lrs or min(self.lrs) <= 0:
            raise LayerwiseError(f"lrs={list(self.lrs)}: give positive learning rates.")
        if self.lr_search_seed not in self.seeds:
            raise LayerwiseError(f"lr_search_seed={self.lr_search_seed} must be one of the seeds {list(self.seeds)}.")
        if self.epochs < 2 and not self.tiny:
            raise LayerwiseError(f"epochs={self.epochs}: adapters need at least 2 epochs over the training split to "
                                 "converge (evidence protocol, rule 4).")
        quantize.QuantConfig(self.quant_type, self.double_quant, self.compute_dtype)
        quantize.LoraSpec(rank=min(self.ranks), targets=self.targets)

    @property
    def qcfg(self) -> quantize.QuantConfig:
        return quantize.QuantConfig(self.quant_type, self.double_quant, self.compute_dtype)

    def spec(self, method: str, rank: int, lr: float, seed: int, n_train: int) -> quantize.RunSpec:
        """One adapter run: the shared schedule (validation ``evals_per_epoch`` times per epoch) at ``lr``."""
        return quantize.RunSpec(method, seed, quantize.LoraSpec(rank=rank, targets=self.targets), self.qcfg,
                                self.schedule(n_train, lr),
                                self.cost_batch_size, self.cost_seq_len)


def _adapter_run(params: Params, name: str, task_name: str, seed: int, method: str, rank: int,
                 lr: float) -> dict[str, Any]:
    """One cached adapter run on the pretrained model with a seeded new head."""
    task = params.task_spec(task_name)
    spec_m = train.standard_spec(params.model_ref(name), params.tiny)
    splits = train.load_task(task, seed)
    tok = models.load_tokenizer(spec_m)
    run = quantize.run(params.spec(method, rank, lr, seed, len(splits["train"])),
                       lambda: models.build_classifier(spec_m, task.num_labels, seed=seed), tok, splits,
                       {"model": name, "tiny": params.tiny, "task": task_name, "task_spec": str(task), "seed": seed,
                        "base": "pretrained, new head"}, params.device)
    return {**run, "lr": lr, "task": task_name, "model": name, "correct": np.asarray(run["correct"], bool)}


def _lr_search(params: Params, name: str, task: str) -> tuple[dict[tuple[str, int], float], pd.DataFrame]:
    """Each (method, rank)'s learning rate, chosen on validation loss on ``lr_search_seed``."""
    rows = []
    majority = train.majority_share(train.load_task(params.task_spec(task), params.lr_search_seed)["val"]["label"])
    for method in params.methods:
        for rank in params.ranks:
            for lr in params.lrs:
                r = _adapter_run(params, name, task, params.lr_search_seed, method, rank, lr)
                rows.append({"model": name, "task": task, "method": method, "rank": rank, "lr": lr,
                             "val_loss": r["val_loss"], "val_accuracy": r["val_accuracy"], "steps": r["steps"],
                             "failed": train.failed_accuracy(r["val_accuracy"], majority),
                             "train_seconds": r["train_seconds"]})
    table = pd.DataFrame(rows)
    best = units_mod.choose_lowest_val_loss(table, ["method", "rank"])
    return {(r.method, int(r.rank)): float(r.lr) for r in best.itertuples()}, table


def _references(params: Params, name: str, task_name: str, seed: int) -> dict[str, Any]:
    """The full fine-tuned model of the baselines chapter and the same model with NF4 blocks, no adapter."""
    task = params.task_spec(task_name)
    model, tok, record = train.baseline(params.model_ref(name), seed, params.tiny, task=task, device=params.device)
    test = train.load_task(task, seed)["test"]
    labels = test["label"].to_numpy()
    full = train.predict(model, tok, test["text"].tolist(), max_length=params.max_length, device=params.device)
    q = quantize.quantize(model, params.qcfg, params.device)
    nf4 = train.predict(q, tok, test["text"].tolist(), max_length=params.max_length, device=params.device)
    errors = quantize.per_block_error(quantize.weight_errors(model, q)).assign(model=name, task=task_name, seed=seed)
    return {"failed": bool(record["failed"]), "full": full.argmax(1) == labels, "nf4": nf4.argmax(1) == labels,
            "weight_errors": errors}


def _kernel_check(params: Params) -> pd.DataFrame:
    """Is the 4-bit matmul right on this machine? A ``Linear4bit`` with Gaussian weights against fp32, for input
    widths that are and are not multiples of the quantization block (bitsandbytes 0.49-0.50 gave wrong results
    on CPU for the latter), beside the NF4 round-trip error of the weights themselves."""
    rows = [quantize.matmul_check(w, 72, 64, params.qcfg, device=params.device) for w in (64, 96, 100, 384, 1536)]
    return pd.DataFrame(rows)


def _sweep(runs: pd.DataFrame, units: list[dict[str, Any]], params: Params, name: str, task: str,
           method: str) -> dict[str, Any]:
    """The rank with the best mean validation accuracy, and whether the largest rank beats the next one
    (paired interval): 'plateau' when the best rank is inside the grid or the last step is not
    distinguishable from zero; 'grid edge' when the largest rank wins and still improves."""
    d = runs[(runs["model"] == name) & (runs["task"] == task) & (runs["method"] == method)]
    val = d.groupby("rank")["val_accuracy"].mean()
    best = int(val.idxmax())
    ranks = sorted(params.ranks)
    tu = [u for u in units if u["task"] == task]
    step = stats.paired_difference([u["runs"][(method, ranks[-1])]["correct"] for u in tu],
                                   [u["runs"][(method, ranks[-2])]["correct"] for u in tu],
                                   name=f"{task} {method}: rank {ranks[-1]} vs {ranks[-2]}",
                                   n_resamples=params.n_bootstrap)
    edge = best == ranks[-1] and step["ci_low"] > 0
    return {"mean": float(best), "ci_low": None, "ci_high": None, "n": len(tu), "unit": "rank",
            "verdict": "grid edge" if edge else "plateau", "last_step_points": step["diff_points"],
            "last_step_ci": [step["ci_low"], step["ci_high"]],
            "method": "best rank by mean validation accuracy over seeds; the largest rank against the next on test "
                      "(paired hierarchical bootstrap, points)"}


def _summarise(result: Result, units: list[dict[str, Any]], params: Params) -> pd.DataFrame:
    ok = [u for u in units if not u["excluded"]]
    fam = stats.TestFamilies({
        "qlora_vs_lora": "does storing the base in 4 bits change the adapted model's accuracy at a given rank?",
        "adapters_vs_full": "is the best adapter of each method less accurate than full fine-tuning?",
        "nf4_storage": "does 4-bit storage alone (no adapter) change the fine-tuned model's accuracy?"})
    runs = pd.DataFrame([{k: v for k, v in r.items() if k not in ("correct", "history")}
                         for u in ok for r in u["runs"].values()])
    rows = []
    for name, mu in units_mod.groups(ok, "model", params.models):
        for task, tu in units_mod.groups(mu, "task", params.tasks):
            full = [u["full"] for u in tu]
            result.metrics[f"accuracy/{name}/{task}/full"] = stats.accuracy_ci(full, n_resamples=params.n_bootstrap)
            result.metrics[f"accuracy/{name}/{task}/nf4_no_adapter"] = stats.accuracy_ci(
                [u["nf4"] for u in tu], n_resamples=params.n_bootstrap)
            for method in params.methods:
                for rank in params.ranks:
                    c = [u["runs"][(method, rank)]["correct"] for u in tu]
                    acc = stats.accuracy_ci(c, n_resamples=params.n_bootstrap)
                    ret = stats.retention_ci(full, c, n_resamples=params.n_bootstrap)
                    result.metrics[f"accuracy/{name}/{task}/{method}_r{rank}"] = acc
                    result.metrics[f"retention/{name}/{task}/{method}_r{rank}"] = ret
                    rows.append({"model": name, "task": task, "method": method, "rank": rank,
                                 "accuracy": acc["mean"], "ci_low": acc["ci_low"], "ci_high": acc["ci_high"],
                                 "retention": ret["mean"], "retention_ci_low": ret["ci_low"],
                                 "retention_ci_high": ret["ci_high"]})
                result.metrics[f"rank_sweep/{name}/{task}/{method}"] = _sweep(runs, tu, params, name, task, method)
        for rank in params.ranks:
            if {"lora", "qlora"} <= set(params.methods):
                d = stats.paired_difference([u["runs"][("qlora", rank)]["correct"] for u in mu],
                                            [u["runs"][("lora", rank)]["correct"] for u in mu],
                                            name=f"{name} rank {rank}: qlora vs lora", n_resamples=params.n_bootstrap)
                fam.add("qlora_vs_lora", d["test"])
        for method in params.methods:
            best = {u["task"]: int(result.metrics[f"rank_sweep/{name}/{u['task']}/{method}"]["mean"]) for u in mu}
            d = stats.paired_difference([u["runs"][(method, best[u["task"]])]["correct"] for u in mu],
                                        [u["full"] for u in mu], name=f"{name}: best {method} vs full fine-tuning",
                                        n_resamples=params.n_bootstrap)
            fam.add("adapters_vs_full", d["test"])
        d = stats.paired_difference([u["nf4"] for u in mu], [u["full"] for u in mu],
                                    name=f"{name}: NF4 blocks, no adapter, vs fp32", n_resamples=params.n_bootstrap)
        fam.add("nf4_storage", d["test"])
    result.tables["accuracy"] = pd.DataFrame(rows)
    cost = runs.groupby(["model", "method", "rank"], as_index=False).agg(
        trainable_params=("trainable_params", "first"), weight_bytes=("weight_bytes", "first"),
        peak_train_bytes=("peak_train_bytes", "median"), memory_kind=("memory_kind", "first"),
        step_seconds=("step_seconds", "median"), train_seconds=("train_seconds", "mean"), steps=("steps", "mean"))
    result.tables["cost"] = cost.assign(peak_train_mib=cost["peak_train_bytes"] / 2**20,
                                        weight_mib=cost["weight_bytes"] / 2**20)
    result.tests.extend(fam.results())
    result.tables["tests"] = fam.table()
    result.tables["families"] = fam.declared()
    return runs


def _key_findings(result: Result, params: Params) -> str:
    m, bullets = result.metrics, []
    for name in params.models:
        for task in params.tasks:
            full, nf4 = m.get(f"accuracy/{name}/{task}/full"), m.get(f"accuracy/{name}/{task}/nf4_no_adapter")
            if not full:
                continue
            parts = []
            for method in params.methods:
                sw = m[f"rank_sweep/{name}/{task}/{method}"]
                r = int(sw["mean"])
                parts.append(f"{method} at rank {r} ({sw['verdict']}) {fmt_ci(m[f'accuracy/{name}/{task}/{method}_r{r}'])}")
            bullets.append(f"**{task}**: full fine-tuning {fmt_ci(full)}; NF4 blocks with no adapter {fmt_ci(nf4)}; "
                           + "; ".join(parts) + ".")
    tests = result.tables.get("tests")
    if tests is not None and len(tests):
        for family in ("qlora_vs_lora", "adapters_vs_full"):
            t = tests[tests["family"] == family]
            if len(t):
                worst = t.loc[t["effect_size"].abs().idxmax()]
                bullets.append(f"**{family.replace('_', ' ')}**: {int((t['p_holm'] < 0.05).sum())} of {len(t)} "
                               f"differences reject after Holm; the largest, {worst['name'].split(': ', 1)[-1]}: "
                               f"{worst['effect_size']:+.1f} points [{worst['ci_low']:+.1f}, {worst['ci_high']:+.1f}].")
    cost = result.tables.get("cost")
    if cost is not None and len(cost):
        kind = cost["memory_kind"].iloc[0]
        lo, hi = cost["peak_train_mib"].min(), cost["peak_train_mib"].max()
        bullets.append(f"**Memory** ({kind}): peak training memory {lo:.0f}–{hi:.0f} MiB across methods and ranks.")
    return "\n".join(f"- {b}" for b in bullets[:6])


def _unit(params: Params, name: str, task: str, seed: int, lrs: dict[tuple[str, int], float]) -> dict[str, Any]:
    """The references and every adapter of one (model, task, seed)."""
    ref = _references(params, name, task, seed)
    unit = {"model": name, "task": task, "seed": seed, "failed": ref["failed"],
            "excluded": ref["failed"] and not params.tiny, "full": ref["full"], "nf4": ref["nf4"],
            "weight_errors": ref["weight_errors"]}
    if not unit["excluded"]:
        unit["runs"] = {(mth, r): _adapter_run(params, name, task, seed, mth, r, lrs[(mth, r)])
                        for mth in params.methods for r in params.ranks}
    return unit


def run(params: Params) -> Result:
    """Run the chapter: tune, train every adapter, quantize the references, summarise, test."""
    units_mod.start(params)
    result, started = Result(), time.time()
    units = units_mod.tuned_units(params, result, lambda m, t: _lr_search(params, m, t),
                                  lambda m, t, s, lrs: _unit(params, m, t, s, lrs), "qlora")
    _summarise(result, units, params)
    result.tables["kernel_check"] = _kernel_check(params)
    errors = pd.concat([u["weight_errors"] for u in units], ignore_index=True)
    result.tables["weight_errors"] = errors.groupby(["model", "task", "block"], as_index=False)["rel_error"].agg(
        rel_error="mean", rel_error_sd="std")
    result.values["seconds"] = time.time() - started
    result.values["key_findings"] = _key_findings(result, params)
    result.in_summary = ("families", "cost", "lr_search")
    return result
