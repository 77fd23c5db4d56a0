"""Exit heads, exit policies, complexity features, training and the exit runtime on tiny random BERTs.

Policies are checked on hand-made exit probabilities whose exits can be worked out by hand; the model
side checks that the exits computed in one pass equal the model truncated at each depth, and that the
runtime (``ExitRunner``, timed by ``time_configs``) at full depth gives the last exit's predictions.
Real early exit against the simulation, policy by policy, is in test_study_dynamic.py.
"""

from __future__ import annotations

import copy

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import word_tokenizer
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    LlamaConfig,
    LlamaForSequenceClassification,
)

from analysis_kit import dynamic as dy
from analysis_kit import layers
from analysis_kit.errors import LayerwiseError

WORDS = ["good", "great", "fine", "bad", "awful", "the", "movie", "was", "not", "very", "plot", "but", "ok"]
N_BLOCKS = 4


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    folder = tmp_path_factory.mktemp("vocab")
    return word_tokenizer(folder, WORDS)


def tiny_bert(tokenizer, num_labels: int = 2, seed: int = 0) -> BertForSequenceClassification:
    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=N_BLOCKS, num_attention_heads=4,
                     intermediate_size=64, max_position_embeddings=64, num_labels=num_labels,
                     initializer_range=0.5)  # wide init: [CLS] states differ between inputs
    return BertForSequenceClassification(cfg).eval()


def toy_frame(n: int, seed: int) -> pd.DataFrame:
    """Label 1 iff a positive word ends the text; lengths vary so batches need padding."""
    rng = np.random.default_rng(seed)
    rows = []
    for _ in range(n):
        y = int(rng.integers(2))
        filler = " ".join(rng.choice(["the", "movie", "was", "plot", "very", "ok"], int(rng.integers(1, 7))))
        rows.append((f"{filler} {rng.choice(['good', 'great', 'fine'] if y else ['bad', 'awful'])}", y))
    return pd.DataFrame(rows, columns=["text", "label"])


@pytest.fixture(scope="module")
def splits():
    return {"train": toy_frame(96, 0), "val": toy_frame(48, 1), "test": toy_frame(48, 2)}


def probs_from_top(top: list[list[float]], pred: list[list[int]]) -> np.ndarray:
    """(examples, blocks, 2) probabilities with the given top probability and predicted class per exit."""
    top, pred = np.asarray(top), np.asarray(pred)
    p = np.empty(top.shape + (2,))
    p[..., 1] = np.where(pred == 1, top, 1 - top)
    p[..., 0] = 1 - p[..., 1]
    return p


# ---------------------------------------------------------------------------------------------- policies

HAND = probs_from_top(
    top=[[0.95, 0.96, 0.97, 0.99],   # confident from block 1
         [0.60, 0.70, 0.90, 0.99],   # confident from block 3
         [0.55, 0.55, 0.60, 0.60],   # never confident
         [0.80, 0.70, 0.90, 0.95]],
    pred=[[1, 1, 1, 1],
          [0, 1, 1, 1],
          [1, 0, 1, 0],
          [0, 1, 1, 1]])
LABELS = np.array([1, 1, 0, 1])


def test_confidence_and_entropy_exit_where_the_threshold_is_first_reached():
    assert dy.simulate(dy.ConfidencePolicy(0.85), HAND).tolist() == [1, 3, 4, 3]
    assert dy.simulate(dy.ConfidencePolicy(2.0), HAND).tolist() == [4, 4, 4, 4]  # never exits early
    # normalised entropy of top 0.9 is h(0.9)/ln 2 = 0.469; 0.95 → 0.286; 0.8 → 0.722
    assert dy.simulate(dy.EntropyPolicy(0.47), HAND).tolist() == [1, 3, 4, 3]
    assert dy.simulate(dy.EntropyPolicy(0.9), HAND).tolist() == [1, 2, 4, 1]  # 0.7 → 0.881
    assert dy.simulate(dy.EntropyPolicy(-1.0), HAND).tolist() == [4, 4, 4, 4]


def test_patience_counts_agreeing_consecutive_exits():
    # patience 0 exits after block 1; patience t needs t exits in a row that agree with the one before
    assert dy.simulate(dy.PatiencePolicy(0), HAND).tolist() == [1, 1, 1, 1]
    assert dy.simulate(dy.PatiencePolicy(1), HAND).tolist() == [2, 3, 4, 3]
    assert dy.simulate(dy.PatiencePolicy(2), HAND).tolist() == [3, 4, 4, 4]
    with pytest.raises(dy.DynamicError, match="non-negative integer"):
        dy.PatiencePolicy(1.5)


def test_outcome_oracle_and_blocks_needed_by_hand():
    preds, correct = dy.outcome(HAND, LABELS, np.array([1, 1, 1, 1]))
    assert preds.tolist() == [1, 0, 1, 0] and correct.tolist() == [True, False, False, False]
    assert dy.oracle_depths(HAND, LABELS).tolist() == [1, 2, 2, 2]
    # stays right from depth d on: ex0 1; ex1 2; ex2 the last exit is right, block 3 wrong → 4; ex3 2
    assert dy.blocks_needed(HAND, LABELS).tolist() == [1, 2, 4, 2]
    wrong_last = np.array([1, 1, 1, 0])  # ex3 wrong at the end → all blocks
    assert dy.blocks_needed(HAND, wrong_last)[3] == N_BLOCKS
    assert dy.oracle_depths(HAND, np.array([0, 1, 0, 1]))[0] == 1  # no exit is right: the cheapest


def test_planned_policy_exits_at_its_depths():
    assert dy.simulate(dy.PlannedPolicy(np.array([2, 1, 4, 3])), HAND).tolist() == [2, 1, 4, 3]
    assert dy.simulate(dy.PlannedPolicy(2), HAND).tolist() == [2, 2, 2, 2]
    with pytest.raises(dy.DynamicError, match=">= 1"):
        dy.PlannedPolicy(np.array([0, 1]))


def test_static_depths_mix_floor_and_ceil_to_the_exact_mean():
    d = dy.static_depths(10, 2.3, 4, seed=1)
    assert sorted(set(d.tolist())) == [2, 3] and (d == 3).sum() == 3 and d.mean() == pytest.approx(2.3)
    assert (d == dy.static_depths(10, 2.3, 4, seed=1)).all()
    assert (dy.static_depths(5, 4.0, 4) == 4).all()
    with pytest.raises(dy.DynamicError, match="1..4"):
        dy.static_depths(5, 4.5, 4)


def test_settings_grid_spans_never_exit_to_always_exit():
    assert dy.settings_grid("patience", HAND) == [0, 1, 2, 3]
    conf = dy.settings_grid("confidence", HAND)
    assert conf[0] == pytest.approx(0.55) and conf[-1] == 2.0
    depths = [dy.simulate(dy.ConfidencePolicy(s), HAND).mean() for s in conf]
    assert depths[0] < depths[-1] == N_BLOCKS and depths == sorted(depths)


def random_probs(n: int, n_blocks: int, n_labels: int, seed: int) -> np.ndarray:
    """Random exit probabilities (examples, blocks, labels): every policy must cope with any of them."""
    logits = np.random.default_rng(seed).normal(0, 2, (n, n_blocks, n_labels))
    return dy.exit_probs(logits)


@pytest.fixture(scope="module")
def policy_inputs():
    """Everything a registered policy may declare in ``needs``, for random probabilities of 5 blocks."""
    n, n_blocks = 24, 5
    rng = np.random.default_rng(1)
    texts = [" ".join(rng.choice(WORDS, int(rng.integers(1, 12)))) for _ in range(n)]
    feats = dy.ComplexityFeatures().fit(texts, rng.integers(0, 3, n))
    predictor = dy.ComplexityPredictor(feats, n_blocks, seed=0).fit(texts, rng.integers(1, n_blocks + 1, n))
    probs = random_probs(n, n_blocks, 3, seed=2)
    return {"n": n, "n_blocks": n_blocks, "texts": texts, "predictor": predictor, "probs": probs,
            "labels": rng.integers(0, 3, n)}


def test_registry_holds_the_seven_policies_online_ones_first():
    assert dy.policy_names() == ("entropy", "confidence", "patience", "calibrated", "complexity", "static", "oracle")
    assert dy.ONLINE_POLICIES == ("entropy", "confidence", "patience", "calibrated", "complexity")
    assert dy.POLICIES == (*dy.ONLINE_POLICIES, "static", "oracle")
    with pytest.raises(dy.DynamicError, match="unknown policy 'nope'; registered"):
        dy.make_policy("nope", 0.5)


@pytest.mark.parametrize("name", dy.policy_names())
def test_every_registered_policy_is_made_by_make_policy_and_exits_within_the_blocks(name, policy_inputs):
    cls = dy.policy_class(name)
    probs, n_blocks = policy_inputs["probs"], policy_inputs["n_blocks"]
    needs = {k: policy_inputs[k] for k in cls.needs}
    grid = dy.settings_grid(name, probs)
    assert grid and grid == cls.settings_grid(probs)
    for setting in grid:
        policy = dy.make_policy(name, setting, **needs)
        assert isinstance(policy, cls) and policy.name == name
        depth = dy.simulate(policy, probs)
        assert depth.shape == (len(probs),) and depth.min() >= 1 and depth.max() <= n_blocks
    for missing in cls.needs:  # each declared input, left out, is named in the error
        with pytest.raises(dy.DynamicError, match=f"missing {missing}="):
            dy.make_policy(name, grid[0], **{k: v for k, v in needs.items() if k != missing})
    with pytest.raises(dy.DynamicError, match=r"does not take \['bogus'\]"):
        dy.make_policy(name, grid[0], bogus=1, **needs)


def test_planned_policies_through_make_policy_equal_their_hand_built_plans(policy_inputs):
    pred, texts = policy_inputs["predictor"], policy_inputs["texts"]
    made = dy.make_policy("complexity", 0.5, predictor=pred, texts=texts)
    assert made.depths.tolist() == pred.policy(texts, 0.5).depths.tolist() and made.setting == 0.5
    with pytest.raises(dy.DynamicError, match="fitted ComplexityPredictor"):
        dy.make_policy("complexity", 0.5, predictor=dy.ComplexityPredictor(pred.features, 5), texts=texts)
    static = dy.make_policy("static", 2.5, n=10, n_blocks=4, seed=3)
    assert static.depths.tolist() == dy.static_depths(10, 2.5, 4, seed=3).tolist() and static.setting == 2.5
    assert static.subset(np.array([1, 4])).depths.tolist() == static.depths[[1, 4]].tolist()
    oracle = dy.make_policy("oracle", 0.0, probs=HAND, labels=LABELS)
    assert dy.simulate(oracle, HAND).tolist() == dy.oracle_depths(HAND, LABELS).tolist()
    assert dy.settings_grid("static", HAND) == [1.0, 2.0, 3.0, 4.0] and dy.settings_grid("oracle", HAND) == [0.0]
    assert dy.settings_grid("complexity", HAND) == [float(o) for o in np.arange(-4, 4.25, 0.25)]


def test_a_toy_policy_is_one_class_that_registers_runs_through_simulate_and_unregisters():
    class AfterBlock(dy.ExitPolicy):
        """Toy: every example leaves after block ``setting`` (1-based), whatever the exits say."""

        name = "toy_after_block"
        needs_probs = False

        @classmethod
        def settings_grid(cls, val_probs, n_points=41):
            return [float(d) for d in range(1, np.shape(val_probs)[1] + 1)]

        def step(self, k, probs, rows):
            return np.full(rows.shape, k + 1 >= self.setting)

    assert dy.register_policy(AfterBlock) is AfterBlock
    try:
        assert "toy_after_block" in dy.policy_names()
        assert dy.simulate(dy.make_policy("toy_after_block", 2), HAND).tolist() == [2, 2, 2, 2]
        sweep = dy.curve(HAND, LABELS, "toy_after_block", dy.settings_grid("toy_after_block", HAND))
        assert sweep["avg_depth"].tolist() == [1.0, 2.0, 3.0, 4.0]

        class Clash(AfterBlock):
            name = "toy_after_block"

        with pytest.raises(dy.DynamicError, match="taken by AfterBlock"):
            dy.register_policy(Clash)
    finally:
        dy.unregister_policy("toy_after_block")
    assert "toy_after_block" not in dy.policy_names()
    with pytest.raises(dy.DynamicError, match="unknown policy 'toy_after_block'"):
        dy.make_policy("toy_after_block", 2)


def test_bad_probability_shapes_are_named():
    with pytest.raises(dy.DynamicError, match="examples, blocks, labels"):
        dy.simulate(dy.EntropyPolicy(0.5), np.zeros((3, 4)))
    with pytest.raises(dy.DynamicError, match="labels has shape"):
        dy.oracle_depths(HAND, np.array([1, 0]))
    with pytest.raises(dy.DynamicError, match="one value in 1..4"):
        dy.outcome(HAND, LABELS, np.array([1, 2, 5, 1]))


# ------------------------------------------------------------------------------------- heads and exits


def test_last_exit_equals_the_model_and_every_exit_equals_the_truncated_model(tokenizer):
    model = tiny_bert(tokenizer)
    heads = dy.ExitHeads.from_model(model, pooling="cls").eval()
    texts = ["the movie was good", "bad", "very very fine plot but not great"]
    logits = dy.predict_exits(model, heads, tokenizer, texts, batch_size=2, device="cpu")
    assert logits.shape == (3, N_BLOCKS, 2)
    batch = tokenizer(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        assert np.allclose(logits[:, -1], model(**batch).logits.numpy(), atol=1e-5)
        for k in range(N_BLOCKS):
            hidden = layers.run_blocks(model, batch, skip=set(range(k + 1, N_BLOCKS)))
            assert np.allclose(logits[:, k], heads.head(k, hidden[:, 0]).numpy(), atol=1e-5)
    mean_heads = dy.ExitHeads.from_model(model, pooling="mean").eval()
    logits = dy.predict_exits(model, mean_heads, tokenizer, texts, batch_size=2, device="cpu")
    with torch.no_grad():
        hidden = layers.run_blocks(model, batch, skip={3})  # exit 2 (0-based): blocks 0..2
        mask = batch["attention_mask"].unsqueeze(-1).float()
        mean = (hidden * mask).sum(1) / mask.sum(1)  # padding excluded, so batching cannot change it
        assert np.allclose(logits[:, 2], mean_heads.head(2, mean).numpy(), atol=1e-5)


def test_pool_by_hand_and_state_spread(tokenizer):
    hidden = torch.tensor([[[1.0, 2.0], [3.0, 4.0], [100.0, 100.0]]])
    mask = torch.tensor([[1, 1, 0]])
    assert dy.pool(hidden, mask, "mean").tolist() == [[2.0, 3.0]]
    assert dy.pool(hidden, mask, "cls").tolist() == [[1.0, 2.0]]
    with pytest.raises(dy.DynamicError, match="pooling"):
        dy.pool(hidden, mask, "max")
    spread = dy.state_spread(tiny_bert(tokenizer), tokenizer, toy_frame(6, 0)["text"].tolist(), device="cpu")
    assert len(spread) == 2 * N_BLOCKS and (spread["relative_spread"] > 0).all()


def test_exit_heads_refuse_decoders_and_regression(tokenizer):
    with pytest.raises(dy.DynamicError, match="num_labels=1"):
        dy.ExitHeads.from_model(tiny_bert(tokenizer, num_labels=1))
    llama = LlamaForSequenceClassification(LlamaConfig(vocab_size=50, hidden_size=16, num_hidden_layers=2,
                                                       num_attention_heads=2, intermediate_size=32, num_labels=2))
    with pytest.raises(dy.DynamicError, match="decoder"):
        dy.ExitHeads.from_model(llama)
    assert issubclass(dy.DynamicError, LayerwiseError)


# ---------------------------------------------------------------------------------------------- training


def test_frozen_training_leaves_the_backbone_and_lowers_the_loss(tokenizer, splits):
    model = tiny_bert(tokenizer)
    before = copy.deepcopy(model.state_dict())
    cfg = dy.ExitTrainConfig(mode="frozen", epochs=15, head_lr=1e-2, batch_size=16, max_length=32, patience=15)
    untrained = dy.ExitHeads.from_model(model).eval()
    with torch.no_grad():
        feats = dy._features(model, tokenizer, splits["val"]["text"].tolist(), 16, 32, torch.device("cpu"), "mean")
        loss0 = dy._weighted_loss(untrained(feats), torch.tensor(splits["val"]["label"].to_numpy()),
                                  dy.exit_weights(N_BLOCKS))
    out, heads, hist = dy.train_exits(model, tokenizer, splits["train"], splits["val"], cfg, seed=0, device="cpu")
    assert out is model and all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert hist["val_loss"].min() < float(loss0) - 0.01
    assert list(hist.columns) == ["epoch", "train_loss", "val_loss", "val_loss_last", "val_acc_last", "val_acc_mean",
                                  "seconds"]


def test_joint_training_moves_the_backbone_and_is_seeded(tokenizer, splits):
    cfg = dy.ExitTrainConfig(mode="joint", epochs=1, lr=1e-3, head_lr=1e-3, batch_size=32, max_length=32)
    small = {k: v.head(48) for k, v in splits.items()}
    runs = []
    for _ in range(2):
        model = tiny_bert(tokenizer)
        before = copy.deepcopy(model.state_dict())
        out, heads, hist = dy.train_exits(model, tokenizer, small["train"], small["val"], cfg, seed=7, device="cpu")
        runs.append(heads.state_dict())
        assert any(not torch.equal(before[k], v) for k, v in out.state_dict().items())
    assert all(torch.equal(runs[0][k], runs[1][k]) for k in runs[0])


def test_exit_weights_and_config_validation():
    assert dy.exit_weights(4).tolist() == pytest.approx([0.1, 0.2, 0.3, 0.4])
    assert dy.exit_weights(4, "uniform").tolist() == pytest.approx([0.25] * 4)
    with pytest.raises(dy.DynamicError, match="mode"):
        dy.ExitTrainConfig(mode="both").validate()
    with pytest.raises(dy.DynamicError, match="weighting"):
        dy.exit_weights(3, "quadratic")


def test_exit_model_is_cached_and_keyed_by_seed(tokenizer, splits, tmp_path, monkeypatch):
    monkeypatch.setenv("LAYERWISE_CACHE", str(tmp_path))
    model = tiny_bert(tokenizer)
    cfg = dy.ExitTrainConfig(mode="joint", epochs=1, lr=1e-3, batch_size=32, max_length=32)
    small = {k: v.head(32) for k, v in splits.items()}
    m1, h1, rec = dy.exit_model(model, tokenizer, "base-x", small["train"], small["val"], cfg, seed=0, device="cpu")
    assert rec["heads"]["n_blocks"] == N_BLOCKS and len(rec["history"]) == 1

    def boom(*a, **k):
        raise AssertionError("trained again although cached")

    monkeypatch.setattr(dy, "train_exits", boom)
    m2, h2, _ = dy.exit_model(model, tokenizer, "base-x", small["train"], small["val"], cfg, seed=0, device="cpu")
    assert all(torch.equal(h1.state_dict()[k], h2.state_dict()[k]) for k in h1.state_dict())
    assert all(torch.equal(m1.state_dict()[k], m2.state_dict()[k]) for k in m1.state_dict())
    with pytest.raises(AssertionError, match="trained again"):
        dy.exit_model(model, tokenizer, "base-x", small["train"], small["val"], cfg, seed=1, device="cpu")



def test_the_exit_heads_key_holds_the_code_that_trains_them():
    """Cached heads are re-trained when their training changes, not only when ``train_exits`` does: the key
    holds the joint and frozen loops, the exit loss, the pooling and the block runner (``layers``)."""
    code = set(dy._EXIT_CODE)
    assert {dy.exit_model, dy.train_exits, dy._train_joint, dy._train_frozen, dy._exit_loss, dy.exit_weights,
            dy.pooled_states, dy.ExitHeads, dy.layers} <= code
    assert not code & {dy.make_policy, dy.predict_exits}  # policies and inference read the heads, never train them

# ------------------------------------------------------------------------------------------ complexity


def test_complexity_features_by_hand():
    train = ["good good movie", "bad bad movie", "good plot", "bad plot", "good fine", "bad awful"]
    feats = dy.ComplexityFeatures(rare_max_count=1, polar_min_count=3, polar_min_logodds=0.5).fit(
        train, [1, 0, 1, 0, 1, 0])
    assert feats.polar == {"good": 1, "bad": 0}  # 4 occurrences each, all in one class; others too rare
    x = dict(zip(dy.ComplexityFeatures.NAMES, feats.transform(["The good, bad movie was not fine!"])[0], strict=True))
    # words: the good bad movie was not fine (7)
    assert x["n_words"] == 7 and x["type_token_ratio"] == 1.0
    assert x["rare_rate"] == pytest.approx(4 / 7)  # the, was, not unseen; fine seen once; good/bad/movie common
    assert x["polar_rate"] == pytest.approx(2 / 7) and x["polar_conflict"] == pytest.approx(0.5)
    assert x["negations"] == 1 and x["contrasts"] == 0 and x["exclaim_question"] == 1
    assert x["content_share"] == pytest.approx(4 / 7)  # the, was, not are stop words
    with pytest.raises(dy.DynamicError, match="not fitted"):
        dy.ComplexityFeatures().transform(["x"])


def test_complexity_predictor_learns_depth_from_length_and_plans_within_range():
    rng = np.random.default_rng(0)
    texts = [" ".join(["word"] * int(n)) for n in rng.integers(1, 20, 120)]
    needed = np.clip(np.array([len(t.split()) for t in texts]) // 5 + 1, 1, 4)
    feats = dy.ComplexityFeatures().fit(texts, np.zeros(len(texts), int))
    pred = dy.ComplexityPredictor(feats, 4, seed=0)
    oof = pred.out_of_fold(texts, needed)
    assert np.corrcoef(oof, needed)[0, 1] > 0.9
    pred.fit(texts, needed)
    assert pred.plan(np.array([0.2, 2.0, 3.6, 9.0]), 0.0).tolist() == [1, 2, 4, 4]
    assert pred.plan(np.array([2.0]), -5).tolist() == [1]
    pol = pred.policy(["word", " ".join(["word"] * 19)], -0.5)
    assert pol.name == "complexity" and pol.depths.tolist() == [1, 4]
    with pytest.raises(dy.DynamicError, match="one depth in 1..4"):
        pred.fit(texts, needed + 4)



# ---------------------------------------------------------------------------------------------- runtime


def test_exit_runner_never_exiting_gives_the_last_exit_and_time_configs_times_it(tokenizer):
    model = tiny_bert(tokenizer, seed=3)
    heads = dy.ExitHeads.from_model(model, seed=1).eval()
    texts = toy_frame(8, 3)["text"].tolist()
    last = dy.predict_exits(model, heads, tokenizer, texts, max_length=32, device="cpu")[:, -1]
    runner = dy.ExitRunner(model, heads)
    never = {"entropy, never": lambda b, i: runner(b, dy.EntropyPolicy(-1.0)),  # reads every exit, never leaves
             "planned, full depth": lambda b, i: runner(b, dy.PlannedPolicy(N_BLOCKS, "none")),
             "untimed no-op": lambda b, i: None}
    for bs in (1, 5):  # batch 1 runs unmasked; batch 5 is padded
        batches = dy.encode_each(tokenizer, texts, 32, bs)
        assert sorted(int(j) for idx, _ in batches for j in idx) == list(range(len(texts)))
        for idx, batch in batches:
            logits, depth = runner(batch, dy.EntropyPolicy(-1.0))
            assert (depth == N_BLOCKS).all() and np.allclose(logits, last[idx], atol=1e-5)
        table = dy.time_configs(never, batches, repeats=2, device="cpu")
        assert len(table) == len(never) * len(batches) and (table["ms"] >= 0).all()
        for name in ("entropy, never", "planned, full depth"):
            rows = table[table["config"] == name]
            assert (rows["depth_mean"] == N_BLOCKS).all() and rows["n"].sum() == len(texts)
            preds = np.zeros(len(texts), int)
            for j, got in zip(rows["batch"], rows["preds"], strict=True):
                preds[batches[j][0]] = got
            assert preds.tolist() == last.argmax(-1).tolist()
        assert table[table["config"] == "untimed no-op"]["preds"].isna().all()
    with pytest.raises(dy.DynamicError, match="1 repeat"):
        dy.time_configs(never, batches, repeats=0)
    profile = dy.depth_profile(model, heads, tokenizer, texts[:3], max_length=32, device="cpu")
    assert profile["depth"].tolist() == list(range(1, N_BLOCKS + 1))
    assert (profile["probed_ms"] >= profile["planned_ms"] - 1e-9).all()


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_exit_runner_on_distilbert_keeps_the_mask_where_its_attention_needs_it(tokenizer, attn):
    """DistilBERT's eager attention indexes the mask itself, so the runner keeps it even for an unpadded batch
    (``FamilyAdapter.mask_optional``); with SDPA it drops it. Either way the last exit is the model's exit."""
    from transformers import DistilBertConfig, DistilBertForSequenceClassification

    torch.manual_seed(0)
    cfg = DistilBertConfig(vocab_size=len(tokenizer), dim=32, n_layers=N_BLOCKS, n_heads=4, hidden_dim=64,
                           max_position_embeddings=64, num_labels=2, initializer_range=0.5)
    cfg._attn_implementation = attn
    model = DistilBertForSequenceClassification(cfg).eval()
    heads = dy.ExitHeads.from_model(model, seed=1).eval()
    texts = toy_frame(6, 4)["text"].tolist()
    last = dy.predict_exits(model, heads, tokenizer, texts, max_length=32, device="cpu")[:, -1]
    runner = dy.ExitRunner(model, heads)
    for bs in (1, 3):
        for idx, batch in dy.encode_each(tokenizer, texts, 32, bs):
            logits, depth = runner(batch, dy.EntropyPolicy(-1.0))
            assert (depth == N_BLOCKS).all() and np.allclose(logits, last[idx], atol=1e-5)
