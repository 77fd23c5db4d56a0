"""Where things live on disk: the repository, the asset/model cache and the results tree.

Every location can be overridden by an environment variable so that users on shared clusters can
point the cache at scratch space and CI can isolate runs.
"""

from __future__ import annotations

import os
from pathlib import Path

from .errors import LayerwiseError

#: Repository root (the folder holding ``pyproject.toml``).
REPO_ROOT = Path(__file__).resolve().parent.parent


class CacheLocationError(LayerwiseError):
    """The cache folder (``LAYERWISE_CACHE``) cannot be created or written."""


def cache_dir() -> Path:
    """Root of the content-addressed cache (assets, converted models, trained models).

    ``LAYERWISE_CACHE`` overrides it; the default is ``<repo>/.cache`` so that a clone is self-contained.
    """
    root = Path(os.environ.get("LAYERWISE_CACHE", REPO_ROOT / ".cache")).expanduser()
    where = f"LAYERWISE_CACHE={root}" if "LAYERWISE_CACHE" in os.environ else f"the cache folder {root}"
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise CacheLocationError(f"{where} cannot be created ({exc.strerror}); point LAYERWISE_CACHE at a writable "
                                 f"folder (e.g. export LAYERWISE_CACHE=$HOME/.cache/layerwise) or unset it to "
                                 f"use <repo>/.cache.") from exc
    if not os.access(root, os.W_OK | os.X_OK):
        raise CacheLocationError(f"{where} is not writable; point LAYERWISE_CACHE at a writable folder (e.g. export "
                                 f"LAYERWISE_CACHE=$HOME/.cache/layerwise), fix its permissions, or unset it to use "
                                 f"<repo>/.cache.")
    return root


def results_dir() -> Path:
    """Root of ``results/<experiment>/<profile>/``; ``LAYERWISE_RESULTS`` overrides it."""
    return Path(os.environ.get("LAYERWISE_RESULTS", REPO_ROOT / "results")).expanduser()


def published(path: str | Path) -> Path:
    """Where ``path`` will live once the run that is writing it is published.

    Under ``analysis-kit run`` a notebook writes into a staging folder (``LAYERWISE_RUN_DIR``) that the
    runner renames to ``results/<LAYERWISE_PUBLISH_AS>`` only if the whole notebook succeeds; paths that a
    notebook records or prints must name the published place, not the staging one. Outside a run (or for
    a path outside the staging folder) ``path`` is returned unchanged.
    """
    path = Path(path)
    stage, target = os.environ.get("LAYERWISE_RUN_DIR"), os.environ.get("LAYERWISE_PUBLISH_AS")
    if not stage or not target:
        return path
    try:
        rel = path.resolve().relative_to(Path(stage).resolve())
    except ValueError:
        return path
    return results_dir() / target / rel


def shown(path: str | Path) -> str:
    """``path`` for a reader: relative to the repository when inside it, so no machine's layout is printed."""
    path = Path(path).resolve()
    try:
        return path.relative_to(REPO_ROOT).as_posix()
    except ValueError:
        return str(path)
