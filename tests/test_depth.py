"""Depth experiments: block selection, the depth statistics on planted data, kept-block fine-tuning, LM loss."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from transformers import BertConfig, BertForSequenceClassification, LlamaConfig, LlamaForCausalLM

from analysis_kit import depth, layers, measure, train
from analysis_kit.depth import DepthError, TrainJob
from analysis_kit.models import ModelSpec

# ------------------------------------------------------------------------------------------ block selection


def test_keep_top_takes_highest_scores_in_block_order_and_breaks_ties_early():
    scores = pd.DataFrame({"layer": [0, 1, 2, 3], "score": [0.1, 0.5, 0.5, 0.2]})
    assert depth.keep_top(scores, 1) == (1,)  # tie between 1 and 2: the earlier block
    assert depth.keep_top(scores, 2) == (1, 2)
    assert depth.keep_top(scores, 3) == (1, 2, 3)
    assert depth.keep_top(scores, 4) == (0, 1, 2, 3)
    sel = depth.first_and_best(scores, [1, 3])
    assert sel == {("first", 1): (0,), ("best", 1): (1,), ("first", 3): (0, 1, 2), ("best", 3): (1, 2, 3)}
    with pytest.raises(DepthError, match="1..4"):
        depth.keep_top(scores, 5)
    with pytest.raises(DepthError, match="several rows per layer"):
        depth.keep_top(pd.concat([scores, scores]), 2)
    with pytest.raises(DepthError, match="outside"):
        depth.first_and_best(scores, [0])


def test_keep_top_reads_layer_labels_in_any_row_order_and_ranks_nan_last():
    """The shared ``strategies.top_k`` keeps what the pandas sort did: layer labels, not row positions; NaN last."""
    shuffled = pd.DataFrame({"layer": [3, 1, 0, 2], "score": [0.2, 0.5, float("nan"), 0.5]})
    assert depth.keep_top(shuffled, 1) == (1,)
    assert depth.keep_top(shuffled, 3) == (1, 2, 3)
    assert depth.keep_top(shuffled, 4) == (0, 1, 2, 3)


def test_train_job_rejects_bad_block_lists():
    spec, task, cfg = ModelSpec("scratch", tiny=True), train.TaskSpec(), train.TrainConfig()
    assert TrainJob(spec, task, cfg, 0, keep=[0, 2]).keep == (0, 2)
    for bad in ([], [2, 1], [1, 1], [-1, 0]):
        with pytest.raises(DepthError, match="increasing"):
            TrainJob(spec, task, cfg, 0, keep=bad)
    with pytest.raises(DepthError, match="workers"):
        depth.prepare_all([], workers=0)
    with pytest.raises(DepthError, match="TrainJob"):
        depth.prepare_all(["not a job"])


# ------------------------------------------------------------------------------------ depth statistics


def planted_runs() -> pd.DataFrame:
    """Six seeds; depth 2 is 10 points worse, depths 4 and 8 are within a fraction of a point of each other.

    Depth 8 has the best validation accuracy, so it is "best"; depth 4 must come out equivalent to it within
    ±2 points and depth 2 significantly different.
    """
    noise = np.array([0.004, -0.003, 0.002, -0.001, 0.003, -0.005])
    jitter = np.array([-0.002, 0.001, 0.002, -0.001, 0.0, 0.001])
    acc = {2: 0.70 + noise + 2 * jitter[::-1], 4: 0.80 + noise + jitter, 8: 0.801 + noise}
    val = {2: 0.70, 4: 0.79, 8: 0.80}
    return pd.DataFrame([{"depth": d, "seed": s, "accuracy": acc[d][s], "val_accuracy": val[d] + 0.001 * s}
                         for d in acc for s in range(6)])


def test_depth_statistics_find_the_planted_answer():
    runs = planted_runs()
    best = depth.best_group(runs, by="val_accuracy")
    assert best == 8
    tests, notes = depth.omnibus(runs, "accuracy")
    assert not notes and len(tests) == 2 and all(t.p_holm is not None for t in tests)
    anova = next(t for t in tests if "ANOVA" in t.name)
    assert anova.p_value < 1e-6 and anova.effect_size > 0.9  # depth 2 is far off: eta² near 1
    out = depth.compare_to_best(runs, best, "accuracy", margin=0.02)
    table = out["table"].set_index("depth")
    assert table.loc[2, "mean_diff"] == pytest.approx(-0.101 + 2 * np.mean([-0.002, 0.001, 0.002, -0.001, 0.0, 0.001]))
    assert table.loc[4, "mean_diff"] == pytest.approx(-0.001 + np.mean([-0.002, 0.001, 0.002, -0.001, 0.0, 0.001]))
    assert bool(table.loc[2, "different"]) and not bool(table.loc[2, "equivalent"])
    assert bool(table.loc[4, "equivalent"]) and not bool(table.loc[4, "different"])
    assert out["smallest_equivalent"] == 4
    assert len(out["difference"]) == len(out["equivalence"]) == 2
    assert all(t.p_holm >= t.p_value for t in out["difference"] + out["equivalence"])
    # a margin smaller than the 0.1-point gap can never be shown: depth 8 is then its own smallest equivalent
    tight = depth.compare_to_best(runs, best, "accuracy", margin=0.0005)
    assert tight["smallest_equivalent"] == 8


def test_best_group_prefers_the_smaller_depth_on_ties():
    runs = pd.DataFrame({"depth": [2, 2, 4, 4], "seed": [0, 1, 0, 1], "val_accuracy": [0.8, 0.9, 0.9, 0.8]})
    assert depth.best_group(runs) == 2
    assert depth.best_group(runs.assign(val_loss=[2.0, 3.0, 1.0, 0.5]), by="val_loss", higher=False) == 4


def test_degenerate_data_gives_notes_and_conservative_tests_instead_of_errors():
    runs = pd.DataFrame({"depth": [1, 1, 2, 2, 4, 4], "seed": [0, 1] * 3, "accuracy": [0.58] * 6})
    tests, notes = depth.omnibus(runs, "accuracy")
    assert tests == [] and len(notes) == 2 and "zero spread" in notes[0]
    out = depth.compare_to_best(runs, 1, "accuracy", margin=0.02)
    assert all(t.p_value == 1.0 for t in out["difference"] + out["equivalence"])
    assert out["smallest_equivalent"] == 1  # identical results are not *shown* equivalent: only best counts
    shifted = depth.safe_tost(np.array([0.5, 0.6]), np.array([0.49, 0.59]), 0.02, "shift")
    assert shifted.p_value == 1.0 and "undefined" in shifted.extras["note"]
    assert depth.safe_paired_ttest(np.array([0.5, 0.6]), np.array([0.49, 0.59]), "shift").p_value == 1.0


def test_missing_seed_is_an_error_that_names_it():
    runs = planted_runs()
    with pytest.raises(DepthError, match=r"\(5, 8\)"):
        depth.wide(runs.drop(index=runs[(runs["depth"] == 8) & (runs["seed"] == 5)].index), "accuracy")
    with pytest.raises(DepthError, match="margin"):
        depth.compare_to_best(runs, 8, margin=0)
    with pytest.raises(DepthError, match="not among"):
        depth.compare_to_best(runs, 16)


# ------------------------------------------------------------------------- kept-block fine-tuning (cached)


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    """An isolated cache reusing the fetched assets, and a tiny 3-block BERT saved as an 'hf' model folder."""
    from analysis_kit import assets, models

    try:
        found = {name: assets.fetch(name, offline=True)[name] for name in ("snippets", "minilm")}
    except assets.AssetError as exc:
        pytest.skip(f"assets not fetched: {exc}")
    mp = pytest.MonkeyPatch()
    root = tmp_path_factory.mktemp("cache")
    mp.setenv("LAYERWISE_CACHE", str(root))
    (root / "assets").mkdir()
    for name, folder in found.items():
        (root / "assets" / name).symlink_to(folder)
    tok = models.load_tokenizer(ModelSpec("minilm"))
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=len(tok), hidden_size=16, num_hidden_layers=3, num_attention_heads=2,
                     intermediate_size=32, max_position_embeddings=64, num_labels=2, pad_token_id=tok.pad_token_id)
    folder = tmp_path_factory.mktemp("tiny_bert")
    BertForSequenceClassification(cfg).save_pretrained(folder)
    tok.save_pretrained(folder)
    yield folder
    mp.undo()


TASK = train.TaskSpec(max_train=48, max_eval=32)
CFG = train.TrainConfig(epochs=1, lr=1e-3, batch_size=16, max_length=32)


def test_first_k_by_keep_blocks_equals_get_trained_with_num_layers(tiny_folder, monkeypatch):
    """The chapter reuses the first-k model when ablation picks the first blocks: both paths must agree."""
    spec = ModelSpec("hf", path=str(tiny_folder))
    kept, _, rec = depth.fine_tune_kept(spec, (0, 1), TASK, CFG, seed=3, device="cpu")
    first, _, _ = train.get_trained(ModelSpec("hf", path=str(tiny_folder), num_layers=2), TASK, CFG, 3, device="cpu")
    assert layers.num_blocks(kept) == 2 and rec["keep"] == [0, 1] and rec["steps"] == 3
    for (k, a), (_, b) in zip(kept.state_dict().items(), first.state_dict().items(), strict=True):
        assert torch.equal(a, b), k
    # a second call is a cache hit; another block set trains a different model
    monkeypatch.setattr(train, "fine_tune", lambda *a, **k: (_ for _ in ()).throw(AssertionError("retrained")))
    again, _, rec2 = depth.fine_tune_kept(spec, [0, 1], TASK, CFG, seed=3, device="cpu")
    assert rec2["folder"] == rec["folder"]
    with pytest.raises(AssertionError, match="retrained"):
        depth.fine_tune_kept(spec, (0, 2), TASK, CFG, seed=3, device="cpu")


def test_jobs_measure_into_a_tidy_frame(tiny_folder):
    spec = ModelSpec("hf", path=str(tiny_folder))
    jobs = [TrainJob(spec, TASK, CFG, 0, keep=(1, 2)), TrainJob(ModelSpec("hf", path=str(tiny_folder), num_layers=1),
                                                                 TASK, CFG, 0)]
    secs = depth.prepare_all(jobs, workers=1)
    assert len(secs) == 2 and all(s > 0 for s in secs)
    runs = depth.measure_runs([dict(job=j, family="tiny", depth=d, seed=0) for j, d in zip(jobs, (2, 1), strict=True)],
                              seq_len=8, repeats=2)
    assert runs["depth"].tolist() == [2, 1] and runs["keep"].tolist() == ["1 2", "all"]
    model, tok, _ = jobs[0].run("cpu")
    direct = train.evaluate(model, tok, train.load_task(TASK, 0)["test"], max_length=CFG.max_length, device="cpu")
    assert runs.loc[0, "accuracy"] == pytest.approx(direct["accuracy"])
    assert runs.loc[0, "parameters"] == measure.count_parameters(model)
    assert 0 < runs.loc[1, "block_parameters"] < runs.loc[0, "block_parameters"] < runs.loc[0, "parameters"]
    assert (runs[["latency_b1_ms", "latency_b64_ms", "train_seconds"]] > 0).all().all()
    assert runs.loc[0, "val_loss"] == pytest.approx(pd.DataFrame(jobs[0].run("cpu")[2]["history"])["val_loss"].min())
    curves = depth.learning_curves([dict(job=j, depth=d) for j, d in zip(jobs, (2, 1), strict=True)])
    assert set(curves["depth"]) == {1, 2} and {"epoch", "val_loss", "train_loss"} <= set(curves.columns)
    scores = depth.AblationJob(jobs[0], split="val", batch_size=16).scores("cpu")
    assert scores["layer"].tolist() == [0, 1] and scores["score"].notna().all()


# --------------------------------------------------------------------------------- truncated decoders


class CharTokenizer:
    """A tiny callable tokenizer (one id per character), enough for lm_batches."""

    padding_side = "right"
    pad_token_id = 0

    def __call__(self, texts, padding=True, truncation=True, max_length=64, return_tensors="pt"):
        ids = [[3 + (ord(c) % 60) for c in t][:max_length] for t in texts]
        width = max(map(len, ids))
        return {"input_ids": torch.tensor([x + [0] * (width - len(x)) for x in ids]),
                "attention_mask": torch.tensor([[1] * len(x) + [0] * (width - len(x)) for x in ids])}


def tiny_llama(identity_block: int | None = None) -> LlamaForCausalLM:
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                      intermediate_size=64, max_position_embeddings=64, initializer_range=0.2)
    model = LlamaForCausalLM(cfg).eval()
    if identity_block is not None:  # zero the residual writes: the block then returns its input unchanged
        block = layers.get_blocks(model)[identity_block]
        torch.nn.init.zeros_(block.self_attn.o_proj.weight)
        torch.nn.init.zeros_(block.mlp.down_proj.weight)
    return model


TEXTS = ["great phone", "awful battery life, returned it", "ok", "the screen is sharp and bright"]


def test_lm_nll_matches_the_model_loss_text_by_text():
    model, tok = tiny_llama(), CharTokenizer()
    nll, tokens = depth.lm_nll(model, tok, TEXTS, batch_size=3, device="cpu")  # batches mix lengths (padding)
    for text, value, n in zip(TEXTS, nll, tokens, strict=True):
        ids = tok([text])["input_ids"]
        assert n == ids.shape[1] - 1
        assert value == pytest.approx(model(input_ids=ids, labels=ids).loss.item(), rel=1e-5)


def test_cutting_an_identity_block_keeps_the_loss_and_block_influence_finds_it():
    model, tok = tiny_llama(identity_block=2), CharTokenizer()
    keeps = {("first", 4): (0, 1, 2, 3), ("best", 4): (0, 1, 2, 3), ("without 2", 3): (0, 1, 3), ("first", 3): (0, 1, 2)}
    out = depth.truncated_lm_nll(model, tok, TEXTS, keeps, device="cpu")
    per = {key: g.sort_values("text")["nll"].to_numpy() for key, g in out.groupby(["selection", "k"])}
    np.testing.assert_allclose(per[("without 2", 3)], per[("first", 4)], rtol=1e-5)
    np.testing.assert_array_equal(per[("best", 4)], per[("first", 4)])
    assert not np.allclose(per[("first", 3)], per[("first", 4)], rtol=1e-3)
    assert out.groupby(["selection", "k"])["parameters"].first()[("first", 3)] < \
        out.groupby(["selection", "k"])["parameters"].first()[("first", 4)]
    scores = depth.lm_scores(model, tok, TEXTS, method="block_influence")
    assert scores.loc[scores["layer"] == 2, "score"].item() == pytest.approx(0.0, abs=1e-6)
    assert 2 not in depth.keep_top(scores, 3)
    with pytest.raises(DepthError, match="not k"):
        depth.truncated_lm_nll(model, tok, TEXTS, {("first", 2): (0,)}, device="cpu")
