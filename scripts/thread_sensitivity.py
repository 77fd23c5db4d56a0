"""Does a seeded CPU training run give the same model with a different number of torch threads?

"Same seed, same numbers" holds on one machine at one thread count (tests/test_train.py proves it). Across
thread counts, floating-point reductions are summed in another order, and a training run that is close to
an instability can end somewhere else. This script measures that for one standard model and seed: it
trains the model once per thread count, each in an empty temporary cache (nothing is reused or written to
the project's cache), and prints the training history side by side with the test accuracy.

    python scripts/thread_sensitivity.py --model scratch --seed 2 --threads 2 1
    python scripts/thread_sensitivity.py --model minilm --seed 0 --threads 2 1
    python scripts/thread_sensitivity.py --model scratch --tiny --threads 2 1     # smoke models: seconds

Exits 1 when the runs disagree on any validation metric, so it can gate a reproducibility claim.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

import pandas as pd
import torch

from analysis_kit import train
from analysis_kit.paths import cache_dir


def run_once(model: str, seed: int, threads: int, tiny: bool) -> tuple[pd.DataFrame, float]:
    """Train ``model`` for ``seed`` with ``threads`` torch threads in a throw-away cache; history and test accuracy."""
    assets = cache_dir() / "assets"
    before_cache, before_threads = os.environ.get("LAYERWISE_CACHE"), torch.get_num_threads()
    with tempfile.TemporaryDirectory(prefix="layerwise-threads-") as tmp:
        (Path(tmp) / "assets").symlink_to(assets, target_is_directory=True)
        os.environ["LAYERWISE_CACHE"] = tmp
        torch.set_num_threads(threads)
        try:
            net, tok, record = train.baseline(model, seed, tiny)
            test = train.load_task(train.standard_task(tiny), seed)["test"]
            cfg = train.SMOKE_TRAIN if tiny else train.STANDARD_TRAIN[model]
            acc = train.evaluate(net, tok, test, max_length=cfg.max_length)["accuracy"]
        finally:
            torch.set_num_threads(before_threads)
            if before_cache is None:
                os.environ.pop("LAYERWISE_CACHE", None)
            else:
                os.environ["LAYERWISE_CACHE"] = before_cache
    hist = pd.DataFrame(record["history"])[["epoch", "train_loss", "val_loss", "val_accuracy"]]
    return hist.assign(threads=threads), acc


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", choices=["minilm", "scratch"], default="scratch")
    ap.add_argument("--seed", type=int, default=2)
    ap.add_argument("--threads", type=int, nargs="+", default=[2, 1], help="torch CPU thread counts to compare")
    ap.add_argument("--tiny", action="store_true", help="tiny random models of the smoke profile")
    args = ap.parse_args(argv)
    if any(t < 1 for t in args.threads) or len(set(args.threads)) < 2:
        ap.error(f"--threads {args.threads}: give at least two different counts, each >= 1")
    histories, accs = [], {}
    for t in args.threads:
        hist, acc = run_once(args.model, args.seed, t, args.tiny)
        histories.append(hist)
        accs[t] = acc
    table = pd.concat(histories).pivot(index="epoch", columns="threads")
    pd.set_option("display.width", 160)
    print(f"{args.model}, seed {args.seed}: training history per torch thread count")
    print(table.round(4).to_string())
    print("test accuracy: " + ", ".join(f"{t} thread(s) {a:.4f}" for t, a in accs.items()))
    same = all(h[["val_loss", "val_accuracy"]].round(6).equals(histories[0][["val_loss", "val_accuracy"]].round(6))
               for h in histories[1:])
    print("identical validation metrics" if same else "the thread count changed the trained model")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
