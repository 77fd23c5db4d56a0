"""The theoretical_validation chapter as a study: do layer-importance scores predict what is safe to cut?

For each model, task and seed (a *unit*) the study scores every block with every registered importance method
on calibration data (training split), then measures the ground truth on held-out data: the damage (loss
increase, nats per prediction) of skipping each block and each set of k blocks the top-k check needs, on the
*whole* test split, per example, so every interval below includes the test set's sampling error. From those
per-example damages it derives:

- **reliability** of the ground truth: split-half correlation of the per-block damage profile (Pearson over
  blocks between two random halves of the test examples, Spearman-Brown corrected, mean over random splits).
  Below ``reliability_min`` the comparison is labelled "not measurable";
- **Spearman** rho between each method's scores and the per-block damage, with a hierarchical interval (seeds,
  then test examples) from :class:`analysis_kit.stats.OfMeans`;
- **regret**: the extra damage of each method's choice of the k least important blocks over the best k-set
  found by search (exhaustive for 6 blocks; a beam search beyond ``exhaustive_max`` candidate sets), averaged
  over k; ``drop_last`` (the last k blocks) and ``random`` (the mean of ``n_random`` random k-sets) sit in the
  same table;
- **tests** that can reject: Wilcoxon signed-rank over the pooled (task, seed) units of a model (10 units give
  a smallest two-sided p of 2/1024, below the Holm threshold of a family of up to 25 tests), or, for a model
  with one unit per task (the pretrained language model, whose only randomness is the text sample), the
  example-level bootstrap test;
- **cost**: each method's measured wall time over its physical minimum (forward or forward + backward passes it
  cannot avoid), and the cached-ablation benchmark against naive forwards;
- **memory** against calibration size: the peak memory of the trace-based scores on SmolLM2 (thirty blocks,
  where keeping every block boundary costs most) at growing calibration sets, under the trace's memory
  budget and with every boundary kept (the design before the budget).

Models: ``minilm`` (the fine-tuned MiniLM-L6 classifier of the baselines chapter, per task and seed; a failed
training is left out and counted) and ``smollm2`` (SmolLM2-135M as a language model on the task's sentences;
damage = increase of the mean next-token loss).
"""

from __future__ import annotations

import pickle
import platform
import time
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import pandas as pd
import torch
from scipy.stats import norm, rankdata

from .. import cache, data, importance, layers, models, stats, train
from ..cache import cached_dir
from ..device import pick
from ..errors import LayerwiseError
from ..models import ModelSpec
from ..report import fmt_ci
from . import Labels, Result, TaskParams
from . import units as units_mod

MODELS = ("minilm", "smollm2")
LABELS = Labels({"minilm": "MiniLM-L6 (fine-tuned classifier)", "smollm2": "SmolLM2-135M (language model)"})
#: The two references every method is compared with: the last k blocks, and k blocks drawn at random.
REFERENCES = ("drop_last", "random")
#: Physical minimum of each method in passes over its data: ("forward" | "forward_backward", count); None =
#: the block evaluations the method's algorithm has to run (counted by ``importance``), see ``_minimum``.
TRACE_METHODS = ("block_influence", "bi_shortgpt", "angular", "angular_gromov", "activation", "mutual_info")
#: Parameters a (model, task, seed) unit does not read: the lists that choose which units run, and the summary's
#: settings (intervals, tests, reliability, the benchmark), so changing them re-uses every cached unit.
SUMMARY_ONLY = ("models", "tasks", "seeds", "n_bootstrap", "reliability_min", "split_halves", "bench_repeats",
                "memory_sizes")
#: The methods the memory table runs: two that read every block boundary of the trace.
MEMORY_METHODS = ("block_influence", "activation")


@dataclass(frozen=True)
class Params(TaskParams):
    """The chapter's parameters: the shared :class:`~analysis_kit.studies.TaskParams`, then the models and
    methods, the calibration data, the two costly methods' settings, the ground truth's search and the
    reliability threshold (the notebook's parameters cell holds the same names and defaults)."""

    models: tuple[str, ...] = ("minilm",)
    methods: tuple[str, ...] = importance.METHODS
    calib_n: int = 256
    batch_size: int = 32
    max_length: int = 64
    expensive_n: int = 32
    conductance_steps: int = 32
    shap_permutations: int = 16
    n_random: int = 50
    exhaustive_max: int = 64
    beam_width: int = 2
    lm_calib_texts: int = 128
    lm_texts: int = 512
    lm_expensive_n: int = 4
    lm_conductance_steps: int = 64
    lm_ks: tuple[int, ...] = (1,)
    split_halves: int = 200
    reliability_min: float = 0.8
    bench_repeats: int = 5
    memory_sizes: tuple[int, ...] = (32, 64, 128, 256)
    torch_threads: int = 2
    n_bootstrap: int = 2_000  # each resample redraws every test example of every seed of every metric

    def is_lm(self, name: str) -> bool:
        """Whether model ``name`` is studied as a language model (SmolLM2, or your decoder folder) rather than
        as a fine-tuned classifier."""
        return train.is_decoder(self.model_ref(name))

    def validate(self) -> None:
        """Fail before any model loads on settings the chapter cannot use."""
        super().validate(MODELS)
        bad = [m for m in self.methods if m not in importance.available_methods()]
        if bad or not self.methods:
            raise LayerwiseError(f"methods={list(self.methods)}: choose from "
                                 f"{', '.join(importance.available_methods())}.")
        if (self.calib_n < 8 or self.expensive_n < 1 or self.lm_expensive_n < 1 or self.lm_calib_texts < 2
                or self.lm_texts < 8):
            raise LayerwiseError("calib_n >= 8, expensive_n >= 1, lm_expensive_n >= 1, lm_calib_texts >= 2 and "
                                 "lm_texts >= 8 are needed for any score or damage to be estimated.")
        if len(set(self.memory_sizes)) < 3 or min(self.memory_sizes) < 2:
            raise LayerwiseError(f"memory_sizes={list(self.memory_sizes)}: give at least three different sizes "
                                 ">= 2 texts, so the memory slope has an interval.")
        if self.conductance_steps < 2 or self.lm_conductance_steps < 2:
            raise LayerwiseError("conductance_steps and lm_conductance_steps must be >= 2 integration intervals.")
        if self.n_random < 20:
            raise LayerwiseError(f"n_random={self.n_random}: use at least 20 random k-sets per k as the chance "
                                 "reference.")
        if not 0 < self.reliability_min < 1:
            raise LayerwiseError(f"reliability_min={self.reliability_min} must lie in (0, 1), e.g. 0.8.")
        if self.split_halves < 20:
            raise LayerwiseError(f"split_halves={self.split_halves}: use at least 20 random half splits.")
        if not self.lm_ks or min(self.lm_ks) < 1 or 1 not in self.lm_ks:
            raise LayerwiseError(f"lm_ks={list(self.lm_ks)}: list the numbers of blocks dropped in the language "
                                 "model's top-k check, including 1 (the per-block damage).")
        if self.torch_threads < 0:
            raise LayerwiseError("torch_threads must be >= 0 (0 keeps torch's default).")


# ------------------------------------------------------------------------------------------------ one unit


def _classifier_batches(tok: Any, df: pd.DataFrame, params: Params) -> list[dict[str, torch.Tensor]]:
    return list(data.make_loader(tok, df["text"].tolist(), df["label"].to_numpy(), batch_size=params.batch_size,
                                 max_length=params.max_length))


def _load(params: Params, name: str, task_name: str, seed: int) -> dict[str, Any]:
    """The model and its calibration and evaluation batches for one unit (see the module docstring)."""
    task = params.task_spec(task_name)
    splits = train.load_task(task, seed)
    if not params.is_lm(name):
        model, tok, record = train.baseline(params.model_ref(name), seed, params.tiny, task=task, device=params.device)
        calib = data.subsample(splits["train"], min(params.calib_n, len(splits["train"])), seed)
        return {"model": model, "failed": bool(record["failed"]), "ks": None,
                "calib": _classifier_batches(tok, calib, params),
                "test": _classifier_batches(tok, splits["test"], params)}
    if params.source(name) is not None:  # your decoder folder, as a language model
        spec = train.standard_spec(params.model_ref(name), params.tiny)
    else:
        spec = ModelSpec("tiny_llama", num_layers=4, tiny=True) if params.tiny else ModelSpec("smollm2")
    model, tok = models.load_causal_lm(spec), models.load_tokenizer(spec)
    model.to(pick(params.device))
    calib = data.subsample(splits["train"], min(params.lm_calib_texts, len(splits["train"])), seed)
    pool = pd.concat([splits["val"], splits["test"]], ignore_index=True)
    held = data.subsample(pool, min(params.lm_texts, len(pool)), seed)
    # sorted by length so a batch holds texts of similar length: padding would double the cost of every pass
    batches = {k: importance.lm_batches(tok, sorted(df["text"].tolist(), key=len), batch_size=params.batch_size,
                                        max_length=params.max_length) for k, df in (("calib", calib), ("test", held))}
    return {"model": model, "failed": False, "ks": tuple(params.lm_ks), **batches}


def _choices(scores: pd.DataFrame, runs: pd.DataFrame, n_layers: int, ks: list[int], n_random: int,
             seed: int) -> pd.DataFrame:
    """Every method's k-set to drop per k (its k lowest scores; Gromov's best run of k consecutive blocks for
    ``angular_gromov``), the last k blocks (``drop_last``) and ``n_random`` random k-sets (``random``)."""
    rng = np.random.default_rng(seed)
    rows = []
    for k in ks:
        for method, drop in importance.choose(scores, k).items():
            if method == "angular_gromov" and k <= int(runs["n"].max()):
                drop = importance.best_run(runs, k)
            rows.append({"method": method, "k": k, "draw": 0, "drop": tuple(drop)})
        rows.append({"method": "drop_last", "k": k, "draw": 0, "drop": tuple(range(n_layers - k, n_layers))})
        for d in range(n_random):
            rows.append({"method": "random", "k": k, "draw": d,
                         "drop": tuple(sorted(rng.choice(n_layers, size=k, replace=False).tolist()))})
    return pd.DataFrame(rows)


def _unit(params: Params, name: str, task_name: str, seed: int) -> dict[str, Any]:
    """Scores, costs, per-example ground truth and every k-set choice of one (model, task, seed)."""
    loaded = _load(params, name, task_name, seed)
    model, cal_b, test_b = loaded["model"], loaded["calib"], loaded["test"]
    model.eval()
    n_layers = layers.num_blocks(model)
    ks = list(loaded["ks"] or range(1, n_layers // 2 + 1))
    ks = [k for k in ks if 1 <= k < n_layers]
    out: dict[str, Any] = {"model": name, "task": task_name, "seed": seed, "n_layers": n_layers,
                           "failed": loaded["failed"], "ks": ks, "excluded": loaded["failed"] and not params.tiny}
    if out["excluded"]:  # a failed training is counted, never measured (smoke: kept, so every step runs)
        return out
    lm = params.is_lm(name)
    few = params.lm_expensive_n if lm else params.expensive_n
    options = {"conductance": {"n_steps": params.lm_conductance_steps if lm else params.conductance_steps,
                               "max_examples": few},
               "shap": {"max_examples": few, "n_permutations": params.shap_permutations}}
    methods = list(params.methods)
    importance.warm_up_shap()
    cal_tr = importance.trace(model, cal_b)
    t_forward = importance.trace(model, cal_b).seconds  # the second pass: warm caches, like the methods'
    t_fb = importance.forward_backward_seconds(model, cal_b, repeats=1)
    scores = importance.compute_all(model, cal_b, methods=methods, seed=seed, trace=cal_tr,
                                    options={m: o for m, o in options.items() if m in methods})
    runs = importance.angular_runs(model, cal_b, trace=cal_tr, max_n=max(ks), token="read")
    del cal_tr
    gt, oracle = importance.beam_oracle(model, test_b, ks, width=params.beam_width,
                                        exhaustive_max=params.exhaustive_max)
    choices = _choices(scores, runs, n_layers, ks, params.n_random, seed)
    missing = [s for s in dict.fromkeys(choices["drop"]) if s not in gt.sets]
    if missing:
        extra = importance.per_example_damage(model, test_b, missing)
        gt = importance.PerExampleDamage(gt.sets + extra.sets, np.concatenate([gt.nll, extra.nll]),
                                         np.concatenate([gt.correct, extra.correct]), gt.full_nll, gt.full_correct,
                                         gt.units, gt.seconds + extra.seconds, gt.block_passes + extra.block_passes)
    singles = [(i,) for i in range(n_layers)]
    index = {s: j for j, s in enumerate(gt.sets)}
    return {**out, "scores": scores.drop(columns=["per_batch"], errors="ignore"),
            "cost": importance.cost_table(scores), "t_forward": t_forward, "t_forward_backward": t_fb,
            "calib_examples": int(sum(b["input_ids"].shape[0] for b in cal_b)),
            "sets": gt.sets, "dnll": (gt.nll - gt.full_nll[None, :]).astype(np.float32),
            "dcorrect": (gt.full_correct[None, :] - gt.correct).astype(np.float32), "units": gt.units,
            "single_rows": [index[s] for s in singles], "choices": choices.assign(row=choices["drop"].map(index)),
            "oracle": oracle.assign(row=oracle["drop"].map(index)), "full_loss": float(gt.full_nll.sum()
                                                                                      / gt.units.sum()),
            "full_accuracy": float(gt.full_correct.sum() / gt.units.sum()), "n_examples": int(gt.units.size),
            "n_tokens": int(gt.units.sum()) if lm else None, "gt_seconds": gt.seconds,
            "gt_block_passes": gt.block_passes}


def _cached_unit(params: Params, name: str, task: str, seed: int) -> dict[str, Any]:
    """``_unit`` stored on disk once complete, so an interrupted run keeps the units it finished. The key holds
    every parameter a unit reads, the code of the unit's functions and of :mod:`analysis_kit.importance` (their
    syntax trees without docstrings, ``cache.code_key``: a reworded docstring re-runs nothing), the fine-tuned
    model's cache folder (``train.baseline_folder``; none for a language model, read as it ships), and the
    hardware and thread count (the cost columns are timings, which belong to a machine)."""
    baseline = None if params.is_lm(name) else train.baseline_folder(params.model_ref(name), seed, params.tiny,
                                                                     params.task_spec(task), params.device)
    spec = {"kind": "importance_unit", "model": name, "task": task, "seed": seed, "baseline": baseline,
            "params": {k: v for k, v in asdict(params).items() if k not in SUMMARY_ONLY},
            "code": cache.code_key(_unit, _load, _choices, _classifier_batches, importance),
            "hardware": {"machine": platform.machine(), "processor": platform.processor(), "node": platform.node(),
                         "threads": torch.get_num_threads(), "device": str(pick(params.device))}}

    def build(folder) -> None:
        (folder / "unit.pkl").write_bytes(pickle.dumps(_unit(params, name, task, seed)))

    return pickle.loads((cached_dir("importance_unit", spec, build) / "unit.pkl").read_bytes())


# ------------------------------------------------------------------------------------------------ measures


def _spearman_rows(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Spearman rho between the last axes of ``x`` and ``y`` (broadcast over leading axes; ties averaged)."""
    rx, ry = rankdata(x, axis=-1), rankdata(np.broadcast_to(y, np.broadcast_shapes(x.shape, y.shape)), axis=-1)
    rx, ry = rx - rx.mean(-1, keepdims=True), ry - ry.mean(-1, keepdims=True)
    den = np.sqrt((rx**2).sum(-1) * (ry**2).sum(-1))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, (rx * ry).sum(-1) / np.where(den > 0, den, 1), 0.0)


def _split_half(dnll: np.ndarray, units: np.ndarray, n_splits: int, seed: int) -> np.ndarray:
    """Spearman-Brown corrected split-half reliabilities of a damage profile (one per random half split).

    ``dnll`` is (sets, examples); each split assigns half the examples to each side, computes every set's
    damage on both halves, correlates the two profiles over the sets (Pearson) and corrects to full length:
    2 r / (1 + r).
    """
    rng = np.random.default_rng(seed)
    n = dnll.shape[1]
    out = np.empty(n_splits)
    for i in range(n_splits):
        side = np.zeros(n, dtype=bool)
        side[rng.permutation(n)[: n // 2]] = True
        a = dnll[:, side].sum(1) / units[side].sum()
        b = dnll[:, ~side].sum(1) / units[~side].sum()
        r = float(np.corrcoef(a, b)[0, 1]) if a.std() > 0 and b.std() > 0 else 0.0
        out[i] = 2 * r / (1 + r) if r > -1 else -1.0
    return out


def _method_scores(unit: dict[str, Any], method: str, n_random: int) -> np.ndarray:
    """Scores per block (higher = more important): the method's, drop_last's implied order (earlier blocks
    matter more), or ``n_random`` random orders for ``random`` (shape (n_random, L))."""
    n_layers = unit["n_layers"]
    if method == "drop_last":
        return np.arange(n_layers, 0, -1, dtype=float)
    if method == "random":
        rng = np.random.default_rng(1000 + unit["seed"])
        return np.stack([rng.permutation(n_layers).astype(float) for _ in range(n_random)])
    g = unit["scores"][unit["scores"]["method"] == method].sort_values("layer")
    return g["score"].to_numpy(float)


def _spearman_groups(units: list[dict[str, Any]], method: str, n_random: int) -> list[np.ndarray]:
    """Per unit, rows [per-example damage of each single block ..., units, scores ...] for ``OfMeans``."""
    out = []
    for u in units:
        d = u["dnll"][u["single_rows"]].T.astype(float)  # (examples, L)
        s = _method_scores(u, method, n_random).reshape(-1)
        out.append(np.column_stack([d, u["units"], np.broadcast_to(s, (d.shape[0], s.size))]))
    return out


def _spearman_statistic(n_layers: int) -> stats.OfMeans:
    def fn(m: np.ndarray) -> np.ndarray:
        d = m[..., :n_layers]
        s = m[..., n_layers + 1:].reshape(*m.shape[:-1], -1, n_layers)
        return _spearman_rows(s, d[..., None, :]).mean(-1)

    return stats.OfMeans(fn)


def _weights(unit: dict[str, Any], method: str, minus: str | None = "oracle") -> np.ndarray:
    """Weights over the unit's evaluated sets such that weights @ damages = the method's mean damage over k
    minus the reference's (``oracle``: the best set found; another method's name; None: nothing)."""
    w = np.zeros(len(unit["sets"]))
    ks = unit["ks"]
    for name, sign in ((method, 1.0), (minus, -1.0)):
        if name is None:
            continue
        table = unit["oracle"] if name == "oracle" else unit["choices"][unit["choices"]["method"] == name]
        for k in ks:
            rows = table[table["k"] == k]["row"].to_numpy()
            np.add.at(w, rows, sign / (len(ks) * len(rows)))
    return w


def _regret_groups(units: list[dict[str, Any]], method: str, minus: str | None = "oracle") -> list[np.ndarray]:
    """Per unit, rows [weighted per-example damage, units]: their ratio of means is the regret (or a difference
    of regrets, when ``minus`` is another method)."""
    return [np.column_stack([_weights(u, method, minus) @ u["dnll"].astype(float), u["units"]]) for u in units]


RATIO = stats.OfMeans(lambda m: m[..., 0] / m[..., 1])


def _wilcoxon_mde(values: np.ndarray, alpha: float) -> float:
    """Smallest mean shift a two-sided Wilcoxon test at level ``alpha`` detects with 80 % power on n units with
    the observed spread (normal approximation, asymptotic relative efficiency 3/pi against the t-test)."""
    n = values.size
    sd = float(values.std(ddof=1)) if n > 1 else float("nan")
    return (norm.ppf(1 - alpha / 2) + norm.ppf(0.8)) * sd / np.sqrt(n) / np.sqrt(3 / np.pi)


# ------------------------------------------------------------------------------------------------ summary


def _families(params: Params) -> stats.TestFamilies:
    """The chapter's test families, declared before any result (one per model and question)."""
    fam = {}
    for m in params.models:
        fam[f"{m}_tracks_damage"] = (f"{LABELS[m]}: does the method's ranking of blocks correlate with the measured "
                                     "damage of skipping them (Spearman rho = 0)?")
        fam[f"{m}_vs_random"] = (f"{LABELS[m]}: does the method's k-set hurt less than k blocks drawn at random "
                                 "(regret difference = 0)?")
        fam[f"{m}_vs_drop_last"] = (f"{LABELS[m]}: does the method's k-set hurt less than dropping the last k "
                                    "blocks (regret difference = 0)?")
    return stats.TestFamilies(fam)


def _usable(units: list[dict[str, Any]], name: str, task: str | None = None) -> list[dict[str, Any]]:
    """The measured units of model ``name`` (and ``task``): failed trainings are left out (rule 3)."""
    return [u for u in units if u["model"] == name and not u["excluded"] and (task is None or u["task"] == task)]


def _summarise(result: Result, units: list[dict[str, Any]], params: Params) -> None:
    """Reliability, Spearman, regret and their tests for every model and task."""
    fam = _families(params)
    methods = list(params.methods)
    rel_rows, rho_rows, regret_rows = [], [], []
    for name in params.models:
        for task in params.tasks:
            group = _usable(units, name, task)
            if not group:
                continue
            n_layers = group[0]["n_layers"]
            halves = [(_split_half(u["dnll"][u["single_rows"]], u["units"], params.split_halves, u["seed"]),
                       _split_half(u["dnll"], u["units"], params.split_halves, u["seed"])) for u in group]
            single = np.array([h[0].mean() for h in halves])
            sets = np.array([h[1].mean() for h in halves])
            rec = (stats.summarize(single, unit="", over="seeds") if len(group) > 1 else
                   {"mean": float(single[0]), "ci_low": float(np.quantile(halves[0][0], 0.025)),
                    "ci_high": float(np.quantile(halves[0][0], 0.975)), "n": 1, "unit": "",
                    "method": f"one unit: 2.5-97.5 % range over {params.split_halves} random half splits"})
            rec["method"] = "split-half reliability of the per-block damage (Spearman-Brown); " + rec["method"]
            result.metrics[f"reliability/{name}/{task}"] = rec
            measurable = rec["mean"] >= params.reliability_min
            rel_rows.append({"model": name, "task": task, "reliability": rec["mean"], "ci_low": rec["ci_low"],
                             "ci_high": rec["ci_high"], "reliability_sets": float(sets.mean()),
                             "n_units": len(group), "n_examples": group[0]["n_examples"],
                             "n_tokens": group[0]["n_tokens"], "measurable": measurable,
                             "failed_trainings": sum(u["failed"] for u in units
                                                     if u["model"] == name and u["task"] == task)})
            for method in [*methods, *REFERENCES]:
                rho = stats.hierarchical_bootstrap(_spearman_groups(group, method, params.n_random),
                                                   _spearman_statistic(n_layers), n_resamples=params.n_bootstrap,
                                                   unit="rho", what="Spearman rho of scores vs per-block damage")
                result.metrics[f"spearman/{name}/{task}/{method}"] = rho
                reg = stats.hierarchical_bootstrap(_regret_groups(group, method), RATIO,
                                                   n_resamples=params.n_bootstrap, unit="nats",
                                                   what="regret: damage of the method's k-set minus the best "
                                                        "k-set's, mean over k")
                result.metrics[f"regret/{name}/{task}/{method}"] = reg
                rho_rows.append({"model": name, "task": task, "method": method, "rho": rho["mean"],
                                 "ci_low": rho["ci_low"], "ci_high": rho["ci_high"], "measurable": measurable})
                regret_rows.append({"model": name, "task": task, "method": method, "regret": reg["mean"],
                                    "ci_low": reg["ci_low"], "ci_high": reg["ci_high"], "measurable": measurable})
        _tests(fam, units, name, params)
    result.tables["reliability"] = pd.DataFrame(rel_rows)
    result.tables["spearman"] = pd.DataFrame(rho_rows)
    result.tables["regret"] = pd.DataFrame(regret_rows)
    result.tables["tests"] = fam.table()
    result.tests = fam.results()
    result.tables["families"] = fam.declared()


def _unit_values(group: list[dict[str, Any]], method: str, what: str, params: Params) -> np.ndarray:
    """Per unit: Spearman rho (``rho``) or the regret difference to a reference (``vs_<reference>``)."""
    vals = []
    for u in group:
        if what == "rho":
            vals.append(float(_spearman_statistic(u["n_layers"])(_spearman_groups([u], method, params.n_random)[0])))
        else:
            vals.append(float(RATIO(_regret_groups([u], method, what.removeprefix("vs_"))[0])))
    return np.array(vals)


def _tests(fam: stats.TestFamilies, units: list[dict[str, Any]], name: str, params: Params) -> None:
    """File every test of model ``name``: Wilcoxon over pooled (task, seed) units where there are >= 5 units,
    else the example-level bootstrap test per task (the language model: one text sample per task)."""
    group = _usable(units, name)
    if not group:
        return
    methods = list(params.methods)
    plan = (("tracks_damage", "rho", [*methods, "drop_last"]),
            ("vs_random", "vs_random", [*methods, "drop_last"]),
            ("vs_drop_last", "vs_drop_last", methods))
    pooled = len(group) >= 5
    for family, what, members in plan:
        alpha = 0.05 / max(len(members) * (1 if pooled else len(params.tasks)), 1)
        for method in members:
            if pooled:
                vals = _unit_values(group, method, what, params)
                test = stats.wilcoxon(vals, np.zeros_like(vals), name=f"{name}: {method} {family} (pooled tasks)")
                test.extras.update(member=method, scope="pooled tasks", mean=float(vals.mean()), n_units=int(vals.size),
                                   mde=float(_wilcoxon_mde(vals, alpha)), statistic_of=what,
                                   min_p=stats.min_attainable_p(test))
                fam.add(f"{name}_{family}", test)
                continue
            for task in params.tasks:
                sub = [u for u in group if u["task"] == task]
                if not sub:
                    continue
                if what == "rho":
                    groups, statistic = _spearman_groups(sub, method, params.n_random), _spearman_statistic(
                        sub[0]["n_layers"])
                else:
                    groups, statistic = _regret_groups(sub, method, what.removeprefix("vs_")), RATIO
                rec, test = stats.bootstrap_test(groups, statistic, name=f"{name}: {method} {family} ({task})",
                                                 n_resamples=params.n_bootstrap, what=what)
                se = (rec["ci_high"] - rec["ci_low"]) / (2 * norm.ppf(0.975))
                test.extras.update(member=method, scope=task, mde=float((norm.ppf(1 - alpha / 2) + norm.ppf(0.8)) * se),
                                   statistic_of=what)
                fam.add(f"{name}_{family}", test)


def _cost(result: Result, units: list[dict[str, Any]], params: Params) -> None:
    """Each method's wall time against its physical minimum, per unit, summarised per model (geometric mean)."""
    rows = []
    for u in units:
        if u["excluded"]:
            continue
        cost = u["cost"]
        for _, r in cost[~cost["method"].str.startswith("shared")].iterrows():
            minimum, what = _minimum(u, r, params)
            rows.append({"model": u["model"], "task": u["task"], "seed": u["seed"], "method": r["method"],
                         "seconds": r["standalone_seconds"], "minimum_seconds": minimum, "minimum": what,
                         "ratio": r["standalone_seconds"] / minimum})
    table = pd.DataFrame(rows)
    result.tables["cost"] = table
    summary = []
    for (name, method), g in table.groupby(["model", "method"], sort=False):
        rec = stats.ratio_summary(g["ratio"].to_numpy(), over="units (task x seed)")
        result.metrics[f"cost_ratio/{name}/{method}"] = rec
        summary.append({"model": name, "method": method, "minimum": g["minimum"].iloc[0],
                        "seconds": g["seconds"].mean(), "ratio": rec["mean"], "ci_low": rec["ci_low"],
                        "ci_high": rec["ci_high"]})
    result.tables["cost_summary"] = pd.DataFrame(summary)


def _minimum(unit: dict[str, Any], row: pd.Series, params: Params) -> tuple[float, str]:
    """The physical minimum of one method's run, in seconds of this unit's measured passes, and its name."""
    method, n_layers = row["method"], unit["n_layers"]
    t_f, t_fb = unit["t_forward"], unit["t_forward_backward"]
    lm = params.is_lm(unit["model"])
    share = min(params.lm_expensive_n if lm else params.expensive_n, unit["calib_examples"]) / unit["calib_examples"]
    if method in ("fisher", "gradient"):
        return t_fb, "1 forward + backward"
    if method == "ablation":
        return t_f * (1 + (n_layers - 1) / 2), "1 forward + (L-1)/2 block passes"
    if method == "conductance":
        sc = unit["scores"]
        points = float(sc.loc[sc["method"] == "conductance", "n_points"].iloc[0])
        return t_fb * points * share, "1 forward + backward per path point (n_points) on its examples"
    if method == "shap":
        return t_f * max(float(row["n_forward"]) - 1, 1e-9), "the block passes its estimator evaluates"
    return t_f, "1 forward"


def _head_seconds(model: torch.nn.Module, batches: Any, repeats: int) -> float:
    """Median wall time of the head and the loss alone over ``batches``: one pass with every block skipped,
    read from a fresh trace each repeat (a trace memoises what it has evaluated)."""
    n_layers = layers.num_blocks(model)
    times = []
    for _ in range(repeats):
        tr = importance.trace(model, batches)
        start = time.perf_counter()
        importance.damage(model, batches, [range(n_layers)], trace=tr)
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def _block_seconds(naive_seconds: float, head_seconds: float, n_blocks: int) -> float:
    """One block's time b in a naive run of L + 1 passes (the full model, then L models of L − 1 blocks: L² blocks
    and L + 1 heads) whose head takes ``head_seconds``: b = (naive − (L + 1) h) / L². Embedding look-ups and
    per-pass set-up fall into b."""
    n = n_blocks
    block = (naive_seconds - (n + 1) * head_seconds) / n**2
    if block <= 0:
        raise LayerwiseError(f"the head alone ({head_seconds:.3g} s) took longer than a naive run allows "
                             f"({naive_seconds:.3g} s for {n + 1} passes); time on an idle machine.")
    return block


def ablation_predicted(naive_seconds: float, head_seconds: float, n_blocks: int) -> float:
    """The speed-up that counting evaluations predicts for cached ablation over a naive run of ``naive_seconds``.

    The naive run evaluates L² blocks and L + 1 heads; cached ablation has to evaluate one full pass (the trace),
    the L(L − 1)/2 blocks after every skipped block and one head per skipped block. With the head's measured
    time h and the block time b (:func:`_block_seconds`), the prediction is naive / ((L + L(L − 1)/2) b +
    (L + 1) h): 2L/(L + 1) for a free head, less where the head costs several blocks (a language model's
    vocabulary projection). Exact ablation cannot do fewer evaluations; a measured speed-up a little above the
    prediction means the naive passes also paid per-pass costs that ``b`` spreads over the blocks.
    """
    n = n_blocks
    block = _block_seconds(naive_seconds, head_seconds, n)
    return naive_seconds / ((n + n * (n - 1) / 2) * block + (n + 1) * head_seconds)


def head_share(naive_seconds: float, head_seconds: float, n_blocks: int) -> float:
    """The head's share of one full pass, h / (L b + h), with b from :func:`_block_seconds` (the naive run's
    mean pass would be slightly short: L of its L + 1 passes run L − 1 blocks)."""
    return head_seconds / (n_blocks * _block_seconds(naive_seconds, head_seconds, n_blocks) + head_seconds)


#: The benchmark's models: name in the metrics, model, whether it runs as a language model, and how many amazon
#: sentences it reads (a 30-block model's naive ablation is 31 full passes: one batch is enough). SmolLM2 runs
#: both ways: its language-model head (49,152 × 576) costs several blocks per pass, which caching cannot avoid
#: (``ablation_predicted``); as a classifier its head is negligible.
BENCH_MODELS = (("minilm", "minilm", False, 64), ("mpnet", "mpnet", False, 64), ("smollm2", "smollm2", True, 8),
                ("smollm2_classifier", "smollm2", False, 32))


def _bench(result: Result, params: Params) -> None:
    """Cached single-block ablation against naive L + 1 forwards, at L = 6 (MiniLM), 12 (MPNet-base) and 30
    (SmolLM2 as a language model and as a classifier), on calibration-sized batches of amazon sentences
    (weights matter not for timing: the classifiers' heads are untrained), beside the speed-up that counting
    evaluations predicts from the head's measured time (``ablation_predicted``)."""
    task = params.task_spec(params.tasks[0])
    df = data.subsample(train.load_task(task, params.seeds[0])["train"], 64 if not params.tiny else 16, 0)
    rows = []
    for label, name, lm, n in BENCH_MODELS:
        if params.tiny and name != "minilm":
            continue
        if lm:
            spec = ModelSpec(name)
            model, tok = models.load_causal_lm(spec), models.load_tokenizer(spec)
            batches = importance.lm_batches(tok, df["text"].tolist()[:n], batch_size=params.batch_size,
                                            max_length=params.max_length)
        else:
            spec = train.standard_spec(name, params.tiny)
            model, tok = models.build_classifier(spec, 2, seed=0), models.load_tokenizer(spec)
            batches = _classifier_batches(tok, df.iloc[:n], params)
        model.eval()
        b = importance.bench_ablation(model, batches, repeats=params.bench_repeats)
        head = _head_seconds(model, batches, params.bench_repeats)
        rec = stats.ratio_summary(b["speedups"], over="alternating timing repeats")
        predicted = stats.ratio_summary([ablation_predicted(t, head, b["n_blocks"]) for t in b["naive_times"]],
                                        over="timing repeats")
        result.metrics[f"ablation_speedup/{label}"] = rec
        result.metrics[f"ablation_predicted/{label}"] = predicted
        rows.append({"model": label, "blocks": b["n_blocks"], "examples": b["n_examples"],
                     "naive_s": b["naive_seconds"], "cached_s": b["cached_seconds"], "speedup": rec["mean"],
                     "ci_low": rec["ci_low"], "ci_high": rec["ci_high"], "predicted": predicted["mean"],
                     "of_predicted": rec["mean"] / predicted["mean"], "head_share": head_share(b["naive_seconds"], head, b["n_blocks"]),
                     "max_abs_diff": b["max_abs_diff"]})
        del model
    result.tables["ablation_bench"] = pd.DataFrame(rows)


def _memory(result: Result, params: Params) -> None:
    """Peak memory of the trace-based scores against calibration size on SmolLM2 as a language model (tiny: a
    4-block LLaMA), under the trace's budget (``importance.TRACE_BUDGET_BYTES``) and with every boundary kept.

    Each point is one measurement (CUDA: the allocator's peak; CPU: the process's sampled RSS growth, see
    ``measure.peak_memory``) beside the bytes of hidden states the trace itself holds (exact); each slope (MiB
    per 100 texts) is a least-squares fit over the sizes with its 95 % t interval: ``memory_slope`` of the
    peak, ``held_slope`` of the trace's own memory when it keeps every boundary. Under the budget the trace's
    memory is not a line (it grows until the budget, then drops to the embedding outputs), so ``held_max``
    gives its largest value over the sizes instead. The budgeted runs go first, smallest first, so no
    measurement reuses pages a bigger one freed.
    """
    from .. import measure

    task = params.task_spec(params.tasks[0])
    texts = train.load_task(task, params.seeds[0])["train"]["text"].tolist()
    spec = ModelSpec("tiny_llama", num_layers=4, tiny=True) if params.tiny else ModelSpec("smollm2")
    model, tok = models.load_causal_lm(spec), models.load_tokenizer(spec)
    model.to(pick(params.device)).eval()
    name = "tiny_llama" if params.tiny else "smollm2"
    rows = []
    for mode, budget in (("budget", None), ("keep_all", 2**62)):
        for n in sorted(params.memory_sizes):
            batches = importance.prepare_batches(model, importance.lm_batches(
                tok, sorted(texts[:n], key=len), batch_size=params.batch_size, max_length=params.max_length))
            held = {}

            def work(batches: list = batches, budget: int | None = budget, held: dict = held) -> None:
                tr = importance.trace(model, batches, budget_bytes=budget)
                importance.compute_all(model, batches, MEMORY_METHODS, trace=tr)
                held.update(bytes=tr.held_bytes, complete=tr.complete, recomputed=tr.recomputed)

            start = time.perf_counter()
            mem = measure.peak_memory(work, device=params.device)
            rows.append({"model": name, "mode": mode, "texts": n, "peak_mib": mem["peak_mib"],
                         "held_mib": held["bytes"] / 2**20, "boundaries_kept": held["complete"],
                         "recomputed_passes": held["recomputed"] / n, "seconds": time.perf_counter() - start,
                         "memory_kind": mem["kind"]})
            result.metrics[f"peak_memory/{name}/{n}/{mode}"] = {
                "mean": mem["peak_mib"], "ci_low": None, "ci_high": None, "n": 1, "unit": "MiB",
                "method": f"one measurement ({mem['kind']}) of trace + {', '.join(MEMORY_METHODS)}"}
    table = pd.DataFrame(rows)
    slopes = []
    budgeted = table[table["mode"] == "budget"]
    result.metrics[f"held_max/{name}/budget"] = {
        "mean": float(budgeted["held_mib"].max()), "ci_low": None, "ci_high": None, "n": len(budgeted),
        "unit": "MiB", "method": f"largest hidden-state memory of the trace over the sizes (exact bytes); the "
                                 f"budget is {importance.TRACE_BUDGET_BYTES / 2**20:g} MiB"}
    for mode, part in table.groupby("mode", sort=False):
        for metric, column, what in (("memory_slope", "peak_mib", "peak memory growth"),
                                     ("held_slope", "held_mib", "hidden states the trace holds")):
            if metric == "held_slope" and mode == "budget":
                continue  # not a line: see held_max
            fit = stats.slope_interval(part["texts"].to_numpy(float) / 100, part[column].to_numpy(float))
            result.metrics[f"{metric}/{name}/{mode}"] = {**fit, "unit": "MiB per 100 texts",
                                                          "method": f"least-squares slope of {what}, 95 % t interval"}
            slopes.append({"model": name, "mode": mode, "measure": what, "mib_per_100_texts": fit["mean"],
                           "ci_low": fit["ci_low"], "ci_high": fit["ci_high"], "sizes": fit["n"]})
    result.tables["memory"] = table
    result.tables["memory_slope"] = pd.DataFrame(slopes)


def _convergence(result: Result, units: list[dict[str, Any]]) -> None:
    """The completeness gap of conductance (per unit, mean over blocks and examples) and SHAP's efficiency."""
    rows = []
    for u in units:
        if u["excluded"]:
            continue
        sc = u["scores"]
        c = sc[sc["method"] == "conductance"]
        if len(c):
            rows.append({"model": u["model"], "task": u["task"], "seed": u["seed"], "method": "conductance",
                         "gap": float(c["gap"].mean()), "gap_max": float(c["gap_max"].max()),
                         "gap_uniform": float(c["gap_uniform"].mean()), "n_points": float(c["n_points"].iloc[0]),
                         "setting": f"{int(c['n_steps'].iloc[0])} steps, {c['quadrature'].iloc[0]} to "
                                    f"{c['n_points'].iloc[0]:.0f} points on average, "
                                    f"{int(c['n_examples'].iloc[0])} examples"})
        s = sc[sc["method"] == "shap"]
        if len(s):
            span = float(s["v_all"].iloc[0] - s["v_none"].iloc[0])
            gap = abs(float(s["score"].sum()) - span) / max(abs(span), 1e-12)
            rows.append({"model": u["model"], "task": u["task"], "seed": u["seed"], "method": "shap", "gap": gap,
                         "gap_max": gap, "setting": str(s["estimator"].iloc[0])})
    table = pd.DataFrame(rows)
    result.tables["convergence"] = table
    for (name, method), g in table.groupby(["model", "method"]) if len(table) else []:
        result.metrics[f"completeness_gap/{name}/{method}"] = {
            "mean": float(g["gap"].mean()), "ci_low": float(g["gap"].min()), "ci_high": float(g["gap"].max()),
            "n": len(g), "unit": "fraction", "method": "mean over units; the interval is the range over units"}


def _ci(rec: dict[str, Any], digits: int = 2) -> str:
    """``0.83 [0.71, 0.90]``: a record's mean and interval (rho, nats and ratios have no percent scale)."""
    return fmt_ci(rec, scale=1, unit="", digits=digits)


def _beats(tests: pd.DataFrame, family: str, reference: str) -> str:
    """The key-findings clause "N methods pick less damaging blocks than <reference> (...)" after Holm; for a
    model tested per task, the methods that win on every task, then those that win on some tasks only, each
    named with its tasks (``stats.wins`` keeps the tasks apart)."""
    won = stats.wins(tests, family) if not tests.empty else {}
    if list(won) == ["pooled tasks"]:
        every, some = won["pooled tasks"], {}
    else:
        every = [m for m in dict.fromkeys(m for ms in won.values() for m in ms) if all(m in ms for ms in won.values())]
        some = {m: [sc for sc, ms in won.items() if m in ms] for ms in won.values() for m in ms if m not in every}
    verb = "method picks" if len(every) == 1 else "methods pick"
    text = f"{len(every)} {verb} less damaging blocks than {reference} ({', '.join(every) or 'none'})"
    if len(won) > 1:
        text = f"{text} on every task" + "".join(f"; {m} only on {', '.join(sc)}" for m, sc in some.items())
    return text


def _oracle_summary(oracle: pd.DataFrame) -> pd.DataFrame:
    """Per model, task and k: the best k-set found most often across seeds, how often, and its mean damage."""
    rows = []
    for (name, task, k), g in oracle.groupby(["model", "task", "k"], sort=False):
        top = g["drop"].value_counts()
        rows.append({"model": name, "task": task, "k": k, "best_set": top.index[0], "units": int(top.iloc[0]),
                     "of": len(g), "d_loss": float(g["d_loss"].mean()), "search": g["search"].iloc[0]})
    return pd.DataFrame(rows)


def _bench_sentence(result: Result) -> str:
    """The cached-ablation benchmark in one sentence: each model's speed-up with its interval and prediction."""
    bench = result.tables.get("ablation_bench")
    if bench is None or not len(bench):
        return ""
    m = result.metrics
    parts = ", ".join(f"{r.model} (L = {r.blocks}) {_ci(m[f'ablation_speedup/{r.model}'], 2)}× (counting "
                      f"evaluations predicts {r.predicted:.2f}×)" for r in bench.itertuples())
    return f" Cached single-block ablation against naive forwards: {parts}."


def _key_findings(result: Result, params: Params) -> str:
    """3-6 bullets for the chapter's key-findings box, every number from this run with its interval."""
    rel, m, tests = result.tables["reliability"], result.metrics, result.tables["tests"]
    rel_text = "; ".join(f"{r.model} on {r.task} {_ci(m[f'reliability/{r.model}/{r.task}'])}"
                         for r in rel.itertuples())
    low = rel[~rel["measurable"]]
    bullets = [f"**Is the ground truth measurable?** Split-half reliability of the per-block damage on whole "
               f"held-out splits: {rel_text}. " + (f"Below {params.reliability_min:g} (not measurable): "
                                                   + ", ".join(f"{r.model}/{r.task}" for r in low.itertuples())
                                                   if len(low) else f"All above {params.reliability_min:g}.")]
    for name in params.models:
        tasks = [t for t in params.tasks if f"reliability/{name}/{t}" in m]
        if not tasks:
            continue
        mean_rho = {meth: np.mean([m[f"spearman/{name}/{t}/{meth}"]["mean"] for t in tasks]) for meth in params.methods}
        best = max(mean_rho, key=mean_rho.get)
        above = [meth for meth in params.methods if all(m[f"spearman/{name}/{t}/{meth}"]["ci_low"] > 0 for t in tasks)]
        regret = {meth: np.mean([m[f"regret/{name}/{t}/{meth}"]["mean"] for t in tasks])
                  for meth in (*params.methods, *REFERENCES)}
        least = min(params.methods, key=regret.get)
        per_task = "; ".join(f"{t}: ρ {_ci(m[f'spearman/{name}/{t}/{best}'])}, regret "
                             f"{_ci(m[f'regret/{name}/{t}/{best}'], 3)} nats" for t in tasks)
        bullets.append(f"**{LABELS[name]}: which score to trust?** {best} tracks the damage best ({per_task}); "
                       f"{len(above)} of {len(params.methods)} methods have a Spearman interval above zero on "
                       f"every task ({', '.join(above) or 'none'}). Least regret: {least}.")
        refs = "; ".join(f"{t}: drop_last {_ci(m[f'regret/{name}/{t}/drop_last'], 3)}, random "
                         f"{_ci(m[f'regret/{name}/{t}/random'], 3)} nats" for t in tasks)
        bullets.append(f"**{LABELS[name]}: better than the simple rules?** Regret of the references: {refs}. "
                       f"After Holm, {_beats(tests, f'{name}_vs_random', 'random')}; "
                       f"{_beats(tests, f'{name}_vs_drop_last', 'drop_last')}.")
    cost = result.tables.get("cost_summary")
    if cost is not None and len(cost):
        c = cost.sort_values("ratio")
        bullets.append(f"**Cost.** Measured time over the physical minimum runs from {c['ratio'].iloc[0]:.2f}× "
                       f"({c['method'].iloc[0]}, {c['model'].iloc[0]}) to {c['ratio'].iloc[-1]:.2f}× "
                       f"({c['method'].iloc[-1]}, {c['model'].iloc[-1]}); see the cost table for every interval."
                       + _bench_sentence(result))
    mem = result.tables.get("memory")
    if mem is not None and len(mem):
        name, top = mem["model"].iloc[0], int(mem["texts"].max())
        peak = mem[mem["texts"] == top].set_index("mode")["peak_mib"]
        held = mem[mem["texts"] == top].set_index("mode")["held_mib"]
        bullets.append(
            f"**Memory.** Keeping every block boundary, the trace's hidden states grow by "
            f"{_ci(m[f'held_slope/{name}/keep_all'], 1)} MiB per 100 texts ({held['keep_all']:.0f} MiB at {top} "
            f"texts, {name}); under the budget they never exceed {m[f'held_max/{name}/budget']['mean']:.0f} MiB "
            f"({held['budget']:.0f} MiB at {top} texts). Peak memory growth at {top} texts: {peak['budget']:.0f} MiB "
            f"under the budget, {peak['keep_all']:.0f} MiB keeping every boundary (one measurement each); at these "
            "sizes each batch's own forward pass dominates the peak.")
    return "\n".join(f"- {b}" for b in bullets[:6])


def run(params: Params) -> Result:
    """Run the chapter: score, measure the ground truth, summarise, test, time."""
    units_mod.start(params)
    result = Result()
    started = time.time()
    units = units_mod.run_units(params, lambda m, t, s: _cached_unit(params, m, t, s), "importance",
                                seeds=lambda m: params.seeds[:1] if params.is_lm(m) else params.seeds)
    result.values["unit_seconds"] = time.time() - started
    for name in params.models:
        for task in params.tasks:
            failed = sum(u["failed"] for u in units if u["model"] == name and u["task"] == task)
            result.metrics[f"failed_trainings/{name}/{task}"] = {
                "mean": failed, "ci_low": None, "ci_high": None, "n": sum(
                    1 for u in units if u["model"] == name and u["task"] == task), "unit": "runs",
                "method": "count of runs within 1 point of the majority class on validation (excluded)"}
    _summarise(result, units, params)
    _cost(result, units, params)
    _convergence(result, units)
    _bench(result, params)
    _memory(result, params)
    result.tables["scores"] = pd.concat([u["scores"].assign(model=u["model"], task=u["task"])
                                         for u in units if not u["excluded"]], ignore_index=True)
    result.tables["oracle"] = pd.concat([u["oracle"].assign(model=u["model"], task=u["task"], seed=u["seed"])
                                         for u in units if not u["excluded"]], ignore_index=True).assign(
        drop=lambda d: d["drop"].map(str))
    result.tables["oracle_summary"] = _oracle_summary(result.tables["oracle"])
    result.values["seconds"] = time.time() - started
    result.values["key_findings"] = _key_findings(result, params)
    result.in_summary = ("reliability", "families", "cost_summary", "ablation_bench", "oracle_summary")
    return result
