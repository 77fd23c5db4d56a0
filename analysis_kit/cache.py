"""Content-addressed, atomic on-disk cache.

Expensive shared work (fine-tuned baselines, converted weights, importance scores) is stored under
``<cache>/<kind>/<key>/`` where ``key`` is the SHA-256 of everything that determines the result. A
result is first written to a temporary sibling folder and then renamed into place, so an interrupted
run never leaves a half-written entry: the next run simply recomputes what is missing.
"""

from __future__ import annotations

import ast
import contextlib
import hashlib
import inspect
import json
import os
import shutil
import tempfile
import textwrap
from collections.abc import Callable
from functools import lru_cache
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


def code_digest(source: str) -> str:
    """Hash of what a module *does*: its syntax tree without docstrings (comments are not in the tree).

    Editing a comment or a docstring, or re-wrapping lines, does not invalidate hours of executed notebooks;
    any change to code does. A module that does not parse is hashed byte for byte.
    """
    try:
        tree = ast.parse(source)
    except SyntaxError:
        return hashlib.sha256(source.encode()).hexdigest()
    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        if (isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef) and body
                and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant)
                and isinstance(body[0].value.value, str)):
            node.body = body[1:] or [ast.Pass()]
    return hashlib.sha256(ast.dump(tree, include_attributes=False).encode()).hexdigest()


@lru_cache(maxsize=256)
def code_key(*code: Any) -> str:
    """The one rule by which cached work is invalidated: a hash of the code that produces it.

    ``code`` are the functions, classes or modules that determine a cache entry; each is hashed by its syntax
    tree without docstrings (:func:`code_digest`), so changing what the code does re-computes the entry while
    rewording a docstring or a comment does not. Every cache key holds ``"code": code_key(...)`` of its
    builder, never a hand-bumped version number that can be forgotten.
    """
    return hashlib.sha256("".join(code_digest(textwrap.dedent(inspect.getsource(c))) for c in code).encode()
                          ).hexdigest()


def reachable(*roots: Any) -> tuple[Any, ...]:
    """``roots`` and every function and class of their own modules that they reach by name, transitively.

    What a cache key's ``code_key`` must hold is not only the builder but the helpers it calls: a key of
    ``train_exits`` alone would keep serving heads trained by an older loss function after the loss changed.
    ``code_key(*reachable(builder))`` follows the builder's names through its module (a helper of a helper
    counts), so a new helper is covered the day it is written. Other modules are not followed: name them
    (or the module itself) beside the builder. Sorted by qualified name, so the key does not depend on the
    order of discovery. Call it when the module has loaded (at its end), so the key is bound to the code as
    written, not to a name a test replaces.
    """
    found: dict[str, Any] = {}
    todo = [inspect.unwrap(r) for r in roots]
    while todo:
        obj = todo.pop()
        name = f"{obj.__module__}.{obj.__qualname__}"
        if name in found:
            continue
        found[name] = obj
        namespace = vars(inspect.getmodule(obj))
        for node in ast.walk(ast.parse(textwrap.dedent(inspect.getsource(obj)))):
            target = namespace.get(node.id) if isinstance(node, ast.Name) else None
            if callable(target):
                target = inspect.unwrap(target)
                if ((inspect.isfunction(target) or inspect.isclass(target))
                        and target.__module__ == obj.__module__):
                    todo.append(target)
    return tuple(found[k] for k in sorted(found))


def file_digest(path: Path) -> str:
    """SHA-256 over the names and contents of a file, or of every file in a folder (a model folder, a
    ``datasets`` folder): the content part of the key of anything computed from a user's files."""
    path = Path(path)
    h = hashlib.sha256()
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    for f in files:
        h.update(str(f.relative_to(path.parent if path.is_file() else path)).encode())
        with open(f, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


def _umask() -> int:
    """The process umask (reading it means setting it, so set it straight back)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def honour_umask(path: Path) -> Path:
    """Give a ``mkstemp``/``mkdtemp`` result the mode an ordinary ``open``/``mkdir`` would have had.

    ``tempfile`` creates files 0600 and folders 0700 whatever the umask; renamed into place they would
    lock other users out of a cache or a results folder shared on a cluster (group-writable umask 002).
    """
    path = Path(path)
    os.chmod(path, (0o777 if path.is_dir() else 0o666) & ~_umask())
    return path


def temp_dir(parent: Path, prefix: str) -> Path:
    """A new empty folder inside ``parent`` (created if needed) with umask-respecting permissions.

    The temporary sibling that an atomic folder write fills before renaming it into place.
    """
    parent = Path(parent)
    parent.mkdir(parents=True, exist_ok=True)
    return honour_umask(Path(tempfile.mkdtemp(dir=parent, prefix=prefix)))


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` via a temporary file and ``os.replace`` (never half-written).

    The file gets the permissions the umask gives a new file, not ``mkstemp``'s 0600.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o666 & ~_umask())
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
        for stale in final.parent.glob(f".{final.name[:12]}.*"):  # a killed build of this entry (we hold its lock)
            if stale.is_dir():
                shutil.rmtree(stale, ignore_errors=True)
        tmp = temp_dir(final.parent, prefix=f".{final.name[:12]}.")
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


def clean_stale_temps(root: Path | None = None) -> list[Path]:
    """Remove the temporary build folders that killed runs left in the cache; return what was removed.

    A build folder ``<kind>/.<key[:12]>.<random>`` belongs to the entry whose lock ``<kind>/.<key>.lock``
    is held while it builds; when that lock can be taken at once, no process is building it and the
    folder is garbage (SIGKILL skips the ``finally`` that normally removes it).
    """
    import fcntl

    root = Path(root) if root is not None else cache_dir()
    removed: list[Path] = []
    for kind in (d for d in root.iterdir() if d.is_dir() and not d.name.startswith(".")) if root.exists() else []:
        locks = {lock.name[1:13]: lock for lock in kind.glob(".*.lock")}
        for tmp in kind.glob(".*"):
            if not tmp.is_dir() or tmp.name.count(".") < 2:
                continue
            lock = locks.get(tmp.name[1:13])
            if lock is None:
                continue
            with open(lock, "a+") as fh:
                try:
                    fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    continue  # being built right now
                try:
                    shutil.rmtree(tmp)
                    removed.append(tmp)
                finally:
                    fcntl.flock(fh, fcntl.LOCK_UN)
    return removed


def cached_json(kind: str, spec: Any, compute: Callable[[], T]) -> T:
    """Memoise a JSON-serialisable result of ``compute()`` under ``spec``."""
    path = cached_dir(kind, spec, lambda d: atomic_write_json(d / "value.json", {"value": compute()}))
    return json.loads((path / "value.json").read_text())["value"]
