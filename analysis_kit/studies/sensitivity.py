"""The sensitivity chapter as a study: do layer-importance rankings hold across seeds, tasks, methods and
calibration sets, and does an unstable ranking cost anything when blocks are cut?

It works on the models and ground truth of the theoretical_validation chapter (the same cached units: the
fine-tuned MiniLM-L6 per task and seed, its eleven rankings on 256 calibration sentences, and the test-set
damage of every set of up to half its blocks), so nothing is trained or measured twice, and adds the cheap
methods' rankings under other calibration sets: smaller and larger samples of the task's own training split,
and samples of the other snippet domains. Only models that trained are used (evidence protocol, rule 3).

- **Agreement with at least three raters, against chance.** Kendall's W across the five seeds (per task and
  method), across the calibration sets (per task, seed and method) and across the methods (per task and seed),
  each beside its chance level 1/m (the expected W of m independent random rankings); the seed agreement is
  tested against chance by permuting every rater's ranking (10,000 permutations: smallest p 1/10,001).
- **Variance decomposition that respects nesting.** Rank-normalised importance is modelled with statsmodels
  ``MixedLM``: fixed effects for the block, block x method and block x task, and a random block profile per
  trained model (task x seed), so rows of one model are not treated as independent. Wald tests of the two
  interaction blocks use the mixed model's covariance; the random profile's variance is tested by a
  likelihood-ratio test against the model without it (half chi-squared, since the variance sits on its
  boundary under the null).
- **Consequence.** Each ranking's choice of the ``k_drop`` least important blocks is scored on the test
  split (regret against the best k-set); a calibration set is compared with the reference (the task's own
  256 sentences) by the paired regret difference, pooled over methods, per (task, seed) unit.
"""

from __future__ import annotations

import pickle
import platform
import time
import warnings
from dataclasses import asdict, dataclass, replace
from typing import Any

import numpy as np
import pandas as pd

from .. import cache, data, importance, stats, train
from .. import sensitivity as sens
from ..cache import cached_dir
from ..device import pick, progress
from ..errors import LayerwiseError
from ..report import fmt_ci
from . import Result, TaskParams
from . import theoretical_validation as tv
from . import units as units_mod

MODELS = ("minilm",)
SUMMARY_ONLY = ("tasks", "seeds", "n_bootstrap", "n_permutations")


@dataclass(frozen=True)
class Params(TaskParams):
    """The chapter's parameters: the shared :class:`~analysis_kit.studies.TaskParams`, the cheap methods re-run
    under every calibration set, the sets themselves, the blocks dropped in the consequence check and the
    permutation count (the notebook's parameters cell holds the same names and defaults)."""

    models: tuple[str, ...] = ("minilm",)
    methods: tuple[str, ...] = importance.CHEAP_METHODS
    cal_sizes: tuple[int, ...] = (32, 128, 512)
    cal_domains: tuple[str, ...] = ("amazon", "movie", "tweets", "nyt")
    domain_n: int = 128
    k_drop: int = 3
    n_permutations: int = 10_000
    torch_threads: int = 2
    n_bootstrap: int = 2_000  # each resample redraws every test example of every seed of every metric

    def validate(self) -> None:
        """Fail before any model loads on settings the chapter cannot use."""
        super().validate(MODELS)
        if len(self.models) != 1 or self.importance_params().is_lm(self.models[0]):
            raise LayerwiseError(f"models={list(self.models)}: name one fine-tuned classifier (minilm, or your "
                                 "encoder folder); the chapter tests the rankings of one model's blocks.")
        bad = [m for m in self.methods if m not in importance.CHEAP_METHODS]
        if bad or not self.methods:
            raise LayerwiseError(f"methods={list(self.methods)}: choose from the cheap methods "
                                 f"{', '.join(importance.CHEAP_METHODS)} (each runs under every calibration set).")
        for d in self.cal_domains:
            if d not in data.DOMAINS:
                raise LayerwiseError(f"cal_domains: {d!r} is not a snippet domain; choose from "
                                     f"{', '.join(data.DOMAINS)}.")
        if not self.cal_sizes or min(self.cal_sizes) < 8 or self.domain_n < 8:
            raise LayerwiseError("cal_sizes and domain_n must be >= 8 sentences.")
        if len(self.conditions("amazon")) + 1 < 3:
            raise LayerwiseError("give at least two calibration sets besides the reference, so agreement across "
                                 "calibration sets has three raters.")
        if self.k_drop < 1:
            raise LayerwiseError(f"k_drop={self.k_drop} must be >= 1.")
        if self.n_permutations < 1000:
            raise LayerwiseError(f"n_permutations={self.n_permutations}: use at least 1000.")
        if self.torch_threads < 0:
            raise LayerwiseError("torch_threads must be >= 0 (0 keeps torch's default).")

    def conditions(self, task: str) -> list[tuple[str, str, int]]:
        """(label, domain, size) of every calibration set besides the reference: the task's own training split
        at each size, every other domain at ``domain_n`` (the own domain at ``domain_n`` is a size)."""
        own = self.own_domain(task)
        out = [(f"own@{n}", own, n) for n in self.cal_sizes if f"own@{n}" != self.reference()]
        out += [(f"{d}@{self.domain_n}", d, self.domain_n) for d in self.cal_domains if d != own]
        return out

    def own_domain(self, task: str) -> str:
        """The snippet domain of a built-in task; your data file stands for its own domain (named as the task)."""
        return task if self.source(task) is not None else data.task_domain(task)

    def reference(self) -> str:
        """The reference calibration set's label: the importance chapter's own scores (``own@<calib_n>``)."""
        return f"own@{self.importance_params().calib_n}"

    def importance_params(self) -> tv.Params:
        """The theoretical_validation parameters whose cached units this chapter reads (its defaults, with this
        chapter's shared settings)."""
        return replace(tv.Params(), tiny=self.tiny, seeds=self.seeds, tasks=self.tasks, models=self.models, sources=self.sources,
                       neutral_band=self.neutral_band, mr_max_train=self.mr_max_train, device=self.device,
                       torch_threads=self.torch_threads, **(_TINY if self.tiny else {}))


#: The smoke profile's settings of the importance units (tiny models, few examples), kept in one place.
_TINY = {"calib_n": 32, "expensive_n": 4, "conductance_steps": 4, "shap_permutations": 2, "n_random": 20,
         "max_length": 32}


# ------------------------------------------------------------------------------------------------ one unit


def _unit(params: Params, task_name: str, seed: int) -> dict[str, Any]:
    """The cheap methods' scores under every calibration set for one (task, seed) model."""
    task = params.task_spec(task_name)
    model, tok, record = train.baseline(params.model_ref(params.models[0]), seed, params.tiny, task=task, device=params.device)
    model.eval()
    splits = train.load_task(task, seed)
    ip = params.importance_params()
    rows = []
    for label, domain, n in params.conditions(task_name):
        if domain == params.own_domain(task_name):
            pool = splits["train"]
        else:
            pool = data.load_snippets(domain, "polarity", params.neutral_band)
        df = data.subsample(pool, min(n, len(pool)), seed + 7919 * n)
        batches = tv._classifier_batches(tok, df, ip)
        sc = importance.compute_all(model, batches, methods=list(params.methods), seed=seed)
        rows.append(sc[["method", "layer", "score"]].assign(condition=label, domain=domain, n=len(df)))
    return {"task": task_name, "seed": seed, "failed": bool(record["failed"]),
            "scores": pd.concat(rows, ignore_index=True)}


def _cached_unit(params: Params, task: str, seed: int) -> dict[str, Any]:
    """``_unit`` stored on disk once complete (key: the parameters it reads, its code and ``importance``'s, and
    the fine-tuned model's cache folder, ``train.baseline_folder``)."""
    baseline = train.baseline_folder(params.model_ref(params.models[0]), seed, params.tiny, params.task_spec(task),
                                     params.device)
    spec = {"kind": "sensitivity_unit", "task": task, "seed": seed, "baseline": baseline,
            "params": {k: v for k, v in asdict(params).items() if k not in SUMMARY_ONLY},
            "code": cache.code_key(_unit, tv._classifier_batches, importance),
            "hardware": {"machine": platform.machine(), "device": str(pick(params.device))}}

    def build(folder) -> None:
        (folder / "unit.pkl").write_bytes(pickle.dumps(_unit(params, task, seed)))

    return pickle.loads((cached_dir("sensitivity_unit", spec, build) / "unit.pkl").read_bytes())


# ------------------------------------------------------------------------------------------------ measures


def _matrix(scores: pd.DataFrame, raters: str) -> np.ndarray:
    """``(raters, blocks)`` score matrix of one ranking family."""
    return scores.pivot_table(index=raters, columns="layer", values="score").to_numpy(float)


def _w_permutation(x: np.ndarray, n_permutations: int, seed: int) -> tuple[float, float, float]:
    """Kendall's W of ``x[raters, items]``, its permutation p against independent random rankings, and the chance
    level 1/m. Every rater's ranking is permuted independently; p = (#{W_perm >= W} + 1) / (n + 1)."""
    w = float(sens.kendall_w(x))
    rng = np.random.default_rng(seed)
    m, n = x.shape
    perm = np.argsort(rng.random((n_permutations, m, n)), axis=-1)
    null = sens.kendall_w(np.take_along_axis(np.broadcast_to(x, (n_permutations, m, n)), perm, axis=-1))
    p = (int((null >= w - 1e-12).sum()) + 1) / (n_permutations + 1)
    return w, p, 1.0 / m


def _drop(scores: np.ndarray, k: int) -> tuple[int, ...]:
    """The k least important blocks (lowest scores; ties: earlier block first), the shared top-k rule."""
    from ..strategies import top_k

    return tuple(top_k(dict(enumerate(scores)), k, largest=False))


def _mixed_model(norm: pd.DataFrame) -> tuple[pd.DataFrame, list[stats.TestResult]]:
    """MixedLM of rank-normalised importance: block + block x method + block x task fixed, a random block profile
    per trained model. Returns the variance table and the tests (Wald for each interaction, LR for the profile)."""
    import statsmodels.formula.api as smf
    from scipy import stats as sps

    df = norm.assign(unit=norm["task"] + "/" + norm["seed"].astype(str), layer=norm["layer"].astype(str))
    formula = "norm ~ C(layer) + C(layer):C(method) + C(layer):C(task)"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # convergence chatter; the fit's own flags are reported below
        full = smf.mixedlm(formula, df, groups="unit", re_formula="0", vc_formula={"profile": "0 + C(layer)"}
                           ).fit(reml=False, method="lbfgs")
        ols = smf.ols(formula, df).fit()
    fe = full.fe_params
    x = full.model.exog
    var_fixed = float(np.var(x @ fe.to_numpy()))
    var_profile = float(full.vcomp[0]) if len(full.vcomp) else 0.0
    var_resid = float(full.scale)
    total = var_fixed + var_profile + var_resid
    table = pd.DataFrame([
        {"component": "fixed: block, block x method, block x task", "variance": var_fixed, "share": var_fixed / total},
        {"component": "random: block profile of the trained model (seed)", "variance": var_profile,
         "share": var_profile / total},
        {"component": "residual", "variance": var_resid, "share": var_resid / total}])
    tests = []
    names = list(fe.index)
    cov = full.cov_params().loc[names, names].to_numpy()
    for term, label in (("C(method)", "block x method"), ("C(task)", "block x task")):
        idx = [i for i, n in enumerate(names) if ":" in n and term in n]
        if not idx:
            continue
        b = fe.to_numpy()[idx]
        v = cov[np.ix_(idx, idx)]
        chi2 = float(b @ np.linalg.pinv(v) @ b)
        tests.append(stats.TestResult(f"{label} changes the block profile (Wald)", chi2,
                                      float(sps.chi2.sf(chi2, len(idx))), var_fixed, "fixed-effect variance",
                                      int(df["unit"].nunique()), extras={"df": len(idx), "min_p": None}))
    lr = max(0.0, 2 * (full.llf - ols.llf))
    tests.append(stats.TestResult("the trained model (seed) has its own block profile (LR)", lr,
                                  float(0.5 * sps.chi2.sf(lr, 1)) if lr > 0 else 1.0, var_profile,
                                  "profile variance", int(df["unit"].nunique()),
                                  extras={"converged": bool(full.converged), "min_p": None}))
    return table, tests


# ------------------------------------------------------------------------------------------------ summary


def run(params: Params) -> Result:
    """Run the chapter: read the importance units, add the calibration sets, measure agreement, variance and
    consequence, test."""
    units_mod.start(params)
    ip = params.importance_params()
    result = Result()
    started = time.time()
    todo = [(t, s) for t in params.tasks for s in params.seeds]
    bar = progress(total=2 * len(todo), desc="sensitivity units (task x seed: importance, calibration sets)")
    units = []
    for task, seed in todo:
        base = tv._cached_unit(ip, params.models[0], task, seed)
        bar.update(1)
        extra = _cached_unit(params, task, seed)
        bar.update(1)
        units.append((base, extra))
    bar.close()
    fam = stats.TestFamilies({
        "seed_agreement": "do the five seeds' rankings of a method agree more than independent random rankings "
                          "(Kendall's W above its chance level)?",
        "variance": "does the block profile change with the method, the task, or the trained model (seed)?",
        "calibration_transfer": "does calibrating on another set pick blocks whose removal hurts more than the "
                                "reference set's choice (paired regret difference, pooled over methods)?"})
    used = [(b, e) for b, e in units if not b["excluded"]]
    result.metrics.update({f"failed_trainings/{params.models[0]}/{t}": {
        "mean": sum(b["failed"] for b, _ in units if b["task"] == t), "ci_low": None, "ci_high": None,
        "n": sum(1 for b, _ in units if b["task"] == t), "unit": "runs",
        "method": "count of runs within 1 point of the majority class on validation (excluded)"} for t in params.tasks})
    long = pd.concat([b["scores"][["method", "layer", "score"]].assign(task=b["task"], seed=b["seed"],
                                                                        condition=params.reference()) for b, _ in used]
                     + [e["scores"].drop(columns=["domain", "n"]).assign(task=e["task"], seed=e["seed"])
                        for _, e in used], ignore_index=True)
    result.tables["scores"] = long
    _agreement(result, fam, long, params)
    ref = long[long["condition"] == params.reference()]
    norm = sens.normalise(ref, ["task", "seed", "method"])
    variance, vtests = _mixed_model(norm)
    for t in vtests:
        fam.add("variance", t)
    result.tables["variance"] = variance
    _transfer(result, fam, used, params)
    result.tables["tests"] = fam.table()
    result.tests = fam.results()
    result.tables["families"] = fam.declared()
    result.values["seconds"] = time.time() - started
    result.values["key_findings"] = _key_findings(result, params)
    result.in_summary = ("agreement", "variance", "families")
    return result


def _agreement(result: Result, fam: stats.TestFamilies, long: pd.DataFrame, params: Params) -> None:
    """Kendall's W across seeds (tested against chance), calibration sets and methods, with chance levels."""
    rows = []
    ref = long[long["condition"] == params.reference()]
    for (task, method), g in ref.groupby(["task", "method"], sort=False):
        w, p, chance = _w_permutation(_matrix(g, "seed"), params.n_permutations, 0)
        test = stats.TestResult(f"seeds agree beyond chance: {method} ({task})", w, p, w - chance,
                                "W minus its chance level", g["seed"].nunique(), alternative="greater",
                                extras={"min_p": 1 / (params.n_permutations + 1), "chance": chance})
        fam.add("seed_agreement", test)
        rows.append({"across": "seeds", "task": task, "method": method, "w": w, "ci_low": None, "ci_high": None,
                     "chance": chance, "raters": g["seed"].nunique()})
    for (task, method), g in long[long["method"].isin(params.methods)].groupby(["task", "method"], sort=False):
        ws = [float(sens.kendall_w(_matrix(gs, "condition"))) for _, gs in g.groupby("seed")]
        rec = stats.summarize(np.array(ws), over="seeds")
        m = g["condition"].nunique()
        result.metrics[f"agreement/calibration/{task}/{method}"] = rec
        rows.append({"across": "calibration sets", "task": task, "method": method, "w": rec["mean"],
                     "ci_low": rec["ci_low"], "ci_high": rec["ci_high"], "chance": 1 / m, "raters": m})
    for task, g in ref.groupby("task", sort=False):
        ws = [float(sens.kendall_w(_matrix(gs, "method"))) for _, gs in g.groupby("seed")]
        rec = stats.summarize(np.array(ws), over="seeds")
        m = g["method"].nunique()
        result.metrics[f"agreement/methods/{task}"] = rec
        rows.append({"across": "methods", "task": task, "method": "all", "w": rec["mean"], "ci_low": rec["ci_low"],
                     "ci_high": rec["ci_high"], "chance": 1 / m, "raters": m})
    table = pd.DataFrame(rows)
    for r in table[table["across"] == "seeds"].itertuples():
        result.metrics[f"agreement/seeds/{r.task}/{r.method}"] = {
            "mean": r.w, "ci_low": None, "ci_high": None, "n": int(r.raters), "unit": "W",
            "method": f"Kendall's W across {r.raters} seeds; chance level {r.chance:.2f}; permutation test below"}
    result.tables["agreement"] = table


def _transfer(result: Result, fam: stats.TestFamilies, used: list[tuple[dict, dict]], params: Params) -> None:
    """Regret of each calibration set's k-set against the reference set's, per (task, seed), pooled over methods."""
    rows, per_unit = [], {}
    for base, extra in used:
        index = {s: j for j, s in enumerate(base["sets"])}
        oracle = base["oracle"][base["oracle"]["k"] == params.k_drop]
        if oracle.empty:
            raise LayerwiseError(f"k_drop={params.k_drop} is not among the importance units' k (1..L/2); lower it.")
        best = int(oracle["row"].iloc[0])
        scored = pd.concat([base["scores"][["method", "layer", "score"]].assign(condition=params.reference()),
                            extra["scores"][["method", "layer", "score", "condition"]]])
        scored = scored[scored["method"].isin(params.methods)]
        weights = {}
        for (cond, method), g in scored.groupby(["condition", "method"], sort=False):
            drop = _drop(g.sort_values("layer")["score"].to_numpy(), params.k_drop)
            w = np.zeros(len(base["sets"]))
            w[index[drop]] += 1.0
            w[best] -= 1.0
            weights.setdefault(cond, []).append(w)
            rows.append({"task": base["task"], "seed": base["seed"], "condition": cond, "method": method,
                         "drop": str(drop), "regret": float(tv.RATIO(np.column_stack(
                             [w @ base["dnll"].astype(float), base["units"]])))})
        for cond, ws in weights.items():
            per_unit.setdefault(cond, {})[(base["task"], base["seed"])] = np.column_stack(
                [np.mean(ws, 0) @ base["dnll"].astype(float), base["units"]])
    table = pd.DataFrame(rows)
    result.tables["transfer"] = table
    ref_groups = per_unit[params.reference()]
    summary = []
    for cond, groups in per_unit.items():
        if cond == params.reference():
            continue
        # a domain that is one task's own is a size for that task: the condition exists for the other task only
        diff = [np.column_stack([g[:, 0] - ref_groups[key][:, 0], g[:, 1]]) for key, g in groups.items()]
        rec = stats.hierarchical_bootstrap(diff, tv.RATIO, n_resamples=params.n_bootstrap, unit="nats",
                                           what="regret difference (calibration set - reference), mean over methods")
        result.metrics[f"transfer/{cond}"] = rec
        vals = np.array([float(tv.RATIO(d)) for d in diff])
        test = stats.wilcoxon(vals, np.zeros_like(vals), name=f"calibration on {cond} vs {params.reference()}")
        test.extras.update(min_p=stats.min_attainable_p(test), mean=float(vals.mean()))
        fam.add("calibration_transfer", test)
        summary.append({"condition": cond, "regret_diff": rec["mean"], "ci_low": rec["ci_low"],
                        "ci_high": rec["ci_high"], "units": len(diff)})
    result.tables["transfer_summary"] = pd.DataFrame(summary)


def _key_findings(result: Result, params: Params) -> str:
    """3-6 bullets, every number from this run with its interval or chance level."""
    ag, tests = result.tables["agreement"], result.tables["tests"]
    seeds = ag[ag["across"] == "seeds"]
    sig = tests[(tests["family"] == "seed_agreement") & (tests["p_holm"] < 0.05)]
    low = seeds.sort_values("w").iloc[0]
    bullets = [f"**Seeds.** Kendall's W across the seeds' rankings ranges from {seeds['w'].min():.2f} "
               f"({low.method}, {low.task}) to {seeds['w'].max():.2f} against a chance level of "
               f"{seeds['chance'].iloc[0]:.2f}; {len(sig)} of {len(seeds)} (method, task) pairs agree beyond "
               "chance after Holm."]
    cal = ag[ag["across"] == "calibration sets"]
    if len(cal):
        lo = cal.sort_values("w").iloc[0]
        bullets.append(f"**Calibration sets.** W across {int(cal['raters'].iloc[0])} calibration sets (chance "
                       f"{cal['chance'].iloc[0]:.2f}): lowest {lo.method} on {lo.task}, {lo.w:.2f} "
                       f"[{lo.ci_low:.2f}, {lo.ci_high:.2f}]; highest {cal['w'].max():.2f}.")
    meth = ag[ag["across"] == "methods"]
    bullets.append("**Methods.** W across the methods, per task: " + "; ".join(
        f"{r.task} {r.w:.2f} [{r.ci_low:.2f}, {r.ci_high:.2f}] (chance {r.chance:.2f})" for r in meth.itertuples())
        + ": the methods disagree far more than seeds or calibration sets do.")
    var = result.tables["variance"].set_index("component")["share"]
    vt = tests[tests["family"] == "variance"]
    bullets.append("**What moves the profile.** Mixed model of rank-normalised importance: "
                   + ", ".join(f"{k.split(':')[0]} {100 * v:.0f} %" for k, v in var.items()) + " of the variance; "
                   + "; ".join(f"{r.name}: Holm p {r.p_holm:.2g}" for r in vt.itertuples()) + ".")
    tr = result.tables["transfer_summary"]
    if len(tr):
        worst = tr.sort_values("regret_diff").iloc[-1]
        worst_rec = {"mean": worst.regret_diff, "ci_low": worst.ci_low, "ci_high": worst.ci_high}
        bullets.append(f"**Does it matter for cutting?** Calibrating on {worst.condition} instead of the task's own "
                       f"sentences changes the regret of the chosen {params.k_drop} blocks by "
                             f"{fmt_ci(worst_rec, 1, ' nats', 3, sign=True)} (the largest change; every set in the "
                       "table below).")
    return "\n".join(f"- {b}" for b in bullets[:6])
