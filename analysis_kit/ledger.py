"""Finished units carried with the repository, so a chapter longer than one sitting resumes on another machine.

The cache (:mod:`analysis_kit.cache`) keeps every finished unit of work (a healed model's predictions, an
adapter run, an importance unit) under ``<cache>/<kind>/<key>/``, so an interrupted run resumes where it
stopped, but only on the machine that holds the cache. A chapter whose default run needs more hours of CPU
than one working session has (compression: ≈ 4 h on 2 cores) would start from nothing on each fresh machine.

The ledger stores the small files a consumer reads back from such an entry (never model weights) in
``results/units/<host>/<kind>/<key>/`` beside the published results, where they are versioned like them:

- :func:`save` copies every finished entry of a portable kind that the ledger lacks (an entry already in the
  ledger is never rewritten, so committed units are never overwritten);
- :func:`restore` puts ledger entries that the cache lacks back into the cache as complete entries, so the
  next run finds them exactly as if it had computed them on this machine.

The key is the cache's own content key (parameters, data, code of the builder, and, where an entry's numbers
depend on it, the hardware and thread count): an entry restores only where the same code would compute the
same thing, and any change to that code computes it afresh. Because a seed gives the same numbers only on the
same processor family and torch build (README, "Results are identical ..."), entries are filed under the host
that computed them (``<host>``: :func:`host_id`, the processor model and torch build; ``host.json`` beside
each entry says it in full) and restore only on a host of the same kind, so a resumed chapter never mixes
numbers from two kinds of machine, and each kind of machine keeps its own units. The runner restores before
every run and saves after every run, failed or interrupted ones included, the units that run finished (never
the cache's leftovers of older code); ``analysis-kit units save`` saves what a run that is still going (or was
killed) has finished so far (``--since MINUTES``: only what finished in the last MINUTES minutes). Smoke-profile entries (tiny random models) are never saved.
``LAYERWISE_LEDGER=0`` turns both directions off (every number is then computed on this machine).
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .cache import temp_dir
from .paths import cache_dir, results_dir

#: The cache kinds whose entries travel, each with the files its consumer reads back (``spec.json``, the
#: entry's full key, always travels too). A kind is portable when those files hold everything downstream code
#: reads: ``healed_arm`` (compression and depth: predictions, history and budget; the healed weights stay
#: behind), ``qlora_runs`` (the adapter run's record) and ``importance_unit`` (scores and ground truth).
PORTABLE: dict[str, tuple[str, ...]] = {
    "healed_arm": ("arm.json", "logits.npz", "history.csv"),
    "qlora_runs": ("value.json",),
    "importance_unit": ("unit.pkl",),
}
SPEC = "spec.json"
HOST = "host.json"
COMPLETE = ".complete"  #: the cache's marker of a finished entry (see ``cache.cached_dir``)


def host() -> dict[str, str]:
    """The machine facts a seed's numbers depend on: the processor model and the torch build (read without
    importing torch, so the CLI stays fast)."""
    import platform
    from importlib.metadata import PackageNotFoundError, version

    cpu = platform.processor() or platform.machine()
    info = Path("/proc/cpuinfo")
    if info.is_file():
        cpu = next((line.split(":", 1)[1].strip() for line in info.read_text().splitlines()
                    if line.lower().startswith("model name")), cpu)
    try:
        torch_version = version("torch")
    except PackageNotFoundError:
        torch_version = "absent"
    return {"cpu": cpu, "torch": torch_version}


def enabled() -> bool:
    """Whether the ledger is in use (``LAYERWISE_LEDGER=0`` turns it off)."""
    return os.environ.get("LAYERWISE_LEDGER", "1") != "0"


def ledger_dir() -> Path:
    """``results/units``: the ledger's root, beside the chapters' published results."""
    return results_dir() / "units"


def host_id(facts: dict[str, str] | None = None) -> str:
    """The folder name of a kind of host: its processor model and torch build as one lower-case slug
    (``amd-epyc_torch-2.13.0-cpu``)."""
    import re

    facts = facts or host()
    slug = [re.sub(r"[^a-z0-9.]+", "-", facts[k].lower()).strip("-") or "unknown" for k in ("cpu", "torch")]
    return f"{slug[0]}_torch-{slug[1]}"


@dataclass(frozen=True)
class Moved:
    """What one :func:`save` or :func:`restore` did: entries copied per kind, and their size in bytes."""

    counts: dict[str, int]
    bytes: int

    def __str__(self) -> str:
        what = ", ".join(f"{n} {kind}" for kind, n in self.counts.items() if n) or "nothing"
        return f"{what} ({self.bytes / 2**20:.1f} MiB)"


def _is_tiny(obj: Any) -> bool:
    """Whether a spec (nested dicts and lists) names a tiny random model anywhere (``"tiny": true``)."""
    if isinstance(obj, dict):
        return obj.get("tiny") is True or any(_is_tiny(v) for v in obj.values())
    if isinstance(obj, list):
        return any(_is_tiny(v) for v in obj)
    return False


def _entries(root: Path, kinds: tuple[str, ...]) -> Iterator[tuple[str, Path]]:
    """Every ``<root>/<kind>/<key>`` folder of the given kinds (hidden build folders and locks skipped)."""
    for kind in kinds:
        folder = root / kind
        if folder.is_dir():
            yield from ((kind, d) for d in sorted(folder.iterdir()) if d.is_dir() and not d.name.startswith("."))


def _copy_entry(kind: str, src: Path, dst: Path, extra: dict[str, str]) -> int:
    """Copy an entry's portable files from ``src`` into a new folder ``dst`` (built beside it and renamed into
    place, so a killed copy leaves nothing half-written), with the ``extra`` files (name: text) written beside
    them: the host record when saving, the cache's finished marker when restoring. Returns the bytes copied."""
    names = (*PORTABLE[kind], SPEC)
    missing = [n for n in names if not (src / n).is_file()]
    if missing:
        raise FileNotFoundError(f"{src} lacks {', '.join(missing)}; it is not a finished {kind} entry.")
    tmp = temp_dir(dst.parent, prefix=f".{dst.name[:12]}.")
    try:
        for name in names:
            shutil.copy2(src / name, tmp / name)
        for name, text in extra.items():
            (tmp / name).write_text(text)
        os.replace(tmp, dst)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return sum((dst / n).stat().st_size for n in names)


def save(kinds: tuple[str, ...] = tuple(PORTABLE), cache: Path | None = None, ledger: Path | None = None,
         include_tiny: bool = False, since: float | None = None) -> Moved:
    """Copy every finished cache entry of ``kinds`` that this host's part of the ledger lacks into it; entries
    of tiny (smoke) models are skipped unless ``include_tiny`` (tests), and entries already in the ledger are
    left as they are.

    ``since`` (a ``time.time()``): only entries finished at or after it (their ``.complete`` marker's time),
    i.e. the units a run computed. A cache keeps the entries of code that has since changed (their keys no
    longer match anything); without ``since`` they would return to the ledger beside their replacements.
    Entries a run read instead of computing came from the ledger or were saved by the run that computed them
    (a run killed outright, SIGKILL, saves nothing: ``analysis-kit units save`` without ``--since`` carries
    what it finished).
    """
    facts = host()
    cache, ledger = cache or cache_dir(), (ledger or ledger_dir()) / host_id(facts)
    record = {HOST: json.dumps(facts, indent=2) + "\n"}
    counts, size = dict.fromkeys(kinds, 0), 0
    for kind, entry in _entries(cache, kinds):
        dst = ledger / kind / entry.name
        if dst.exists() or not (entry / COMPLETE).exists():
            continue
        if since is not None and (entry / COMPLETE).stat().st_mtime < since:
            continue
        if not include_tiny and _is_tiny(json.loads((entry / SPEC).read_text())):
            continue
        size += _copy_entry(kind, entry, dst, record)
        counts[kind] += 1
    return Moved(counts, size)


def restore(kinds: tuple[str, ...] = tuple(PORTABLE), cache: Path | None = None, ledger: Path | None = None
            ) -> Moved:
    """Put every ledger entry of ``kinds`` that the cache lacks back into the cache as a finished entry, from
    the part of the ledger computed on hosts like this one (:func:`host_id`); entries computed on other kinds
    of host are left for this machine to compute."""
    cache, ledger = cache or cache_dir(), (ledger or ledger_dir()) / host_id()
    counts, size = dict.fromkeys(kinds, 0), 0
    for kind, entry in _entries(ledger, kinds):
        dst = cache / kind / entry.name
        if (dst / COMPLETE).exists():
            continue
        if dst.exists():  # an unfinished build left by a killed run: the ledger's finished copy replaces it
            shutil.rmtree(dst)
        size += _copy_entry(kind, entry, dst, {COMPLETE: ""})
        counts[kind] += 1
    return Moved(counts, size)


def status(ledger: Path | None = None) -> dict[str, dict[str, int]]:
    """Entries and bytes per ``<host>/<kind>`` in the ledger (every host's part, this one's included)."""
    ledger = ledger or ledger_dir()
    out: dict[str, dict[str, int]] = {}
    hosts = sorted(d for d in ledger.iterdir() if d.is_dir() and not d.name.startswith(".")) if ledger.is_dir() else []
    for part in hosts:
        for kind, entry in _entries(part, tuple(PORTABLE)):
            row = out.setdefault(f"{part.name}/{kind}", {"entries": 0, "bytes": 0})
            row["entries"] += 1
            row["bytes"] += sum(f.stat().st_size for f in entry.iterdir() if f.is_file())
    return out
