"""Chapters take your model and data: ``tasks``/``models`` entries that are a data file or a Hugging Face folder.

Parsing and checks run without a model; the end-to-end test fine-tunes a tiny BERT folder on a CSV through the
real ``train`` path (no monkeypatching) inside the baselines and theoretical-validation studies.
"""

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import word_tokenizer
from transformers import BertConfig, BertForSequenceClassification, LlamaConfig, LlamaForCausalLM

from analysis_kit import runner, train
from analysis_kit.errors import LayerwiseError
from analysis_kit.studies import baselines, parse_source, sensitivity
from analysis_kit.studies import theoretical_validation as tv

POS, NEG, FILL = ["good", "great", "fine"], ["bad", "awful", "poor"], ["the", "a", "phone", "was", "it"]
NAMED = ("amazon", "mr")


def _csv(path, n=160, labels=("neg", "pos"), seed=0):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, len(labels), n)
    words = [NEG, POS, FILL]
    texts = [" ".join([*rng.choice(words[min(v, 2)], 2), *rng.choice(FILL, 3)]) for v in y]
    pd.DataFrame({"text": texts, "label": [labels[v] for v in y]}).to_csv(path, index=False)
    return path


@pytest.fixture()
def bert_folder(tmp_path):
    tok = word_tokenizer(tmp_path, POS + NEG + FILL)
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=3, num_attention_heads=2,
                     intermediate_size=32, max_position_embeddings=32, num_labels=2)
    folder = tmp_path / "my-bert"
    BertForSequenceClassification(cfg).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def test_parse_source_names_paths_and_refuses_clashes(tmp_path):
    assert parse_source("amazon", NAMED, "tasks") == ("amazon", None)
    assert parse_source("rev=/d/r.csv", NAMED, "tasks") == ("rev", "/d/r.csv")
    assert parse_source("/d/My Reviews.csv", NAMED, "tasks") == ("my_reviews", "/d/My Reviews.csv")
    assert parse_source("imdb", NAMED, "tasks") == ("imdb", None)  # unknown name: the chapter's check names the choices
    with pytest.raises(LayerwiseError, match="built-in"):
        parse_source("mr=/d/r.csv", NAMED, "tasks")


def test_params_keep_names_in_keys_and_paths_in_sources(tmp_path, bert_folder):
    csv = _csv(tmp_path / "rev.csv")
    p = baselines.Params(tasks=("amazon", f"{csv}"), models=("minilm", f"mine={bert_folder}"))
    assert p.tasks == ("amazon", "rev") and p.models == ("minilm", "mine")
    assert p.source("rev") == str(csv) and p.model_ref("mine") == str(bert_folder) and p.model_ref("minilm") == "minilm"
    again = baselines.Params(**{**p.__dict__})  # a rebuilt Params (replace, papermill) keeps the same sources
    assert again == p
    p.validate()  # reads and checks the file and the folder's config, loads no model
    spec = p.task_spec("rev")
    assert spec.name == "rev" and spec.labels == ("neg", "pos") and spec.num_labels == 2 and spec.digest
    splits = train.load_task(spec, seed=0)
    assert sum(len(s) for s in splits.values()) == 160 and set(splits["test"]["label"]) == {0, 1}
    with pytest.raises(LayerwiseError, match="two paths"):
        baselines.Params(tasks=(f"x={csv}", f"x={tmp_path / 'other.csv'}"))


@pytest.mark.parametrize(("content", "match"), [
    ("", "empty"),
    ("words,label\na,pos\n", r"no column\(s\) \['text'\]"),
    ("text,label\n" + "a b,pos\n" * 30, "same label"),
    ("text,label\n" + "a b,pos\n" * 30 + "c d,neg\n" * 3, "fewer than 10 rows"),
])
def test_bad_data_files_fail_before_any_model_loads(tmp_path, content, match, monkeypatch):
    path = tmp_path / "bad.csv"
    path.write_text(content)
    monkeypatch.setattr(train, "baseline", lambda *a, **k: pytest.fail("a model was loaded"))
    with pytest.raises(LayerwiseError, match=match):
        baselines.run(baselines.Params(tasks=(str(path),)))
    with pytest.raises(LayerwiseError, match="does not exist"):
        baselines.run(baselines.Params(tasks=(str(tmp_path / "missing.csv"),)))


def test_bad_model_folders_fail_up_front(tmp_path):
    with pytest.raises(LayerwiseError, match="no config.json"):
        tv.Params(models=(str(tmp_path),)).validate()
    (tmp_path / "config.json").write_text('{"model_type": "t5"}')
    with pytest.raises(LayerwiseError, match="not supported.*bert"):
        tv.Params(models=(f"t5={tmp_path}",)).validate()
    with pytest.raises(LayerwiseError, match="more than two labels"):
        baselines.Params(tasks=(str(_csv(tmp_path / "three.csv", labels=("a", "b", "c"))),)).validate()


def test_the_runner_accepts_paths_where_the_cell_says_so(tmp_path):
    p = runner.notebook_params("baselines")
    assert p["tasks"].paths and p["models"].paths and p["tasks"].choices == ("amazon", "mr")
    resolved = runner.resolve("baselines", "smoke", {"tasks": [f"rev={tmp_path}/r.csv"], "models": ["/m/bert"]})
    assert resolved["tasks"] == [f"rev={tmp_path}/r.csv"]
    with pytest.raises(runner.ParameterError, match="or a path"):
        runner.resolve("baselines", "smoke", {"tasks": ["imdb"]})


def test_a_chapter_fine_tunes_your_folder_on_your_file(tmp_path, bert_folder, monkeypatch):
    """The real train path: recipe search (the encoder grid), cached fine-tunes, metrics under your names."""
    monkeypatch.setenv("LAYERWISE_CACHE", str(tmp_path / "cache"))
    small = train.RecipeSearch(lrs=(3e-3, 1e-2), base=train.TrainConfig(epochs=6, batch_size=16, max_length=16, patience=6),
                               max_examples=None)
    monkeypatch.setitem(train.RECIPE_SEARCH, "minilm", small)
    csv = _csv(tmp_path / "rev.csv", n=300)
    params = baselines.Params(seeds=(0, 1), tasks=(str(csv),), models=(f"mine={bert_folder}",), n_bootstrap=1000)
    result = baselines.run(params)
    acc = result.metrics["accuracy/mine/rev"]
    assert 0 <= acc["ci_low"] <= acc["mean"] <= acc["ci_high"] <= 1 and acc["ci_low"] < acc["ci_high"]
    assert "accuracy/bow/rev" in result.metrics and "failed_trainings/mine/rev" in result.metrics
    spec = train.standard_spec(str(bert_folder))
    assert spec.kind == "hf" and spec.digest and not train.is_decoder(str(bert_folder))
    assert train.recipe_search(str(bert_folder)) is small  # an encoder folder gets the encoder grid


def test_a_decoder_folder_is_studied_as_a_language_model(tmp_path, monkeypatch):
    from transformers import AutoTokenizer

    from analysis_kit import models

    tok = AutoTokenizer.from_pretrained(models._smollm2_tokenizer_folder())
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
                      num_key_value_heads=2, intermediate_size=64, max_position_embeddings=128)
    folder = tmp_path / "my-llama"
    LlamaForCausalLM(cfg).save_pretrained(folder)
    tok.save_pretrained(folder)
    p = tv.Params(models=(f"lm={folder}",))
    assert p.is_lm("lm") and not p.is_lm("minilm") and train.is_decoder(str(folder))
    with pytest.raises(LayerwiseError, match="one fine-tuned classifier"):
        sensitivity.Params(models=(f"lm={folder}",)).validate()
