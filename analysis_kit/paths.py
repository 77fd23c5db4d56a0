"""Where things live on disk: the repository, the asset/model cache and the results tree.

Every location can be overridden by an environment variable so that users on shared clusters can
point the cache at scratch space and CI can isolate runs.
"""

from __future__ import annotations

import os
from pathlib import Path

#: Repository root (the folder holding ``pyproject.toml``).
REPO_ROOT = Path(__file__).resolve().parent.parent


def cache_dir() -> Path:
    """Root of the content-addressed cache (assets, converted models, trained models).

    ``LAYERWISE_CACHE`` overrides it; the default is ``<repo>/.cache`` so that a clone is self-contained.
    """
    root = Path(os.environ.get("LAYERWISE_CACHE", REPO_ROOT / ".cache")).expanduser()
    root.mkdir(parents=True, exist_ok=True)
    return root


def results_dir() -> Path:
    """Root of ``results/<experiment>/<profile>/``; ``LAYERWISE_RESULTS`` overrides it."""
    return Path(os.environ.get("LAYERWISE_RESULTS", REPO_ROOT / "results")).expanduser()
