"""Compare two sets of ``results/<slug>/<profile>/summary.json`` (e.g. smoke runs before and after a refactor).

Prints, per chapter, how many metrics, tests and glued values are identical, and lists those that differ.
Timing-like names (seconds, latency, speed-up, cost, overhead, efficiency, ms) are compared separately:
they measure the machine, not the code, and differ between any two runs.

Usage: python scripts/compare_summaries.py BEFORE_DIR AFTER_DIR   (each holding <slug>/summary.json)
"""

from __future__ import annotations

import json
import math
import re
import sys
from pathlib import Path

TIMING = re.compile(r"second|latency|speedup|speed_up|cost|overhead|efficien|_ms\b|/ms|ms_|timing|wall|duration|"
                    r"bench|ratio_scratch|ratio_minilm|peak|load_avg|context|budget|minutes|target3_worst", re.I)


def _same(a: object, b: object) -> bool:
    if isinstance(a, float) and isinstance(b, float):
        return a == b or (math.isnan(a) and math.isnan(b)) or math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-12)
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    return a == b


def compare(before: dict, after: dict) -> dict[str, list[str]]:
    """Names of the metrics, tests and glued values that differ (code) or are timing-like (machine)."""
    out: dict[str, list[str]] = {"same": [], "differ": [], "timing": [], "only_one_side": []}
    for section in ("metrics", "glued"):
        a, b = before.get(section, {}), after.get(section, {})
        for name in sorted(set(a) | set(b)):
            key = f"{section}:{name}"
            if name not in a or name not in b:
                out["only_one_side"].append(key)
            elif TIMING.search(name):
                out["timing"].append(key)
            else:
                out["same" if _same(a[name], b[name]) else "differ"].append(key)
    ta = {t["name"]: t for t in before.get("tests", [])}
    tb = {t["name"]: t for t in after.get("tests", [])}
    for name in sorted(set(ta) | set(tb)):
        key = f"tests:{name}"
        if name not in ta or name not in tb:
            out["only_one_side"].append(key)
        elif TIMING.search(name):
            out["timing"].append(key)
        else:
            out["same" if _same(ta[name], tb[name]) else "differ"].append(key)
    return out


def main(before_dir: str, after_dir: str) -> int:
    bad = 0
    for path in sorted(Path(before_dir).glob("*/summary.json")):
        slug = path.parent.name
        other = Path(after_dir) / slug / "summary.json"
        if not other.exists():
            print(f"{slug}: no summary after")
            bad += 1
            continue
        res = compare(json.loads(path.read_text()), json.loads(other.read_text()))
        print(f"{slug}: {len(res['same'])} identical, {len(res['differ'])} differ, "
              f"{len(res['timing'])} timing-like (not compared), {len(res['only_one_side'])} on one side only")
        for kind in ("differ", "only_one_side"):
            for name in res[kind]:
                print(f"    {kind}: {name}")
        bad += len(res["differ"]) + len(res["only_one_side"])
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:3]))
