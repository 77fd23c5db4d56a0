"""The dynamic-depth chapter as a study: can an exit-trained model answer in half the time at batch 1?

For each model, task (``amazon``, ``mr``) and seed (a seed fixes the split, the initialisation and the
data order) the study

1. takes the chapters' shared fine-tuned classifier as the **reference** and trains an **exit-enabled**
   model from the same pretrained weights with the same recipe, epochs and data (backbone and one exit
   after every block jointly, depth-weighted loss plus self-distillation from the last exit:
   :func:`analysis_kit.dynamic.fair_exit_model`);
2. chooses each anchor policy's **operating point on validation**: DeeBERT's entropy threshold and
   PABEE's patience at the cheapest predicted latency whose validation accuracy is within
   ``val_margin_points`` of the exit model's own last exit (paired, on the same inputs), CALM's calibrated threshold by Learn-then-Test with the
   guarantee "disagrees with the full-depth prediction on at most ``calm_delta`` of inputs, with
   probability 1 - ``calm_epsilon``", and static truncation (the first d blocks and exit d; the
   drop-last baseline) by the same rule as entropy; the **headline** policy of each seed is, among the
   policies within ``val_margin_points`` of the last exit on validation, the one with the lowest
   predicted validation latency (the most accurate one when none is within the margin);
3. reports on **test**: accuracy loss against the reference (paired hierarchical bootstrap over seeds and
   examples), blocks executed, and **measured** latency at batch 1 and at batch ``latency_batch`` with
   shrinking batches, the controller inside the timer, configurations interleaved; speed-ups are ratios
   of summed per-input times with a hierarchical interval (seeds, then timed inputs);
4. tests every policy against static truncation at the same average depth (McNemar pooled over seeds)
   and against the reference (paired bootstrap), in two families declared once;
5. checks that real early exit reproduces the simulated exits, and that the saved exit-enabled folder
   reloads (transformers + :class:`analysis_kit.dynamic.ExitModel`) with the same predictions and depths.

A training whose validation accuracy is within one point of the majority share is a failed training:
counted in ``failed_trainings/<model>/<task>`` and left out (in smoke, counted and kept).
"""

from __future__ import annotations

import pickle
import platform
import tempfile
import time
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import pandas as pd
import torch

from .. import dynamic, stats, train
from ..cache import cached_dir, code_key
from ..device import pick
from ..errors import LayerwiseError
from ..report import fmt_ci
from . import Labels, Result, TaskParams
from . import units as units_mod

MODELS = ("minilm", "mpnet")
ANCHORS = {"entropy": "DeeBERT (Xin et al. 2020): normalised-entropy threshold",
           "patience": "PABEE (Zhou et al. 2020): consecutive agreeing exits",
           "calibrated": "CALM (Schuster et al. 2022): threshold with a Learn-then-Test guarantee",
           "static": "static truncation: first d blocks and exit d (the drop-last baseline)"}
LABELS = Labels({"minilm": "MiniLM-L6", "mpnet": "MPNet-base"})
ENTROPY_GRID = tuple(float(x) for x in np.round(np.linspace(0.0, 1.0, 41), 4))


@dataclass(frozen=True)
class Params(TaskParams):
    """The dynamic-depth chapter's parameters: the shared :class:`~analysis_kit.studies.TaskParams`, then
    the models, exit training, policies and their calibration, the verdict's thresholds and the latency
    measurement (the notebook's parameters cell holds the same names and defaults)."""

    models: tuple[str, ...] = ("minilm",)
    distill: float = 0.5
    head_lr: float = 1e-3
    weighting: str = "linear"
    policies: tuple[str, ...] = ("entropy", "patience", "calibrated")
    val_margin_points: float = 0.5
    calm_delta: float = 0.02
    calm_epsilon: float = 0.05
    max_loss_points: float = 1.0
    goal_speedup: float = 2.0
    latency_n: int = 200
    latency_batch: int = 64
    latency_n_batched: int = 640
    latency_repeats: int = 3
    profile_n: int = 50
    torch_threads: int = 2

    def validate(self) -> None:
        """Fail before any training on settings the chapter cannot use."""
        super().validate(MODELS)
        bad = [p for p in self.policies if p not in ANCHORS or p == "static"]
        if bad or not self.policies:
            raise LayerwiseError(f"policies={list(self.policies)}: choose from entropy, patience, calibrated "
                                 "(static truncation is always run as the baseline).")
        if not 0 <= self.distill < 1:
            raise LayerwiseError(f"distill={self.distill} must lie in [0, 1): the weight of the last exit's "
                                 "distribution in each earlier exit's loss.")
        if not 0 < self.calm_delta < 1 or not 0 < self.calm_epsilon < 1:
            raise LayerwiseError("calm_delta and calm_epsilon must lie in (0, 1), e.g. 0.02 and 0.05.")
        if self.latency_n < 2 or self.latency_n_batched < 2 or self.latency_batch < 2 or self.latency_repeats < 1:
            raise LayerwiseError("latency_n, latency_n_batched and latency_batch must be >= 2 and latency_repeats "
                                 ">= 1: latency is always measured, never inferred from block counts.")
        if self.torch_threads < 0:
            raise LayerwiseError("torch_threads must be >= 0 (0 keeps torch's default).")


# ------------------------------------------------------------------------------------------------ one unit


def _op_point(val_curve: pd.DataFrame, full_acc: float, margin_points: float) -> pd.Series:
    """The cheapest (predicted latency) setting whose validation accuracy is within ``margin_points`` of
    ``full_acc`` (the exit model's own last exit on the same inputs: a paired comparison, so only the
    inputs where the two disagree add noise); the most accurate one when none is."""
    ok = val_curve[(full_acc - val_curve["accuracy"]) * 100 <= margin_points + 1e-9]
    if ok.empty:
        return val_curve.sort_values(["accuracy", "pred_ms"], ascending=[False, True]).iloc[0]
    return ok.sort_values(["pred_ms", "accuracy"], ascending=[True, False]).iloc[0]


def _curves(probs: dict[str, np.ndarray], y: dict[str, np.ndarray], profile: pd.DataFrame) -> pd.DataFrame:
    """Every policy's settings on val and test: average depth, accuracy, predicted batch-1 ms."""
    n_blocks = probs["val"].shape[1]
    probed, planned = profile["probed_ms"].to_numpy(), profile["planned_ms"].to_numpy()
    grids = {"entropy": ENTROPY_GRID, "patience": tuple(float(p) for p in range(n_blocks)),
             "calibrated": tuple(sorted(set(dynamic.settings_grid("confidence", probs["val"], 81)))),
             "static": tuple(float(d) for d in range(1, n_blocks + 1))}
    rows = []
    for split in ("val", "test"):
        for name, grid in grids.items():
            for s in grid:
                depths = np.full(len(y[split]), int(s)) if name == "static" \
                    else dynamic.simulate(dynamic.make_policy(name, s), probs[split])
                _, correct = dynamic.outcome(probs[split], y[split], depths)
                cost = planned if name == "static" else probed
                rows.append({"split": split, "policy": name, "setting": float(s), "avg_depth": float(depths.mean()),
                             "accuracy": float(correct.mean()), "pred_ms": float(cost[depths - 1].mean())})
    return pd.DataFrame(rows)


def _depths(name: str, setting: float, probs: np.ndarray) -> np.ndarray:
    if name == "static":
        return np.full(probs.shape[0], int(setting))
    return dynamic.simulate(dynamic.make_policy(name, setting), probs)


def _runner_config(runner: dynamic.ExitRunner, name: str, setting: float, shrink: bool = True):
    """A ``time_configs`` entry: real early exit under policy ``name`` at ``setting``."""
    if name == "static":
        return lambda b, i: runner(b, dynamic.PlannedPolicy(int(setting), "static"), shrink)
    return lambda b, i: runner(b, dynamic.make_policy(name, setting), shrink)


def _unit(params: Params, name: str, task_name: str, seed: int) -> dict[str, Any]:
    """One (model, task, seed): train or load, choose operating points on val, score and time on test."""
    task = params.task_spec(task_name)
    got = dynamic.fair_exit_model(params.model_ref(name), seed, task, params.tiny, params.distill, params.head_lr, params.weighting,
                                  params.device)
    model, heads, tok, ref = got["model"], got["heads"], got["tokenizer"], got["reference"]
    cfg, splits = got["config"], got["splits"]
    ref_rec, ex_rec = got["reference_record"], got["record"]
    unit: dict[str, Any] = {"model": name, "task": task_name, "seed": seed,
                            "failed": bool(ref_rec["failed"] or ex_rec["failed"]),
                            "fairness": {"reference_epochs": float(max(r["epoch"] for r in ref_rec["history"])),
                                         "reference_best_epoch": float(min(ref_rec["history"],
                                                                           key=lambda r: r["val_loss"])["epoch"]),
                                         "reference_steps": int(ref_rec.get("steps", 0)),
                                         "reference_seconds": float(ref_rec["train_seconds"]),
                                         "exit_epochs": float(max(r["epoch"] for r in ex_rec["history"])),
                                         "exit_best_epoch": float(min(ex_rec["history"],
                                                                      key=lambda r: r["val_loss_last"])["epoch"]),
                                         "exit_steps": int(max(r.get("step", 0) for r in ex_rec["history"])),
                                         "exit_seconds": float(ex_rec["train_seconds"]),
                                         "n_train": len(splits["train"]), "lr": cfg.lr, "distill": cfg.distill}}
    kw = {"max_length": cfg.max_length, "device": params.device}
    texts = {s: splits[s]["text"].tolist() for s in ("val", "test")}
    y = {s: splits[s]["label"].to_numpy() for s in ("val", "test")}
    probs = {s: dynamic.exit_probs(dynamic.predict_exits(model, heads, tok, texts[s], **kw)) for s in ("val", "test")}
    ref_pred = {s: train.predict(ref, tok, texts[s], 64, cfg.max_length, params.device).argmax(-1)
                for s in ("val", "test")}
    ref_acc = {s: float((ref_pred[s] == y[s]).mean()) for s in ("val", "test")}
    profile = dynamic.depth_profile(model, heads, tok, texts["val"][:params.profile_n], **kw)
    curves = _curves(probs, y, profile)
    val = curves[curves["split"] == "val"]
    full_val = float((probs["val"][:, -1].argmax(-1) == y["val"]).mean())
    ops = {}
    for pol in ("entropy", "patience", "static"):
        ops[pol] = float(_op_point(val[val["policy"] == pol], full_val, params.val_margin_points)["setting"])
    calm = dynamic.consistency_threshold(probs["val"], params.calm_delta, params.calm_epsilon)
    ops["calibrated"] = calm["threshold"]
    pred_val_ms = {p: float(profile["planned_ms" if p == "static" else "probed_ms"].to_numpy()[
        _depths(p, s, probs["val"]) - 1].mean()) for p, s in ops.items()}
    val_acc = {p: float(dynamic.outcome(probs["val"], y["val"], _depths(p, st, probs["val"]))[1].mean())
               for p, st in ops.items()}
    within = [p for p in params.policies if (full_val - val_acc[p]) * 100 <= params.val_margin_points + 1e-9]
    headline = min(within, key=lambda p: (pred_val_ms[p], params.policies.index(p))) if within \
        else max(params.policies, key=lambda p: (val_acc[p], -params.policies.index(p)))
    n_blocks = heads.n_blocks

    # accuracy side on the whole test split
    per_example = {"label": y["test"], "reference": ref_pred["test"] == y["test"],
                   "last_exit": probs["test"][:, -1].argmax(-1) == y["test"]}
    op_rows = []
    for pol in (*params.policies, "static"):
        depths = _depths(pol, ops[pol], probs["test"])
        preds, correct = dynamic.outcome(probs["test"], y["test"], depths)
        per_example[pol] = correct
        per_example[f"{pol}_depth"] = depths
        if pol != "static":
            matched = dynamic.static_depths(len(depths), max(1.0, float(depths.mean())), n_blocks, seed)
            per_example[f"{pol}_static_matched"] = dynamic.outcome(probs["test"], y["test"], matched)[1]
        op_rows.append({"policy": pol, "setting": ops[pol], "val_pred_ms": pred_val_ms[pol], "val_acc": val_acc[pol],
                        "val_depth": float(_depths(pol, ops[pol], probs["val"]).mean()),
                        "test_depth": float(depths.mean()), "test_acc": float(correct.mean()),
                        "headline": pol == headline})
    unit["ops"] = pd.DataFrame(op_rows)
    unit["per_example"] = pd.DataFrame(per_example)
    unit["calm"] = {**calm, "test_disagreement": float(
        (probs["test"][np.arange(len(y["test"])), _depths("calibrated", ops["calibrated"], probs["test"]) - 1]
         .argmax(-1) != probs["test"][:, -1].argmax(-1)).mean())}
    unit["headline"] = headline
    unit["curves"] = curves
    unit["profile"] = profile
    unit["accuracy"] = {"reference_val": ref_acc["val"], "reference_test": ref_acc["test"], "exit_full_val": full_val}

    # cost side: measured, real early exit
    dev = pick(params.device)
    model.eval().to(dev)
    heads.eval().to(dev)
    ref.eval().to(dev)
    runner = dynamic.ExitRunner(model, heads)
    rng = np.random.default_rng(seed)
    test_df = splits["test"]
    timing = {}
    for label, bs, n in (("b1", 1, params.latency_n), ("batched", params.latency_batch, params.latency_n_batched)):
        pick_idx = np.sort(rng.choice(len(test_df), size=min(n, len(test_df)), replace=False))
        sample = [texts["test"][i] for i in pick_idx]
        batches = [(pick_idx[i], {k: v.to(dev) for k, v in b.items()})
                   for i, b in dynamic.encode_each(tok, sample, cfg.max_length, bs)]
        configs = {"reference": lambda b, i: (ref(**b).logits.float().cpu().numpy(), np.full(len(i), n_blocks))}
        if label == "b1":
            configs["exit runtime, no exit"] = lambda b, i: runner(b, dynamic.PlannedPolicy(n_blocks, "none",
                                                                                           probe=True))
        for pol in (*params.policies, "static"):
            configs[pol] = _runner_config(runner, pol, ops[pol])
        t = dynamic.time_configs(configs, batches, params.latency_repeats, dev)
        t["examples"] = [batches[j][0].tolist() for j in t["batch"]]
        timing[label] = t
    unit["timing"] = timing
    agree = []
    for pol in (*params.policies, "static"):
        t = timing["b1"][timing["b1"]["config"] == pol]
        idx = np.concatenate([np.asarray(e) for e in t["examples"]])
        real_depth = t["depth_mean"].to_numpy()
        sim_depth = per_example[f"{pol}_depth"][idx]
        agree.append({"policy": pol, "depth_agreement": float((real_depth == sim_depth).mean())})
    unit["runtime_agreement"] = pd.DataFrame(agree)
    unit["ship"] = _ship_check(model, heads, tok, headline, ops[headline], texts["test"][:20], probs["test"][:20],
                               cfg.max_length, calm if headline == "calibrated" else {})
    return unit


def _ship_check(model, heads, tok, policy: str, setting: float, texts: list[str], probs: np.ndarray,
                max_length: int, info: dict[str, Any]) -> dict[str, Any]:
    """Save the exit-enabled model, reload it, and compare its exits and predictions with the simulation."""
    with tempfile.TemporaryDirectory() as tmp:
        dynamic.save_exit_model(tmp, model.cpu(), heads.cpu(), tok, policy, setting,
                                {**{k: v for k, v in info.items() if k != "p_value" or v is not None},
                                 "max_length": max_length})
        loaded = dynamic.load_exit_model(tmp, "cpu")
        logits, depths = loaded.predict(texts)
    sim = _depths(policy, setting, probs)
    return {"policy": policy, "same_depths": float((depths == sim).mean()),
            "same_predictions": float((logits.argmax(-1) == probs[np.arange(len(sim)), sim - 1].argmax(-1)).mean())}


#: Params fields that only change the summary, not what a unit measures.
SUMMARY_ONLY = ("seeds", "tasks", "models", "goal_speedup", "max_loss_points", "n_bootstrap")


def _cached_unit(params: Params, name: str, task: str, seed: int) -> dict[str, Any]:
    """``_unit``, stored on disk once complete, so an interrupted run keeps the (model, task, seed) units it
    finished and a re-run of the summary does not re-time them. The key holds every parameter a unit
    reads, the code of the unit, of :mod:`analysis_kit.dynamic` and of everything the exit heads' key holds
    (``cache.code_key``, the kit's one invalidation rule: a reworded docstring re-times nothing), the reference
    model's cache folder (``train.baseline_folder``: the exit model copies its recipe and budget), and the
    hardware and thread count (timings belong to a machine)."""
    baseline = train.baseline_folder(params.model_ref(name), seed, params.tiny, params.task_spec(task), params.device)
    spec = {"kind": "dynamic_unit", "model": name, "task": task, "seed": seed, "baseline": baseline,
            "params": {k: v for k, v in asdict(params).items() if k not in SUMMARY_ONLY},
            "code": code_key(_unit, _curves, _op_point, _depths, _runner_config, _ship_check, dynamic,
                             *dynamic._EXIT_CODE),
            "hardware": {"machine": platform.machine(), "processor": platform.processor(), "node": platform.node(),
                         "threads": torch.get_num_threads(), "device": str(pick(params.device))}}

    def build(folder) -> None:
        (folder / "unit.pkl").write_bytes(pickle.dumps(_unit(params, name, task, seed)))

    return pickle.loads((cached_dir("dynamic_unit", spec, build) / "unit.pkl").read_bytes())


# ------------------------------------------------------------------------------------------------ summary


def _ratio_rows(t: pd.DataFrame, base: str, other: str) -> np.ndarray:
    """(base ms, other ms) per timed batch, matched on the batch."""
    a = t[t["config"] == base].set_index("batch")["ms"]
    b = t[t["config"] == other].set_index("batch")["ms"]
    return np.column_stack([a.to_numpy(), b.reindex(a.index).to_numpy()])


def _speedup(rows: np.ndarray) -> float:
    return float(rows[:, 0].sum() / rows[:, 1].sum())


def _speedups(ok: list[dict[str, Any]], policy_of, params: Params) -> tuple[dict[str, Any], dict[str, Any]]:
    """Batch-1 and batched speed-up records over the reference for ``policy_of(unit)`` (a policy per seed):
    ratio of summed times, hierarchical interval over seeds and timed inputs (or batches)."""
    n = min(params.n_bootstrap, 4000)
    return tuple(stats.hierarchical_bootstrap([_ratio_rows(u["timing"][setup], "reference", policy_of(u)) for u in ok],
                                              _speedup, n_resamples=n, unit="x", what=what)
                 for setup, what in (("b1", "b1 speed-up"), ("batched", f"batch-{params.latency_batch} speed-up")))


def _usable(units: list[dict[str, Any]], params: Params) -> list[dict[str, Any]]:
    """Units whose trainings did not fail (smoke keeps them all, so the pipeline still runs)."""
    return [u for u in units if not u["failed"] or params.tiny]


def _diff_record(d: dict[str, Any], what: str) -> dict[str, Any]:
    """A ``paired_difference`` result as a metric record (reference minus policy, in points)."""
    return {"mean": d["diff_points"], "ci_low": d["ci_low"], "ci_high": d["ci_high"], "n": d["n"],
            "n_examples": d["n_examples"], "unit": "points", "method": f"{what}; {d['method']}"}


def _summarise(result: Result, units: list[dict[str, Any]], params: Params) -> None:
    fam = stats.TestFamilies({
        "vs static": "does the policy beat static truncation (first d blocks) at the same average depth? McNemar "
                     "pooled over seeds",
        "vs reference": "do the policy and the fine-tuned reference err on different sentences, given the trained "
                        "models? McNemar pooled over seeds (the loss's size and its interval over seeds and "
                        "sentences are the paired hierarchical bootstrap beside it, which decides the goal)"})
    nb = params.n_bootstrap
    pol_rows, head_rows = [], []
    for (name, task), group in _groupby(units, ("model", "task")).items():
        ok = _usable(group, params)
        result.metrics[f"failed_trainings/{name}/{task}"] = {
            "mean": float(sum(u["failed"] for u in group)), "ci_low": None, "ci_high": None, "n": len(group),
            "unit": "trainings",
            "method": f"count of seeds whose reference or exit-trained model is within {train.FAILED_MARGIN:.0%} of "
                      "the majority share on validation; no interval (a count)"
                      + (" (smoke: kept)" if params.tiny else " (excluded)")}
        if len(ok) < 2:
            result.notes.append(f"{name}/{task}: fewer than two usable seeds; no summary.")
            continue
        key = f"{name}/{task}"
        ref_c = [u["per_example"]["reference"].to_numpy() for u in ok]
        result.metrics[f"reference/{key}/accuracy"] = stats.accuracy_ci(ref_c, n_resamples=nb)
        result.metrics[f"exit_model/{key}/last_exit_accuracy"] = stats.accuracy_ci(
            [u["per_example"]["last_exit"].to_numpy() for u in ok], n_resamples=nb)
        last = stats.paired_difference(ref_c, [u["per_example"]["last_exit"].to_numpy() for u in ok],
                                       name=f"{key}: reference vs the exit model's last exit", n_resamples=nb)
        result.metrics[f"exit_model/{key}/last_exit_loss_points"] = _diff_record(last, "reference - last exit")
        for pol in (*params.policies, "static"):
            dyn_c = [u["per_example"][pol].to_numpy() for u in ok]
            diff = stats.paired_difference(ref_c, dyn_c, name=f"{key}: reference vs {pol} (paired bootstrap)",
                                           n_resamples=nb)
            fam.add("vs reference", stats.stratified_mcnemar(
                ref_c, dyn_c, name=f"{key}: reference vs {pol} (McNemar pooled over seeds)"))
            b1, bb = _speedups(ok, lambda u, pol=pol: pol, params)
            depth = stats.summarize(np.array([u["per_example"][f"{pol}_depth"].mean() for u in ok]),
                                    unit="blocks", over="seeds")
            p = f"policy/{key}/{pol}"
            result.metrics[f"{p}/acc_loss_points"] = _diff_record(diff, "reference - policy accuracy")
            result.metrics[f"{p}/b1_speedup"] = b1
            result.metrics[f"{p}/b{params.latency_batch}_speedup"] = bb
            result.metrics[f"{p}/avg_depth"] = depth
            row = {"model": name, "task": task, "policy": pol, "anchor": ANCHORS[pol],
                   "avg_depth": depth["mean"], "b1_speedup": b1["mean"], "b1_low": b1["ci_low"],
                   "b1_high": b1["ci_high"], "batched_speedup": bb["mean"], "batched_low": bb["ci_low"],
                   "batched_high": bb["ci_high"], "loss_points": diff["diff_points"], "loss_low": diff["ci_low"],
                   "loss_high": diff["ci_high"], "headline_seeds": sum(u["headline"] == pol for u in ok)}
            if pol != "static":
                st_c = [u["per_example"][f"{pol}_static_matched"].to_numpy() for u in ok]
                mc = fam.add("vs static", stats.stratified_mcnemar(
                    dyn_c, st_c, name=f"{key}: {pol} vs static truncation at the same average depth"))
                vs = stats.paired_difference(dyn_c, st_c, name=f"{key}: {pol} - static (matched depth)",
                                             n_resamples=nb)
                result.metrics[f"{p}/vs_static_points"] = _diff_record(vs, "policy - static at matched depth")
                row.update(vs_static_points=vs["diff_points"], vs_static_low=vs["ci_low"],
                           vs_static_high=vs["ci_high"], mcnemar_p=mc.p_value)
            pol_rows.append(row)
        head_rows.append(_headline(result, key, ok, ref_c, params))
        result.metrics[f"calibrated/{key}/test_disagreement"] = stats.summarize(
            np.array([u["calm"]["test_disagreement"] for u in ok]), unit="fraction", over="seeds")
    for name in params.models:
        usable = [u for u in _usable(units, params) if u["model"] == name]
        if len(usable) < 2:
            continue
        extra = [np.diff(_ratio_rows(u["timing"]["b1"], "reference", "exit runtime, no exit"), axis=1)[:, 0]
                 for u in usable]
        result.metrics[f"overhead_ms/{name}"] = stats.hierarchical_bootstrap(
            extra, n_resamples=min(nb, 4000), unit="ms per input",
            what="exit runtime at full depth (every exit and the controller evaluated) minus the plain forward, "
                 "batch 1, over (task, seed) units and inputs")
        per_exit = [float((u["profile"]["probed_ms"] - u["profile"]["planned_ms"]).iloc[-1]
                          / max(1, len(u["profile"]) - 1)) for u in usable]
        result.metrics[f"exit_head_ms/{name}"] = stats.summarize(np.array(per_exit), unit="ms per exit",
                                                                 over="seeds")
    tests = fam.results()
    result.tests.extend(tests)
    result.tables["tests"] = fam.table()
    result.tables["families"] = fam.declared()
    result.tables["policies"] = pd.DataFrame(pol_rows)
    result.tables["headline"] = pd.DataFrame(head_rows)


def _headline(result: Result, key: str, ok: list[dict[str, Any]], ref_c: list[np.ndarray],
              params: Params) -> dict[str, Any]:
    """The per-seed validation-chosen policy, reported on test, and the goal's verdict from intervals."""
    dyn_c = [u["per_example"][u["headline"]].to_numpy() for u in ok]
    diff = stats.paired_difference(ref_c, dyn_c, name=f"{key}: reference vs the validation-chosen policy",
                                   n_resamples=params.n_bootstrap)
    b1, bb = _speedups(ok, lambda u: u["headline"], params)
    loss = _diff_record(diff, "reference - validation-chosen policy")
    h = f"headline/{key}"
    result.metrics[f"{h}/b1_speedup"] = b1
    result.metrics[f"{h}/acc_loss_points"] = loss
    result.metrics[f"{h}/b{params.latency_batch}_speedup"] = bb
    result.metrics[f"{h}/avg_depth"] = stats.summarize(
        np.array([u["per_example"][f"{u['headline']}_depth"].mean() for u in ok]), unit="blocks", over="seeds")
    met = bool(b1["ci_low"] is not None and b1["ci_low"] >= params.goal_speedup
               and loss["ci_high"] is not None and loss["ci_high"] <= params.max_loss_points)
    return {"key": key, "policies": ", ".join(sorted({u["headline"] for u in ok})),
            "b1_speedup": b1["mean"], "b1_low": b1["ci_low"], "b1_high": b1["ci_high"],
            "batched_speedup": bb["mean"], "loss_points": loss["mean"], "loss_low": loss["ci_low"],
            "loss_high": loss["ci_high"], "goal_met": met,
            "speedup_short_by": max(0.0, params.goal_speedup - (b1["ci_low"] or 0.0)),
            "loss_over_by": max(0.0, (loss["ci_high"] or 0.0) - params.max_loss_points)}


def _groupby(units: list[dict[str, Any]], keys: tuple[str, ...]) -> dict[tuple, list[dict[str, Any]]]:
    out: dict[tuple, list[dict[str, Any]]] = {}
    for u in units:
        out.setdefault(tuple(u[k] for k in keys), []).append(u)
    return out


def _tables(result: Result, units: list[dict[str, Any]]) -> None:
    """Tidy per-seed tables for the chapter's charts and for readers who want the raw numbers."""
    def tag(df: pd.DataFrame, u: dict[str, Any]) -> pd.DataFrame:
        return df.assign(model=u["model"], task=u["task"], seed=u["seed"], failed=u["failed"])

    result.tables["operating_points"] = pd.concat([tag(u["ops"], u).assign(**u["accuracy"]) for u in units],
                                                  ignore_index=True)
    result.tables["curves"] = pd.concat([tag(u["curves"], u).assign(reference_test=u["accuracy"]["reference_test"],
                                                                    reference_val=u["accuracy"]["reference_val"])
                                         for u in units], ignore_index=True)
    result.tables["profile"] = pd.concat([tag(u["profile"], u) for u in units], ignore_index=True)
    result.tables["timing"] = pd.concat([tag(t.drop(columns=["preds", "examples"]).assign(setup=k), u)
                                         for u in units for k, t in u["timing"].items()], ignore_index=True)
    result.tables["fairness"] = pd.DataFrame([{"model": u["model"], "task": u["task"], "seed": u["seed"],
                                               **u["fairness"]} for u in units])
    result.tables["calibration"] = pd.DataFrame([{"model": u["model"], "task": u["task"], "seed": u["seed"],
                                                  **u["calm"]} for u in units])
    result.tables["runtime_agreement"] = pd.concat([tag(u["runtime_agreement"], u) for u in units],
                                                   ignore_index=True)
    result.tables["runtime_agreement_summary"] = (result.tables["runtime_agreement"]
                                                  .groupby(["model", "task", "policy"], as_index=False)
                                                  ["depth_agreement"].mean())
    result.tables["ship"] = pd.DataFrame([{"model": u["model"], "task": u["task"], "seed": u["seed"], **u["ship"]}
                                          for u in units])


def _curve_summary(result: Result, units: list[dict[str, Any]], params: Params) -> None:
    """Speed-up/accuracy curve per policy on test: for every setting, the mean over seeds of the predicted
    batch-1 speed-up (the reference's measured batch-1 time over the setting's time predicted from the
    measured per-depth profile) and of the accuracy loss against the reference, with a t interval over
    seeds (each seed has its own test split, so the seed-to-seed spread includes test-set sampling)."""
    rows = []
    for u in _usable(units, params):
        t = u["timing"]["b1"]
        ref_ms = float(t[t["config"] == "reference"]["ms"].mean())
        c = u["curves"]
        c = c[(c["split"] == "test") & (c["policy"] != "calibrated")]
        rows.append(c.assign(model=u["model"], task=u["task"], seed=u["seed"],
                             pred_speedup=ref_ms / c["pred_ms"],
                             loss_points=(u["accuracy"]["reference_test"] - c["accuracy"]) * 100))
    if not rows:
        return
    per_seed = pd.concat(rows, ignore_index=True)
    out = []
    for (name, task, pol, setting), g in per_seed.groupby(["model", "task", "policy", "setting"]):
        loss = stats.summarize(g["loss_points"].to_numpy(), unit="points", over="seeds")
        out.append({"model": name, "task": task, "policy": pol, "series": f"{pol} · {task}", "setting": setting,
                    "avg_depth": g["avg_depth"].mean(), "pred_speedup": g["pred_speedup"].mean(),
                    "loss_points": loss["mean"], "loss_low": loss["ci_low"], "loss_high": loss["ci_high"],
                    "seeds": len(g)})
    result.tables["curve_summary"] = pd.DataFrame(out)


def _ci(rec: dict[str, Any], fmt: str = ".2f", suffix: str = "") -> str:
    """``mean [low, high]`` of a metric record, for prose, in the book's one format (:func:`report.fmt_ci`)."""
    sign = fmt.startswith("+")
    digits = int(fmt.strip("+.f%"))
    if fmt.endswith("%"):
        return fmt_ci(rec, scale=100, unit=" %", digits=digits, sign=sign)
    return fmt_ci(rec, scale=1, unit=suffix, digits=digits, sign=sign)


def _findings(result: Result, params: Params) -> str:
    """The chapter's answer as Markdown, every number taken from the results just computed."""
    m, lines = result.metrics, []
    tests = {t.name: t for t in result.tests}
    b = params.latency_batch
    for row in result.tables.get("headline", pd.DataFrame()).to_dict("records"):
        key = row["key"]
        sp, loss = m[f"headline/{key}/b1_speedup"], m[f"headline/{key}/acc_loss_points"]
        verdict = "**goal met** (whole speed-up interval ≥ {g}×, whole loss interval ≤ {l} point)" if row["goal_met"] \
            else ("**goal missed**: the speed-up interval's low end is {s:.2f}× short of {g}×, the loss interval's "
                  "high end {o:.2f} points over {l}").format(s=row["speedup_short_by"], o=row["loss_over_by"],
                                                              g=params.goal_speedup, l=params.max_loss_points)
        verdict = verdict.format(g=params.goal_speedup, l=params.max_loss_points)
        lines.append(f"- **{key}**, the policy chosen on validation ({row['policies']}): measured batch-1 speed-up "
                     f"{_ci(sp, '.2f', '×')} at an accuracy loss of {_ci(loss, '+.2f')} points against the "
                     f"fine-tuned reference; batch {b}: {_ci(m[f'headline/{key}/b{b}_speedup'], '.2f', '×')}; "
                     f"{_ci(m[f'headline/{key}/avg_depth'], '.2f')} blocks of "
                     f"{int(result.tables['profile']['depth'].max())} on average. {verdict}.")
    pol = result.tables.get("policies", pd.DataFrame())
    for (name, task), g in pol.groupby(["model", "task"]) if len(pol) else []:
        key = f"{name}/{task}"
        parts = []
        for r in g.to_dict("records"):
            txt = (f"{r['policy']} {r['b1_speedup']:.2f}× [{r['b1_low']:.2f}, {r['b1_high']:.2f}] at "
                   f"{r['loss_points']:+.2f} [{r['loss_low']:+.2f}, {r['loss_high']:+.2f}] points")
            t = tests.get(f"{key}: {r['policy']} vs static truncation at the same average depth")
            if t is not None:
                txt += f", {r['vs_static_points']:+.2f} points vs static at its depth (Holm p = {t.p_holm:.2g})"
            parts.append(txt)
        lines.append(f"- {key}, every anchor at its validation operating point (batch-1 speed-up; loss vs "
                     "reference): " + "; ".join(parts) + ".")
        lm = m.get(f"exit_model/{key}/last_exit_loss_points")
        if lm:
            lines.append(f"- {key}: the exit-trained model's last exit is {_ci(lm, '+.2f')} points below the "
                         "reference trained with the same recipe, epochs and data (the price of training exits "
                         "jointly, before any early exit).")
        cal = m.get(f"calibrated/{key}/test_disagreement")
        if cal:
            lines.append(f"- {key}: CALM-style calibration promised at most {params.calm_delta:.0%} disagreement "
                         f"with the full-depth prediction (with probability {1 - params.calm_epsilon:.0%}); on test "
                         f"it disagreed on {_ci(cal, '.2%')} of inputs.")
    for name in params.models:
        if f"overhead_ms/{name}" in m:
            lines.append(f"- The exit runtime at full depth, every exit and the controller evaluated, costs "
                         f"{_ci(m[f'overhead_ms/{name}'], '+.2f')} ms per input over the plain forward at batch 1 "
                         f"({LABELS[name]}); one exit head alone costs "
                         f"{_ci(m[f'exit_head_ms/{name}'], '.2f')} ms, what every block an input passes without "
                         "leaving pays on top of the block.")
    tt = result.tables.get("tests")
    if tt is not None and len(tt):
        parts = []
        for fam, g in tt.groupby("family"):
            floor = pd.to_numeric(g["min_p"], errors="coerce")
            parts.append(f"{fam}: {int((floor < 0.05 / len(g)).sum())} of {len(g)} tests could reach p below the "
                         f"strictest Holm threshold 0.05/{len(g)}, {int((g['p_holm'] < 0.05).sum())} rejected")
        lines.append("- Test families (declared before the results): " + "; ".join(parts) + ".")
    agree = result.tables.get("runtime_agreement")
    ship = result.tables.get("ship")
    if agree is not None and ship is not None:
        lines.append(f"- Real early exit reproduced the simulated exit depth on {agree['depth_agreement'].mean():.1%} "
                     f"of timed inputs; the saved folders reloaded with the same depths on "
                     f"{ship['same_depths'].mean():.1%} and the same predictions on "
                     f"{ship['same_predictions'].mean():.1%} of checked inputs.")
    return "\n".join(lines)


def _key_findings(result: Result, params: Params) -> str:
    """Three to six bullets for the top of the chapter (the full list is :func:`_findings`)."""
    m, lines = result.metrics, []
    head = result.tables.get("headline", pd.DataFrame())
    for name in params.models:
        parts = []
        for row in head[head["key"].str.startswith(f"{name}/")].to_dict("records") if len(head) else []:
            key = row["key"]
            parts.append(f"{key.split('/')[1]}: {row['policies']} {fmt_ci(m[f'headline/{key}/b1_speedup'], 1, '×', 2)}"
                         f" at {fmt_ci(m[f'headline/{key}/acc_loss_points'], 1, ' points', 2, sign=True)} of "
                         f"accuracy, goal {'met' if row['goal_met'] else 'missed'}")
        if parts:
            lines.append(f"- **{LABELS[name]}**, the policy chosen on validation, measured batch-1 speed-up and "
                         f"accuracy loss against the full model (goal: the whole speed-up interval at least "
                         f"{params.goal_speedup:g}×, the whole loss interval at most {params.max_loss_points:g} "
                         "point): " + "; ".join(parts) + ".")
    pol = result.tables.get("policies", pd.DataFrame())
    cal = []
    for r in pol[pol["policy"] == "calibrated"].to_dict("records") if len(pol) else []:
        key = f"calibrated/{r['model']}/{r['task']}/test_disagreement"
        if key in m:
            cal.append(f"{r['model']}/{r['task']} {r['b1_speedup']:.2f}× [{r['b1_low']:.2f}, {r['b1_high']:.2f}], "
                       f"test disagreement {fmt_ci(m[key])}")
    if cal:
        lines.append(f"- The calibrated policy (CALM-style, promises at most {params.calm_delta:.0%} disagreement "
                     f"with the full model with probability {1 - params.calm_epsilon:.0%}): " + "; ".join(cal) + ".")
    tests = {t.name: t for t in result.tests}
    vs = [(r, tests.get(f"{r['model']}/{r['task']}: entropy vs static truncation at the same average depth"))
          for r in (pol[pol["policy"] == "entropy"].to_dict("records") if len(pol) else [])]
    vs = [(r, t) for r, t in vs if t is not None]
    if vs:
        lines.append("- Exiting by confidence beats cutting the last blocks at the same average depth (entropy minus "
                     "static truncation, points): " + "; ".join(
                         f"{r['model']}/{r['task']} {r['vs_static_points']:+.1f} (Holm p = {t.p_holm:.2g})"
                         for r, t in vs) + ".")
    cost = [f"{LABELS[name]} {fmt_ci(m[f'overhead_ms/{name}'], 1, ' ms', 2, sign=True)}"
            for name in params.models if f"overhead_ms/{name}" in m]
    if cost:
        lines.append("- What the exits cost when no input leaves early (full depth, batch 1, per input over the plain "
                     "forward): " + "; ".join(cost) + ".")
    return "\n".join(lines)


def run(params: Params) -> Result:
    """Run the chapter: train or load, choose on validation, score and time on test, summarise and test."""
    units_mod.start(params)
    result = Result()
    started = time.time()
    units = units_mod.run_units(params, lambda m, t, s: _cached_unit(params, m, t, s), "dynamic depth")
    result.values["seconds"] = time.time() - started
    result.values["threads"] = torch.get_num_threads()
    _tables(result, units)
    _summarise(result, units, params)
    _curve_summary(result, units, params)
    result.values["findings"] = _findings(result, params)
    result.values["key_findings"] = _key_findings(result, params)
    result.in_summary = ("headline", "policies", "fairness", "ship")
    return result
