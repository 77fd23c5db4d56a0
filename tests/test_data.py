"""Data: labels, splits, batches, the JSONL loader and the dataset card."""

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from analysis_kit import data

FIX = Path(__file__).parent / "fixtures"


class CharTokenizer:
    """Enough of a tokenizer for batching tests: one id per character."""

    pad_token_id = 0

    def __call__(self, texts, truncation=True, max_length=128):
        return {"input_ids": [[ord(c) % 97 + 1 for c in t][:max_length] for t in texts]}


def test_label_modes_and_band():
    scores = np.array([-3.9, -0.6, -0.2, 0.0, 0.4, 0.51, 3.99])
    labels, keep = data.label_scores(scores, "polarity", 0.5)
    assert keep.tolist() == [True, True, False, False, False, True, True]
    assert labels[keep].tolist() == [0, 0, 1, 1]
    bins, _ = data.label_scores(np.array([-4.0, -2.41, -2.39, 0.0, 0.81, 4.0]), "bins5", 0)
    assert bins.tolist() == [0, 0, 1, 2, 3, 4]
    with pytest.raises(data.DataError, match="label_mode"):
        data.label_scores(scores, "stars", 0.5)


def _frame(n=200, seed=0):
    rng = np.random.default_rng(seed)
    return pd.DataFrame({"id": [f"x{i}" for i in range(n)], "text": ["a " * (i % 7 + 1) for i in range(n)],
                         "score": rng.normal(size=n), "label": (np.arange(n) % 4 == 0).astype(int)})


def test_split_is_stratified_disjoint_and_seeded():
    df = _frame()
    a, b, c = data.split(df, seed=3), data.split(df, seed=3), data.split(df, seed=4)
    assert {k: len(v) for k, v in a.items()} == {"train": 140, "val": 30, "test": 30}
    assert set(a["train"].id).isdisjoint(a["test"].id) and set(a["val"].id).isdisjoint(a["test"].id)
    for part in a.values():
        assert part["label"].mean() == pytest.approx(0.25, abs=0.04)
    assert a["test"].id.tolist() == b["test"].id.tolist() and a["test"].id.tolist() != c["test"].id.tolist()
    with pytest.raises(data.DataError, match="fractions"):
        data.split(df, 0, fractions=(0.5, 0.2, 0.2))


def test_subsample():
    df = _frame()
    s = data.subsample(df, 40, seed=1)
    assert len(s) == 40 and s["label"].mean() == pytest.approx(0.25)
    assert data.subsample(df, 40, seed=1).id.tolist() == s.id.tolist()
    assert len(data.subsample(df, 1000, seed=1)) == len(df)


def test_loader_pads_dynamically_buckets_and_is_deterministic():
    texts = ["x" * n for n in [3, 50, 4, 49, 5, 48, 6, 47]]
    labels = list(range(8))
    tok = CharTokenizer()
    plain = data.make_loader(tok, texts, labels, batch_size=2, bucket=False)
    assert [b["labels"].tolist() for b in plain] == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert plain[0]["input_ids"].shape == (2, 50) and plain[0]["attention_mask"].sum().item() == 53
    bucketed = data.make_loader(tok, texts, labels, batch_size=2, bucket=True)
    widths = sorted(b["input_ids"].shape[1] for b in bucketed)
    assert widths == [4, 6, 48, 50]  # similar lengths share a batch: far less padding
    s1 = data.make_loader(tok, texts, labels, batch_size=2, shuffle=True, seed=5)
    s2 = data.make_loader(tok, texts, labels, batch_size=2, shuffle=True, seed=5)
    assert [b["labels"].tolist() for b in s1] == [b["labels"].tolist() for b in s2]
    assert sorted(sum((b["labels"].tolist() for b in s1), [])) == labels
    with pytest.raises(data.DataError):
        data.make_loader(tok, texts, labels[:3])


def test_amazon_reviews_2023_loader():
    df = data.load_amazon_reviews_2023(FIX / "amazon_reviews_2023_sample.jsonl")
    assert df["rating"].tolist() == [5.0, 1.0, 4.0, 2.0, 5.0]  # the 3-star review is dropped, blank line skipped
    assert df["label"].tolist() == [1, 0, 1, 0, 1]
    assert len(data.load_amazon_reviews_2023(FIX / "amazon_reviews_2023_sample.jsonl", "bins5")) == 6
    with pytest.raises(data.DataError, match=r"malformed.jsonl:3: rating 9.0"):
        data.load_amazon_reviews_2023(FIX / "amazon_reviews_2023_malformed.jsonl")


def test_amazon_reviews_2023_bad_json_and_missing_field(tmp_path):
    p = tmp_path / "r.jsonl"
    p.write_text('{"rating": 5, "title": "t", "text": "x"}\n{"rating": 5, "title": \n')
    with pytest.raises(data.DataError, match=r"r.jsonl:2: not valid JSON"):
        data.load_amazon_reviews_2023(p)
    p.write_text('{"rating": 5, "text": "x"}\n')
    with pytest.raises(data.DataError, match=r"r.jsonl:1: missing field\(s\) \['title'\]"):
        data.load_amazon_reviews_2023(p)


@pytest.fixture(scope="module")
def snippets_available():
    from analysis_kit import assets

    try:
        assets.fetch("snippets")
    except assets.AssetError as exc:
        pytest.skip(f"snippets asset unavailable: {exc}")


def test_real_snippets_and_card(snippets_available):
    amazon = data.load_snippets("amazon", "regression", 0.0)
    assert len(amazon) == 3708 and amazon["score"].between(-4, 4).all()
    pol = data.load_snippets("amazon", "polarity", 0.5)
    assert len(pol) == int((amazon["score"].abs() > 0.5).sum())
    ratings = data.load_ratings("amazon")
    assert len(ratings) == 3708 and ratings["ratings"].str.len().min() >= 20
    card = data.dataset_card(("amazon",), neutral_band=0.5).iloc[0]
    assert card["n_total"] == 3708 and card["n_after_band"] == len(pol)
    assert card["share_positive"] == pytest.approx(pol["label"].mean())
    assert card["rater_sd_mean"] == pytest.approx(ratings["sd"].mean())
    with pytest.raises(data.DataError, match="unknown domain"):
        data.load_snippets("reddit")
