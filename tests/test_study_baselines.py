"""The baselines study on synthetic snippets and a tiny BERT: metric names, intervals, failed trainings, tests."""

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import word_tokenizer
from transformers import BertConfig, BertForSequenceClassification

from analysis_kit import data, train
from analysis_kit.errors import LayerwiseError
from analysis_kit.studies import baselines

POS, NEG, FILL = ["good", "great", "fine"], ["bad", "awful", "poor"], ["the", "a", "movie", "phone", "it"]


def _snippets(domain: str, n: int = 160) -> pd.DataFrame:
    rng = np.random.default_rng(abs(hash(domain)) % 1000)
    labels = (rng.random(n) < 0.55).astype(int)
    shown = np.where(rng.random(n) < 0.15, 1 - labels, labels)  # 15 % label noise: no model is perfect
    texts = [" ".join([*rng.choice(POS if y else NEG, 2), *rng.choice(FILL, 3)]) for y in shown]
    return pd.DataFrame({"id": [f"{domain}{i}" for i in range(n)], "text": texts,
                         "score": np.where(labels == 1, 1.5, -1.5), "label": labels})


def _fake(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    """Synthetic domains; a tiny BERT whose seed-1 training is reported as failed."""
    tok = word_tokenizer(tmp_path, POS + NEG + FILL)
    frames = {d: _snippets(d) for d in data.DOMAINS}
    monkeypatch.setattr(data, "load_snippets", lambda d, *a, **k: frames[d].copy())
    monkeypatch.setattr(data, "load_ratings", lambda d: frames[d].assign(sd=np.linspace(0, 2, len(frames[d]))))
    monkeypatch.setattr(data, "dataset_card", lambda **k: pd.DataFrame(
        {"domain": list(frames), "n_after_band": [len(f) for f in frames.values()]}))

    def baseline(name, seed, tiny=False, task=None, device="auto"):
        torch.manual_seed(seed)
        cfg = BertConfig(vocab_size=len(tok), hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                         intermediate_size=32, max_position_embeddings=32, num_labels=2)
        model = BertForSequenceClassification(cfg).eval()
        with torch.no_grad():  # make it informative: a bias towards the positive words' embeddings
            model.classifier.weight.normal_()
        return model, tok, {"train_seconds": 1.0, "steps": 10, "failed": seed == 1, "val": {"accuracy": 0.6},
                            "val_majority": 0.55}

    monkeypatch.setattr(train, "baseline", baseline)
    monkeypatch.setattr(train, "recipe", lambda *a, **k: train.SMOKE_TRAIN)
    table = pd.DataFrame({"lr": [1e-3], "epoch": [1.0], "step": [10], "val_loss": [0.6], "val_accuracy": [0.6],
                          "best_epoch": [1.0], "train_seconds": [1.0], "failed": [False], "chosen": [True]})
    monkeypatch.setattr(train, "search_recipe", lambda *a, **k: (train.SMOKE_TRAIN, table))


PARAMS = baselines.Params(tiny=False, seeds=(0, 1, 2), tasks=("amazon", "mr"), cross_domain_n=40,
                          n_bootstrap=1000)


@pytest.fixture(scope="module")
def result(tmp_path_factory):
    """One run of the study on the fake data, shared by the tests below (it takes a few seconds)."""
    with pytest.MonkeyPatch.context() as mp:
        _fake(mp, tmp_path_factory.mktemp("tok"))
        yield baselines.run(PARAMS)


def test_study_reports_every_headline_metric_with_a_proper_interval(result):
    res = result
    for task in ("amazon", "mr"):
        for model in ("minilm", "bow", "vader", "majority"):
            rec = res.metrics[f"accuracy/{model}/{task}"]
            assert 0 <= rec["ci_low"] < rec["ci_high"] <= 1, (model, task, rec)
            assert rec["ci_low"] <= rec["mean"] <= rec["ci_high"]
        assert res.metrics[f"failed_trainings/minilm/{task}"]["mean"] == 1.0
        assert f"accuracy/minilm/{task}/on_tweets" in res.metrics
    assert not res.tables["recipe_search"].empty and res.tables["recipe_search"]["chosen"].any()
    assert "findings" in res.values and "amazon" in res.values["findings"]


def test_failed_trainings_are_left_out(result):
    res = result
    minilm = res.tables["per_seed"].query("model == 'minilm'")
    assert set(minilm["seed"]) == {0, 2}
    assert res.metrics["accuracy/minilm/amazon"]["n"] == 2
    assert res.metrics["accuracy/bow/amazon"]["n"] == 3


def test_comparisons_sit_in_declared_families_with_holm(result):
    res = result
    tests = res.tables["tests"]
    assert set(tests["family"]) == {"amazon: bootstrap", "amazon: mcnemar", "mr: bootstrap", "mr: mcnemar"}
    assert tests["p_holm"].notna().all() and (tests["p_holm"] >= tests["p_value"] - 1e-12).all()
    assert tests["min_p"].notna().all()
    assert tests["name"].is_unique


def test_bad_parameters_fail_before_any_work():
    with pytest.raises(LayerwiseError, match="at least two distinct seeds"):
        baselines.run(baselines.Params(seeds=(0, 0)))
    with pytest.raises(LayerwiseError, match="unknown task"):
        baselines.run(baselines.Params(tasks=("imdb",)))
    with pytest.raises(LayerwiseError, match="choose one or more of"):
        baselines.run(baselines.Params(models=("bert",)))
