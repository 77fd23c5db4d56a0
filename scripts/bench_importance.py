"""Benchmark the importance methods' two performance targets and write the numbers as JSON.

1. Single-block ablation from cached block inputs vs the naive L + 1 full forward passes, at L = 12
   (target: >= 1.8x faster, identical scores).
2. Total wall time of the six cheap methods (Fisher, gradient, ablation, block influence, angular distance,
   activation statistics; shared passes counted once) vs one ordinary forward + backward pass over the same
   data (target: <= 3x).

The model is the 12-block from-scratch classifier: the trained baseline (``--trained``, from the cache,
trained first if missing) or, by default, the same architecture with random weights; timings do not depend
on the weights, and the identity of the ablation scores is checked either way. The data are calibration
snippets from the training split of the standard task.

Usage: python scripts/bench_importance.py [--n 64] [--repeats 5] [--threads 0] [--trained] [--out PATH]
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

import torch

from analysis_kit import data, importance, models, train
from analysis_kit.cache import atomic_write_json
from analysis_kit.paths import results_dir
from analysis_kit.report import provenance


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=64, help="calibration examples (default 64)")
    parser.add_argument("--batch-size", type=int, default=16, help="examples per batch (default 16)")
    parser.add_argument("--max-length", type=int, default=64, help="tokens per snippet (default 64)")
    parser.add_argument("--repeats", type=int, default=5, help="alternating timing repeats (default 5)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the split, sample and model (default 0)")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads, 0 leaves the default")
    parser.add_argument("--trained", action="store_true", help="use the trained scratch baseline (cached)")
    parser.add_argument("--out", type=Path, default=results_dir() / "theoretical_validation" / "bench.json",
                        help="JSON output (default results/theoretical_validation/bench.json)")
    args = parser.parse_args(argv)
    if args.n < 2 or args.repeats < 1 or args.batch_size < 1:
        parser.error("--n must be >= 2, --repeats and --batch-size >= 1")
    if args.threads:
        torch.set_num_threads(args.threads)

    start = time.time()
    spec = train.standard_spec("scratch")
    if args.trained:
        model, tokenizer, _ = train.baseline("scratch", args.seed)
    else:
        model, tokenizer = models.build_classifier(spec, 2, seed=args.seed), models.load_tokenizer(spec)
    splits = train.load_task(train.standard_task(), args.seed)
    calib = data.subsample(splits["train"], min(args.n, len(splits["train"])), args.seed)
    batches = list(data.make_loader(tokenizer, calib["text"].tolist(), calib["label"].to_numpy(),
                                    batch_size=args.batch_size, max_length=args.max_length))

    ablation = importance.bench_ablation(model, batches, repeats=args.repeats)
    cheap = importance.bench_cheap_cost(model, batches, repeats=args.repeats, seed=args.seed)
    result = {
        "model": "scratch-12 (trained)" if args.trained else "scratch-12 architecture, random weights",
        "spec": dataclasses.asdict(spec),
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "ablation": ablation, "cheap_methods": cheap,
        "targets": {"ablation_speedup_min": 1.8, "cheap_ratio_max": 3.0},
        "met": {"ablation": bool(ablation["speedup"] >= 1.8 and ablation["identical"]),
                "cheap": bool(cheap["ratio"] <= 3.0)},
        "provenance": provenance(start),
    }
    atomic_write_json(args.out, result)
    print(f"ablation, L={ablation['n_blocks']}, {ablation['n_examples']} examples: naive "
          f"{ablation['naive_seconds']:.2f}s, cached {ablation['cached_seconds']:.2f}s "
          f"({ablation['cached_seconds_no_trace']:.2f}s without the shared trace): speed-up "
          f"{ablation['speedup']:.2f}x (per repeat {[round(x, 2) for x in ablation['speedups']]}), scores "
          f"{'identical' if ablation['identical'] else 'differ by ' + str(ablation['max_abs_diff'])} "
          f"-> target >= 1.8x {'met' if result['met']['ablation'] else 'MISSED'}")
    print(f"methods 1-6: {cheap['methods_seconds']:.2f}s vs one forward+backward "
          f"{cheap['forward_backward_seconds']:.2f}s: {cheap['ratio']:.2f}x (per repeat "
          f"{[round(x, 2) for x in cheap['ratios']]}) -> target <= 3x {'met' if result['met']['cheap'] else 'MISSED'}")
    print(f"written to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
