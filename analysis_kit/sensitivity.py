"""Agreement maths for layer-importance rankings: rank normalisation and Kendall's W, vectorised.

The sensitivity chapter (``analysis_kit.studies.sensitivity``) asks how stable rankings of blocks are
across seeds, methods and calibration sets; it needs two pieces that are not in scipy or statsmodels in the
shape it uses them:

- ``normalise`` puts rankings on a common scale (ranks in [0, 1], or z-scores) within each ranking, so
  methods with different units can be compared and only the *profile over blocks* differs;
- ``kendall_w`` gives Kendall's W of ``x[..., raters, items]``, tie-corrected and vectorised over leading
  axes, so a permutation test evaluates thousands of shuffled rankings in one call.

Input tables are tidy: one row per (ranking, layer) with a ``score`` where higher = more important, as
produced by ``importance.compute``.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd
from scipy import stats as sps

from .errors import LayerwiseError


class SensitivityError(LayerwiseError):
    """Input that the sensitivity analysis cannot use (missing columns, incomplete or unbalanced designs)."""


def _require(df: pd.DataFrame, cols: Sequence[str], what: str) -> None:
    if not isinstance(df, pd.DataFrame):
        raise SensitivityError(f"{what} needs a pandas DataFrame, got {type(df).__name__}.")
    missing = [c for c in cols if c not in df.columns]
    if missing:
        raise SensitivityError(f"{what}: column(s) {missing} missing (have {list(df.columns)}); pass a tidy table "
                               "with one row per (ranking, layer), as importance.compute returns.")
    if df.empty:
        raise SensitivityError(f"{what}: the table is empty; check the filter that produced it.")


def normalise(df: pd.DataFrame, within: Sequence[str], value: str = "score", how: str = "rank",
              out: str = "norm") -> pd.DataFrame:
    """Add column ``out``: ``value`` normalised within each ranking (rows sharing ``within``).

    ``how="rank"``: average rank scaled to [0, 1] (1 = most important), so methods with different scales
    (Fisher is heavy-tailed, ablation can be negative) become comparable; ``how="z"``: z-score (0 when
    the ranking is constant). Either way each ranking has the same mean, so factor main effects vanish
    and only the *profile over layers* can differ between conditions.
    """
    _require(df, [*within, value], "normalise")
    if how not in ("rank", "z"):
        raise SensitivityError(f"how={how!r}: choose 'rank' or 'z'.")
    g = df.groupby(list(within), sort=False)[value]
    if how == "rank":
        size = g.transform("size").to_numpy(dtype=float)
        if (size < 2).any():
            raise SensitivityError("a ranking has a single layer; normalising needs at least 2 layers per ranking.")
        normed = (g.rank(method="average").to_numpy(dtype=float) - 1) / (size - 1)
    else:
        sd = g.transform("std", ddof=0).to_numpy(dtype=float)
        centred = df[value].to_numpy(dtype=float) - g.transform("mean").to_numpy(dtype=float)
        normed = np.divide(centred, sd, out=np.zeros_like(centred), where=sd > 0)
    return df.assign(**{out: normed})


# --------------------------------------------------------------------------- vectorised agreement maths


def _tie_sum(x: np.ndarray) -> np.ndarray:
    """Sum over tie groups of t^3 - t along the last axis (= sum over items of (group size)^2 - 1)."""
    counts = (x[..., :, None] == x[..., None, :]).sum(-1)
    return (counts**2 - 1).sum(-1)


def kendall_w(x: np.ndarray) -> np.ndarray:
    """Kendall's W of ``x[..., raters, items]`` (tie-corrected, raw scores ranked per rater); NaN if undefined.

    Same formula as ``stats.kendalls_w``, vectorised over leading axes (bootstrap resamples).
    """
    x = np.asarray(x, dtype=float)
    m, n = x.shape[-2:]
    ranks = sps.rankdata(x, axis=-1)
    s = ((ranks.sum(-2) - m * (n + 1) / 2) ** 2).sum(-1)
    denom = m**2 * (n**3 - n) - m * _tie_sum(ranks).sum(-1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(denom > 0, 12 * s / np.where(denom > 0, denom, 1), np.nan)
