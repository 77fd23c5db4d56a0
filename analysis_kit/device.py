"""Device choice, seeding and progress bars: the three things every compute function needs."""

from __future__ import annotations

import os
import random

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


def progress(iterable=None, **kwargs):
    """``tqdm`` (text) that honours ``LAYERWISE_PROGRESS``; the runner turns it off inside executed notebooks."""
    from tqdm import tqdm

    kwargs.setdefault("disable", not progress_enabled())
    kwargs.setdefault("leave", False)
    return tqdm(iterable, **kwargs)
