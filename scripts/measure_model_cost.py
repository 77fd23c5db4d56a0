"""Measure what one fine-tune of each candidate model costs on this CPU, to decide which models fit a profile.

Why: the default profile runs on 2 CPU cores, where one fine-tune should take about 10 minutes or less
(2 epochs over the Amazon task's 2,060 training snippets). MiniLM-L6 fits; whether MPNet-base (12 blocks,
hidden 768) and SmolLM2-135M as a sequence classifier (full fine-tuning, or LoRA through ``peft``) fit too,
or belong to the full (GPU) profile only, is decided from these numbers.

What: for each model, ``--warmup`` optimizer steps and then ``--steps`` timed ones of the training recipe's
shape: the real Amazon train split (``train.load_task(train.TaskSpec(), seed=0)``), the training data loader
(``data.make_loader(..., shuffle=True, bucket=True)``), batch 32, 64 tokens, AdamW, gradient clipping, train
mode. Each (model, round) runs in its own process, so its peak RSS is its own, and every round measures all
models one after the other with the same batch order (odd rounds in reverse order), so a change in the
machine's load hits all of them; each model's ratio to MiniLM in the same round is the number that survives
a shared machine. The validation passes of a real fine-tune are not included (a forward pass over 15 % of
the data per epoch).

Extrapolation: minutes for 2 epochs over a task's training split = 2 × ceil(n_train / batch) steps × seconds
per step × (padded tokens per batch over a whole epoch of that task / padded tokens per batch of the timed
steps). The length factor corrects for which batches were timed and for the movie-review (``mr``) snippets'
other lengths; it assumes time proportional to tokens, so it slightly overstates the effect when the
optimizer step (independent of length) is a large part of a step. ``--minilm-minutes`` (a MiniLM 2-epoch
Amazon fine-tune measured on a quiet machine) turns the ratios into minutes that do not depend on today's load.

Writes ``<out>/cost.csv`` (one row per model) and ``<out>/run.json`` (settings, machine, load, every round).

    OMP_NUM_THREADS=2 python scripts/measure_model_cost.py                     # all four, 2 rounds
    OMP_NUM_THREADS=2 python scripts/measure_model_cost.py --models minilm mpnet --rounds 1 --steps 4
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pandas as pd

#: The models measured: name -> (ModelSpec kind, LoRA or full fine-tuning).
VARIANTS = {"minilm": ("minilm", False), "mpnet": ("mpnet", False), "smollm2": ("smollm2", False),
            "smollm2_lora": ("smollm2", True)}
#: LoRA on SmolLM2's attention projections; the classification head ``score`` is trained in full.
LORA = {"r": 16, "lora_alpha": 32, "lora_dropout": 0.05, "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"],
        "modules_to_save": ["score"]}
EPOCHS = 2
#: Task name -> snippet domain (``mr`` = the movie-review snippets).
TASKS = {"amazon": "amazon", "mr": "movie"}
MARK = "MEASURE_JSON "


def _rss_bytes() -> int:
    import psutil

    return psutil.Process().memory_info().rss


def _build(variant: str) -> tuple[Any, Any]:
    """The tokenizer and the (LoRA-wrapped where asked) two-class classifier of ``variant``."""
    from analysis_kit import models

    kind, lora = VARIANTS[variant]
    spec = models.ModelSpec(kind)
    tokenizer = models.load_tokenizer(spec)
    model = models.build_classifier(spec, num_labels=2, seed=0)
    if lora:
        from peft import LoraConfig, TaskType, get_peft_model

        model = get_peft_model(model, LoraConfig(task_type=TaskType.SEQ_CLS, **LORA))
    return tokenizer, model


def _tokens_per_batch(tokenizer: Any, df: pd.DataFrame, batch_size: int, max_length: int, seed: int) -> float:
    """Mean padded tokens per batch over one epoch of ``df`` with the training loader."""
    from analysis_kit import data

    loader = data.make_loader(tokenizer, df["text"].tolist(), df["label"].to_numpy(), batch_size=batch_size,
                              shuffle=True, seed=seed, max_length=max_length, bucket=True)
    sizes = [batch["input_ids"].numel() for batch in loader]
    return sum(sizes) / len(sizes)


def measure(variant: str, steps: int, warmup: int, batch_size: int, max_length: int, lr: float, seed: int,
            threads: int) -> dict[str, Any]:
    """Time ``steps`` optimizer steps of ``variant`` after ``warmup`` ones (run in a child process)."""
    import torch

    from analysis_kit import data, models, train

    if threads:
        torch.set_num_threads(threads)
    t0 = time.perf_counter()
    splits = {name: train.load_task(train.TaskSpec(domain=domain), seed=0)["train"] for name, domain in TASKS.items()}
    amazon = splits["amazon"]  # TaskSpec() is the Amazon task: polarity, neutral band 0.5, whole split
    tokenizer, model = _build(variant)
    load_s = time.perf_counter() - t0
    rss_loaded = _rss_bytes()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
    loader = data.make_loader(tokenizer, amazon["text"].tolist(), amazon["label"].to_numpy(), batch_size=batch_size,
                              shuffle=True, seed=seed, max_length=max_length, bucket=True)
    if len(loader) < warmup + steps:
        raise SystemExit(f"only {len(loader)} batches; lower --steps/--warmup")
    model.train()
    times, tokens, losses = [], [], []
    for i, batch in enumerate(loader):
        if i == warmup + steps:
            break
        start = time.perf_counter()
        labels = batch.pop("labels")
        loss = torch.nn.functional.cross_entropy(model(**batch).logits, labels)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        elapsed = time.perf_counter() - start
        if i >= warmup:
            times.append(elapsed)
            tokens.append(batch["input_ids"].numel())
            losses.append(float(loss))
    per_batch = {name: _tokens_per_batch(tokenizer, df, batch_size, max_length, seed) for name, df in splits.items()}
    return {
        "model": variant, "kind": VARIANTS[variant][0], "method": "lora" if VARIANTS[variant][1] else "full",
        "torch_threads": torch.get_num_threads(), "load_s": load_s,
        "total_params": models.count_parameters(model), "trainable_params": sum(p.numel() for p in params),
        "step_s": times, "step_tokens": tokens, "loss": losses,
        "n_train": {name: len(df) for name, df in splits.items()}, "tokens_per_batch": per_batch,
        "rss_loaded_bytes": rss_loaded,
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,  # Linux: KiB
    }


def _child(variant: str, args: argparse.Namespace, seed: int) -> dict[str, Any]:
    cmd = [sys.executable, __file__, "--child", variant, "--steps", str(args.steps), "--warmup", str(args.warmup),
           "--batch-size", str(args.batch_size), "--max-length", str(args.max_length), "--lr", str(args.lr),
           "--seed", str(seed), "--threads", str(args.threads)]
    load_before = os.getloadavg()[0]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith(MARK)]
    if proc.returncode != 0 or not lines:
        raise SystemExit(f"measuring {variant} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    row = json.loads(lines[-1][len(MARK):])
    row["loadavg_1min"] = [load_before, os.getloadavg()[0]]
    return row


def _lscpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return platform.processor() or "unknown"
    names = [ln.split(":", 1)[1].strip() for ln in out.splitlines() if ln.startswith("Model name")]
    return names[0] if names else "unknown"


def _summarize(rounds: list[list[dict[str, Any]]], args: argparse.Namespace) -> pd.DataFrame:
    """One row per model: mean seconds per step (median over rounds), ratio to MiniLM, extrapolated minutes."""
    rows = []
    for variant in args.models:
        runs = [r for rnd in rounds for r in rnd if r["model"] == variant]
        per_round = [statistics.fmean(r["step_s"]) for r in runs]
        ratios = []
        for rnd in rounds:
            ref = [r for r in rnd if r["model"] == "minilm"]
            mine = [r for r in rnd if r["model"] == variant]
            if ref and mine:
                ratios.append(statistics.fmean(mine[0]["step_s"]) / statistics.fmean(ref[0]["step_s"]))
        first = runs[0]
        s_step = statistics.median(per_round)
        timed_tokens = statistics.fmean(t for r in runs for t in r["step_tokens"])
        row: dict[str, Any] = {
            "model": variant, "kind": first["kind"], "method": first["method"],
            "total_params": first["total_params"], "trainable_params": first["trainable_params"],
            "rounds": len(runs), "s_per_step": s_step, "s_per_step_min": min(per_round), "s_per_step_max": max(per_round),
            "ratio_to_minilm": statistics.median(ratios) if ratios else math.nan,
            "ratio_min": min(ratios) if ratios else math.nan, "ratio_max": max(ratios) if ratios else math.nan,
            "peak_rss_gib": max(r["peak_rss_bytes"] for r in runs) / 2**30,
            "tokens_per_timed_batch": timed_tokens,
        }
        for task in TASKS:
            steps = EPOCHS * math.ceil(first["n_train"][task] / args.batch_size)
            factor = first["tokens_per_batch"][task] / timed_tokens
            row[f"n_train_{task}"] = first["n_train"][task]
            row[f"steps_2ep_{task}"] = steps
            row[f"tokens_per_batch_{task}"] = first["tokens_per_batch"][task]
            row[f"minutes_2ep_{task}"] = steps * s_step * factor / 60
            if args.minilm_minutes is not None and ratios:  # the task's size and lengths relative to Amazon
                scale = steps * first["tokens_per_batch"][task] / (
                    EPOCHS * math.ceil(first["n_train"]["amazon"] / args.batch_size)
                    * first["tokens_per_batch"]["amazon"])
                row[f"minutes_2ep_{task}_via_ratio"] = args.minilm_minutes * row["ratio_to_minilm"] * scale
        rows.append(row)
    return pd.DataFrame(rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", choices=list(VARIANTS), default=list(VARIANTS),
                        help="models to measure (minilm is needed for the ratios); default: all")
    parser.add_argument("--steps", type=int, default=8, help="timed optimizer steps per model and round (default 8)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first (default 2)")
    parser.add_argument("--rounds", type=int, default=2, help="rounds over all models, each with its own batch order")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--max-length", type=int, default=64)
    parser.add_argument("--lr", type=float, default=5e-5, help="AdamW learning rate (does not change the cost)")
    parser.add_argument("--seed", type=int, default=0, help="batch order of round r uses seed + r")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default / OMP_NUM_THREADS)")
    parser.add_argument("--minilm-minutes", type=float, default=None,
                        help="minutes of a MiniLM 2-epoch Amazon fine-tune on a quiet machine: adds minutes via ratio")
    parser.add_argument("--note", default="", help="free text kept in run.json (e.g. where --minilm-minutes is from)")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent.parent / "results" / "model_cost")
    parser.add_argument("--child", choices=list(VARIANTS), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if min(args.steps, args.rounds, args.batch_size, args.max_length) < 1 or args.warmup < 0:
        parser.error("--steps, --rounds, --batch-size and --max-length must be >= 1, --warmup >= 0")
    if args.child:
        row = measure(args.child, args.steps, args.warmup, args.batch_size, args.max_length, args.lr, args.seed,
                      args.threads)
        print(MARK + json.dumps(row), flush=True)
        return 0

    import torch

    from analysis_kit.cache import atomic_write_json, atomic_write_text
    from analysis_kit.report import provenance

    if args.threads:
        torch.set_num_threads(args.threads)
    started = time.time()
    rounds: list[list[dict[str, Any]]] = []
    for r in range(args.rounds):
        rnd = []
        for variant in args.models if r % 2 == 0 else args.models[::-1]:  # alternate the order against drift
            row = _child(variant, args, args.seed + r)
            print(f"round {r}: {variant:13s} {statistics.fmean(row['step_s']):6.2f} s/step, "
                  f"peak RSS {row['peak_rss_bytes'] / 2**30:.2f} GiB, load {row['loadavg_1min'][0]:.1f}", flush=True)
            rnd.append(row)
        rounds.append(rnd)
    table = _summarize(rounds, args)
    args.out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(args.out / "cost.csv", table.to_csv(index=False, float_format="%.4g"))
    run = {
        "what": "seconds per optimizer step of fine-tuning, per model, on the Amazon train split; see the script",
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "cpu_model": _lscpu_model(), "cpu_count": os.cpu_count(), "torch_threads": rounds[0][0]["torch_threads"],
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        "loadavg_at_end": list(os.getloadavg()),
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k != "child"},
        "lora": LORA, "epochs_extrapolated": EPOCHS,
        "provenance": provenance(started),
        "rounds": rounds,
    }
    atomic_write_json(args.out / "run.json", run)
    with pd.option_context("display.width", 200, "display.max_columns", 30):
        print(table[["model", "method", "trainable_params", "s_per_step", "ratio_to_minilm", "peak_rss_gib",
                     "minutes_2ep_amazon", "minutes_2ep_mr"]].to_string(index=False, float_format="%.2f"))
    print(f"wrote {args.out / 'cost.csv'} and {args.out / 'run.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
