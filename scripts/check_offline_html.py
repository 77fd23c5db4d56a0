"""Check that the built book renders its charts with no network, in headless Chromium.

For every chapter page under ``<html>/book/experiments/`` it opens the page with all non-file requests
blocked (and recorded), waits for load, and checks that the page has at least one chart, that every
image (charts are SVG rendered offline by vl-convert) decoded with a non-zero size, and that nothing
tried to reach the network. A screenshot of each page is written beside the report for a human look.

Usage: python scripts/check_offline_html.py HTML_DIR [HTML_DIR ...]
Exit 1 with a list of problems when any check fails.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

CHROMIUM_CANDIDATES = ("/usr/bin/chromium", "/usr/bin/chromium-browser", "/usr/bin/google-chrome")


def _find_chromium() -> str | None:
    for cand in CHROMIUM_CANDIDATES:
        if Path(cand).exists():
            return cand
    return shutil.which("chromium")


def chromium_path() -> str:
    """The system Chromium (Debian package ``chromium``); Playwright's own download is never used.

    On a fresh Debian machine ``make test`` must pass by itself: when Chromium is missing and we are root
    with apt, it is installed here (one line says so); otherwise the check stops with one line that names
    the command to run.
    """
    found = _find_chromium()
    if found:
        return found
    if os.geteuid() == 0 and shutil.which("apt-get"):
        print("chromium not found: installing Debian's chromium with apt-get (needed once) …", flush=True)
        for cmd in (["apt-get", "update", "-qq"], ["apt-get", "install", "-y", "-qq", "chromium"]):
            proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"})
            if proc.returncode != 0:
                tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or [""]
                sys.exit(f"chromium not found and `{' '.join(cmd)}` failed ({tail[0]}); install it by hand: "
                         f"apt-get install -y chromium")
        found = _find_chromium()
        if found:
            return found
        sys.exit("chromium not found even after apt-get installed the package; install it by hand: "
                 "apt-get install -y chromium")
    sys.exit("chromium not found: run `sudo apt-get install -y chromium` (Debian/Ubuntu) and re-run `make test`.")


def check_site(html_dir: Path, browser) -> tuple[list[dict], list[str]]:
    """Open every chapter page of one built book; return per-page facts and problems.

    Besides charts and the network, math: every ``.math`` element must be typeset (``mjx-container``) by
    the MathJax copy the build vendors, with no request leaving the machine.
    """
    from playwright.sync_api import TimeoutError as PlaywrightTimeout

    pages = sorted((html_dir / "book" / "experiments").glob("*.html"))
    problems = [] if pages else [f"{html_dir}: no chapter pages under book/experiments/"]
    facts = []
    shots = html_dir.parent / "offline-check"
    shots.mkdir(exist_ok=True)
    for page_path in pages:
        page = browser.new_page(viewport={"width": 1280, "height": 1600})
        external: list[str] = []
        page.on("request", lambda r, ext=external: None if r.url.startswith(("file:", "data:", "blob:"))
                else ext.append(r.url))
        page.route(re.compile(r"^(https?|wss?)://"), lambda route: route.abort())
        page.goto(page_path.as_uri(), wait_until="load", timeout=20000)
        page.wait_for_timeout(300)
        if page.evaluate("() => document.querySelectorAll('.math').length") > 0:
            # math is typeset by the vendored MathJax (book/_static/mathjax) after load; wait for it
            try:
                page.wait_for_function("() => document.querySelectorAll('mjx-container').length >= "
                                       "document.querySelectorAll('.math').length", timeout=15000)
            except PlaywrightTimeout:
                problems.append(f"{page_path}: MathJax did not typeset the page's math within 15 s")
        info = page.evaluate("""() => {
            const imgs = [...document.querySelectorAll('img')];
            const charts = imgs.filter(i => (i.currentSrc || i.src).includes('svg'));
            const inline = [...document.querySelectorAll('.cell_output svg, .output svg')];
            const math = document.querySelectorAll('.math').length;
            const typeset = document.querySelectorAll('mjx-container').length;
            return {images: imgs.length, charts: charts.length + inline.length, math: math, typeset: typeset,
                    broken: imgs.filter(i => !(i.complete && i.naturalWidth > 0)).map(i => i.src.slice(0, 120)),
                    errors: [...document.querySelectorAll('.output.error, .output.traceback')].length};
        }""")
        page.screenshot(path=str(shots / f"{page_path.stem}.png"), full_page=False)
        page.close()
        info.update(page=str(page_path.relative_to(html_dir)), external=external)
        facts.append(info)
        if info["charts"] == 0:
            problems.append(f"{page_path}: no chart rendered")
        if info["math"] and info["typeset"] < info["math"]:
            problems.append(f"{page_path}: {info['math'] - info['typeset']} of {info['math']} math expressions were "
                            f"not typeset offline (is book/_static/mathjax/tex-svg.js in the build?)")
        if info["broken"]:
            problems.append(f"{page_path}: images that did not load: {info['broken']}")
        if external:
            problems.append(f"{page_path}: tried the network: {external[:5]}")
        if info["errors"]:
            problems.append(f"{page_path}: {info['errors']} error outputs in the executed notebook")
    return facts, problems


def main(argv: list[str]) -> int:
    if not argv:
        print(__doc__)
        return 2
    from playwright.sync_api import sync_playwright

    all_problems = []
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=chromium_path(), args=[
            "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
            "--disable-sync", "--no-first-run", "--disable-quic"])
        for d in argv:
            facts, problems = check_site(Path(d).resolve(), browser)
            print(json.dumps({"site": d, "pages": facts}, indent=1))
            all_problems += problems
        browser.close()
    for p in all_problems:
        print(f"PROBLEM: {p}", file=sys.stderr)
    print(f"offline check: {len(all_problems)} problem(s)")
    return 1 if all_problems else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
