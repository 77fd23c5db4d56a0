"""Benchmark real early exit on this machine: ms per input for every policy, batch size and batch mode.

The chapter ``dynamic_selection`` measures latency on the machine it runs on; this script repeats that
measurement on any other (another CPU, a GPU) for one standard model and seed, so that "does early exit
pay here?" can be answered without running the whole chapter. The exit heads come from the cache (they
are trained once if missing). Policy settings are the chapter's budget-mode settings for ``--target``.

    python scripts/bench_dynamic.py --model minilm --seed 0 --batch-sizes 1 8 32 128 --n 256
    python scripts/bench_dynamic.py --model scratch --tiny --n 16 --batch-sizes 1 4   # the smoke models: seconds

Prints one table (policy x batch size x shrink) with ms per input and the speed-up over the model's
ordinary forward pass; ``--out FILE.csv`` also writes it.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from analysis_kit import dynamic
from analysis_kit.cache import atomic_write_text
from analysis_kit.device import pick


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", choices=["minilm", "scratch"], default="minilm")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--mode", choices=list(dynamic.MODES), default="joint", help="how the exit heads were trained")
    ap.add_argument("--tiny", action="store_true", help="tiny random models of the smoke profile")
    ap.add_argument("--target", type=float, default=0.5, help="budget: average depth as a fraction of the blocks")
    ap.add_argument("--n", type=int, default=128, help="test inputs to time")
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 32])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = default)")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--out", type=Path, default=None, help="also write the table as CSV here")
    args = ap.parse_args(argv)
    if not 0 < args.target <= 1 or args.n < 1 or min(args.batch_sizes) < 1 or args.repeats < 1:
        ap.error("need 0 < --target <= 1, --n >= 1, batch sizes >= 1 and --repeats >= 1")
    if args.threads:
        torch.set_num_threads(args.threads)
    dev = pick(args.device)

    start = time.time()
    cfg = dynamic.default_exit_config(args.model, args.mode, args.tiny)
    got = dynamic.get_exit_model(args.model, args.seed, args.tiny, cfg, device=dev)
    model, heads, tok, splits = got["model"].to(dev), got["heads"].to(dev), got["tokenizer"], got["splits"]
    res = dynamic.analyse(model, heads, tok, splits, args.seed, targets=(args.target,), static_search="first_k",
                          max_length=cfg.max_length, device=dev)
    test = splits["test"]
    texts = test.sample(min(args.n, len(test)), random_state=args.seed)["text"].tolist()
    lat = dynamic.latency_study(model, heads, tok, res, texts, splits["val"]["text"].tolist()[:30], args.seed,
                                target_frac=args.target, batch_sizes=tuple(args.batch_sizes), repeats=args.repeats,
                                max_length=cfg.max_length, device=dev)
    table = lat["latency"]
    full = table[table["policy"] == "full (HF forward)"].set_index("batch_size")["ms_per_example"]
    table = table.assign(speedup_vs_full=table["batch_size"].map(full) / table["ms_per_example"])
    acc = res["budget"].set_index("policy")["test_acc"]
    table = table.assign(test_acc=table["policy"].map(acc))
    print(f"{args.model} (seed {args.seed}, {args.mode} heads) on {dev}, torch threads {torch.get_num_threads()}; "
          f"{len(texts)} test inputs; budget {args.target:g} of the blocks; {time.time() - start:.0f} s")
    print(table.round(3).to_string(index=False))
    print(f"complexity overhead per input: median {lat['overhead']['ms'].median():.3f} ms, "
          f"p95 {lat['overhead']['ms'].quantile(0.95):.3f} ms")
    if args.out:
        atomic_write_text(args.out, table.to_csv(index=False))


if __name__ == "__main__":
    main()
