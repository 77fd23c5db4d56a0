"""Healing recipes at fine-tuning scale (``heal.heal_recipe`` on ``train.fine_tune``), on a tiny BERT and a
toy task whose label is a word rule, so that training has something to learn."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import word_tokenizer
from transformers import AutoModelForSequenceClassification, BertConfig, BertForSequenceClassification

from analysis_kit import heal, layers, train
from analysis_kit.errors import LayerwiseError
from analysis_kit.heal import HealError, RecipeOptions

WORDS = ["good", "bad", "film", "plot", "actor", "great", "awful", "story", "the", "a", "was", "is"]


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return word_tokenizer(tmp_path_factory.mktemp("vocab"), WORDS)


def frame(n: int, seed: int) -> pd.DataFrame:
    """Sentences of random filler words; label 1 when 'good' or 'great' occurs (a rule one block can learn)."""
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        words = list(rng.choice(WORDS[3:], size=6))
        label = i % 2
        words[int(rng.integers(0, 6))] = rng.choice(["good", "great"] if label else ["bad", "awful"])
        rows.append({"text": " ".join(words), "label": label})
    return pd.DataFrame(rows)


def teacher(tokenizer, seed: int = 0) -> BertForSequenceClassification:
    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=4, num_attention_heads=4,
                     intermediate_size=64, max_position_embeddings=64, num_labels=2, pad_token_id=0,
                     hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    return BertForSequenceClassification(cfg).eval()


CFG = train.TrainConfig(epochs=2, lr=3e-3, batch_size=8, patience=10, max_length=16, eval_every=4)


@pytest.fixture(scope="module")
def data():
    return frame(48, 0), frame(24, 1)


@pytest.mark.parametrize("recipe", heal.RECIPES)
def test_every_recipe_gets_the_same_budget_and_returns_a_plain_model_of_k_blocks(tokenizer, data, recipe):
    tr, val = data
    model, hist, info = heal.heal_recipe(recipe, teacher(tokenizer), (0, 2), tokenizer, tr, val, CFG, seed=0,
                                         first_k=lambda k: layers.keep_blocks(teacher(tokenizer, seed=5), range(k)),
                                         device="cpu")
    assert type(model) is BertForSequenceClassification and layers.num_blocks(model) == 2
    # equal budget: 48 examples / 8 per step x 2 epochs, the same for every recipe (patience never triggers)
    assert info["steps"] == 12 and info["examples"] == 96
    assert list(hist["step"]) == [4, 6, 10, 12]  # every 4 steps of each 6-step epoch, and at its end
    assert 0 < info["trainable_parameters"] <= info["parameters"]
    assert not any(p.requires_grad for p in model.parameters())


def test_partial_trains_only_the_last_block_and_the_head(tokenizer, data):
    tr, val = data
    t = teacher(tokenizer)
    start = layers.keep_blocks(t, (0, 1, 3))
    model, _, info = heal.heal_recipe("partial", t, (0, 1, 3), tokenizer, tr, val, CFG, seed=0,
                                      options=RecipeOptions(partial_blocks=1), device="cpu")
    before, after = start.state_dict(), model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(k.startswith(("bert.encoder.layer.2.", "bert.pooler.", "classifier.")) for k in changed)
    assert any(k.startswith("bert.encoder.layer.2.") for k in changed)
    assert info["trainable_parameters"] < info["parameters"] / 2


def test_lora_is_merged_into_a_model_that_reloads_with_transformers_alone(tokenizer, data, tmp_path):
    tr, val = data
    model, _, _ = heal.heal_recipe("lora", teacher(tokenizer), (1, 3), tokenizer, tr, val, CFG, seed=0,
                                   device="cpu")
    assert not any("lora" in k for k in model.state_dict())
    model.save_pretrained(tmp_path)
    again = AutoModelForSequenceClassification.from_pretrained(tmp_path).eval()
    batch = tokenizer(["good film", "awful plot was"], return_tensors="pt", padding=True)
    with torch.no_grad():
        assert torch.allclose(model(**batch).logits, again(**batch).logits, atol=1e-6)


def test_healing_learns_the_rule_and_one_seed_gives_the_same_weights(tokenizer, data):
    tr, val = data
    t = teacher(tokenizer)
    a, hist, _ = heal.heal_recipe("distill", t, (0, 3), tokenizer, tr, val, CFG, seed=3, device="cpu")
    b, _, _ = heal.heal_recipe("distill", t, (0, 3), tokenizer, tr, val, CFG, seed=3, device="cpu")
    for (k, x), y in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        assert torch.equal(x, y), k
    # the teacher is random, so only the labels can lift validation accuracy above chance (8 epochs of 96)
    long = replace(CFG, epochs=8, eval_every=None)
    _, fhist, _ = heal.heal_recipe("finetune", t, (0, 3), tokenizer, frame(96, 0), frame(48, 1), long, seed=3,
                                   device="cpu")
    assert fhist["val_accuracy"].iloc[0] < 0.65 and fhist["val_accuracy"].max() >= 0.8
    assert np.isfinite(hist["train_loss"]).all()


def test_fine_tune_uses_the_given_loss_but_validates_on_the_labels(tokenizer, data):
    tr, val = data
    calls = []

    def zero_loss(model, batch, labels):
        calls.append(int(labels.shape[0]))
        return (model(**batch).logits * 0.0).sum()

    model = teacher(tokenizer)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    _, hist = train.fine_tune(model, tokenizer, tr, val, CFG, seed=0, device="cpu", loss_fn=zero_loss)
    assert sum(calls) == 96 and (hist["train_loss"] == 0).all()
    assert hist["val_loss"].notna().all()
    # weight decay is the only force on a zero loss: the weights shrink but the predictions barely move
    assert any(not torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_bad_requests_fail_before_training(tokenizer, data):
    tr, val = data
    t = teacher(tokenizer)
    with pytest.raises(HealError, match="unknown healing recipe"):
        heal.heal_recipe("prune", t, (0,), tokenizer, tr, val, CFG, seed=0, device="cpu")
    with pytest.raises(HealError, match="needs first_k="):
        heal.heal_recipe("first_k", t, (0,), tokenizer, tr, val, CFG, seed=0, device="cpu")
    with pytest.raises(HealError, match="partial_blocks=3"):
        heal.heal_recipe("partial", t, (0, 1), tokenizer, tr, val, CFG, seed=0,
                         options=RecipeOptions(partial_blocks=3), device="cpu")
    with pytest.raises(HealError, match="not all zero"):
        RecipeOptions(kd_weight=0, hidden_weight=0, ce_weight=0).validate()
    frozen = teacher(tokenizer)
    for p in frozen.parameters():
        p.requires_grad_(False)
    with pytest.raises(LayerwiseError, match="no parameter of the model requires gradients"):
        train.fine_tune(frozen, tokenizer, tr, val, CFG, seed=0, device="cpu")
