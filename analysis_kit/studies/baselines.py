"""The baselines chapter as a study: how good are the uncut models, and against which references?

For each task (``amazon``, ``mr``) and seed (a seed fixes the 70/15/15 split, the initialisation and the
data order) the study fits the references (majority class, tuned bag-of-words, VADER with a threshold
tuned on train) and the fine-tuned pretrained models (MiniLM-L6 by default; MPNet-base and SmolLM2-135M
where asked), whose recipe is chosen on validation (:func:`analysis_kit.train.search_recipe`). It scores
every model on the whole test split and on seeded samples of the other snippet domains, and returns
accuracy and macro-F1 with hierarchical bootstrap intervals (seeds, then test examples), the paired
comparisons of each model with the references (paired hierarchical bootstrap, and McNemar pooled over
seeds), the recipe-search table, training costs, failed trainings, and whether predictive uncertainty
tracks human disagreement.

A training whose validation accuracy is within one point of the majority class is a failed training
(evidence protocol, rule 3): it is counted in ``failed_trainings/<model>/<task>`` and left out of every
other number; in the smoke profile (tiny random models, which often fail) it is counted but kept, so
the pipeline is still exercised.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import pandas as pd
from scipy.special import softmax
from scipy.stats import spearmanr

from .. import data, measure, references, stats, train
from ..device import progress
from ..errors import LayerwiseError
from ..report import fmt_ci
from . import Labels, Result, TaskParams

MODELS = ("minilm", "mpnet", "smollm2")
REFERENCES = ("majority", "bow", "vader")
LABELS = Labels({"minilm": "MiniLM-L6 (fine-tuned)", "mpnet": "MPNet-base (fine-tuned)",
          "smollm2": "SmolLM2-135M (fine-tuned)", "bow": "bag-of-words", "vader": "VADER",
          "majority": "majority class"})


@dataclass(frozen=True)
class Params(TaskParams):
    """The baselines chapter's parameters: the shared :class:`~analysis_kit.studies.TaskParams`, the models,
    the cross-domain sample size and the bag-of-words C grid (the notebook's parameters cell holds the
    same names and defaults)."""

    models: tuple[str, ...] = ("minilm",)
    cross_domain_n: int = 1000
    bow_c_grid: tuple[float, ...] = (0.3, 1.0, 3.0, 10.0, 30.0)

    def validate(self) -> None:
        """Fail before any training on settings the chapter cannot use."""
        super().validate(MODELS)
        multi = [t for t in self.tasks if self.task_spec(t).num_labels != 2]
        if multi:
            raise LayerwiseError(f"tasks {multi} have more than two labels; this chapter compares every model with "
                                 "VADER, which scores binary polarity, so give it a file with two labels.")


def _predictor(model, tokenizer):
    """Class probabilities of a fine-tuned classifier for a list of texts."""
    return lambda texts: softmax(train.predict(model, tokenizer, list(texts)), axis=1)


def _score(probs: np.ndarray, labels: np.ndarray) -> dict[str, np.ndarray]:
    """Per-example prediction, correctness and predictive entropy (nats) from class probabilities."""
    preds = probs.argmax(1)
    entropy = -(probs * np.log(np.clip(probs, 1e-12, 1))).sum(1)
    return {"pred": preds, "correct": preds == labels, "entropy": entropy}


def _transfer_sets(task: str, neutral_band: float, n: int) -> dict[str, pd.DataFrame]:
    """Seeded samples (``n`` each, 0 = all) of every snippet domain other than the task's, named as tasks."""
    out = {}
    for domain in data.DOMAINS:
        if domain == data.task_domain(task):
            continue
        df = data.load_snippets(domain, "polarity", neutral_band)
        out[data.domain_task(domain)] = data.subsample(df, n, seed=0) if n and n < len(df) else df
    return out


def _fit_models(params: Params, task_name: str, seed: int, splits: dict[str, pd.DataFrame], cost: list[dict],
                ) -> dict[str, tuple]:
    """Fit references and fine-tuned models for one (task, seed); record their costs; return predictors."""
    predictors = {}
    for name in REFERENCES:
        kw = {"c_grid": tuple(params.bow_c_grid)} if name == "bow" else {}
        t0 = time.perf_counter()
        ref = references.make_reference(name, **kw).fit(splits["train"], splits["val"])
        cost.append({"task": task_name, "seed": seed, "model": name, "train_seconds": time.perf_counter() - t0,
                     "steps": None, "examples_seen": len(splits["train"]), "parameters": None, "failed": False,
                     "val_accuracy": None, "val_majority": None, "chosen": str(ref.describe())})
        predictors[name] = (ref.predict_proba, False)
    task = params.task_spec(task_name)
    for name in params.models:
        model, tok, record = train.baseline(params.model_ref(name), seed, params.tiny, task=task, device=params.device)
        cfg = train.recipe(params.model_ref(name), task, params.tiny, params.device)
        cost.append({"task": task_name, "seed": seed, "model": name, "train_seconds": record["train_seconds"],
                     "steps": record["steps"], "examples_seen": record["steps"] * cfg.batch_size,
                     "parameters": measure.count_parameters(model), "failed": record["failed"],
                     "val_accuracy": record["val"].get("accuracy"), "val_majority": record.get("val_majority"),
                     "chosen": f"lr={cfg.lr:g}, best epoch by validation loss"})
        predictors[name] = (_predictor(model, tok), record["failed"])
    return predictors


def _examples(params: Params) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """Score every model on every (task, seed) test split and transfer sample.

    Returns the per-example table (task, seed, model, domain, id, label, pred, correct, entropy, failed),
    the cost table and the rater-spread table of the test snippets.
    """
    rows, cost, spread = [], [], []
    jobs = [(t, s) for t in params.tasks for s in params.seeds]
    bar = progress(total=len(jobs), desc="baselines: fit and score")
    for task_name in params.tasks:
        own = params.source(task_name) is not None  # your data file: no other domains, no rater spread
        transfer = {} if own else _transfer_sets(task_name, params.neutral_band, params.cross_domain_n)
        ratings = pd.Series(dtype=float) if own else data.load_ratings(data.task_domain(task_name)).set_index("id")["sd"]
        for seed in params.seeds:
            task = params.task_spec(task_name)
            splits = train.load_task(task, seed)
            sets = {task_name: splits["test"], **transfer}
            predictors = _fit_models(params, task_name, seed, splits, cost)
            for model, (predict, failed) in predictors.items():
                for domain, df in sets.items():
                    t0 = time.perf_counter()
                    scored = _score(predict(df["text"].tolist()), df["label"].to_numpy())
                    secs = time.perf_counter() - t0
                    rows.append(pd.DataFrame({"task": task_name, "seed": seed, "model": model, "domain": domain,
                                              "id": df["id"].to_numpy(), "label": df["label"].to_numpy(),
                                              "failed": failed, **scored}))
                    if domain == task_name:
                        cost.append({"task": task_name, "seed": seed, "model": model, "predict_seconds": secs,
                                     "predict_examples": len(df)})
            spread.append(pd.DataFrame({"task": task_name, "seed": seed, "id": splits["test"]["id"].to_numpy(),
                                        "rater_sd": splits["test"]["id"].map(ratings).to_numpy()}))
            bar.update(1)
    bar.close()
    cost = pd.DataFrame(cost)
    fits = cost[cost["train_seconds"].notna()].drop(columns=["predict_seconds", "predict_examples"])
    preds = cost[cost["predict_seconds"].notna()][["task", "seed", "model", "predict_seconds", "predict_examples"]]
    return pd.concat(rows, ignore_index=True), fits.merge(preds, on=["task", "seed", "model"]), \
        pd.concat(spread, ignore_index=True)


def _by_seed(frame: pd.DataFrame, column: str) -> list[np.ndarray]:
    """One array per seed (in seed order) of ``column``, rows ordered by example id."""
    return [g.sort_values("id")[column].to_numpy() for _, g in frame.groupby("seed", sort=True)]


def _usable(examples: pd.DataFrame, tiny: bool) -> pd.DataFrame:
    """Rows of successful trainings (all rows in the smoke profile, where failures are only counted)."""
    return examples if tiny else examples[~examples["failed"]]


def _accuracy_metrics(result: Result, examples: pd.DataFrame, params: Params) -> pd.DataFrame:
    """``accuracy/<model>/<task>`` and ``macro_f1/<model>/<task>`` (in-domain) and transfer accuracies."""
    rows = []
    kw = {"n_resamples": params.n_bootstrap}
    for (task, model, domain), sub in _usable(examples, params.tiny).groupby(["task", "model", "domain"]):
        if sub["seed"].nunique() < 2:
            result.notes.append(f"{model} on {task}→{domain}: fewer than two successful seeds, no interval.")
            continue
        acc = stats.accuracy_ci(_by_seed(sub, "correct"), **kw)
        f1 = stats.macro_f1_ci(_by_seed(sub, "label"), _by_seed(sub, "pred"), 2, **kw)
        key = f"{model}/{task}" if domain == task else f"{model}/{task}/on_{domain}"
        result.metrics[f"accuracy/{key}"] = acc
        result.metrics[f"macro_f1/{key}"] = f1
        rows += [{"task": task, "model": model, "domain": domain, "metric": m, **rec}
                 for m, rec in (("accuracy", acc), ("macro_f1", f1))]
    return pd.DataFrame(rows)


def _failed(result: Result, cost: pd.DataFrame, params: Params) -> pd.DataFrame:
    """``failed_trainings/<model>/<task>``: failed trainings out of the seeds, per fine-tuned model."""
    rows = []
    for (task, model), sub in cost[cost["model"].isin(params.models)].groupby(["task", "model"]):
        k, n = int(sub["failed"].sum()), len(sub)
        result.metrics[f"failed_trainings/{model}/{task}"] = {
            "mean": float(k), "ci_low": None, "ci_high": None, "n": n, "unit": "trainings",
            "method": f"count of trainings (of {n} seeds) whose validation accuracy is within "
                      f"{train.FAILED_MARGIN:.0%} of the majority class; no interval (a count)"}
        rows.append({"task": task, "model": model, "failed": k, "trainings": n,
                     "failed_seeds": ", ".join(str(s) for s in sub.loc[sub["failed"], "seed"]) or "none"})
    return pd.DataFrame(rows)


def _comparisons(result: Result, examples: pd.DataFrame, params: Params) -> pd.DataFrame:
    """Each fine-tuned model against each reference, and the references against the majority class.

    Two declared test families per task: the paired hierarchical bootstrap of the accuracy difference
    (seeds and test examples resampled together, so it includes training and test-set variance), and
    McNemar pooled over seeds (Cochran–Mantel–Haenszel with each pair a stratum: conditional on the
    trained models). Holm within each family.
    """
    families = {}
    for task in params.tasks:
        families[f"{task}: bootstrap"] = (f"{task}: is model A more accurate than B? Paired hierarchical bootstrap "
                                          "over seeds and test examples")
        families[f"{task}: mcnemar"] = (f"{task}: do A and B err on different examples, given the trained models? "
                                        "McNemar pooled over seeds")
    fam = stats.TestFamilies(families)
    pairs = [(m, r) for m in params.models for r in ("bow", "vader", "majority")]
    pairs += [("bow", "majority"), ("vader", "majority"), ("bow", "vader")]
    pairs += [(a, b) for i, a in enumerate(params.models) for b in params.models[i + 1:]]
    rows = []
    usable = _usable(examples, params.tiny)
    for task in params.tasks:
        own = usable[(usable["task"] == task) & (usable["domain"] == task)]
        for a, b in pairs:
            seeds = sorted(set(own.loc[own["model"] == a, "seed"]) & set(own.loc[own["model"] == b, "seed"]))
            if len(seeds) < 2:
                continue
            ca = _by_seed(own[(own["model"] == a) & own["seed"].isin(seeds)], "correct")
            cb = _by_seed(own[(own["model"] == b) & own["seed"].isin(seeds)], "correct")
            name = f"{task}: {LABELS[a]} vs {LABELS[b]}"
            diff = stats.paired_difference(ca, cb, name=f"{name} (paired bootstrap)", n_resamples=params.n_bootstrap)
            fam.add(f"{task}: bootstrap", diff["test"])
            fam.add(f"{task}: mcnemar", stats.stratified_mcnemar(ca, cb, name=f"{name} (McNemar over seeds)"))
            rows.append({"task": task, "a": a, "b": b, "seeds": len(seeds),
                         **{k: v for k, v in diff.items() if k != "test"}})
    tests = fam.results()
    result.tests.extend(tests)
    result.tables["tests"] = fam.table()
    result.tables["families"] = pd.DataFrame([{"family": k, "question": v} for k, v in families.items()])
    return pd.DataFrame(rows)


def _uncertainty(examples: pd.DataFrame, spread: pd.DataFrame, params: Params) -> pd.DataFrame:
    """Spearman ρ between predictive entropy and the raters' SD, hierarchical bootstrap over seeds × examples.

    VADER and the majority class are left out: the majority's entropy is constant and VADER's
    probabilities are a fixed squashing of its score, not a predictive distribution.
    """
    def rho(rows: np.ndarray) -> float:
        return float(spearmanr(rows[:, 0], rows[:, 1]).statistic) if np.ptp(rows[:, 0]) > 0 else 0.0

    out = []
    usable = _usable(examples, params.tiny)
    for (task, model), sub in usable[usable["domain"] == usable["task"]].groupby(["task", "model"]):
        if model in ("majority", "vader"):
            continue
        joined = sub.merge(spread, on=["task", "seed", "id"]).dropna(subset=["rater_sd"])
        if joined["seed"].nunique() < 2:
            continue
        groups = [g.sort_values("id")[["entropy", "rater_sd"]].to_numpy(float) for _, g in joined.groupby("seed")]
        rec = stats.hierarchical_bootstrap(groups, rho, n_resamples=min(2000, params.n_bootstrap),
                                           unit="Spearman rho", what="Spearman rho")
        out.append({"task": task, "model": model, **rec})
    return pd.DataFrame(out)


def _recipes(params: Params) -> pd.DataFrame:
    """The recipe-search tables of the fine-tuned models (read from the cache: the runs were trained above)."""
    tables = []
    for task_name in params.tasks:
        task = params.task_spec(task_name)
        for name in params.models:
            ref = params.model_ref(name)
            search = train.recipe_search(ref, params.tiny)
            if search is None:
                continue
            _, table = train.search_recipe(train.standard_spec(ref, params.tiny), task, search, params.device,
                                           allow_failed=params.tiny)
            tables.append(table.assign(task=task_name, model=name, seed=search.seed, max_steps=search.base.max_steps,
                                       batch_size=search.base.batch_size, patience=search.base.patience))
    return pd.concat(tables, ignore_index=True) if tables else pd.DataFrame()


def _presentation(result: Result, params: Params) -> None:
    """Reader-facing tables (model × task, transfer), glue values and the findings paragraph."""
    acc = result.tables["accuracy"]
    acc = acc.assign(label=acc["model"].map(LABELS), text=[fmt_ci(r) for r in acc.to_dict("records")])
    own = acc[(acc["domain"] == acc["task"])]
    result.tables["accuracy_table"] = own.pivot_table(index=["label", "metric"], columns="task", values="text",
                                                      aggfunc="first")
    transfer = acc[(acc["domain"] != acc["task"]) & (acc["metric"] == "accuracy")]
    result.tables["transfer_table"] = transfer.pivot_table(index=["task", "label"], columns="domain", values="text",
                                                           aggfunc="first")
    result.tables["transfer_long"] = transfer.assign(transfer=transfer["task"] + "→" + transfer["domain"])
    intervals = own[own["metric"] == "accuracy"][["task", "model", "ci_low", "ci_high", "mean"]]
    per_seed = result.tables["per_seed"]
    in_dom = per_seed[per_seed["domain"] == per_seed["task"]].merge(intervals, on=["task", "model"])
    result.tables["per_seed_in_domain"] = in_dom.assign(model=in_dom["model"].map(LABELS))
    cost = result.tables["cost"]
    result.tables["cost_summary"] = cost.groupby(["task", "model"], as_index=False).agg(
        seeds=("seed", "size"), train_seconds=("train_seconds", "mean"), examples_seen=("examples_seen", "mean"),
        predict_seconds=("predict_seconds", "mean"), predict_examples=("predict_examples", "first"),
        parameters=("parameters", "first"))
    glue = {f"acc_{r['model']}_{r['task']}": r["text"] for r in own[own["metric"] == "accuracy"].to_dict("records")}
    result.values["glue"] = glue
    result.values["findings"] = _findings(result, params)
    result.values["key_findings"] = _key_findings(result, params)


def _accuracies(m: dict, params: Params, task: str) -> list[str]:
    """``"<model> 88.9 % [86.3, 91.2]"`` for every model and reference scored on ``task``, models first."""
    return [f"{LABELS[k]} {fmt_ci(m[f'accuracy/{k}/{task}'])}"
            for k in (*params.models, "bow", "vader", "majority") if f"accuracy/{k}/{task}" in m]


def _failed_count(result: Result) -> str:
    """``"0 of 10"``: failed trainings out of all fine-tunes."""
    failed = result.tables["failed_trainings"]
    return (f"{int(failed['failed'].sum()) if len(failed) else 0} of "
            f"{int(failed['trainings'].sum()) if len(failed) else 0}")


def _findings(result: Result, params: Params) -> str:
    """The chapter's findings as Markdown, every number taken from the results just computed."""
    m = result.metrics
    lines = [f"- **{task}** test accuracy (hierarchical 95% CI): " + "; ".join(_accuracies(m, params, task)) + "."
             for task in params.tasks]
    comps = result.tables["comparisons"]
    for row in comps[comps["a"].isin(params.models)].to_dict("records"):
        test = next(t for t in result.tests if t.name.startswith(f"{row['task']}: {LABELS[row['a']]} vs "
                                                                   f"{LABELS[row['b']]} (paired"))
        verdict = {1: "interval above zero", -1: "interval below zero",
                   0: "interval includes zero: not distinguishable"}[stats.interval_side(row["ci_low"], row["ci_high"])]
        lines.append(f"- {row['task']}: {LABELS[row['a']]} − {LABELS[row['b']]} = {row['diff_points']:+.1f} points "
                     f"[{row['ci_low']:+.1f}, {row['ci_high']:+.1f}]; P(seed of A beats seed of B) = "
                     f"{row['prob_improvement']:.2f}; Holm p = {test.p_holm:.3g}: {verdict}.")
    lines.append(f"- Failed trainings: {_failed_count(result)} fine-tunes (validation accuracy within one point of "
                 "the majority class).")
    below = [f"{LABELS[r['model']]} trained on {r['task']} scores {fmt_ci(r)} on {r['domain']}"
             for r in result.tables["accuracy"].to_dict("records")
             if r["metric"] == "accuracy" and r["domain"] != r["task"] and r["model"] != "majority"
             and f"accuracy/majority/{r['task']}/on_{r['domain']}" in m
             and r["ci_high"] < m[f"accuracy/majority/{r['task']}/on_{r['domain']}"]["mean"]]
    if below:
        lines.append("- Below the majority class of the target domain (whole interval under it): "
                     + "; ".join(below) + ".")
    for task in params.tasks:
        key = f"accuracy/vader/{task}/on_tweets"
        if key in m:
            lines.append(f"- VADER with its threshold tuned on {task} scores {fmt_ci(m[key])} on the tweets, "
                         "the genre its lexicon was built on, against "
                         f"{fmt_ci(m[f'accuracy/vader/{task}'])} in domain.")
    unc = result.tables["uncertainty_vs_raters"]
    for row in unc.to_dict("records"):
        lines.append(f"- Uncertainty vs human disagreement, {LABELS[row['model']]} on {row['task']}: Spearman ρ "
                     f"{row['mean']:.2f} [{row['ci_low']:.2f}, {row['ci_high']:.2f}].")
    return "\n".join(lines)


def _key_findings(result: Result, params: Params) -> str:
    """Three to six bullets for the top of the chapter (the full list is :func:`_findings`)."""
    m = result.metrics
    lines = [f"- **{task}**, test accuracy: " + "; ".join(_accuracies(m, params, task)) + "." for task in params.tasks]
    comps = result.tables["comparisons"]
    best = comps[comps["a"].isin(params.models) & (comps["b"] == "bow")].to_dict("records")
    parts = []
    for r in best:
        diff = fmt_ci({"mean": r["diff_points"], "ci_low": r["ci_low"], "ci_high": r["ci_high"]}, scale=1, unit="",
                      sign=True)
        verdict = {1: "interval above zero", -1: "interval below zero",
                   0: "not distinguishable"}[stats.interval_side(r["ci_low"], r["ci_high"])]
        parts.append(f"{r['task']}, {LABELS[r['a']]} {diff} ({verdict})")
    if parts:
        lines.append("- The fine-tuned transformer against the strongest simple reference, bag-of-words (difference "
                     "in points, paired hierarchical interval): " + "; ".join(parts) + ".")
    lines.append(f"- Failed trainings (validation accuracy within one point of the majority class): "
                 f"{_failed_count(result)} fine-tunes; any would be left out.")
    tweets = [f"tuned on {task}: {fmt_ci(m[f'accuracy/vader/{task}/on_tweets'])} on tweets vs "
              f"{fmt_ci(m[f'accuracy/vader/{task}'])} in domain"
              for task in params.tasks if f"accuracy/vader/{task}/on_tweets" in m]
    if tweets:
        lines.append("- VADER is far stronger on the tweets its lexicon was built on than on reviews ("
                     + "; ".join(tweets) + "), so its transfer numbers are not a fair comparison.")
    return "\n".join(lines)


def run(params: Params) -> Result:
    """Run the chapter: fit, score, summarise and test; see the module docstring."""
    params.validate()
    result = Result()
    card = data.dataset_card(neutral_band=params.neutral_band)
    result.tables["dataset_card"] = card.assign(task=card["domain"].map(data.domain_task))
    result.values["n_after_band"] = dict(zip(card["domain"].map(data.domain_task), card["n_after_band"], strict=True))
    examples, cost, spread = _examples(params)
    result.tables["recipe_search"] = _recipes(params)
    result.tables["cost"] = cost
    result.tables["failed_trainings"] = _failed(result, cost, params)
    result.tables["accuracy"] = _accuracy_metrics(result, examples, params)
    result.tables["comparisons"] = _comparisons(result, examples, params)
    result.tables["uncertainty_vs_raters"] = _uncertainty(examples, spread, params)
    result.tables["per_seed"] = (_usable(examples, params.tiny)
                                 .groupby(["task", "seed", "model", "domain"], as_index=False)
                                 .agg(accuracy=("correct", "mean"), n=("correct", "size")))
    fits = cost[cost["model"].isin(params.models)]
    for (task, model), sub in fits.groupby(["task", "model"]):
        result.metrics[f"train_seconds/{model}/{task}"] = stats.summarize(
            sub["train_seconds"].to_numpy(), unit="s", over="seeds")
    _presentation(result, params)
    result.tables["train_seconds"] = cost[["task", "model", "seed", "train_seconds", "steps", "examples_seen",
                                           "failed"]]
    result.in_summary = ("recipe_search", "train_seconds", "failed_trainings")
    return result
