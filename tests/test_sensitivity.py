"""Tests for analysis_kit.sensitivity: hand-checkable rankings, a statsmodels cross-check, a tiny BERT."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from scipy import stats as sps

from analysis_kit import sensitivity as S
from analysis_kit import stats


def _tidy(mats: dict[tuple, list[float]], cols: tuple[str, ...]) -> pd.DataFrame:
    """{(key values): scores per layer} → tidy rows (cols..., layer, score)."""
    return pd.DataFrame([{**dict(zip(cols, key, strict=True)), "layer": i, "score": float(v)}
                         for key, scores in mats.items() for i, v in enumerate(scores)])


def _design(noise: float = 1.0, shift_domain: str = "z", seed: int = 0) -> pd.DataFrame:
    """3 seeds x 2 methods x 3 domains x 6 layers; domain ``shift_domain`` tilts the profile."""
    rng = np.random.default_rng(seed)
    prof = np.array([0, 3, 1, 2, 5, 4], float)
    mats = {(s, m, d): prof + rng.normal(0, noise, 6) + (np.arange(6) * 2 if d == shift_domain else 0)
            for s in range(3) for m in ("a", "b") for d in ("x", "y", "z")}
    return _tidy(mats, ("seed", "method", "domain"))


# ----------------------------------------------------------------------------------------- scales


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


def test_coarsen_maps_relative_depth():
    df = _tidy({("deep",): [1, 3, 5, 7, 9, 11], ("flat",): [2, 4, 6]}, ("model",))
    out = S.coarsen(df, 3, ["model"])
    deep = out[out.model == "deep"].set_index("layer")["score"]
    assert deep.tolist() == [2.0, 6.0, 10.0]  # pairs (0,1), (2,3), (4,5) averaged
    assert out[out.model == "flat"]["score"].tolist() == [2.0, 4.0, 6.0]  # L == n_bins: unchanged
    with pytest.raises(S.SensitivityError, match="smallest depth"):
        S.coarsen(df, 4, ["model"])


def test_n_select_bounds():
    assert S.n_select(6, 1 / 3) == 2 and S.n_select(12, 1 / 3) == 4 and S.n_select(3, 0.1) == 1
    assert S.n_select(3, 0.9) == 2  # never all layers
    with pytest.raises(S.SensitivityError):
        S.n_select(6, 1.0)


# ------------------------------------------------------------------------------------ agreement maths


def test_kendall_w_matches_stats_module_including_ties():
    rng = np.random.default_rng(3)
    for _ in range(5):
        x = rng.integers(0, 4, size=(4, 7)).astype(float)  # many ties
        assert np.isclose(S.kendall_w(x), stats.kendalls_w(x).effect_size)
    assert np.isclose(S.kendall_w(np.array([[1, 2, 3], [1, 2, 3]])), 1.0)
    assert np.isclose(S.kendall_w(np.array([[1, 2, 3], [3, 2, 1]])), 0.0)
    assert np.isnan(S.kendall_w(np.ones((2, 3))))


def test_mean_tau_matches_scipy():
    rng = np.random.default_rng(4)
    x = rng.normal(size=(3, 8))
    want = np.mean([sps.kendalltau(x[i], x[j]).statistic for i, j in ((0, 1), (0, 2), (1, 2))])
    assert np.isclose(S.mean_tau(x), want)
    assert np.isclose(S.mean_tau(np.array([[1, 2, 3, 4], [4, 3, 2, 1]])), -1.0)
    batched = S.mean_tau(np.stack([x, x[::-1]]))  # leading axes are vectorised
    assert batched.shape == (2,) and np.allclose(batched, want)


def test_jaccard_top_and_drop_sets():
    x = np.array([[9, 8, 1, 2, 3, 0], [9, 1, 8, 2, 3, 0]], float)
    assert np.isclose(S.mean_jaccard(x, 2, largest=True), 1 / 3)  # {0,1} vs {0,2}
    assert np.isclose(S.mean_jaccard(x, 2, largest=False), 1 / 3)  # {5,2} vs {5,1}
    assert S.jaccard([1, 2], [2, 3]) == 1 / 3 and S.jaccard([], []) == 1.0
    with pytest.raises(S.SensitivityError, match="k="):
        S.mean_jaccard(x, 6)


def test_agreement_identical_profiles_are_perfect_and_shifted_ones_are_not():
    same = _design(noise=0.0, shift_domain="none")
    out = S.agreement(same, "domain", block=["seed"], by=["method"], n_boot=300)
    assert set(out["stat"]) == set(S.AGREEMENT_STATS) and len(out) == 8
    assert np.allclose(out["estimate"], 1.0) and np.allclose(out["ci_high"], 1.0)
    shifted = S.agreement(_design(noise=0.0), "domain", block=["seed"], by=["method"], n_boot=300)
    tau = shifted[shifted.stat == "tau"]["estimate"]
    assert (tau < 0.9).all()
    summ, per = S.agreement(_design(noise=1.0), "domain", block=["seed"], by=["method"], n_boot=300, detail=True)
    assert len(per) == 2 * 4 * 3 and set(per["block"]) == {"0", "1", "2"}
    means = per.groupby(["method", "stat"])["value"].mean()
    assert np.allclose(summ.set_index(["method", "stat"])["estimate"].loc[means.index], means)
    row = shifted.iloc[0]
    assert row.n_blocks == 3 and row.n_levels == 3 and row.n_layers == 6 and row.k == 2
    assert row.ci_low <= row.estimate <= row.ci_high


def test_agreement_is_deterministic_and_interval_shrinks_with_less_noise():
    noisy = _design(noise=3.0)
    a = S.agreement(noisy, "seed", block=["domain"], by=["method"], n_boot=300, seed=1)
    b = S.agreement(noisy, "seed", block=["domain"], by=["method"], n_boot=300, seed=1)
    pd.testing.assert_frame_equal(a, b)
    quiet = S.agreement(_design(noise=0.3), "seed", block=["domain"], by=["method"], n_boot=300, seed=1)
    assert quiet[quiet.stat == "tau"]["estimate"].mean() > a[a.stat == "tau"]["estimate"].mean()


def test_agreement_rejects_incomplete_designs():
    df = _design().query("not (seed == 1 and domain == 'y' and layer == 3)")
    with pytest.raises(S.SensitivityError, match="lacks"):
        S.agreement(df, "domain", block=["seed"], by=["method"])
    with pytest.raises(S.SensitivityError, match="duplicate"):
        S.agreement(_design(), "domain", block=["seed"])  # methods not separated
    with pytest.raises(S.SensitivityError, match="n_boot"):
        S.agreement(_design(), "domain", block=["seed"], by=["method"], n_boot=50)


def test_agreement_record_is_a_metric_record():
    row = S.agreement(_design(), "domain", block=["seed"], by=["method"], n_boot=300).iloc[1]
    rec = S.agreement_record(row)
    assert set(rec) == {"mean", "ci_low", "ci_high", "n", "unit", "method"} and rec["n"] == 3


# ---------------------------------------------------------------------------- variance decomposition


def test_variance_decomposition_matches_statsmodels_and_finds_the_factor():
    df = S.normalise(_design(noise=0.5), ["seed", "method", "domain"])
    vd = S.variance_decomposition(df, ["seed", "domain", "method"], n_boot=200).set_index("term")
    assert np.isclose(vd["eta_sq"].sum(), 1.0)
    fast = S._eta_fast(df["norm"].to_numpy(), {f"layer × {f}": pd.factorize(df[f])[0] for f in
                                               ("seed", "domain", "method")}, pd.factorize(df["layer"])[0])
    for term, share in fast.items():
        assert np.isclose(vd.loc[term, "eta_sq"], share), term
    # the tilted domain moves the profile; methods and seeds do not (beyond noise)
    assert vd.loc["layer × domain", "eta_sq"] > 5 * vd.loc["layer × method", "eta_sq"]
    assert vd.loc["layer × domain", "p_value"] < 1e-3
    assert vd.loc["layer", "ci_low"] <= vd.loc["layer", "eta_sq"] <= vd.loc["layer", "ci_high"]
    tests = S.anova_tests(vd.reset_index())
    assert [t.name for t in tests] == ["ANOVA F: layer × seed", "ANOVA F: layer × domain", "ANOVA F: layer × method"]


def test_variance_decomposition_needs_balance():
    df = S.normalise(_design(), ["seed", "method", "domain"])
    with pytest.raises(S.SensitivityError, match="balanced"):
        S.variance_decomposition(df.iloc[6:], ["seed", "domain", "method"], n_boot=200)


# -------------------------------------------------------------------------------------- consequences


def test_drop_set_takes_least_important_with_stable_ties():
    assert S.drop_set(pd.Series([5.0, 1.0, 3.0, 1.0]), 2) == (1, 3)
    assert S.drop_set({0: 0.0, 1: 0.0, 2: 1.0}, 1) == (0,)
    with pytest.raises(S.SensitivityError, match="n_drop"):
        S.drop_set(pd.Series([1.0, 2.0]), 2)
    assert S.drop_set(pd.Series({7: 2.0, 4: 2.0, 9: 5.0}), 1) == (4,)  # labels, not positions, break ties


def _tiny_bert():
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=3, num_attention_heads=2,
                     intermediate_size=32, max_position_embeddings=16, num_labels=2)
    return BertForSequenceClassification(cfg).eval()


def test_pruning_transfer_on_a_tiny_bert_memoises_and_computes_retention():
    from analysis_kit import layers

    model = _tiny_bert()
    g = torch.Generator().manual_seed(1)
    batch = {"input_ids": torch.randint(1, 50, (24, 8), generator=g), "attention_mask": torch.ones(24, 8, dtype=torch.long)}
    labels = torch.randint(0, 2, (24,), generator=g)
    calls = []

    def evaluate(key: tuple, drop: frozenset[int]) -> dict[str, float]:
        calls.append((key, drop))
        with torch.no_grad():
            pruned = layers.drop_blocks(model, drop) if drop else model
            acc = (pruned(**batch).logits.argmax(-1) == labels).float().mean().item()
        return {"accuracy": acc}

    rankings = _tidy({("bert", 0, "fisher", "amazon"): [3, 1, 2], ("bert", 0, "fisher", "tweets"): [3, 2, 1],
                      ("bert", 0, "ablation", "amazon"): [5, 0, 4]}, ("arch", "seed", "method", "condition"))
    out = S.pruning_transfer(rankings, evaluate)
    assert out["drop"].tolist() == ["1", "2", "1"]
    assert len(calls) == 3  # full once, drop {1} once (shared by two rankings), drop {2} once
    full = evaluate(("bert", 0), frozenset())["accuracy"]
    assert np.allclose(out["full"], full)
    assert np.allclose(out["retention"], out["accuracy"] / full)
    with pytest.raises(S.SensitivityError, match="must return"):
        S.pruning_transfer(rankings, lambda k, d: {"loss": 1.0})


def test_compare_to_reference_pairs_over_seeds_and_averages_methods():
    rows = [{"seed": s, "method": m, "condition": c, "retention": 0.9 + 0.01 * s - (0.05 if c == "tweets" else 0)
             + (0.002 * s * (c == "tweets"))}
            for s in range(4) for m in ("a", "b") for c in ("amazon", "tweets")]
    table, tests = S.compare_to_reference(pd.DataFrame(rows), "retention", "condition", "amazon", ["seed"])
    assert len(tests) == 1 and tests[0].n == 4
    assert np.isclose(table.loc[0, "mean_diff"], -0.05 + 0.002 * 1.5)
    assert tests[0].p_value < 0.01 and table.loc[0, "ci_high"] < 0


def test_gaps_signs():
    acc = pd.DataFrame([{"arch": "m", "seed": 0, "split": "amazon_train", "accuracy": 0.95},
                        {"arch": "m", "seed": 0, "split": "amazon_test", "accuracy": 0.85},
                        {"arch": "m", "seed": 0, "split": "tweets", "accuracy": 0.70}])
    out = S.gaps(acc).set_index("kind")["gap"]
    assert np.isclose(out["train-test"], 0.10) and np.isclose(out["cross-domain"], 0.15)
    with pytest.raises(S.SensitivityError, match="amazon_test"):
        S.gaps(acc[acc.split != "amazon_test"])


def test_ofat_grid():
    grid = S.ofat_grid({"hidden": 128, "heads": 4}, {"hidden": [128, 64], "heads": [4, 2]})
    assert grid.to_dict("records") == [{"hidden": 128, "heads": 4, "varied": "centre"},
                                       {"hidden": 64, "heads": 4, "varied": "hidden"},
                                       {"hidden": 128, "heads": 2, "varied": "heads"}]
    with pytest.raises(S.SensitivityError, match="not among"):
        S.ofat_grid({"hidden": 128}, {"hidden": [64, 32]})


class _WordTokenizer:
    """Whitespace tokenizer with the call signature data.make_loader uses (no assets needed)."""

    pad_token_id = 0

    def __call__(self, texts, truncation=True, max_length=128):
        return {"input_ids": [[1 + len(w) for w in t.split()][:max_length] for t in texts]}


def test_sample_batches_subsamples_stratified_and_zero_means_all():
    df = pd.DataFrame({"text": [f"w{'x' * (i % 5)} y" * (1 + i % 3) for i in range(40)],
                       "label": [i % 2 for i in range(40)]})
    some = S.sample_batches(_WordTokenizer(), df, 10, seed=0, batch_size=4)
    labels = torch.cat([b["labels"] for b in some])
    assert len(labels) == 10 and int(labels.sum()) == 5  # stratified: half of each label
    again = S.sample_batches(_WordTokenizer(), df, 10, seed=0, batch_size=4)
    assert all(torch.equal(a["input_ids"], b["input_ids"]) for a, b in zip(some, again, strict=True))
    assert sum(len(b["labels"]) for b in S.sample_batches(_WordTokenizer(), df, 0, seed=0)) == 40
    with pytest.raises(S.SensitivityError, match="n=-1"):
        S.sample_batches(_WordTokenizer(), df, -1, seed=0)


def test_check_params_catches_unanswerable_grids():
    ok = {"seeds": [0, 1], "methods": ["fisher"], "cal_domains": ["amazon", "tweets"], "cal_sizes": [16, 64],
          "levels": {"hidden": [128, 64]}}
    S.check_params(**ok, available_methods=["fisher", "ablation"])
    with pytest.raises(S.SensitivityError, match="at least 2 levels"):
        S.check_params(**{**ok, "seeds": [0]})
    with pytest.raises(S.SensitivityError, match="repeats"):
        S.check_params(**{**ok, "cal_sizes": [16, 16]})
    with pytest.raises(S.SensitivityError, match="start with 'amazon'"):
        S.check_params(**{**ok, "cal_domains": ["tweets", "amazon"]})
    with pytest.raises(S.SensitivityError, match="unknown importance"):
        S.check_params(**ok, available_methods=["ablation"])


def test_cached_scores_computes_once_per_key(tmp_path, monkeypatch):
    monkeypatch.setenv("LAYERWISE_CACHE", str(tmp_path))
    calls = []

    def compute() -> pd.DataFrame:
        calls.append(1)
        return pd.DataFrame({"method": ["fisher"] * 2, "layer": [0, 1], "score": [0.5, float("nan")]})

    args = ("/some/cache/trained/abc123", {"domain": "amazon", "n": 16}, ["fisher"], 0, {})
    first = S.cached_scores(*args, compute)
    again = S.cached_scores(*args, compute)
    assert len(calls) == 1
    pd.testing.assert_frame_equal(first, again)
    assert np.isnan(again.loc[1, "score"])
    S.cached_scores("/other/abc123", {"domain": "amazon", "n": 32}, ["fisher"], 0, {}, compute)
    assert len(calls) == 2  # a different calibration set is a different key
