"""Benchmark: does removing blocks speed a model up in proportion? (the compression chapter's latency target)

For a model folder (or the MiniLM asset, or the standard from-scratch architecture) and a list of kept-block
counts, time ``model(**batch)`` at each batch size with the first ``k`` blocks kept (cost depends on how many
blocks remain, not which) and compare the speedup with the ideal L / L'. The target is a batch-64 speedup of
at least 90% of the ideal on CPU. Writes a CSV and prints a table; exits 1 when the target is missed.

    python scripts/bench_latency.py --model minilm --keep 5 4 3 2 --batch 1 64 --repeats 20
    python scripts/bench_latency.py --model /path/to/hf/folder --keep 6 3 --out bench.csv
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from analysis_kit import compress, layers, models


def load(name: str) -> tuple[torch.nn.Module, object]:
    """The model to time and its tokenizer: ``minilm``, ``scratch`` (random init: timing needs no training),
    ``smollm2``, or a Hugging Face folder."""
    if name in ("minilm", "scratch"):
        spec = models.ModelSpec(name)
        return models.build_classifier(spec, num_labels=2), models.load_tokenizer(spec)
    if name == "smollm2":
        spec = models.ModelSpec("smollm2")
        return models.load_causal_lm(spec), models.load_tokenizer(spec)
    model, tokenizer = compress._load_any(Path(name).expanduser())
    return model, tokenizer


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="minilm", help="minilm, scratch, smollm2 or a Hugging Face model folder")
    parser.add_argument("--keep", type=int, nargs="+", required=True, help="kept-block counts to time")
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 64], help="batch sizes")
    parser.add_argument("--seq-len", type=int, default=64, help="tokens per example")
    parser.add_argument("--repeats", type=int, default=20, help="timed runs per setting (median reported)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed runs first")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--target", type=float, default=0.9, help="required speedup / ideal at the largest batch")
    parser.add_argument("--out", default="bench_latency.csv", help="CSV file to write")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    model, tokenizer = load(args.model)
    n = layers.num_blocks(model)
    bad = [k for k in args.keep if not 1 <= k <= n]
    if bad:
        parser.error(f"--keep {bad}: the model has {n} blocks; pass counts in 1..{n}.")
    table = compress.cost_table(model, tokenizer, args.keep, batch_sizes=args.batch, seq_len=args.seq_len,
                                repeats=args.repeats, warmup=args.warmup, device="cpu")
    table.insert(0, "model", args.model)
    table.insert(1, "threads", torch.get_num_threads())
    table.to_csv(args.out, index=False)
    cols = ["n_kept", "batch_size", "median_ms", "speedup", "speedup_ci_low", "speedup_ci_high", "ideal",
            "efficiency", "params", "peak_mib"]
    print(table[cols].round(3).to_string(index=False))
    largest = table[(table["batch_size"] == max(args.batch)) & (table["n_kept"] < n)]
    missed = largest[largest["efficiency"] < args.target]
    print(f"\nbatch {max(args.batch)}: worst speedup/ideal = {largest['efficiency'].min():.3f} "
          f"(target {args.target}); table written to {args.out}")
    return 1 if len(missed) else 0


if __name__ == "__main__":
    sys.exit(main())
