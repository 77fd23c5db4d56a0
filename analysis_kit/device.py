"""Device choice, seeding and progress bars: the three things every compute function needs."""

from __future__ import annotations

import os
import random
from typing import Any

import numpy as np
import torch

from .errors import LayerwiseError


def pick(device: str | torch.device = "auto") -> torch.device:
    """Return CUDA when available and ``device == "auto"``, else the device asked for.

    Asking for CUDA on a machine without it is an error rather than a silent CPU fallback.
    """
    if isinstance(device, torch.device):
        return device
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise LayerwiseError(f"device={device!r} was requested but CUDA is not available; use device='cpu' or 'auto'.")
    return torch.device(device)


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (CPU and CUDA) so one seed gives the same numbers on CPU."""
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)


def progress_enabled() -> bool:
    """Progress bars are on unless ``LAYERWISE_PROGRESS=0``."""
    return os.environ.get("LAYERWISE_PROGRESS", "1") != "0"


_RELAY: dict[str, Any] = {}


def _relay_file() -> Any:
    """The file that ``analysis-kit run`` reads to show a notebook's loop progress on the console, or None.

    Inside an executed notebook, bars printed to stderr would end up in the published page; the runner
    names a side file in ``LAYERWISE_PROGRESS_FILE`` instead and relays its newest line to the terminal.
    """
    path = os.environ.get("LAYERWISE_PROGRESS_FILE")
    if not path:
        return None
    if _RELAY.get("path") != path:
        _RELAY.update(path=path, fh=open(path, "a", encoding="utf-8", buffering=1))  # noqa: SIM115 (kept open)
    return _RELAY["fh"]


def progress(iterable=None, **kwargs):
    """``tqdm`` for long loops: to the terminal, or relayed by ``analysis-kit run`` from inside a notebook.

    ``LAYERWISE_PROGRESS=0`` turns the terminal bars off (CI); the runner's relay file, when set, takes
    precedence so a chapter's long loops show on the console of ``analysis-kit run`` but never in the book.
    """
    from tqdm import tqdm

    relay = _relay_file()
    if relay is not None:
        kwargs.setdefault("file", relay)
        kwargs.setdefault("ascii", True)
        kwargs.setdefault("ncols", 100)
        kwargs.setdefault("mininterval", 1.0)
        kwargs.setdefault("disable", False)
    kwargs.setdefault("disable", not progress_enabled())
    kwargs.setdefault("leave", False)
    return tqdm(iterable, **kwargs)
