"""Training: same seed → identical metrics on CPU; early stopping; the trained-model cache."""

import numpy as np
import pandas as pd
import pytest
import torch
from transformers import BertConfig, BertForSequenceClassification

from analysis_kit import train
from analysis_kit.errors import LayerwiseError


class WordTokenizer:
    """A deterministic whitespace tokenizer (enough for make_loader)."""

    pad_token_id = 0
    vocab = {w: i + 1 for i, w in enumerate("good great fine bad awful poor the a movie phone it is".split())}

    def __call__(self, texts, truncation=True, max_length=128):
        return {"input_ids": [[self.vocab.get(w, 13) for w in t.split()][:max_length] or [13] for t in texts]}


def _frame(n: int, seed: int) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    pos, neg = ["good", "great", "fine"], ["bad", "awful", "poor"]
    rows = []
    for i in range(n):
        label = i % 2
        words = list(rng.choice(pos if label else neg, 2)) + list(rng.choice(["the", "a", "movie", "phone", "it"], 3))
        rng.shuffle(words)
        rows.append({"id": f"s{i}", "text": " ".join(words), "label": label})
    return pd.DataFrame(rows)


def _model(seed: int = 0):
    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=16, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
                     max_position_embeddings=32, num_labels=2)
    return BertForSequenceClassification(cfg)


CFG = train.TrainConfig(epochs=3, lr=3e-3, batch_size=8, patience=5, max_length=16)


def test_same_seed_gives_identical_metrics_on_cpu():
    tr, va = _frame(64, 0), _frame(32, 1)
    runs = []
    for _ in range(2):
        model, hist = train.fine_tune(_model(), WordTokenizer(), tr, va, CFG, seed=7, device="cpu")
        runs.append((hist, train.evaluate(model, WordTokenizer(), va, device="cpu")))
    pd.testing.assert_frame_equal(runs[0][0].drop(columns="seconds"), runs[1][0].drop(columns="seconds"))
    assert runs[0][1]["accuracy"] == runs[1][1]["accuracy"]
    np.testing.assert_array_equal(runs[0][1]["probs"], runs[1][1]["probs"])
    other, _ = train.fine_tune(_model(), WordTokenizer(), tr, va, CFG, seed=8, device="cpu")
    assert not np.array_equal(train.evaluate(other, WordTokenizer(), va, device="cpu")["probs"], runs[0][1]["probs"])


def test_training_learns_and_restores_best_weights():
    tr, va = _frame(96, 0), _frame(48, 1)
    cfg = train.TrainConfig(epochs=12, lr=5e-3, batch_size=8, patience=12, max_length=16)
    model, hist = train.fine_tune(_model(), WordTokenizer(), tr, va, cfg, seed=0, device="cpu")
    final = train.evaluate(model, WordTokenizer(), va, device="cpu")
    assert final["accuracy"] >= 0.9  # the words decide the label: a working loop learns it
    assert final["loss"] == pytest.approx(hist["val_loss"].min(), rel=1e-5)  # best weights restored
    assert {"step", "epoch", "train_loss", "val_loss", "val_accuracy", "val_macro_f1"} <= set(hist.columns)


def test_early_stopping_stops():
    tr, va = _frame(64, 0), _frame(32, 1)
    cfg = train.TrainConfig(epochs=30, lr=1e-9, batch_size=8, patience=1, max_length=16, eval_every=2)
    _, hist = train.fine_tune(_model(), WordTokenizer(), tr, va, cfg, seed=0, device="cpu")
    assert hist["step"].max() < 30 * 8  # a learning rate of ~0 cannot improve validation loss for long


def test_bad_config_and_empty_data_fail_fast():
    with pytest.raises(LayerwiseError, match="invalid TrainConfig"):
        train.fine_tune(_model(), WordTokenizer(), _frame(8, 0), _frame(8, 1), train.TrainConfig(epochs=0), 0, "cpu")
    with pytest.raises(LayerwiseError, match="empty"):
        train.fine_tune(_model(), WordTokenizer(), _frame(8, 0).iloc[:0], _frame(8, 1), CFG, 0, "cpu")


def test_metrics_from_logits_by_hand():
    logits = np.log(np.array([[0.9, 0.1], [0.2, 0.8], [0.6, 0.4], [0.3, 0.7]]))
    m = train.metrics_from_logits(logits, np.array([0, 1, 1, 1]))
    assert m["accuracy"] == 0.75 and m["correct"].tolist() == [True, True, False, True]
    assert m["loss"] == pytest.approx(-np.mean(np.log([0.9, 0.8, 0.4, 0.7])))
    assert m["macro_f1"] == pytest.approx(np.mean([2 / 3, 0.8]))


def test_get_trained_caches_by_spec(tmp_path, monkeypatch):
    """The cache trains once per (model, task, config, seed) and reloads identical weights."""
    from analysis_kit import assets

    try:
        found = {name: assets.fetch(name, offline=True)[name] for name in ("snippets", "minilm")}
    except assets.AssetError as exc:
        pytest.skip(f"assets not fetched: {exc}")
    monkeypatch.setenv("LAYERWISE_CACHE", str(tmp_path))
    (tmp_path / "assets").mkdir()
    for name, folder in found.items():  # reuse the fetched assets; trained models go to the tmp cache
        (tmp_path / "assets" / name).symlink_to(folder)
    calls = []
    real = train.fine_tune
    monkeypatch.setattr(train, "fine_tune", lambda *a, **k: calls.append(1) or real(*a, **k))
    task = train.TaskSpec(max_train=48, max_eval=24)
    cfg = train.TrainConfig(epochs=1, batch_size=16, max_length=32)
    spec = train.standard_spec("scratch", tiny=True)
    m1, _, rec1 = train.get_trained(spec, task, cfg, seed=0, device="cpu")
    m2, _, rec2 = train.get_trained(spec, task, cfg, seed=0, device="cpu")
    assert len(calls) == 1 and rec1["folder"] == rec2["folder"]
    for (k, a), (_, b) in zip(m1.state_dict().items(), m2.state_dict().items(), strict=True):
        assert torch.equal(a, b), k
    train.get_trained(spec, task, cfg, seed=1, device="cpu")
    assert len(calls) == 2


def _fake_record(val_losses, val_acc=0.8, majority=0.55):
    hist = [{"step": 10 * (i + 1), "epoch": float(i + 1), "train_loss": 0.5, "val_loss": v, "val_accuracy": val_acc,
             "seconds": 1.0} for i, v in enumerate(val_losses)]
    rec = {"history": hist, "train_seconds": 3.0, "val": {"accuracy": val_acc}, "val_majority": majority}
    return {**rec, "failed": train.is_failed(rec)}


def test_recipe_search_picks_the_lowest_validation_loss_and_never_a_failed_training(monkeypatch):
    runs = {1e-5: _fake_record([0.6, 0.5, 0.55]), 1e-4: _fake_record([0.4, 0.3], val_acc=0.555),  # failed
            3e-5: _fake_record([0.5, 0.45, 0.47])}
    monkeypatch.setattr(train, "trained_record", lambda spec, task, cfg, seed, device="auto": runs[cfg.lr])
    search = train.RecipeSearch(lrs=(1e-5, 1e-4, 3e-5), base=train.TrainConfig(epochs=3), max_examples=None)
    cfg, table = train.search_recipe(None, train.TaskSpec(), search)
    assert cfg.lr == 3e-5 and cfg.epochs == 3
    chosen = table[table["chosen"]]
    assert len(chosen) == 1 and chosen.iloc[0]["epoch"] == 2.0 and chosen.iloc[0]["val_loss"] == 0.45
    assert table.loc[table["lr"] == 1e-4, "failed"].all()
    assert len(table) == 3 + 2 + 3  # one row per (learning rate, evaluated epoch)


def test_recipe_search_refuses_when_every_candidate_failed_unless_allowed(monkeypatch):
    monkeypatch.setattr(train, "trained_record", lambda *a, **k: _fake_record([0.6, 0.5], val_acc=0.56))
    search = train.RecipeSearch(lrs=(1e-5, 1e-4), base=train.TrainConfig(), max_examples=None)
    with pytest.raises(LayerwiseError, match="failed training"):
        train.search_recipe(None, train.TaskSpec(), search)
    cfg, _ = train.search_recipe(None, train.TaskSpec(), search, allow_failed=True)
    assert cfg.lr in (1e-5, 1e-4)


def test_failed_training_is_within_one_point_of_the_majority_class():
    assert train.is_failed({"val": {"accuracy": 0.595}, "val_majority": 0.586})
    assert not train.is_failed({"val": {"accuracy": 0.61}, "val_majority": 0.586})
    assert not train.is_failed({"val": {"mse": 1.0}})  # regression: not decidable
    assert train.majority_share([1, 1, 0, 1]) == 0.75


def test_failed_accuracy_is_at_most_one_point_above_the_majority_share():
    assert train.failed_accuracy(0.50, 0.50)  # the majority class itself
    assert train.failed_accuracy(0.50 + train.FAILED_MARGIN, 0.50)  # the margin is inclusive
    assert not train.failed_accuracy(0.52, 0.50)
    assert train.failed_accuracy(0.40, 0.50)  # worse than the majority class
    rec = {"val": {"accuracy": 0.595}, "val_majority": 0.586}
    assert train.is_failed(rec) == train.failed_accuracy(0.595, 0.586)


def test_named_tasks_map_to_snippet_domains():
    assert train.task_spec("mr").domain == "movie" and train.task_spec("mr").name == "mr"
    assert train.task_spec("amazon", tiny=True).max_train == train.SMOKE_TASK.max_train
    with pytest.raises(LayerwiseError, match="unknown task"):
        train.task_spec("imdb")


def test_epoch_budget_follows_the_training_split_size():
    search = train.RecipeSearch(lrs=(1e-4,), base=train.TrainConfig(epochs=4), max_examples=9000)
    assert search.schedule(2060).epochs == 4  # Amazon: 4 epochs
    assert search.schedule(3500).epochs == 2  # mr, capped split: 2 epochs, about the same example passes
    assert search.schedule(20000).epochs == 1  # never fewer than one epoch


@pytest.mark.parametrize("name", ["smollm2", "mpnet"])
def test_standard_models_train_as_sequence_classifiers(name, monkeypatch, tmp_path):
    """The tiny stand-ins of the 12- and 30-block testbeds go through the same cached fine-tuning path."""
    from analysis_kit import assets

    needed = ("snippets", "smollm2" if name == "smollm2" else "mpnet")
    try:
        found = {a: assets.fetch(a, offline=True)[a] for a in needed}
    except assets.AssetError as exc:
        pytest.skip(f"assets not fetched: {exc}")
    monkeypatch.setenv("LAYERWISE_CACHE", str(tmp_path))
    (tmp_path / "assets").mkdir()
    for asset, folder in found.items():
        (tmp_path / "assets" / asset).symlink_to(folder)
    task = train.TaskSpec(max_train=48, max_eval=24)
    cfg = train.TrainConfig(epochs=1, batch_size=16, max_length=32)
    model, tok, rec = train.get_trained(train.standard_spec(name, tiny=True), task, cfg, seed=0, device="cpu")
    assert rec["steps"] == 3 and "val_majority" in rec and isinstance(rec["failed"], bool)
    assert train.predict(model, tok, ["good phone", "bad movie"]).shape == (2, 2)


def test_the_optimizer_warms_up_decays_to_zero_and_skips_decay_on_biases_and_norms():
    model, head = _model(), torch.nn.Linear(16, 2)
    for p in model.bert.embeddings.parameters():
        p.requires_grad_(False)
    opt = train.Optimizer([(model.parameters(), 1e-3), (head.parameters(), 1e-2)], total=10, weight_decay=0.1,
                          warmup_ratio=0.2, grad_clip=1.0)
    assert [opt.lr_factor(s) for s in range(10)] == pytest.approx([0.5, 1.0, 1.0, 0.875, 0.75, 0.625, 0.5, 0.375,
                                                                   0.25, 0.125])
    assert opt.lr_factor(10) == 0.0
    groups = [(g["initial_lr"], g["weight_decay"], {p.ndim > 1 for p in g["params"]}) for g in opt.opt.param_groups]
    assert groups == [(1e-3, 0.1, {True}), (1e-3, 0.0, {False}), (1e-2, 0.1, {True}), (1e-2, 0.0, {False})]
    trained = {id(p) for p in opt.params}
    assert trained == {id(p) for p in [*model.parameters(), *head.parameters()] if p.requires_grad}
    assert not trained & {id(p) for p in model.bert.embeddings.parameters()}
    big = (head.weight * 1e6).sum() + model(input_ids=torch.tensor([[1, 2, 3]])).logits.sum()
    before = head.weight.detach().clone()
    opt.step(big)  # a gradient norm near 1e6, clipped to 1 in place before the update
    assert torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in opt.params if p.grad is not None])) <= 1.0001
    assert opt.sched.get_last_lr() == pytest.approx([1e-3, 1e-3, 1e-2, 1e-2])  # step 1 of 2 warm-up steps done
    # Adam's first step moves a weight by the step's rate (lr · 0.5) times the sign of its gradient, plus decay
    assert (head.weight.detach() - before).abs().max() <= 1e-2 * 0.5 * (1 + 0.1 * before.abs().max()) + 1e-7
    with pytest.raises(LayerwiseError, match="requires gradients"):
        train.Optimizer([(torch.nn.Linear(2, 2).requires_grad_(False).parameters(), 1e-3)], 5, 0.0, 0.1, 1.0)


def test_every_trainer_of_the_kit_steps_through_the_one_optimizer(monkeypatch, tmp_path):
    """fine_tune (and with it every healing recipe and QLoRA), the step-budget healing of ``analyze`` and the exit
    heads' joint training all update through ``train.Optimizer.step``: one schedule, one clipping rule."""
    from conftest import word_tokenizer

    from analysis_kit import dynamic, heal

    calls = []
    step = train.Optimizer.step
    monkeypatch.setattr(train.Optimizer, "step", lambda self, loss: (calls.append(1), step(self, loss)))
    tok, tr, val = word_tokenizer(tmp_path, list(WordTokenizer.vocab)), _frame(16, 0), _frame(8, 1)
    train.fine_tune(_model(), WordTokenizer(), tr, val, train.TrainConfig(epochs=1, batch_size=8, max_length=8), 0, "cpu")
    assert len(calls) == 2
    ids = torch.randint(1, 16, (4, 6))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": torch.tensor([0, 1, 0, 1])}
    heal.distill(_model(), _model(), [0], [batch], heal.HealConfig(steps=3), device="cpu")
    assert len(calls) == 5
    cfg = dynamic.ExitTrainConfig(mode="joint", epochs=1, batch_size=8, max_length=8)
    model = _model()
    model.resize_token_embeddings(len(tok))
    dynamic.train_exits(model, tok, tr, val, cfg, seed=0, device="cpu")
    assert len(calls) == 7
