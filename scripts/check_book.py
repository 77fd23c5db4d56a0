"""Check the built books read answer-first and carry no hand-typed numbers (analysis_kit.bookcheck).

Usage: python scripts/check_book.py HTML_DIR [HTML_DIR ...]
Runs the shape, raw-math and warning checks on every chapter page of each built book, the findings-page
check, and the typed-number lint on the Markdown cells of notebooks/*.ipynb. Stale pages (a chapter whose
shown run predates its code, marked by the book) are listed, not failed. Exit 1 with the problems.
"""

from __future__ import annotations

import sys
from pathlib import Path

from analysis_kit.bookcheck import check_book
from analysis_kit.paths import REPO_ROOT


def main(argv: list[str]) -> int:
    if not argv:
        print(__doc__)
        return 2
    failed = False
    for html in argv:
        problems, notices = check_book(Path(html), REPO_ROOT / "notebooks")
        for n in notices:
            print(f"[book-check] notice: {n}")
        for p in problems:
            print(f"[book-check] {p}")
        failed |= bool(problems)
        print(f"[book-check] {html}: {len(problems)} problem(s), {len(notices)} notice(s)")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
