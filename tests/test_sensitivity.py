"""Tests for analysis_kit.sensitivity: hand-checkable rankings, a statsmodels cross-check, a tiny BERT."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from analysis_kit import sensitivity as S
from analysis_kit import stats


def _tidy(mats: dict[tuple, list[float]], cols: tuple[str, ...]) -> pd.DataFrame:
    """{(key values): scores per layer} → tidy rows (cols..., layer, score)."""
    return pd.DataFrame([{**dict(zip(cols, key, strict=True)), "layer": i, "score": float(v)}
                         for key, scores in mats.items() for i, v in enumerate(scores)])


def test_normalise_rank_and_z():
    df = _tidy({("r1",): [10, 30, 20], ("r2",): [-1, -1, 5]}, ("run",))
    out = S.normalise(df, ["run"])
    assert out["norm"].tolist() == [0.0, 1.0, 0.5, 0.25, 0.25, 1.0]  # ties share the average rank
    z = S.normalise(df, ["run"], how="z")
    assert np.allclose(z.groupby("run")["norm"].mean(), 0)
    assert np.allclose(z[z.run == "r1"]["norm"], [-1.224744871, 1.224744871, 0.0])
    const = S.normalise(_tidy({("c",): [2, 2, 2]}, ("run",)), ["run"], how="z")
    assert (const["norm"] == 0).all()
    with pytest.raises(S.SensitivityError, match="how="):
        S.normalise(df, ["run"], how="share")
    with pytest.raises(S.SensitivityError, match="missing"):
        S.normalise(df, ["nope"])


def test_kendall_w_matches_stats_module_including_ties():
    rng = np.random.default_rng(3)
    for _ in range(5):
        x = rng.integers(0, 4, size=(4, 7)).astype(float)  # many ties
        assert np.isclose(S.kendall_w(x), stats.kendalls_w(x).effect_size)
    assert np.isclose(S.kendall_w(np.array([[1, 2, 3], [1, 2, 3]])), 1.0)
    assert np.isclose(S.kendall_w(np.array([[1, 2, 3], [3, 2, 1]])), 0.0)
    assert np.isnan(S.kendall_w(np.ones((2, 3))))
