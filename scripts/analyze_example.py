"""Make the inputs of the README's `analyze` example: a fine-tuned MiniLM folder and a CSV of Amazon snippets.

`analysis-kit analyze` works on *your* model and data; this script makes a stand-in for both from the
assets, so the command can be tried (and timed) on a fresh clone:

    .venv/bin/python scripts/analyze_example.py /tmp/example          # ~2-4 min on 2 CPU cores
    .venv/bin/analysis-kit analyze /tmp/example/minilm-amazon --data /tmp/example/amazon500.csv \\
        --out /tmp/example/report --target-ratio 2 --heal finetune

The model is all-MiniLM-L6-v2 fine-tuned (seed 0, 2 epochs, lr 1e-4) on 1,000 Amazon review snippets; the
CSV holds 500 *other* snippets (text, label: negative/positive), so the report measures the cut on data the
model has not seen. Both are written with transformers / pandas alone, like a user's own files.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from analysis_kit import data, models, train
from analysis_kit.device import seed_everything


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", type=Path, help="folder for minilm-amazon/ and amazon500.csv")
    ap.add_argument("--n-train", type=int, default=1000)
    ap.add_argument("--n-csv", type=int, default=500)
    args = ap.parse_args()
    snippets = data.load_snippets("amazon").sample(frac=1.0, random_state=0).reset_index(drop=True)
    if len(snippets) < args.n_train + 200 + args.n_csv:
        raise SystemExit(f"only {len(snippets)} Amazon snippets; lower --n-train or --n-csv.")
    fit = snippets.iloc[:args.n_train]
    val = snippets.iloc[args.n_train:args.n_train + 200]
    csv = snippets.iloc[args.n_train + 200:args.n_train + 200 + args.n_csv]
    args.out.mkdir(parents=True, exist_ok=True)
    names = models.LABEL_NAMES[2]
    csv.assign(label=csv["label"].map(dict(enumerate(names))))[["text", "label"]].to_csv(
        args.out / "amazon500.csv", index=False)
    spec = models.ModelSpec("minilm")
    tok = models.load_tokenizer(spec)
    seed_everything(0)
    model = models.build_classifier(spec, 2, seed=0)
    cfg = train.TrainConfig(epochs=2, lr=1e-4, batch_size=32, patience=1, max_length=64)
    model, hist = train.fine_tune(model, tok, fit, val, cfg, seed=0)
    folder = args.out / "minilm-amazon"
    model.cpu().save_pretrained(folder)
    tok.save_pretrained(folder)
    acc = hist["val_accuracy"].iloc[-1]
    print(f"wrote {folder} (validation accuracy {acc:.3f} after {int(hist['step'].max())} steps) and "
          f"{args.out / 'amazon500.csv'} ({len(csv)} rows)")


if __name__ == "__main__":
    main()
