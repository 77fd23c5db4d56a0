"""Dynamic depth v2 on tiny random BERTs: the lean runtime, self-distillation, the CALM-style calibration,
saving an exit-enabled model, the fair exit config, and the study's metric names and verdicts."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import word_tokenizer
from test_dynamic import WORDS, toy_frame
from transformers import BertConfig, BertForSequenceClassification

from analysis_kit import dynamic as dy
from analysis_kit import runner, train
from analysis_kit.errors import LayerwiseError
from analysis_kit.studies import (
    baselines,
    compression,
    dynamic_selection,
    findings,
    multilayer_exploration,
    qlora,
    sensitivity,
    theoretical_validation,
)
from analysis_kit.studies.cells import NOTEBOOK_ONLY, params_from


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return word_tokenizer(tmp_path_factory.mktemp("vocab"), WORDS)


def tiny_bert(tokenizer, seed: int = 0) -> BertForSequenceClassification:
    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=4, num_attention_heads=4,
                     intermediate_size=64, max_position_embeddings=64, num_labels=2, initializer_range=0.5)
    return BertForSequenceClassification(cfg).eval()


def diverse_heads(model, seed: int = 1) -> dy.ExitHeads:
    heads = dy.ExitHeads.from_model(model, seed=seed).eval()
    torch.manual_seed(seed + 4)
    for lin in heads.out:  # exits that disagree, so that policies exit at different depths
        torch.nn.init.normal_(lin.weight, std=2.0)
    return heads


@pytest.mark.parametrize("name", ["entropy", "patience", "calibrated", "static"])
def test_exit_runner_takes_the_simulated_decisions_at_every_batch_shape(tokenizer, name):
    model = tiny_bert(tokenizer, seed=3)
    heads = diverse_heads(model)
    texts = toy_frame(12, 3)["text"].tolist()
    probs = dy.exit_probs(dy.predict_exits(model, heads, tokenizer, texts, device="cpu"))
    policy = {"entropy": lambda: dy.EntropyPolicy(float(np.median(dy.normalised_entropy(probs[:, :-1])))),
              "patience": lambda: dy.PatiencePolicy(1),
              "calibrated": lambda: dy.CalibratedPolicy(float(np.median(probs[:, :-1].max(-1)))),
              "static": lambda: dy.PlannedPolicy(2, "static")}[name]()
    want = dy.simulate(policy, probs)
    want_p = probs[np.arange(len(texts)), want - 1]
    runner = dy.ExitRunner(model, heads)
    for bs, shrink in ((1, True), (5, True), (5, False)):
        depth, got = np.zeros(len(texts), int), np.zeros((len(texts), 2))
        for idx, batch in dy.encode_each(tokenizer, texts, 32, bs):
            logits, d = runner(batch, policy, shrink)
            depth[idx], got[idx] = d, torch.softmax(torch.tensor(logits), -1).numpy()
        assert depth.tolist() == want.tolist(), (bs, shrink)
        np.testing.assert_allclose(got, want_p, atol=1e-5)
    assert len(set(want.tolist())) > 1 or isinstance(policy, dy.PlannedPolicy)


def test_exit_runner_refuses_heads_of_another_depth(tokenizer):
    model = tiny_bert(tokenizer)
    with pytest.raises(dy.DynamicError, match="4 blocks but the heads 3"):
        dy.ExitRunner(model, dy.ExitHeads(3, 32, 2))


def test_self_distillation_pulls_early_exits_towards_the_detached_last_exit():
    torch.manual_seed(0)
    logits = torch.randn(8, 3, 2, requires_grad=True)
    labels = torch.randint(0, 2, (8,))
    w = dy.exit_weights(3)
    assert torch.allclose(dy._exit_loss(logits, labels, w, 0.0), dy._weighted_loss(logits, labels, w))
    # when an early exit already equals the last, the KL term adds nothing for it
    same = logits.detach().clone()
    same[:, 0] = same[:, 2]
    full, plain = dy._exit_loss(same, labels, w, 0.5), dy._weighted_loss(same, labels, w)
    ce1 = torch.nn.functional.cross_entropy(same[:, 1], labels)
    kl1 = torch.nn.functional.kl_div(torch.log_softmax(same[:, 1], -1), torch.softmax(same[:, 2], -1),
                                     reduction="batchmean")
    ce0 = torch.nn.functional.cross_entropy(same[:, 0], labels)
    want = plain - w[0] * 0.5 * ce0 - w[1] * 0.5 * ce1 + w[1] * 0.5 * kl1
    assert torch.allclose(full, want, atol=1e-6)
    # the teacher is detached: the last exit's gradient comes from its own cross-entropy only
    dy._exit_loss(logits, labels, w, 0.9).backward()
    g_last = logits.grad[:, 2].clone()
    logits.grad = None
    (w[2] * torch.nn.functional.cross_entropy(logits[:, 2], labels)).backward()
    assert torch.allclose(g_last, logits.grad[:, 2], atol=1e-6)
    with pytest.raises(dy.DynamicError, match="distill"):
        dy.ExitTrainConfig(distill=1.0).validate()


def test_consistency_threshold_controls_disagreement_and_refuses_too_few_examples():
    rng = np.random.default_rng(0)
    n, blocks = 2000, 4
    conf = rng.uniform(0.5, 1.0, (n, blocks))
    final = rng.integers(0, 2, n)
    # an exit agrees with the last one with probability equal to its confidence
    agree = rng.random((n, blocks)) < conf
    agree[:, -1] = True
    pred = np.where(agree, final[:, None], 1 - final[:, None])
    probs = np.stack([np.where(pred == 0, conf, 1 - conf), np.where(pred == 1, conf, 1 - conf)], -1)
    got = dy.consistency_threshold(probs, delta=0.05, epsilon=0.05)
    depths = dy.simulate(dy.make_policy("calibrated", got["threshold"]), probs)
    disagree = (probs[np.arange(n), depths - 1].argmax(-1) != final).mean()
    assert got["p_value"] <= 0.05 and disagree == pytest.approx(got["disagreement"])
    assert disagree < 0.05 and got["avg_depth"] < blocks  # it does exit early, within the promise
    # 50 examples cannot show 1 % disagreement at 5 %: (0.99)^50 = 0.61 > 0.05, so never exit early
    small = dy.consistency_threshold(probs[:50], delta=0.01, epsilon=0.05)
    assert small["threshold"] == 2.0 and small["avg_depth"] == blocks and small["p_value"] is None
    with pytest.raises(dy.DynamicError, match="delta"):
        dy.consistency_threshold(probs, delta=0.0)


def test_saved_exit_model_reloads_with_transformers_and_reproduces_exits(tokenizer, tmp_path):
    from transformers import AutoModelForSequenceClassification

    model = tiny_bert(tokenizer, seed=2)
    heads = diverse_heads(model, seed=3)
    texts = toy_frame(10, 5)["text"].tolist()
    runner = dy.ExitRunner(model, heads)
    probs = dy.exit_probs(dy.predict_exits(model, heads, tokenizer, texts, device="cpu"))
    thr = float(np.median(dy.normalised_entropy(probs[:, 0])))  # half the inputs leave after block 1
    want_logits, want_depths = np.zeros((len(texts), 2)), np.zeros(len(texts), int)
    for idx, b in dy.encode_each(tokenizer, texts, 32, 1):  # length-bucketed order: put back by index
        want_logits[idx], want_depths[idx] = runner(b, dy.make_policy("entropy", thr))
    folder = dy.save_exit_model(tmp_path / "exit", model, heads, tokenizer, "entropy", thr, {"max_length": 32})
    plain = AutoModelForSequenceClassification.from_pretrained(folder)  # transformers alone loads the backbone
    assert plain.config.num_hidden_layers == 4
    loaded = dy.load_exit_model(folder, "cpu")
    logits, depths = loaded.predict(texts)
    assert depths.tolist() == want_depths.tolist() and len(set(depths.tolist())) > 1
    np.testing.assert_allclose(logits, want_logits, atol=1e-5)
    with pytest.raises(dy.DynamicError, match="complexity policy needs its fitted predictor"):
        dy.save_exit_model(tmp_path / "x", model, heads, tokenizer, "complexity", 0.0)
    with pytest.raises(dy.DynamicError, match="has no exit_config.json"):
        dy.load_exit_model(tmp_path)


def test_recipe_exit_config_copies_the_reference_recipe_and_its_realised_length():
    rec = train.TrainConfig(epochs=3, lr=7e-5, batch_size=16, patience=1, max_length=48, max_steps=120)
    cfg = dy.recipe_exit_config(rec, distill=0.3)
    assert (cfg.mode, cfg.epochs, cfg.lr, cfg.batch_size, cfg.patience, cfg.max_length, cfg.max_steps, cfg.distill,
            cfg.stop_on) == ("joint", 3, 7e-5, 16, 1, 48, 120, 0.3, "last")
    assert (cfg.weight_decay, cfg.warmup_ratio, cfg.grad_clip) == (rec.weight_decay, rec.warmup_ratio, rec.grad_clip)
    ran = dy.recipe_exit_config(rec, epochs_run=2, steps_run=90)  # what the reference's early stopping ran
    assert (ran.epochs, ran.max_steps, ran.patience) == (2, 90, 2)  # no earlier stop: the same length
    with pytest.raises(dy.DynamicError, match="stop_on"):
        dy.ExitTrainConfig(stop_on="first").validate()


def test_joint_training_stops_at_max_steps(tokenizer):
    model = tiny_bert(tokenizer)
    cfg = dy.ExitTrainConfig(epochs=3, batch_size=8, max_steps=5, distill=0.5, lr=1e-3, max_length=32)
    _, _, hist = dy.train_exits(model, tokenizer, toy_frame(64, 0), toy_frame(16, 1), cfg, seed=0, device="cpu")
    assert len(hist) == 1 and hist["step"].iloc[-1] == 5
    # stop_on="last" follows the last exit's validation loss, and runs all epochs when patience allows
    cfg = dy.ExitTrainConfig(epochs=3, batch_size=16, lr=1e-3, max_length=32, stop_on="last", patience=3)
    model2, heads, hist = dy.train_exits(tiny_bert(tokenizer), tokenizer, toy_frame(64, 0), toy_frame(16, 1), cfg,
                                         seed=0, device="cpu")
    assert len(hist) == 3 and {"val_loss_last", "val_loss"} <= set(hist.columns)
    feats = dy.predict_exits(model2, heads, tokenizer, toy_frame(16, 1)["text"].tolist(), max_length=32, device="cpu")
    kept = float(torch.nn.functional.cross_entropy(torch.tensor(feats[:, -1]),
                                                   torch.tensor(toy_frame(16, 1)["label"].to_numpy())))
    assert kept == pytest.approx(hist["val_loss_last"].min(), abs=1e-4)  # the restored checkpoint is the best one


# ------------------------------------------------------------------------------------------------ the study


def _fake_unit_inputs(monkeypatch, tokenizer, failed_seed: int | None = None):
    """fair_exit_model → a tiny BERT reference and a tiny exit model trained briefly on toy data."""
    def fake(name, seed, task, tiny=False, distill=0.5, head_lr=1e-3, weighting="linear", device="auto"):
        splits = {"train": toy_frame(64, seed), "val": toy_frame(120, seed + 10), "test": toy_frame(60, seed + 20)}
        ref = tiny_bert(tokenizer, seed)
        model = tiny_bert(tokenizer, seed + 50)
        cfg = dy.ExitTrainConfig(epochs=2, batch_size=16, lr=1e-3, max_length=32, distill=distill)
        model, heads, hist = dy.train_exits(model, tokenizer, splits["train"], splits["val"], cfg, seed, "cpu")
        history = hist.to_dict(orient="records")
        return {"model": model, "heads": heads, "tokenizer": tokenizer, "reference": ref, "splits": splits,
                "record": {"history": history, "train_seconds": 1.0, "failed": seed == failed_seed},
                "reference_record": {"history": [{"epoch": 2.0, "val_loss": 0.5}], "steps": 8, "train_seconds": 1.0,
                                     "failed": False},
                "config": cfg}

    monkeypatch.setattr(dy, "fair_exit_model", fake)
    monkeypatch.setattr(dynamic_selection, "_cached_unit", dynamic_selection._unit)


def test_study_reports_the_must_show_metrics_with_intervals(monkeypatch, tokenizer):
    _fake_unit_inputs(monkeypatch, tokenizer, failed_seed=2)
    params = dynamic_selection.Params(seeds=(0, 1, 2), tasks=("amazon",), latency_n=6, latency_n_batched=16,
                                      latency_batch=8, latency_repeats=1, profile_n=5, n_bootstrap=1000,
                                      torch_threads=1)
    res = dynamic_selection.run(params)
    m = res.metrics
    for key in ("headline/minilm/amazon/b1_speedup", "headline/minilm/amazon/acc_loss_points",
                "headline/minilm/amazon/b8_speedup", "overhead_ms/minilm"):
        assert m[key]["ci_low"] <= m[key]["mean"] <= m[key]["ci_high"], key
    assert m["failed_trainings/minilm/amazon"]["mean"] == 1 and m["headline/minilm/amazon/b1_speedup"]["n"] == 2
    for pol in ("entropy", "patience", "calibrated", "static"):
        assert f"policy/minilm/amazon/{pol}/b1_speedup" in m and f"policy/minilm/amazon/{pol}/acc_loss_points" in m
    assert set(res.tables["policies"]["policy"]) == {"entropy", "patience", "calibrated", "static"}
    assert res.tables["runtime_agreement"]["depth_agreement"].min() == 1.0
    assert res.tables["ship"][["same_depths", "same_predictions"]].min().min() == 1.0
    assert set(res.tables["tests"]["family"]) == {"vs static", "vs reference"}
    assert "goal" in res.values["findings"] and "minilm/amazon" in res.values["findings"]
    row = res.tables["headline"].iloc[0]
    b1 = m["headline/minilm/amazon/b1_speedup"]
    loss = m["headline/minilm/amazon/acc_loss_points"]
    assert row["goal_met"] == (b1["ci_low"] >= 2.0 and loss["ci_high"] <= 1.0)
    # the loss is reference minus policy on the same examples, in points
    ops = res.tables["operating_points"]
    assert set(ops["policy"]) == {"entropy", "patience", "calibrated", "static"}


def test_study_params_fail_before_training():
    with pytest.raises(LayerwiseError, match="at least two distinct seeds"):
        dynamic_selection.Params(seeds=(0,)).validate()
    with pytest.raises(LayerwiseError, match="static truncation is always run"):
        dynamic_selection.Params(policies=("static",)).validate()
    with pytest.raises(LayerwiseError, match="never inferred"):
        dynamic_selection.Params(latency_n=1).validate()
    with pytest.raises(LayerwiseError, match="choose one or more of minilm, mpnet"):
        dynamic_selection.Params(models=("bert",)).validate()


@pytest.mark.parametrize(("slug", "cls"), [("dynamic_selection", dynamic_selection.Params),
                                           ("baselines", baselines.Params), ("findings", findings.Params),
                                           ("theoretical_validation", theoretical_validation.Params),
                                           ("sensitivity", sensitivity.Params),
                                           ("compression", compression.Params),
                                           ("multilayer_exploration", multilayer_exploration.Params),
                                           ("qlora", qlora.Params)])
def test_parameters_cell_and_params_are_one_source(slug, cls):
    cell = runner.notebook_params(slug)
    defaults = cls()
    for name, p in cell.items():
        if name in NOTEBOOK_ONLY:
            continue
        want = getattr(defaults, name)
        got = tuple(p.default) if isinstance(p.default, list) else p.default
        assert got == want, f"{slug}: parameter {name} is {got!r} in the notebook but {want!r} in Params"
    missing = set(cls.__dataclass_fields__) - set(cell) - {"device", "sources"}  # sources: derived from tasks/models
    assert not missing, f"{slug}: Params fields {missing} are not in the parameters cell"
    built = params_from(cls, {name: p.default for name, p in cell.items()})
    assert built == defaults


def test_params_from_turns_lists_into_tuples_and_validates():
    p = params_from(baselines.Params, {"seeds": [3, 4], "tasks": ["mr"], "unrelated": 1})
    assert p.seeds == (3, 4) and p.tasks == ("mr",)
    with pytest.raises(LayerwiseError, match="at least two distinct seeds"):
        params_from(dynamic_selection.Params, {"seeds": [1]})
    with pytest.raises(LayerwiseError, match="mapping"):
        params_from(dynamic_selection.Params, [("seeds", [1, 2])])


def test_exit_runner_on_mpnet_matches_the_simulation(tokenizer):
    from transformers import MPNetConfig, MPNetForSequenceClassification

    torch.manual_seed(0)
    cfg = MPNetConfig(vocab_size=len(tokenizer) + 4, hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
                      intermediate_size=64, max_position_embeddings=80, num_labels=2, initializer_range=0.5)
    model = MPNetForSequenceClassification(cfg).eval()
    heads = diverse_heads(model)
    texts = toy_frame(10, 7)["text"].tolist()
    probs = dy.exit_probs(dy.predict_exits(model, heads, tokenizer, texts, max_length=32, device="cpu"))
    policy = dy.EntropyPolicy(float(np.median(dy.normalised_entropy(probs[:, 0]))))
    want = dy.simulate(policy, probs)
    runner = dy.ExitRunner(model, heads)
    for bs in (1, 4):
        depth = np.zeros(len(texts), int)
        for idx, batch in dy.encode_each(tokenizer, texts, 32, bs):
            depth[idx] = runner(batch, policy)[1]
        assert depth.tolist() == want.tolist(), bs
