"""Data: readers, label modes, splits, bucketed batches, the JSONL loader, the dataset card.

Small hand-made files and frames check the rules exactly; the real snippets (fetched once into the
default cache by a session fixture, skipped when they cannot be had) check the readers on the real data.
"""

from __future__ import annotations

import gzip
import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from analysis_kit import data

FIX = Path(__file__).parent / "fixtures"
SAMPLE = FIX / "amazon_reviews_2023_sample.jsonl"
MALFORMED = FIX / "amazon_reviews_2023_malformed.jsonl"


class CharTokenizer:
    """Enough of a tokenizer for batching tests: one id per character, no special tokens."""

    pad_token_id = 0

    def __call__(self, texts, truncation=False, max_length=None):
        ids = [[ord(c) % 97 + 1 for c in t] for t in texts]
        return {"input_ids": [x[:max_length] if truncation and max_length else x for x in ids]}


# ------------------------------------------------------------------------------------------------- labels


def test_polarity_drops_the_neutral_band_inclusively():
    scores = np.array([-3.9, -0.6, -0.5, -0.2, 0.0, 0.5, 0.51, 3.99])
    labels, keep = data.label_scores(scores, "polarity", 0.5)
    assert keep.tolist() == [True, True, False, False, False, False, True, True]
    assert labels[keep].tolist() == [0, 0, 1, 1]
    labels0, keep0 = data.label_scores(scores, "polarity", 0.0)
    assert keep0.sum() == 7 and labels0[keep0].tolist() == [0, 0, 0, 0, 1, 1, 1]  # only 0.0 is dropped


def test_bins5_are_equal_width_over_minus4_to_4():
    edges_and_more = np.array([-4.0, -2.41, -2.4, -0.81, -0.8, 0.0, 0.79, 0.8, 2.39, 2.4, 4.0, 0.7999999999999999,
                               -2.4000000000000004])  # float noise next to an edge counts as on the edge
    bins, keep = data.label_scores(edges_and_more, "bins5")
    assert bins.tolist() == [0, 0, 1, 1, 2, 2, 2, 3, 3, 4, 4, 3, 1] and keep.all()
    with pytest.raises(data.DataError, match="-4..4"):
        data.label_scores(np.array([4.5]), "bins5")


def test_regression_and_unknown_mode():
    scores = np.array([-1.25, 0.0, 3.5])
    labels, keep = data.label_scores(scores, "regression", 0.5)
    assert labels.dtype == float and labels.tolist() == [-1.25, 0.0, 3.5] and keep.all()
    with pytest.raises(data.DataError, match="choose from polarity, bins5, regression"):
        data.label_scores(scores, "stars")


# ------------------------------------------------------------------------------------------------- readers


def _write_snippet_files(folder: Path, stem: str, scores: list[float], ratings: list[list[int]]) -> None:
    """Ground truth (CRLF, no final newline, a latin-1 byte) and ratings (UTF-8 BOM) in the real layout."""
    texts = [" ".join(["w"] * (i + 1)) for i in range(len(scores))]
    gt = "\r\n".join(f"{i}\t{s}\t{t}" for i, (s, t) in enumerate(zip(scores, texts, strict=True), 1))
    (folder / f"{stem}_GroundTruth.txt").write_bytes(gt.encode("latin-1"))
    lines = [f"{i}\t{np.mean(r)}\t{np.std(r):.5f}\t{r}" for i, r in enumerate(ratings, 1)]
    (folder / f"{stem}_anonDataRatings.txt").write_bytes(b"\xef\xbb\xbf" + "\r\n".join(lines).encode())


def test_read_ground_truth_handles_crlf_missing_newline_and_latin1(tmp_path):
    path = tmp_path / "x_GroundTruth.txt"
    path.write_bytes(b"1_1\t-0.9\tsoo bad\r\n\r\n1_2\t2.5\tclich\xe9 \x85 fine")  # \xe9 is not valid UTF-8
    df = data.read_ground_truth(path)
    assert df.to_dict("list") == {"id": ["1_1", "1_2"], "score": [-0.9, 2.5], "text": ["soo bad", "cliché \x85 fine"]}
    path.write_bytes("1\t0.5\tclich\u00e9s in UTF-8\r\n".encode())
    assert data.read_ground_truth(path)["text"].tolist() == ["clichés in UTF-8"]
    path.write_bytes(b"1_1\t-0.9\tok\r\n1_2\tnot-a-number\ttext\r\n")
    with pytest.raises(data.DataError, match=r"x_GroundTruth.txt:2: score 'not-a-number'"):
        data.read_ground_truth(path)
    path.write_bytes(b"1_1 -0.9 no tabs\r\n")
    with pytest.raises(data.DataError, match=r"x_GroundTruth.txt:1: expected 'id<TAB>score<TAB>text'"):
        data.read_ground_truth(path)


def test_read_ratings_strips_bom_and_checks_lines(tmp_path):
    _write_snippet_files(tmp_path, "x", [1.0, -2.0], [[1, 1, 1], [-1, -3]])
    df = data.read_ratings(tmp_path / "x_anonDataRatings.txt")
    assert df["id"].tolist() == ["1", "2"] and df["ratings"].tolist() == [[1, 1, 1], [-1, -3]]
    assert df["score"].tolist() == [1.0, -2.0] and df["sd"].tolist() == [0.0, 1.0]
    (tmp_path / "bad.txt").write_text("1\t1.0\t0.0\t[1, 1]\n2\t1.0\t0.0\t[1, oops]\n")
    with pytest.raises(data.DataError, match=r"bad.txt:2: expected 'id<TAB>mean<TAB>sd<TAB>\[r1, r2, \.\.\.\]'"):
        data.read_ratings(tmp_path / "bad.txt")


@pytest.fixture()
def tiny_snippets(tmp_path, monkeypatch):
    """A stand-in snippets folder with two domains; load_* read it instead of the real asset."""
    _write_snippet_files(tmp_path, "amazonReviewSnippets", [1.0, -2.0, 0.3, 0.6, -0.5],
                         [[1, 1, 1], [0, 2], [-1, 0, 1, 4], [2], [0, 0]])
    _write_snippet_files(tmp_path, "tweets", [3.0, -3.0], [[3, 3], [-3, -4]])
    monkeypatch.setattr(data, "_snippet_dir", lambda: tmp_path)
    return tmp_path


def test_load_snippets_modes_on_a_tiny_folder(tiny_snippets):
    pol = data.load_snippets("amazon", "polarity", 0.5)
    assert list(pol.columns) == ["id", "text", "score", "label"]
    assert pol["id"].tolist() == ["1", "2", "4"] and pol["label"].tolist() == [1, 0, 1]
    assert len(data.load_snippets("amazon", "polarity", 0.0)) == 5
    assert data.load_snippets("amazon", "bins5")["label"].tolist() == [3, 1, 2, 2, 2]
    assert data.load_snippets("amazon", "regression")["label"].tolist() == [1.0, -2.0, 0.3, 0.6, -0.5]
    for bad, match in [({"domain": "reddit"}, "unknown domain 'reddit'"), ({"label_mode": "stars"}, "label_mode"),
                       ({"neutral_band": 4.0}, r"neutral_band=4.0 must be in \[0, 4\)")]:
        with pytest.raises(data.DataError, match=match):
            data.load_snippets(**bad)


# ------------------------------------------------------------------------------------------------- splits


def _frame(n=200, seed=0, float_labels=False):
    rng = np.random.default_rng(seed)
    labels = rng.normal(size=n) if float_labels else (np.arange(n) % 4 == 0).astype(int)
    return pd.DataFrame({"id": [f"x{i}" for i in range(n)], "text": ["a " * (i % 7 + 1) for i in range(n)],
                         "score": rng.normal(size=n), "label": labels})


def test_split_is_stratified_disjoint_complete_and_seeded():
    df = _frame()
    a, b, c = data.split(df, seed=3), data.split(df, seed=3), data.split(df, seed=4)
    assert {k: len(v) for k, v in a.items()} == {"train": 140, "val": 30, "test": 30}
    assert sorted(pd.concat(a.values())["id"]) == sorted(df["id"])  # disjoint and complete
    assert [int(v["label"].sum()) for v in a.values()] == [35, 8, 7]  # 50 positives split 70/15/15
    assert all(a[k]["id"].tolist() == b[k]["id"].tolist() for k in a)
    assert a["test"]["id"].tolist() != c["test"]["id"].tolist()
    plain = data.split(df, seed=3, stratify=False)
    assert sorted(pd.concat(plain.values())["id"]) == sorted(df["id"])


def test_split_stratifies_float_labels_by_quantile_and_refuses_tiny_classes():
    df = _frame(float_labels=True)
    parts = data.split(df, seed=0)
    q = np.quantile(df["label"], [0.2, 0.4, 0.6, 0.8])
    for part in parts.values():  # each fifth of the label range is equally represented in every part
        shares = np.bincount(np.digitize(part["label"], q), minlength=5) / len(part)
        assert np.allclose(shares, 0.2, atol=0.04)
    rare = _frame().assign(label=lambda d: (np.arange(len(d)) < 2).astype(int))
    with pytest.raises(data.DataError, match="fewer than 3 examples.*stratify=False"):
        data.split(rare, seed=0)
    assert len(data.split(rare, seed=0, stratify=False)["train"]) == 140
    with pytest.raises(data.DataError, match="fractions"):
        data.split(df, 0, fractions=(0.5, 0.2, 0.2))
    with pytest.raises(data.DataError, match="too few to split"):
        data.split(df.head(5), 0)


def test_subsample_keeps_shares_and_is_seeded():
    df = _frame()
    s = data.subsample(df, 40, seed=1)
    assert len(s) == 40 and int(s["label"].sum()) == 10
    assert data.subsample(df, 40, seed=1)["id"].tolist() == s["id"].tolist()
    assert data.subsample(df, 40, seed=2)["id"].tolist() != s["id"].tolist()
    assert len(data.subsample(df, 1000, seed=1)) == len(df)
    with pytest.raises(data.DataError, match="positive"):
        data.subsample(df, 0, seed=1)
    with pytest.raises(data.DataError, match="stratify=False"):
        data.subsample(df.assign(label=np.arange(len(df))), 10, seed=1)


# ------------------------------------------------------------------------------------------------- batches


def test_loader_pads_each_batch_to_its_longest_row():
    texts = ["x" * n for n in [3, 50, 4, 49, 5, 48, 6, 47]]
    loader = data.make_loader(CharTokenizer(), texts, list(range(8)), batch_size=2, bucket=False)
    assert isinstance(loader, torch.utils.data.DataLoader) and len(loader) == 4
    batches = list(loader)
    assert [b["labels"].tolist() for b in batches] == [[0, 1], [2, 3], [4, 5], [6, 7]]  # order kept
    first = batches[0]
    assert set(first) == {"input_ids", "attention_mask", "labels"} and first["labels"].dtype == torch.long
    assert first["input_ids"].shape == (2, 50) and first["attention_mask"].sum(1).tolist() == [3, 50]
    assert (first["input_ids"][0, 3:] == 0).all() and (first["input_ids"][0, :3] != 0).all()  # right padding
    assert [b["input_ids"].shape[1] for b in batches] == [50, 49, 48, 47]
    short = next(iter(data.make_loader(CharTokenizer(), texts, list(range(8)), batch_size=8, max_length=10)))
    assert short["input_ids"].shape == (8, 10)  # truncated to max_length


def test_bucketing_groups_similar_lengths_and_is_deterministic():
    texts = ["x" * n for n in [3, 50, 4, 49, 5, 48, 6, 47]]
    labels = list(range(8))
    tok = CharTokenizer()
    bucketed = list(data.make_loader(tok, texts, labels, batch_size=2, bucket=True))
    assert [b["input_ids"].shape[1] for b in bucketed] == [4, 6, 48, 50]
    assert [b["labels"].tolist() for b in bucketed] == [[0, 2], [4, 6], [7, 5], [3, 1]]
    s1 = data.make_loader(tok, texts, labels, batch_size=2, shuffle=True, seed=5)
    s2 = data.make_loader(tok, texts, labels, batch_size=2, shuffle=True, seed=5)
    order = [b["labels"].tolist() for b in s1]
    assert order == [b["labels"].tolist() for b in s2] == [b["labels"].tolist() for b in s1]  # also on a 2nd pass
    assert sorted(sum(order, [])) == labels
    assert sorted(b["input_ids"].shape[1] for b in s1) == [4, 6, 48, 50]  # shuffled, still bucketed
    others = {str([b["labels"].tolist() for b in data.make_loader(tok, texts, labels, 2, True, seed)])
              for seed in range(6)}
    assert len(others) > 1  # the seed changes the order


def test_bucketing_sorts_only_within_chunks_of_50_batches():
    lengths = np.arange(120)[::-1]  # batch_size 1 → 120 batches → chunks of 40 (array_split into 3)
    batches = data.batch_order(lengths, batch_size=1, shuffle=False, seed=0, bucket=True)
    flat = np.concatenate(batches)
    assert flat.tolist() == list(range(39, -1, -1)) + list(range(79, 39, -1)) + list(range(119, 79, -1))
    shuffled = np.concatenate(data.batch_order(lengths, 1, True, 0, True))
    assert sorted(shuffled.tolist()) == list(range(120))


def test_loader_labels_and_errors():
    tok = CharTokenizer()
    reg = next(iter(data.make_loader(tok, ["ab", "c"], np.array([0.5, -1.25]), batch_size=2, bucket=False)))
    assert reg["labels"].dtype == torch.float32 and reg["labels"].tolist() == [0.5, -1.25]
    with pytest.raises(data.DataError, match="3 texts but 2 labels"):
        data.make_loader(tok, ["a", "b", "c"], [0, 1])
    with pytest.raises(data.DataError, match="no texts"):
        data.make_loader(tok, [], [])

    class NoPad(CharTokenizer):
        pad_token_id = None

    with pytest.raises(data.DataError, match="pad_token = tokenizer.eos_token"):
        data.make_loader(NoPad(), ["a"], [0])


# ------------------------------------------------------------------------------------------------- JSONL


def test_amazon_reviews_2023_label_modes():
    df = data.load_amazon_reviews_2023(SAMPLE)
    assert list(df.columns) == ["rating", "title", "text", "label"]
    assert df["rating"].tolist() == [5.0, 1.0, 4.0, 2.0, 5.0]  # the 3-star review is dropped, blank line skipped
    assert df["label"].tolist() == [1, 0, 1, 0, 1] and df["title"].iloc[-1] == "Très bien"
    bins = data.load_amazon_reviews_2023(SAMPLE, label_mode="bins5")
    assert bins["label"].tolist() == [4, 0, 2, 3, 1, 4]
    reg = data.load_amazon_reviews_2023(SAMPLE, label_mode="regression")
    assert reg["label"].tolist() == [5.0, 1.0, 3.0, 4.0, 2.0, 5.0]
    assert data.load_amazon_reviews_2023(SAMPLE, limit=3)["rating"].tolist() == [5.0, 1.0, 4.0]  # 3 kept rows


def test_amazon_reviews_2023_malformed_rows_name_file_and_line(tmp_path):
    with pytest.raises(data.DataError, match=r"amazon_reviews_2023_malformed.jsonl:3: rating 9.0"):
        data.load_amazon_reviews_2023(MALFORMED)
    assert len(data.load_amazon_reviews_2023(MALFORMED, limit=2)) == 2  # stops before the bad line
    good = '{"rating": 5, "title": "t", "text": "x"}\n'
    cases = {'{"rating": 5, "title": \n': r"r.jsonl:2: not valid JSON",
             '{"rating": 5, "text": "x"}\n': r"r.jsonl:2: missing field\(s\) \['title'\]",
             '{"rating": 4.5, "title": "t", "text": "x"}\n': r"r.jsonl:2: rating 4.5",
             '{"rating": true, "title": "t", "text": "x"}\n': r"r.jsonl:2: rating True",
             '{"rating": 0, "title": "t", "text": "x"}\n': r"r.jsonl:2: rating 0",
             '{"rating": 5, "title": null, "text": "x"}\n': r"r.jsonl:2: title is NoneType",
             '[5, "t", "x"]\n': r"r.jsonl:2: expected a JSON object"}
    path = tmp_path / "r.jsonl"
    for line, match in cases.items():
        path.write_text(good + line)
        with pytest.raises(data.DataError, match=match):
            data.load_amazon_reviews_2023(path)
    path.write_text("\n\n")
    with pytest.raises(data.DataError, match="no reviews"):
        data.load_amazon_reviews_2023(path)
    with pytest.raises(data.DataError, match="does not exist"):
        data.load_amazon_reviews_2023(tmp_path / "missing.jsonl")


def test_amazon_reviews_2023_reads_gzip(tmp_path):
    gz = tmp_path / "Electronics.jsonl.gz"
    with gzip.open(gz, "wb") as fh:
        fh.write(SAMPLE.read_bytes())
    assert data.load_amazon_reviews_2023(gz).equals(data.load_amazon_reviews_2023(SAMPLE))


def test_amazon_reviews_2023_bad_bytes_and_bad_gzip_are_data_errors(tmp_path):
    good = b'{"rating": 5, "title": "t", "text": "x"}\n'
    latin1 = tmp_path / "latin1.jsonl"
    latin1.write_bytes(good + '{"rating": 4, "title": "caf\u00e9", "text": "x"}\n'.encode("latin-1"))
    with pytest.raises(data.DataError, match=r"latin1.jsonl:2: byte 0xe9 .* not valid UTF-8"):
        data.load_amazon_reviews_2023(latin1)
    unnamed = tmp_path / "unnamed.jsonl"  # gzip data without the .gz name
    unnamed.write_bytes(gzip.compress(good))
    with pytest.raises(data.DataError, match=r"unnamed.jsonl:1: .*gzip-compressed"):
        data.load_amazon_reviews_2023(unnamed)
    not_gz = tmp_path / "plain.jsonl.gz"
    not_gz.write_bytes(good)
    with pytest.raises(data.DataError, match=r"plain.jsonl.gz:1: the gzip data is corrupt"):
        data.load_amazon_reviews_2023(not_gz)
    truncated = tmp_path / "cut.jsonl.gz"
    truncated.write_bytes(gzip.compress(good * 200)[:-30])
    with pytest.raises(data.DataError, match=r"cut.jsonl.gz:\d+: the gzip data is corrupt or truncated"):
        data.load_amazon_reviews_2023(truncated)
    empty = tmp_path / "empty.jsonl"
    empty.write_bytes(b"")
    with pytest.raises(data.DataError, match="empty.jsonl holds no reviews"):
        data.load_amazon_reviews_2023(empty)


def test_amazon_reviews_2023_all_neutral_is_an_error_not_an_empty_table(tmp_path):
    path = tmp_path / "neutral.jsonl"
    path.write_text('{"rating": 3, "title": "t", "text": "x"}\n' * 4)
    with pytest.raises(data.DataError, match=r"all 4 reviews are 3-star .*label_mode='bins5'"):
        data.load_amazon_reviews_2023(path)
    assert len(data.load_amazon_reviews_2023(path, label_mode="bins5")) == 4


# ------------------------------------------------------------------------------------------------- card


def test_rater_spread_by_hand():
    spread = data.rater_spread([[1, 1, 1], [0, 2], [-1, 0, 1, 4], [2]])
    assert spread["n"].tolist() == [3, 2, 4, 1]
    assert np.allclose(spread["sd"], [0, 1, math.sqrt(3.5), 0])  # devs of the 3rd: -2, -1, 0, 3
    assert np.allclose(spread["abs_dev"], [0, 1, 1.5, 0])
    assert np.allclose(spread["pair_diff"], [0, 2, 16 / 6, 0])  # pairs: 1, 2, 5, 1, 4, 3
    with pytest.raises(data.DataError, match="at least one rating"):
        data.rater_spread([[1], []])


def test_card_row_by_hand():
    snippets = pd.DataFrame({"id": list("abcde"), "score": [1.0, -2.0, 0.3, 0.6, -0.5],
                             "text": ["one", "two words", "a b c", "w x y z", " ".join("k" * 10)]})
    ratings = pd.DataFrame({"ratings": [[1, 1, 1], [0, 2], [-1, 0, 1, 4], [2]]})
    row = data.card_row(snippets, ratings, neutral_band=0.5, tokenizer=CharTokenizer())
    expected = {"n_total": 5, "n_after_band": 3, "share_positive": 2 / 3,  # kept: 1.0, -2.0, 0.6
                "words_mean": 4.0, "words_median": 3.0, "words_p95": 8.8,  # 4 + 0.8 * (10 - 4)
                "tokens_mean": (3 + 9 + 5 + 7 + 19) / 5, "raters_mean": 2.5,
                "rater_sd_mean": (1 + math.sqrt(3.5)) / 4, "rater_abs_dev_mean": 2.5 / 4,
                "rater_pair_diff_mean": (2 + 16 / 6) / 4}
    assert row.keys() == expected.keys()
    assert all(row[k] == pytest.approx(v) for k, v in expected.items())
    assert "tokens_mean" not in data.card_row(snippets, ratings)


def test_dataset_card_one_row_per_domain(tiny_snippets):
    card = data.dataset_card(("amazon", "tweets"), neutral_band=0.5)
    assert card["domain"].tolist() == ["amazon", "tweets"] and card.columns[0] == "domain"
    assert card["n_total"].tolist() == [5, 2] and card["n_after_band"].tolist() == [3, 2]
    assert card["share_positive"].tolist() == pytest.approx([2 / 3, 0.5])
    assert card["rater_abs_dev_mean"].tolist() == pytest.approx([(0 + 1 + 1.5 + 0 + 0) / 5, (0 + 0.5) / 2])
    with pytest.raises(data.DataError, match="unknown domain 'reddit'"):
        data.dataset_card(("amazon", "reddit"))


# ------------------------------------------------------------------------------------------------- real snippets


@pytest.fixture(scope="session")
def real_snippets() -> Path:
    """The real snippets in the default cache (fetched once, shared with every other test and notebook)."""
    from analysis_kit import assets

    try:
        return assets.fetch("snippets")["snippets"]
    except assets.AssetError as exc:
        pytest.skip(f"the snippets asset cannot be had here: {exc}")


def test_real_snippets_sizes_and_ratings(real_snippets):
    sizes = {"amazon": 3708, "movie": 10605, "tweets": 4200, "nyt": 5190}  # as published (DESIGN.md)
    for domain, n in sizes.items():
        df = data.load_snippets(domain, "regression")
        assert len(df) == n and df["id"].is_unique and df["score"].between(-4, 4).all()
        assert (df["text"].str.len() > 0).all() and not df["text"].str.contains("\r").any()
    ratings = data.load_ratings("amazon")
    amazon = data.load_snippets("amazon", "regression")
    assert sorted(ratings["id"]) == sorted(amazon["id"]) and ratings["ratings"].str.len().min() >= 20
    spread = data.rater_spread(list(ratings["ratings"]))
    assert np.allclose(spread["sd"], ratings["sd"], atol=1e-5)  # the file's SD is the population SD
    means = pd.Series([np.mean(r) for r in ratings["ratings"]], index=ratings["id"])
    assert np.allclose(means[amazon["id"]].to_numpy(), amazon["score"], atol=1e-6)  # ratings match ground truth
    assert "clichés" in " ".join(data.load_snippets("movie", "regression")["text"])  # decoded as UTF-8


def test_real_snippets_labels_and_card(real_snippets):
    amazon = data.load_snippets("amazon", "regression")
    pol = data.load_snippets("amazon", "polarity", 0.5)
    assert len(pol) == int((amazon["score"].abs() > 0.5).sum())
    assert pol["label"].tolist() == (pol["score"] > 0).astype(int).tolist()
    bins = data.load_snippets("amazon", "bins5")
    assert np.bincount(bins["label"], minlength=5).tolist() == [
        int(((amazon["score"] >= lo) & (amazon["score"] < hi)).sum())
        for lo, hi in [(-4, -2.4), (-2.4, -0.8), (-0.8, 0.8), (0.8, 2.4), (2.4, 4.01)]]
    card = data.dataset_card(("amazon",), neutral_band=0.5).iloc[0]
    assert card["n_total"] == 3708 and card["n_after_band"] == len(pol)
    assert card["share_positive"] == pytest.approx(pol["label"].mean())
    parts = data.split(pol, seed=0)
    assert sum(len(p) for p in parts.values()) == len(pol)
    assert all(abs(p["label"].mean() - pol["label"].mean()) < 0.01 for p in parts.values())


def test_fixtures_are_valid_jsonl():
    """The sample fixture is what the JSONL tests assume: 6 reviews, one blank line, Amazon 2023 fields."""
    lines = SAMPLE.read_text(encoding="utf-8").splitlines()
    records = [json.loads(line) for line in lines if line.strip()]
    assert len(records) == 6 and sum(not line.strip() for line in lines) == 1
    assert all({"rating", "title", "text", "asin", "parent_asin", "user_id", "timestamp"} <= r.keys() for r in records)


# ------------------------------------------------------------------------------ datasets' save_to_disk

DATASET = FIX / "datasets_folder"  # written by datasets 4.8.5 (fixtures/make_datasets_folders.py), 2 shards
DATASET_DICT = FIX / "datasets_dict_folder"  # a DatasetDict: train (24 rows) and test (12 rows)


def test_saved_dataset_folder_reads_every_shard_with_class_label_names():
    df, fmt = data.read_table(DATASET)
    assert fmt == "datasets" and len(df) == 30 and list(df.columns) == ["review", "stars"]
    assert set(df["stars"]) == {"negative", "positive"}  # ClassLabel ids come back as their names
    assert df.loc[0, "review"] == "the phone was very good number 0" and df.loc[0, "stars"] == "positive"
    assert df["review"].is_unique  # both shards, each row once
    table, names = data.load_labelled_file(DATASET, text_column="review", label_column="stars")
    assert names == ("negative", "positive") and len(table) == 30


def test_saved_dataset_dict_reads_the_train_split():
    df, _ = data.read_table(DATASET_DICT)
    assert len(df) == 24 and not df["review"].str.contains("number 1[01][0-9]").any()


def test_broken_saved_dataset_folders_are_data_errors(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(data.DataError, match="no state.json or dataset_dict.json"):
        data.read_table(empty)
    broken = tmp_path / "broken"
    broken.mkdir()
    for f in DATASET.iterdir():
        (broken / f.name).write_bytes(f.read_bytes())
    (broken / "data-00001-of-00002.arrow").write_bytes(b"not arrow at all")
    with pytest.raises(data.DataError, match="data-00001-of-00002.arrow is not a readable Arrow stream"):
        data.read_table(broken)
    (broken / "state.json").write_text("{")
    with pytest.raises(data.DataError, match="save_to_disk metadata cannot be read"):
        data.read_table(broken)
    no_splits = tmp_path / "dict"
    no_splits.mkdir()
    (no_splits / "dataset_dict.json").write_text('{"splits": []}')
    with pytest.raises(data.DataError, match="lists no splits"):
        data.read_table(no_splits)
