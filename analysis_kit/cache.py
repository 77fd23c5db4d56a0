"""Content-addressed, atomic on-disk cache.

Expensive shared work (fine-tuned baselines, converted weights, importance scores) is stored under
``<cache>/<kind>/<key>/`` where ``key`` is the SHA-256 of everything that determines the result. A
result is first written to a temporary sibling folder and then renamed into place, so an interrupted
run never leaves a half-written entry: the next run simply recomputes what is missing.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from .paths import cache_dir

T = TypeVar("T")


def _canonical(obj: Any) -> Any:
    """Turn dataclasses, paths, tuples and numpy scalars into JSON-stable values."""
    if hasattr(obj, "__dataclass_fields__"):
        return {k: _canonical(getattr(obj, k)) for k in obj.__dataclass_fields__}
    if isinstance(obj, dict):
        return {str(k): _canonical(v) for k, v in sorted(obj.items(), key=lambda kv: str(kv[0]))}
    if isinstance(obj, (list, tuple)):
        return [_canonical(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    if hasattr(obj, "item") and callable(obj.item):  # numpy / torch scalars
        return obj.item()
    return obj


def key_of(spec: Any) -> str:
    """SHA-256 hex digest of a JSON-canonical form of ``spec`` (dicts are key-sorted)."""
    blob = json.dumps(_canonical(spec), sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` via a temporary file and ``os.replace`` (never half-written)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_json(path: Path, obj: Any) -> None:
    """Write ``obj`` as indented JSON atomically."""
    atomic_write_text(path, json.dumps(_canonical(obj), indent=2, sort_keys=False, default=str) + "\n")


@contextlib.contextmanager
def _locked(path: Path):
    """Hold an exclusive advisory lock on ``path`` (POSIX ``flock``) so concurrent runs build an entry once."""
    import fcntl

    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def cached_dir(kind: str, spec: Any, build: Callable[[Path], None]) -> Path:
    """Return the cache folder for ``spec``, calling ``build(tmp_folder)`` only if it is missing.

    ``build`` fills an empty temporary folder; on success it is renamed to its final, content-addressed
    name and ``spec.json`` is stored beside the payload for inspection. On failure nothing is left.
    Concurrent callers with the same spec (two notebooks running at once) wait on a lock instead of
    doing the same expensive work twice.
    """
    final = cache_dir() / kind / key_of(spec)
    if (final / ".complete").exists():
        return final
    with _locked(final.parent / f".{final.name}.lock"):
        if (final / ".complete").exists():  # another process built it while we waited
            return final
        tmp = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".{final.name[:12]}."))
        try:
            build(tmp)
            atomic_write_json(tmp / "spec.json", spec)
            (tmp / ".complete").touch()
            if final.exists():  # an incomplete leftover from an interrupted run
                shutil.rmtree(final)
            os.replace(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return final


def cached_json(kind: str, spec: Any, compute: Callable[[], T]) -> T:
    """Memoise a JSON-serialisable result of ``compute()`` under ``spec``."""
    path = cached_dir(kind, spec, lambda d: atomic_write_json(d / "value.json", {"value": compute()}))
    return json.loads((path / "value.json").read_text())["value"]
