"""The strategy family: the one top-k rule, the registry, the declarations every caller reads, and the promise
every registered strategy keeps (k sorted, distinct, in-range blocks) on a tiny random BERT."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import word_tokenizer
from transformers import BertConfig, BertForSequenceClassification

from analysis_kit import cli, compress, importance, strategies
from analysis_kit.compress import CompressError
from analysis_kit.strategies import Calibration, Strategy, StrategyError, top_k
from analysis_kit.studies import sensitivity

WORDS = ["good", "bad", "great", "awful", "the", "movie", "was", "not"]


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return word_tokenizer(tmp_path_factory.mktemp("tok"), WORDS)


def bert(n_blocks: int = 5, seed: int = 0) -> BertForSequenceClassification:
    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=len(WORDS) + 5, hidden_size=32, num_hidden_layers=n_blocks, num_attention_heads=4,
                     intermediate_size=64, max_position_embeddings=32, num_labels=2, pad_token_id=0)
    return BertForSequenceClassification(cfg).eval()


class LastBlocks(Strategy):
    """A toy strategy for the registry test: the last k blocks."""

    name = "toy_last_blocks"

    def select(self, model: torch.nn.Module, k: int, calib: Calibration) -> tuple[int, ...]:
        n = len(model.bert.encoder.layer)
        return tuple(range(n - k, n))


# ------------------------------------------------------------------------------------------ top_k


def test_top_k_directions_ties_and_nan():
    scores = [2.0, 5.0, 5.0, 1.0, 1.0]
    assert top_k(scores, 1) == (1,)  # tie 1/2 on the highest: the lower index
    assert top_k(scores, 2, largest=False) == (3, 4)
    assert top_k(scores, 1, largest=False) == (3,)  # tie 3/4 on the lowest: the lower index
    assert top_k({7: 0.5, 3: 0.5, 5: 0.1}, 1) == (3,)  # mapping labels are the indices
    assert top_k(pd.Series([0.0, np.nan, 1.0]), 2) == (0, 2)  # NaN ranks last in either direction
    assert top_k(pd.Series([0.0, np.nan, 1.0]), 2, largest=False) == (0, 2)
    assert top_k(scores, 0) == () and top_k(scores, 5) == (0, 1, 2, 3, 4)
    with pytest.raises(StrategyError, match=r"0\.\.5"):
        top_k(scores, 6)


def test_every_caller_of_top_k_keeps_its_convention():
    """The five copies had two directions; the shared rule keeps each caller's answer."""
    table = pd.DataFrame({"method": "m", "layer": [3, 0, 2, 1], "score": [1.0, 4.0, 4.0, 1.0]})
    assert compress.keep_top_k(table, 2) == (0, 2)  # keep the highest
    assert sensitivity._drop(table.sort_values("layer")["score"].to_numpy(), 1) == (1,)  # drop the lowest
    assert importance.choose(table, 1) == {"m": (1,)}


# ------------------------------------------------------------------------------------------ registry


def test_registry_backs_strategies_constant_and_cli_choices():
    assert compress.STRATEGIES == strategies.names() == (
        "importance", "distributed", "angular", "drop_last", "greedy", "random")
    needs = {name: (strategies.lookup(name).needs_data, strategies.lookup(name).needs_importance)
             for name in strategies.names()}
    assert needs == {"importance": (False, True), "distributed": (False, False), "angular": (True, False),
                     "drop_last": (False, False), "greedy": (True, False), "random": (False, False)}
    with pytest.raises(CompressError, match="unknown strategy 'best'; choose from importance"):
        strategies.lookup("best")


def test_toy_strategy_registers_runs_through_select_and_unregisters(tmp_path):
    model = bert(5)
    strategies.register(LastBlocks)
    try:
        with pytest.raises(StrategyError, match="already registered"):
            strategies.register(LastBlocks)
        assert "toy_last_blocks" in strategies.names()
        assert compress.select("toy_last_blocks", model, 2) == (3, 4)
        assert strategies.lookup("toy_last_blocks").select(model, 3, strategies.Calibration()) == (2, 3, 4)
        args = cli.build_parser().parse_args(["compress", "a", "b", "--strategy", "toy_last_blocks", "--keep", "1"])
        assert args.strategy == "toy_last_blocks"  # the CLI's choices come from the registry
        with pytest.raises(CompressError, match="ignores --texts"):  # compress_folder reads the declarations
            compress.compress_folder(tmp_path / "src", tmp_path / "out", "toy_last_blocks", keep=1, texts=["a"])
    finally:
        strategies.unregister("toy_last_blocks")
    assert "toy_last_blocks" not in strategies.names()
    with pytest.raises(CompressError, match="unknown strategy"):
        compress.select("toy_last_blocks", model, 2)


def test_declared_needs_are_checked_with_the_fix_named(tmp_path):
    class NeedsData(Strategy):
        name = "toy_needs_data"
        needs_data = True

        def select(self, model: torch.nn.Module, k: int, calib: Calibration) -> tuple[int, ...]:
            return tuple(range(k))

    strategies.register(NeedsData)
    try:
        with pytest.raises(CompressError, match=r"toy_needs_data' needs calibration data= \(compress.encode"):
            compress.select("toy_needs_data", bert(3), 1)
        with pytest.raises(CompressError, match="needs calibration texts"):
            compress.compress_folder(tmp_path / "src", tmp_path / "out", "toy_needs_data", keep=1)
        with pytest.raises(CompressError, match="used only by strategy 'importance'"):
            compress.compress_folder(tmp_path / "src", tmp_path / "out", "toy_needs_data", keep=1, texts=["a"],
                                     method="fisher")
    finally:
        strategies.unregister("toy_needs_data")
    with pytest.raises(StrategyError, match="Strategy subclass"):
        strategies.register(object)  # type: ignore[arg-type]


# ------------------------------------------------------------------------------------------ every strategy


def test_every_registered_strategy_returns_k_sorted_distinct_in_range_blocks(tokenizer):
    model, n = bert(5, seed=1), 5
    rng = np.random.default_rng(0)
    texts = [" ".join(rng.choice(WORDS, size=int(rng.integers(2, 7)))) for _ in range(8)]
    calib = Calibration(data=compress.encode(tokenizer, texts, batch_size=4), seed=3, device="cpu",
                        scores=pd.DataFrame({"method": "m", "layer": range(n), "score": rng.normal(size=n)}))
    for name in strategies.names():
        strategy = strategies.lookup(name)
        strategy.check(calib)
        for k in range(1, n + 1):
            keep = strategy.select(model, k, calib)
            assert isinstance(keep, tuple) and len(keep) == k, (name, k, keep)
            assert list(keep) == sorted(set(keep)) and all(isinstance(b, int) for b in keep), (name, k, keep)
            assert 0 <= keep[0] and keep[-1] < n, (name, k, keep)
            assert keep == compress.select(name, model, k, scores=calib.scores, data=calib.data, seed=3,
                                           device="cpu")  # the wrapper is the same call
    assert math.comb(n, n) == 1 and strategies.lookup("random").select(model, n, calib) == tuple(range(n))
