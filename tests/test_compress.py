"""Selection strategies, subset evaluation, cost and statistics of layer removal, on tiny random models."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import word_tokenizer
from scipy import stats as sps
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    LlamaConfig,
    LlamaForCausalLM,
    LlamaForSequenceClassification,
)

from analysis_kit import compress, layers
from analysis_kit.compress import CompressError

WORDS = ["good", "bad", "great", "awful", "the", "movie", "was", "not", "very", "fine", "phone", "battery"]


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tok")
    return word_tokenizer(folder, WORDS)


def texts(n: int, seed: int = 0) -> list[str]:
    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(WORDS, size=int(rng.integers(2, 9)))) for _ in range(n)]


def bert(n_blocks: int = 4, seed: int = 0, labels: int = 2) -> BertForSequenceClassification:
    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=len(WORDS) + 5, hidden_size=32, num_hidden_layers=n_blocks, num_attention_heads=4,
                     intermediate_size=64, max_position_embeddings=32, num_labels=labels, pad_token_id=0)
    return BertForSequenceClassification(cfg).eval()


def llama_config(n_blocks: int = 5) -> LlamaConfig:
    return LlamaConfig(vocab_size=len(WORDS) + 5, hidden_size=32, num_hidden_layers=n_blocks, num_attention_heads=4,
                       num_key_value_heads=2, intermediate_size=64, max_position_embeddings=64, pad_token_id=0,
                       num_labels=2)


def make_identity(model, block: int) -> None:
    """Zero the residual writes of a pre-norm LLaMA block: the block becomes exactly the identity."""
    b = layers.get_blocks(model)[block]
    with torch.no_grad():
        b.self_attn.o_proj.weight.zero_()
        b.mlp.down_proj.weight.zero_()


# ------------------------------------------------------------------------------------------ how many


def test_n_keep_from_count_ratio_and_fraction():
    assert compress.n_keep(6, keep=3) == 3
    assert compress.n_keep(6, ratio=2.0) == 3
    assert compress.n_keep(12, ratio=1.5) == 8
    assert compress.n_keep(30, drop_fraction=0.2) == 24
    with pytest.raises(CompressError, match="exactly one"):
        compress.n_keep(6, keep=3, ratio=2.0)
    with pytest.raises(CompressError, match=">= 1"):
        compress.n_keep(6, ratio=0.5)
    with pytest.raises(CompressError, match="cannot keep"):
        compress.n_keep(6, keep=7)


# ----------------------------------------------------------------------------------- data-free picks


def test_top_k_keeps_highest_scores_ties_to_earlier():
    assert compress.keep_top_k([0.1, 0.9, 0.5, 0.7], 2) == (1, 3)
    assert compress.keep_top_k({0: 1.0, 1: 1.0, 2: 0.0}, 1) == (0,)
    table = pd.DataFrame({"method": ["a"] * 6 + ["b"] * 3, "layer": [0, 1, 2] * 3, "seed": [0] * 3 + [1] * 3 + [0] * 3,
                          "score": [3, 1, 2, 1, 3, 0, 0, 0, 9]})
    # method a averaged over seeds: layer 0 → 2, layer 1 → 2, layer 2 → 1
    assert compress.keep_top_k(table, 2, method="a") == (0, 1)
    assert compress.keep_top_k(table, 1, method="b") == (2,)
    with pytest.raises(CompressError, match="several methods"):
        compress.keep_top_k(table, 1)
    with pytest.raises(CompressError, match="score every block"):
        compress.keep_top_k({0: 1.0, 2: 0.5}, 1, n_blocks=3)


def test_distributed_and_drop_last():
    assert compress.keep_distributed(6, 3) == (0, 3, 5)
    assert compress.keep_distributed(12, 4) == (0, 4, 7, 11)
    assert compress.keep_distributed(6, 6) == tuple(range(6))
    assert compress.keep_distributed(6, 1) == (5,)
    assert compress.keep_drop_last(6, 4) == (0, 1, 2, 3)
    with pytest.raises(CompressError, match="impossible"):
        compress.keep_drop_last(6, 0)


def test_random_keeps_exhaustive_when_few_and_distinct_otherwise():
    all5 = compress.random_keeps(6, 5, n_draws=20)  # C(6, 5) = 6 <= 20: the exact null, every subset once
    assert sorted(all5) == sorted(tuple(i for i in range(6) if i != d) for d in range(6))
    assert len(all5) == math.comb(6, 5)
    draws = compress.random_keeps(12, 6, n_draws=25, seed=3)
    assert len(draws) == 25 and len(set(draws)) == 25
    assert all(len(d) == 6 and list(d) == sorted(d) and 0 <= d[0] and d[-1] < 12 for d in draws)
    assert draws == compress.random_keeps(12, 6, n_draws=25, seed=3)
    assert draws != compress.random_keeps(12, 6, n_draws=25, seed=4)


# ------------------------------------------------------------------------------ subsets without models


def test_encode_restores_input_order(tokenizer):
    t = texts(11)
    enc = compress.encode(tokenizer, t, labels=np.arange(11), batch_size=4)
    lengths = np.concatenate([b["attention_mask"].sum(1).numpy() for b in enc.batches])
    assert list(lengths) == sorted(lengths, reverse=True)  # length-sorted batches
    assert enc.restore(np.concatenate([b["labels"].numpy() for b in enc.batches])).tolist() == list(range(11))


def test_subset_outputs_equal_compacted_bert(tokenizer):
    model = bert(4)
    t = texts(9)
    enc = compress.encode(tokenizer, t, batch_size=4)
    keeps = [(0, 1, 2, 3), (0, 1, 3), (0, 2), (1, 2, 3), (3,), (0, 1)]
    outs = compress.subset_outputs(model, enc, keeps, device="cpu")
    batch = tokenizer(t, padding=True, return_tensors="pt")
    for keep in keeps:
        with torch.no_grad():
            ref = compress.compact(model, keep)(**batch).logits.numpy()
        np.testing.assert_allclose(outs[keep], ref, atol=1e-5)


def test_subset_outputs_equal_compacted_llama_lm(tokenizer):
    torch.manual_seed(0)
    model = LlamaForCausalLM(llama_config(5)).eval()
    t = texts(7, seed=1)
    enc = compress.encode(tokenizer, t, batch_size=3)
    keeps = [(0, 2, 4), (1, 3), (0, 1, 2, 3, 4)]
    outs = compress.subset_outputs(model, enc, keeps, compress.lm_nll_readout, device="cpu")
    for keep in keeps:
        small = compress.compact(model, keep)
        for i, text in enumerate(t):
            ids = tokenizer(text, return_tensors="pt")
            with torch.no_grad():
                loss = small(**ids, labels=ids["input_ids"]).loss.item()
            assert outs[keep][i] == pytest.approx(loss, abs=1e-4)


# ------------------------------------------------------------------------------------ data-driven picks


def test_greedy_removes_identity_blocks_first(tokenizer):
    torch.manual_seed(2)
    model = LlamaForSequenceClassification(llama_config(5)).eval()
    make_identity(model, 1)
    make_identity(model, 3)
    enc = compress.encode(tokenizer, texts(12, seed=3), batch_size=6)
    keep, trace = compress.greedy_removal(model, enc, 3, criterion="kl", device="cpu")
    assert keep == (0, 2, 4)
    assert sorted(trace["removed"]) == [1, 3]
    assert trace["value"].tolist() == pytest.approx([0.0, 0.0], abs=1e-6)
    assert trace["candidates"].tolist() == [5, 4]  # re-scored after each removal


def test_greedy_loss_criterion_matches_subset_loss(tokenizer):
    model = bert(4, seed=5)
    t = texts(16, seed=4)
    labels = np.arange(16) % 2
    enc = compress.encode(tokenizer, t, labels=labels, batch_size=8)
    keep, trace = compress.greedy_removal(model, enc, 2, criterion="loss", device="cpu")
    logits = compress.subset_outputs(model, enc, [keep])[keep]
    ce = torch.nn.functional.cross_entropy(torch.as_tensor(logits), torch.as_tensor(labels)).item()
    assert trace["value"].iloc[-1] == pytest.approx(ce, rel=1e-5)
    unlabelled = compress.encode(tokenizer, t, batch_size=8)
    with pytest.raises(CompressError, match="needs labels"):
        compress.greedy_removal(model, unlabelled, 2, criterion="loss")


def test_bare_models_use_pooled_embeddings_and_cosine_greedy(tokenizer):
    from transformers import BertModel, LlamaModel

    t = texts(10, seed=6)
    enc = compress.encode(tokenizer, t, batch_size=4)
    batch = tokenizer(t, padding=True, return_tensors="pt")
    mask = batch["attention_mask"].unsqueeze(-1).float()
    torch.manual_seed(0)
    bare_bert = BertModel(bert(4).config).eval()
    torch.manual_seed(0)
    bare_llama = LlamaModel(llama_config(5)).eval()
    for model, keep in ((bare_bert, (0, 2)), (bare_llama, (1, 3, 4))):  # = the compacted model's mean pooling
        with torch.no_grad():
            hidden = compress.compact(model, keep)(**batch).last_hidden_state
        ref = ((hidden * mask).sum(1) / mask.sum(1)).numpy()
        out = compress.subset_outputs(model, enc, [keep], compress.pooled_readout, device="cpu")[keep]
        np.testing.assert_allclose(out, ref, atol=1e-5)
    make_identity(bare_llama, 1)
    make_identity(bare_llama, 3)
    keep, trace = compress.greedy_removal(bare_llama, enc, 3, device="cpu")  # auto = cosine for a bare model
    assert keep == (0, 2, 4) and set(trace["criterion"]) == {"cosine_from_full"}
    assert trace["value"].tolist() == pytest.approx([0.0, 0.0], abs=1e-6)
    with pytest.raises(CompressError, match="bare model; use criterion='cosine'"):
        compress.greedy_removal(bare_bert, enc, 2, criterion="kl")
    with pytest.raises(CompressError, match="for bare models"):
        compress.greedy_removal(bert(4), enc, 2, criterion="cosine")


def test_angular_distance_zero_for_identity_run(tokenizer):
    torch.manual_seed(3)
    model = LlamaForCausalLM(llama_config(6)).eval()
    make_identity(model, 2)
    make_identity(model, 3)
    enc = compress.encode(tokenizer, texts(8, seed=5), batch_size=4)
    table = compress.angular_distances(model, enc, device="cpu")
    assert set(table.columns) >= {"start", "n", "distance"}
    run = table[(table["start"] == 2) & (table["n"] == 2)]["distance"].item()
    assert run == pytest.approx(0.0, abs=1e-3)
    assert table[table["n"] == 1]["distance"].min() == pytest.approx(0.0, abs=1e-3)
    assert compress.keep_angular(model, enc, 4, table=table) == (0, 1, 4, 5)
    assert (table["distance"] >= -1e-6).all() and (table["distance"] <= 1 + 1e-6).all()


def test_select_dispatch_and_errors(tokenizer):
    model = bert(4)
    assert compress.select("drop_last", model, 2) == (0, 1)
    assert compress.select("importance", model, 2, scores=pd.DataFrame({"layer": range(4), "score": [4, 3, 2, 1]})) \
        == (0, 1)
    with pytest.raises(CompressError, match="calibration"):
        compress.select("greedy", model, 2)
    with pytest.raises(CompressError, match="unknown strategy"):
        compress.select("best", model, 2)


# ------------------------------------------------------------------------------------------ cost


def test_cost_table_shapes_and_ideal(tokenizer):
    model = bert(4)
    df = compress.cost_table(model, tokenizer, [2], batch_sizes=(1, 4), seq_len=8, repeats=3, warmup=1, device="cpu")
    assert sorted(df["n_kept"].unique()) == [2, 4]
    full = df[df["n_kept"] == 4]
    assert full["speedup"].tolist() == pytest.approx([1.0, 1.0])
    assert df[df["n_kept"] == 2]["ideal"].tolist() == [2.0, 2.0]
    assert (df[df["n_kept"] == 2]["params"] < full["params"].iloc[0]).all()
    assert (df["peak_mib"] >= 0).all() and (df["memory_kind"] == "cpu_rss_sampled").all()


def test_cost_table_times_sizes_interleaved(tokenizer, monkeypatch):
    """Timed runs visit every size in turn, so a burst of load cannot fall on one size's window alone."""
    from analysis_kit import layers, measure

    order, real = [], measure.latency

    def spy(model, batch, repeats=20, warmup=3, device="auto"):
        if warmup == 0:  # a timed run, not the warm-up
            order.append(layers.num_blocks(model))
        return real(model, batch, repeats=repeats, warmup=warmup, device=device)

    monkeypatch.setattr(measure, "latency", spy)
    compress.cost_table(bert(4), tokenizer, [3, 2], batch_sizes=(2,), seq_len=8, repeats=3, warmup=1, device="cpu")
    assert order == [4, 3, 2] * 3


# ------------------------------------------------------------------------------------------ statistics


def test_retention_and_errors():
    np.testing.assert_allclose(compress.retention([0.8, 0.9], [0.9, 0.9]), [0.8 / 0.9, 1.0])
    with pytest.raises(CompressError, match="not aligned"):
        compress.retention([0.8], [0.9, 0.9])


def test_paired_tests_match_scipy():
    df = pd.DataFrame({"n_kept": 3, "seed": [0, 1, 2] * 3, "strategy": ["a"] * 3 + ["random"] * 3 + ["b"] * 3,
                       "retention": [0.95, 0.97, 0.96, 0.90, 0.91, 0.93, 0.90, 0.91, 0.93]})
    tests = compress.paired_tests(df, "retention", "random")
    by = {t.extras["strategy"]: t for t in tests}
    ref = sps.ttest_rel([0.95, 0.97, 0.96], [0.90, 0.91, 0.93], alternative="greater")
    assert by["a"].p_value == pytest.approx(ref.pvalue) and by["a"].statistic == pytest.approx(ref.statistic)
    assert by["a"].extras["prob_improvement"] == 1.0
    assert by["b"].p_value == 1.0  # identical to the reference on every seed


# ------------------------------------------------------------------------------------ folders


def test_compress_folder_round_trip(tmp_path, tokenizer):
    from transformers import AutoModelForSequenceClassification

    src = tmp_path / "src"
    model = bert(4)
    model.save_pretrained(src)
    tokenizer.save_pretrained(src)
    record = compress.compress_folder(src, tmp_path / "out", "distributed", keep=2)
    assert record["kept"] == [0, 3] and record["params_after"] < record["params_before"]
    loaded = AutoModelForSequenceClassification.from_pretrained(tmp_path / "out").eval()
    assert loaded.config.num_hidden_layers == 2
    batch = tokenizer(texts(3), padding=True, return_tensors="pt")
    with torch.no_grad():
        np.testing.assert_allclose(loaded(**batch).logits, compress.compact(model, (0, 3))(**batch).logits, atol=1e-5)
    with pytest.raises(CompressError, match="not empty"):
        compress.compress_folder(src, tmp_path / "out", "drop_last", keep=2)
    with pytest.raises(CompressError, match="calibration texts"):
        compress.compress_folder(src, tmp_path / "out2", "greedy", keep=2)
    assert not (tmp_path / "out2").exists()
    record = compress.compress_folder(src, tmp_path / "out3", "greedy", ratio=2.0, texts=texts(10))
    assert record["n_kept"] == 2


def test_compress_folder_saves_a_bare_encoder_that_automodel_loads(tmp_path, tokenizer):
    from transformers import AutoModel, BertModel

    torch.manual_seed(0)
    model = BertModel(bert(4).config).eval()  # e.g. all-MiniLM-L6-v2: architectures ["BertModel"]
    src = tmp_path / "src"
    model.save_pretrained(src)
    tokenizer.save_pretrained(src)
    batch = tokenizer(texts(3), padding=True, return_tensors="pt")
    for strategy in ("greedy", "angular", "drop_last"):
        calib = texts(8) if strategy != "drop_last" else None
        record = compress.compress_folder(src, tmp_path / strategy, strategy, keep=2, texts=calib, device="cpu")
        loaded = AutoModel.from_pretrained(tmp_path / strategy).eval()
        assert type(loaded).__name__ == "BertModel" and loaded.config.num_hidden_layers == 2
        with torch.no_grad():
            np.testing.assert_allclose(loaded(**batch).last_hidden_state,
                                       compress.compact(model, record["kept"])(**batch).last_hidden_state, atol=1e-5)
    with pytest.raises(CompressError, match=r"bare model \(BertModel\).*--strategy greedy"):
        compress.compress_folder(src, tmp_path / "imp", "importance", keep=2, method="ablation", texts=texts(8))
    assert not (tmp_path / "imp").exists()


def test_compress_folder_checks_every_input_before_loading(tmp_path, tokenizer, monkeypatch):
    from analysis_kit.errors import LayerwiseError

    src = tmp_path / "src"
    bert(4).save_pretrained(src)
    tokenizer.save_pretrained(src)

    def never(*args, **kwargs):
        raise AssertionError("the model was loaded before the inputs were checked")

    monkeypatch.setattr(compress, "_load_any", never)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    bad = [({"strategy": "greedy", "keep": 2, "method": "fisher", "texts": ["a"]}, CompressError,
            r"used only by strategy 'importance'; strategy 'greedy' ignores it"),
           ({"strategy": "drop_last", "keep": 2, "method": "fisher"}, CompressError, "'drop_last' ignores it"),
           ({"strategy": "importance", "keep": 2, "method": "nope", "texts": ["a"]}, CompressError,
            "unknown importance method 'nope'"),
           ({"strategy": "drop_last", "keep": 2, "device": "cuda"}, LayerwiseError, "CUDA is not available"),
           ({"strategy": "drop_last", "keep": 2, "device": "gpu"}, CompressError, "not a device torch knows"),
           ({"strategy": "drop_last", "keep": 9}, CompressError, "cannot keep 9 of 4 blocks"),
           ({"strategy": "drop_last", "ratio": 0.5}, CompressError, "must be >= 1"),
           ({"strategy": "random", "keep": 2, "texts": ["a"]}, CompressError, "ignores --texts")]
    for kwargs, error, match in bad:
        with pytest.raises(error, match=match):
            compress.compress_folder(src, tmp_path / "out", **kwargs)
    assert not (tmp_path / "out").exists()


def test_save_folder_honours_a_group_writable_umask(tmp_path, tokenizer):
    import os
    import stat

    old = os.umask(0o002)
    try:
        out = compress.save_folder(compress.compact(bert(4), (0, 3)), tokenizer, tmp_path / "shared" / "m",
                                   {"kept": [0, 3]})
    finally:
        os.umask(old)
    assert stat.S_IMODE(out.stat().st_mode) == 0o775
    files = [p for p in out.rglob("*") if p.is_file()]
    assert {p.name for p in files} >= {"config.json", "model.safetensors", "compression.json", "vocab.txt"}
    assert {oct(stat.S_IMODE(p.stat().st_mode)) for p in files} == {oct(0o664)}


# ------------------------------------------------------------------------------------ study helpers
