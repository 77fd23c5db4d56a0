"""The content-addressed cache: stable keys, atomic entries, nothing left behind on failure."""

import json
from pathlib import Path

import pytest

from analysis_kit import cache


@pytest.fixture(autouse=True)
def _tmp_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("LAYERWISE_CACHE", str(tmp_path / "cache"))


def test_key_is_order_independent_and_sensitive():
    assert cache.key_of({"a": 1, "b": [1, 2]}) == cache.key_of({"b": [1, 2], "a": 1})
    assert cache.key_of({"a": 1}) != cache.key_of({"a": 2})
    assert cache.key_of((1, 2)) == cache.key_of([1, 2])


def test_cached_dir_builds_once():
    calls = []

    def build(folder: Path) -> None:
        calls.append(folder)
        (folder / "x.txt").write_text("hello")

    a = cache.cached_dir("k", {"n": 1}, build)
    b = cache.cached_dir("k", {"n": 1}, build)
    assert a == b and len(calls) == 1
    assert (a / "x.txt").read_text() == "hello"
    assert json.loads((a / "spec.json").read_text()) == {"n": 1}


def test_failed_build_leaves_nothing_and_retries():
    def bad(folder: Path) -> None:
        (folder / "partial").write_text("half")
        raise RuntimeError("interrupted")

    with pytest.raises(RuntimeError):
        cache.cached_dir("k", {"n": 2}, bad)
    kind_dir = Path(cache.cache_dir()) / "k"
    assert [p for p in kind_dir.iterdir() if not p.name.endswith(".lock")] == []  # lock files are reused
    path = cache.cached_dir("k", {"n": 2}, lambda f: (f / "ok").write_text("1"))
    assert (path / "ok").exists() and not (path / "partial").exists()


def test_cached_json_and_atomic_write(tmp_path):
    n = []
    assert cache.cached_json("j", {"q": 1}, lambda: n.append(1) or {"v": 3}) == {"v": 3}
    assert cache.cached_json("j", {"q": 1}, lambda: n.append(1) or {"v": 4}) == {"v": 3}
    assert len(n) == 1
    target = tmp_path / "out" / "f.json"
    cache.atomic_write_json(target, {"a": 1})
    assert json.loads(target.read_text()) == {"a": 1}
    assert [p.name for p in target.parent.iterdir()] == ["f.json"]


def test_concurrent_builders_build_once(tmp_path):
    import multiprocessing as mp

    marker = tmp_path / "calls"
    marker.mkdir()
    ctx = mp.get_context("fork")
    procs = [ctx.Process(target=_slow_build, args=(str(marker), i)) for i in range(3)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(30)
    assert all(p.exitcode == 0 for p in procs)
    assert len(list(marker.iterdir())) == 1  # one build, two waiters


def _slow_build(marker: str, i: int) -> None:
    import time

    def build(folder: Path) -> None:
        (Path(marker) / f"call{i}").touch()
        time.sleep(0.5)
        (folder / "x").write_text("done")

    cache.cached_dir("concurrent", {"same": True}, build)


def test_entries_and_files_honour_the_umask(tmp_path):
    """Issue 13.9: a cache shared on a cluster (umask 002) must not get mkdtemp's 0700 / mkstemp's 0600."""
    import os

    old = os.umask(0o002)
    try:
        folder = cache.cached_dir("k", {"n": 3}, lambda d: (d / "x.txt").write_text("x"))
        path = tmp_path / "out" / "a.json"
        cache.atomic_write_json(path, {"a": 1})
    finally:
        os.umask(old)
    assert folder.stat().st_mode & 0o777 == 0o775
    assert path.stat().st_mode & 0o777 == 0o664
    assert (folder / "spec.json").stat().st_mode & 0o777 == 0o664


def test_stale_temp_folders_of_killed_builds_are_removed(tmp_path):
    """Issue 13.6: SIGKILL skips the cleanup; the next build of that entry, or clean_stale_temps, removes it."""
    root = Path(tmp_path / "cache")
    key = cache.key_of({"n": 4})
    kind = root / "trained"
    kind.mkdir(parents=True)
    (kind / f".{key}.lock").write_text("")
    stale = kind / f".{key[:12]}.abc123"
    stale.mkdir()
    (stale / "partial.bin").write_text("half")
    assert cache.clean_stale_temps(root) == [stale] and not stale.exists()

    stale.mkdir()
    cache.cached_dir("trained", {"n": 4}, lambda d: (d / "x.txt").write_text("x"))
    assert not stale.exists()
    assert not [p for p in kind.iterdir() if p.is_dir() and p.name.startswith(".")]


def test_a_temp_folder_being_built_is_kept(tmp_path):
    import fcntl

    root = Path(tmp_path / "cache")
    key = cache.key_of({"n": 5})
    kind = root / "trained"
    kind.mkdir(parents=True)
    live = kind / f".{key[:12]}.xyz"
    live.mkdir()
    with open(kind / f".{key}.lock", "a+") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)  # another process is building this entry
        assert cache.clean_stale_temps(root) == []
    assert live.exists()


def test_unwritable_cache_location_is_a_clear_error(tmp_path, monkeypatch):
    """Issue 13.7: a LAYERWISE_CACHE that cannot be created names the variable and the fix."""
    from analysis_kit import paths

    blocker = tmp_path / "file"
    blocker.write_text("")
    monkeypatch.setenv("LAYERWISE_CACHE", str(blocker / "cache"))
    with pytest.raises(paths.CacheLocationError, match="LAYERWISE_CACHE=.*cannot be created.*point LAYERWISE_CACHE"):
        paths.cache_dir()
    monkeypatch.setattr(paths.os, "access", lambda *a: False)  # a read-only folder (root ignores chmod)
    monkeypatch.setenv("LAYERWISE_CACHE", str(tmp_path / "ro"))
    with pytest.raises(paths.CacheLocationError, match="is not writable"):
        paths.cache_dir()


def test_code_key_follows_code_not_docstrings(tmp_path, monkeypatch):
    """The one invalidation rule: a cache key changes with what the code does, not with its docstring."""
    import importlib
    import sys

    from analysis_kit.cache import code_key

    def module(body: str, name: str):
        (tmp_path / f"{name}.py").write_text(body)
        monkeypatch.syspath_prepend(str(tmp_path))
        sys.modules.pop(name, None)
        return importlib.import_module(name)

    a = module('def f(x):\n    """Say what."""\n    return x + 1\n', "ck_a")
    b = module('def f(x):\n    """Say it differently, at length."""\n    # a comment\n    return x + 1\n', "ck_b")
    c = module('def f(x):\n    """Say what."""\n    return x + 2\n', "ck_c")
    assert code_key(a.f) == code_key(b.f) != code_key(c.f)


REACH = '''import functools
from json import dumps  # another module's function: not followed


def builder(x):
    return helper(x) + len(dumps(x))


def helper(x):
    return Thing().value(x) + deeper(x) + memo(x)


class Thing:
    def value(self, x):
        return x


def deeper(x):
    return x * {factor}


@functools.lru_cache
def memo(x):
    return x


def unrelated():
    return deeper(0)
'''


def test_reachable_keys_a_builder_with_every_helper_it_calls(tmp_path, monkeypatch):
    """``cache.reachable`` follows a builder's names through its module, helpers of helpers and decorated ones
    included, and nothing it does not call; a change two calls deep changes the key, which ``code_key`` of the
    builder alone misses."""
    import importlib
    import sys

    def module(name: str, factor: int):
        (tmp_path / f"{name}.py").write_text(REACH.format(factor=factor))
        monkeypatch.syspath_prepend(str(tmp_path))
        sys.modules.pop(name, None)
        return importlib.import_module(name)

    a, b = module("reach_a", 2), module("reach_b", 3)
    found = cache.reachable(a.builder)
    assert [o.__qualname__ for o in found] == ["Thing", "builder", "deeper", "helper", "memo"]
    assert cache.reachable(a.helper, a.builder) == found  # the same tuple whatever the roots' order
    assert cache.code_key(a.builder) == cache.code_key(b.builder)  # the builder alone: the change is invisible
    assert cache.code_key(*found) != cache.code_key(*cache.reachable(b.builder))
