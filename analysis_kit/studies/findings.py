"""The book's first page: every chapter's question, our measured answer, the original claim and the anchor.

Nothing here computes a new number. The study reads each chapter's published ``summary.json`` (and CSV
tables) for one profile, so the findings page always quotes what the chapters last computed, and it labels
an answer *stale* when the chapter's shown run no longer matches its code (:func:`runner.stale_chapters`):
such a chapter has not yet been re-run under the evidence protocol and its old numbers are not repeated.

Besides the table, it gathers the book's summary figure: accuracy kept (% of the full fine-tuned model)
against measured speed-up, for every compact model and exit policy a fresh chapter measured, with the
simple references (bag-of-words, VADER) and the literature's anchors marked.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import pandas as pd

from .. import runner, stats
from ..bookcheck import MAX_BULLETS
from ..errors import LayerwiseError
from ..paths import results_dir
from ..report import fmt_ci
from . import Result
from .compression import config_label


@dataclass(frozen=True)
class Params:
    """The page's parameters (the notebook's parameters cell holds the same names and defaults)."""

    profile: str = "default"  # whose results to read: smoke, default or full

    def validate(self) -> None:
        """Fail on a profile no chapter is run under."""
        if self.profile not in ("smoke", "default", "full"):
            raise LayerwiseError(f"profile={self.profile!r}: choose smoke, default or full.")


@dataclass(frozen=True)
class Question:
    """One row of the findings table: the chapter, its question, the original claim and the anchor."""

    chapter: str
    question: str
    claim: str  # what the research project this book grew out of reported ("—" when it made none)
    anchor: str  # the literature's number, with its source


QUESTIONS = (
    Question("baselines", "How accurate is the uncut fine-tuned model, against references anyone can run?",
             "A from-scratch classifier fed every chapter (it collapsed to the majority class on a seed)",
             "—"),
    Question("theoretical_validation", "Do layer-importance scores predict the damage of removing a block?",
             "Importance methods validated by agreement with each other",
             "Lu et al. (ICLR 2026): no metric reliably beats dropping the last layers"),
    Question("compression", "How much of the model can be cut and healed before accuracy drops?",
             "2.5× compression keeping 78.3% accuracy",
             "Sajjad et al. (2023): BERT 12→6 blocks with fine-tuning keeps ≈ 97% of GLUE; "
             "BERT-of-Theseus 98.6%"),
    Question("multilayer_exploration", "How many blocks does the task need, each depth fine-tuned on equal terms?",
             "—", "Sajjad et al. (2023): dropping the top layers and fine-tuning is a strong baseline"),
    Question("qlora", "Does a 4-bit base with low-rank adapters keep the accuracy of full fine-tuning?",
             "—", "Dettmers et al. (2023): QLoRA matches 16-bit fine-tuning"),
    Question("sensitivity", "Do importance rankings hold across seeds, calibration sets and methods?", "—", "—"),
    Question("dynamic_selection", "How much faster does early exit answer one request, and at what accuracy?",
             "50–75% of resources saved by dynamic layer selection",
             "DeeBERT ≈ 40% time saved; PABEE 1.57–1.62× at ≤ 1 point (Zhou et al. 2020)"),
)

#: Literature anchors drawn on the summary figure as speed-ups (their accuracy kept is in the table).
ANCHORS = (
    ("DistilBERT, 97% kept (Sanh et al. 2019)", 1.6),
    ("6-block BERT-of-Theseus / PKD, 98.6% kept (Xu et al. 2020)", 1.94),
    ("PABEE, ≤ 1 point lost (Zhou et al. 2020)", 1.57),
)


def _summary(slug: str, profile: str) -> dict[str, Any] | None:
    path = results_dir() / slug / profile / "summary.json"
    return json.loads(path.read_text()) if path.exists() else None


def _table(slug: str, profile: str, name: str) -> pd.DataFrame:
    path = results_dir() / slug / profile / f"{name}.csv"
    return pd.read_csv(path) if path.exists() else pd.DataFrame()


def _baselines(s: dict[str, Any], profile: str) -> tuple[str, str]:
    m, parts, verdicts = s["metrics"], [], []
    tasks = s["params"].get("tasks", [])
    for task in tasks:
        if f"accuracy/minilm/{task}" in m:
            parts.append(f"{task}: MiniLM-L6 {fmt_ci(m[f'accuracy/minilm/{task}'])}, bag-of-words "
                         f"{fmt_ci(m[f'accuracy/bow/{task}'])}, VADER {fmt_ci(m[f'accuracy/vader/{task}'])}")
    comps = _table("baselines", profile, "comparisons")
    for r in comps[(comps["a"] == "minilm") & (comps["b"] == "bow")].to_dict("records") if len(comps) else []:
        side = {1: "better", 0: "not distinguishable", -1: "worse"}[stats.interval_side(r["ci_low"], r["ci_high"])]
        verdicts.append(f"{r['task']}: {side} than bag-of-words by {r['diff_points']:+.1f} points "
                        f"[{r['ci_low']:+.1f}, {r['ci_high']:+.1f}]")
    return "; ".join(parts), "; ".join(verdicts)


def _dynamic(s: dict[str, Any], profile: str) -> tuple[str, str]:
    m = s["metrics"]
    head = _table("dynamic_selection", profile, "headline")
    parts, verdicts = [], []
    for r in head.to_dict("records") if len(head) else []:
        key = r["key"]
        parts.append(f"{key}: {r['policies']} {fmt_ci(m[f'headline/{key}/b1_speedup'], 1, '×', 2)} at "
                     f"{fmt_ci(m[f'headline/{key}/acc_loss_points'], 1, ' points', 2, sign=True)} lost")
        verdicts.append(f"{key}: goal {'met' if r['goal_met'] else 'missed'}")
    goal = s["params"].get("goal_speedup")
    if goal is not None:
        verdicts.append(f"goal: whole speed-up interval ≥ {goal:g}×, whole loss interval ≤ "
                        f"{s['params'].get('max_loss_points'):g} point")
    return "; ".join(parts), "; ".join(verdicts)


def _importance(s: dict[str, Any], profile: str) -> tuple[str, str]:
    """Per model and task: the ground truth's reliability, the method whose scores track damage best, and the
    regret of the best method against drop_last; the verdict from the Holm-corrected tests against drop_last."""
    m, parts, verdicts = s["metrics"], [], []
    for model in s["params"].get("models", []):
        for task in s["params"].get("tasks", []):
            rel = m.get(f"reliability/{model}/{task}")
            if not rel:
                continue
            rho = {k.rsplit("/", 1)[1]: v for k, v in m.items() if k.startswith(f"spearman/{model}/{task}/")
                   and not k.endswith(("/random", "/drop_last"))}
            best = max(rho, key=lambda k: rho[k]["mean"])
            dl = m[f"regret/{model}/{task}/drop_last"]
            parts.append(f"{model}/{task}: reliability {fmt_ci(rel, 1, '', 2)}; best ρ {best} "
                         f"{fmt_ci(rho[best], 1, '', 2)}; drop_last regret {fmt_ci(dl, 1, ' nats', 3)}")
        for scope, won in stats.wins(s.get("tests", []), f"{model}_vs_drop_last").items():
            where = "" if scope == "pooled tasks" else f" on {scope}"
            verdicts.append(f"{model}{where}: " + (f"beats drop_last after Holm: {', '.join(won)}" if won
                                                   else "no method beats drop_last after Holm"))
    return "; ".join(parts), "; ".join(verdicts)


def _compression(s: dict[str, Any], profile: str) -> tuple[str, str]:
    """Per task: the headline retention at each ratio with the configuration chosen on validation; the verdict
    on the 2x goal (mean >= 97 %, low end >= 95 %) from the interval."""
    m, parts, verdicts = s["metrics"], [], []
    for task in s["params"].get("tasks", []):
        heads = [(k.rsplit("_", 1)[1], v) for k, v in m.items()
                 if k.startswith(f"headline/minilm/{task}/retention_")]
        if heads:
            parts.append(f"{task}: " + ", ".join(f"{r} {fmt_ci(v)} ({config_label(v['strategy'], v['recipe'])})"
                                                 for r, v in heads))
        two = m.get(f"headline/minilm/{task}/retention_2x")
        if two:
            met = two["mean"] >= 0.97 and two["ci_low"] >= 0.95
            verdicts.append(f"{task}: 2× goal (≥ 97 %, low end ≥ 95 %) {'met' if met else 'missed'}")
    return "; ".join(parts), "; ".join(verdicts)


def _depth(s: dict[str, Any], profile: str) -> tuple[str, str]:
    """Per task: accuracy of the first k pretrained blocks, fine-tuned, at each depth; the verdict per depth
    against the deepest (equivalence margin from the chapter's power analysis)."""
    m, parts = s["metrics"], []
    for task in s["params"].get("tasks", []):
        ks = sorted(int(k.rsplit("/k", 1)[1]) for k in m if k.startswith(f"depth/minilm/{task}/k"))
        if ks:
            parts.append(f"{task}: " + ", ".join(f"{k} blocks {fmt_ci(m[f'depth/minilm/{task}/k{k}'])}" for k in ks))
    cmp = _table("multilayer_exploration", profile, "comparisons")
    verdicts = [f"{int(r['depth'])} vs {int(r['deepest'])} blocks: {r['verdict']}"
                for r in (cmp.to_dict("records") if len(cmp) else [])]
    return "; ".join(parts), "; ".join(verdicts)


def _qlora(s: dict[str, Any], profile: str) -> tuple[str, str]:
    """Per task: full fine-tuning, NF4 storage without adapter, and each method's best rank; the verdicts of the
    adapters-vs-full tests after Holm."""
    m, parts = s["metrics"], []
    for task in s["params"].get("tasks", []):
        if f"accuracy/minilm/{task}/full" not in m:
            continue
        best = []
        for method in s["params"].get("methods", []):
            sweep = m.get(f"rank_sweep/minilm/{task}/{method}")
            if sweep:
                r = int(sweep["mean"])
                best.append(f"{method} r{r} {fmt_ci(m[f'accuracy/minilm/{task}/{method}_r{r}'])} ({sweep['verdict']})")
        parts.append(f"{task}: full {fmt_ci(m[f'accuracy/minilm/{task}/full'])}, NF4 without adapter "
                     f"{fmt_ci(m[f'accuracy/minilm/{task}/nf4_no_adapter'])}, " + ", ".join(best))
    verdicts = [f"{t['name'].split(': ', 1)[-1]}: {t['effect_size']:+.1f} points, Holm p {t['p_holm']:.3g}"
                for t in s.get("tests", []) if t.get("family") == "adapters_vs_full"]
    return "; ".join(parts), "; ".join(verdicts)


def _sensitivity(s: dict[str, Any], profile: str) -> tuple[str, str]:
    """Per task: agreement (Kendall's W) across seeds (lowest method), calibration sets (lowest) and methods,
    each against its chance level; the verdict from the seed-agreement tests after Holm."""
    m, parts = s["metrics"], []
    ag = _table("sensitivity", profile, "agreement")
    chance = ag.groupby(["across", "task"])["chance"].first().to_dict() if len(ag) else {}

    def vs(across: str, task: str) -> str:
        c = chance.get((across, task))
        return f"; chance {c:.2f}" if c is not None else ""

    for task in s["params"].get("tasks", []):
        seeds = {k.rsplit("/", 1)[1]: v for k, v in m.items() if k.startswith(f"agreement/seeds/{task}/")}
        cal = {k.rsplit("/", 1)[1]: v for k, v in m.items() if k.startswith(f"agreement/calibration/{task}/")}
        meth = m.get(f"agreement/methods/{task}")
        if not (seeds and cal and meth):
            continue
        ls, lc = min(seeds, key=lambda k: seeds[k]["mean"]), min(cal, key=lambda k: cal[k]["mean"])
        parts.append(f"{task}: W across seeds ≥ {seeds[ls]['mean']:.2f} ({ls}{vs('seeds', task)}), across calibration "
                     f"sets ≥ {fmt_ci(cal[lc], 1, '', 2)} ({lc}{vs('calibration sets', task)}), across methods "
                     f"{fmt_ci(meth, 1, '', 2)} (all methods{vs('methods', task)})")
    tests = [t for t in s.get("tests", []) if t.get("family") == "seed_agreement"]
    agree = sum((t.get("p_holm") or 1) < 0.05 for t in tests)
    verdict = f"{agree} of {len(tests)} (method, task) rankings agree across seeds beyond chance after Holm" \
        if tests else ""
    return "; ".join(parts), verdict


ANSWERS = {"baselines": _baselines, "theoretical_validation": _importance, "compression": _compression,
           "multilayer_exploration": _depth, "qlora": _qlora, "sensitivity": _sensitivity,
           "dynamic_selection": _dynamic}


def _points(profile: str, summaries: dict[str, dict[str, Any]]) -> pd.DataFrame:
    """The summary figure's points: accuracy kept and measured speed-up, each with its interval where known."""
    rows = []
    if "dynamic_selection" in summaries:
        m = summaries["dynamic_selection"]["metrics"]
        pol = _table("dynamic_selection", profile, "policies")
        for r in pol.to_dict("records") if len(pol) else []:
            ref = m.get(f"reference/{r['model']}/{r['task']}/accuracy")
            if not ref:
                continue
            base = ref["mean"] * 100
            rows.append({"what": f"early exit: {r['policy']}", "kind": "exit policy", "task": r["task"],
                         "speedup": r["b1_speedup"], "speedup_low": r["b1_low"], "speedup_high": r["b1_high"],
                         "kept": 100 * (base - r["loss_points"]) / base,
                         "kept_low": 100 * (base - r["loss_high"]) / base,
                         "kept_high": 100 * (base - r["loss_low"]) / base})
    if "compression" in summaries:
        pareto = _table("compression", profile, "pareto")
        if len(pareto):
            rows += pareto[pareto["kind"] == "compressed"].assign(kind="pruned and healed").to_dict("records")
    if "baselines" in summaries:
        m = summaries["baselines"]["metrics"]
        cost = _table("baselines", profile, "cost_summary")
        for task in summaries["baselines"]["params"].get("tasks", []):
            full = m.get(f"accuracy/minilm/{task}")
            c = cost[cost["task"] == task].set_index("model") if len(cost) else pd.DataFrame()
            if not full or "minilm" not in c.index:
                continue
            for ref, label in (("bow", "bag-of-words"), ("vader", "VADER")):
                rec = m.get(f"accuracy/{ref}/{task}")
                if rec and ref in c.index and c.loc[ref, "predict_seconds"] > 0:
                    rows.append({"what": label, "kind": "simple reference", "task": task,
                                 "speedup": c.loc["minilm", "predict_seconds"] / c.loc[ref, "predict_seconds"],
                                 "speedup_low": None, "speedup_high": None,
                                 "kept": 100 * rec["mean"] / full["mean"],
                                 "kept_low": 100 * rec["ci_low"] / full["mean"],
                                 "kept_high": 100 * rec["ci_high"] / full["mean"]})
    return pd.DataFrame(rows, columns=["what", "kind", "task", "speedup", "speedup_low", "speedup_high", "kept",
                                       "kept_low", "kept_high"])


def _markdown_table(rows: list[dict[str, str]]) -> str:
    """The findings table as MyST Markdown: each question links its chapter; answer, verdict, claim, anchor."""
    def cell(text: str) -> str:
        return str(text).replace("|", "\\|").replace("\n", " ")

    out = ["| question | our answer [95 % interval] | verdict | the original claim | the literature |",
           "|---|---|---|---|---|"]
    for r in rows:
        verdict = r["verdict"] if r["verdict"] != "open" else f"open ({r['status']})"
        out.append(f"| {{doc}}`{cell(r['question'])} <{r['chapter']}>` | {cell(r['our answer (95% interval)'])} | "
                   f"{cell(verdict)} | {cell(r['original claim'])} | {cell(r['literature anchor'])} |")
    return "\n".join(out)


def run(params: Params) -> Result:
    """Read every chapter's published results for ``params.profile`` and build the findings table and figure."""
    params.validate()
    result = Result()
    stale = runner.stale_chapters(params.profile)
    summaries = {q.chapter: s for q in QUESTIONS if (s := _summary(q.chapter, params.profile)) is not None}
    fresh = {k: v for k, v in summaries.items() if k not in stale}
    rows = []
    for q in QUESTIONS:
        if q.chapter in fresh and q.chapter in ANSWERS:
            answer, verdict = ANSWERS[q.chapter](fresh[q.chapter], params.profile)
            status = "measured under the evidence protocol"
        else:
            answer = "not yet re-measured under the evidence protocol"
            verdict = "open"
            status = ("stale: the chapter's page shows an older run" if q.chapter in stale else
                      "measured; this page has no summary line for it yet" if q.chapter in fresh else "not run")
        rows.append({"question": q.question, "chapter": q.chapter, "our answer (95% interval)": answer,
                     "verdict": verdict, "original claim": q.claim, "literature anchor": q.anchor, "status": status})
    result.tables["findings"] = pd.DataFrame(rows)
    result.values["table_md"] = _markdown_table(rows)
    result.tables["tradeoff"] = _points(params.profile, fresh)
    result.tables["anchors"] = pd.DataFrame(ANCHORS, columns=["anchor", "speedup"])
    n_fresh = sum(q.chapter in fresh for q in QUESTIONS)
    lines = [f"- **{q.question}** {r['our answer (95% interval)']}; {r['verdict']}."
             for q, r in zip(QUESTIONS, rows, strict=True) if q.chapter in fresh and q.chapter in ANSWERS]
    t = result.tables["tradeoff"]
    ex = t[t["kind"] == "exit policy"]
    if len(ex):
        best = ex.loc[ex["speedup"].idxmax()]
        lines.append(f"- Fastest measured exit policy: {best['what']} on {best['task']}, "
                     f"{best['speedup']:.2f}× [{best['speedup_low']:.2f}, {best['speedup_high']:.2f}] keeping "
                     f"{best['kept']:.1f} % [{best['kept_low']:.1f}, {best['kept_high']:.1f}] of the full model's "
                     "accuracy.")
    # every question without a measured answer is named as open: one bullet each while the box has room
    # (at most six bullets), the rest together in the last one
    open_q = [q for q in QUESTIONS if not (q.chapter in fresh and q.chapter in ANSWERS)]
    room = MAX_BULLETS - len(lines)
    single = open_q if len(open_q) <= room else open_q[:room - 1]
    lines += [f"- Open: *{q.question}* ({q.chapter}: not yet measured under the evidence protocol)." for q in single]
    if len(single) < len(open_q):
        lines.append("- Also open, for the same reason: " + "; ".join(f"*{q.question}* ({q.chapter})"
                                                                     for q in open_q[len(single):]) + ".")
    if len(lines) > MAX_BULLETS:  # the box holds at most MAX_BULLETS bullets: the rest share the last one
        lines = lines[:MAX_BULLETS - 1] + ["- " + " ".join(b.removeprefix("- ") for b in lines[MAX_BULLETS - 1:])]
    result.values["key_findings"] = "\n".join(lines)
    result.values["n_fresh"] = n_fresh
    return result
