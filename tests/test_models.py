"""Model specs and builders. Most tests use small stand-ins for the assets (a 3-block BERT folder with a
toy vocabulary, a toy decoder tokenizer); the tests on the real assets are skipped when the assets are
not already in the default cache (tests never download)."""

from __future__ import annotations

import pytest
import torch
from transformers import (
    BertConfig,
    BertModel,
    BertTokenizerFast,
    LlamaForCausalLM,
    LlamaForSequenceClassification,
    MPNetConfig,
    MPNetForSequenceClassification,
    MPNetModel,
    MPNetTokenizerFast,
    PreTrainedTokenizerFast,
)

from analysis_kit import layers, models
from analysis_kit.errors import LayerwiseError
from analysis_kit.models import ModelSpec, ModelSpecError

WORDS = ["good", "bad", "great", "awful", "the", "movie", "was", "not", "very", "fine"]


@pytest.fixture(scope="module")
def fake_minilm(tmp_path_factory):
    """A 3-block BERT encoder folder laid out like the MiniLM asset (BertModel weights + tokenizer)."""
    folder = tmp_path_factory.mktemp("minilm")
    vocab = folder / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]) + "\n")
    tokenizer = BertTokenizerFast(vocab_file=str(vocab))
    config = BertConfig(vocab_size=len(tokenizer), hidden_size=48, num_hidden_layers=3, num_attention_heads=6,
                        intermediate_size=96, max_position_embeddings=64, pad_token_id=0)
    torch.manual_seed(123)
    BertModel(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def fake_mpnet(tmp_path_factory):
    """A 4-block MPNet encoder folder laid out like the mpnet asset (MPNetModel weights + MPNet tokenizer)."""
    folder = tmp_path_factory.mktemp("mpnet")
    vocab = folder / "vocab.txt"
    vocab.write_text("\n".join(["<s>", "<pad>", "</s>", "[UNK]", "<mask>", *WORDS]) + "\n")
    tokenizer = MPNetTokenizerFast(vocab_file=str(vocab))
    config = MPNetConfig(vocab_size=len(tokenizer), hidden_size=48, num_hidden_layers=4, num_attention_heads=6,
                         intermediate_size=96, max_position_embeddings=66, pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(321)
    MPNetModel(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def fake_decoder_tokenizer(tmp_path_factory):
    """A word-level tokenizer folder with SmolLM2's special-token layout (unk 0, bos 1, eos = pad 2)."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Whitespace

    vocab = {tok: i for i, tok in enumerate(["<unk>", "<s>", "</s>", *WORDS])}
    core = Tokenizer(WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                                        pad_token="</s>", model_input_names=["input_ids", "attention_mask"])
    folder = tmp_path_factory.mktemp("decoder_tokenizer")
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture
def fake_assets(monkeypatch, fake_minilm, fake_mpnet, fake_decoder_tokenizer):
    """Point models at the stand-ins instead of the real assets."""
    folders = {"minilm": fake_minilm, "mpnet": fake_mpnet}

    def locate(name):
        if name not in folders:
            raise AssertionError(f"unexpected asset {name!r}")
        return folders[name]

    monkeypatch.setattr(models, "_locate", locate)
    monkeypatch.setattr(models, "_smollm2_tokenizer_folder", lambda: fake_decoder_tokenizer)
    return fake_minilm


def _state_equal(a, b) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


# ------------------------------------------------------------------------------------------------- specs


@pytest.mark.parametrize("kwargs, match", [
    ({"kind": "roberta"}, "Unknown model kind"),
    ({"kind": "scratch", "hidden": 250, "heads": 4}, "not divisible by heads"),
    ({"kind": "scratch", "hidden": 30}, "not divisible by heads"),  # the default 4 heads
    ({"kind": "hf"}, "needs path"),
    ({"kind": "minilm", "path": "/x"}, "only used with kind='hf'"),
    ({"kind": "scratch", "num_layers": 0}, "positive integer"),
    ({"kind": "scratch", "num_layers": True}, "positive integer"),
    ({"kind": "scratch", "hidden": 64.0}, "positive integer"),
    ({"kind": "minilm", "hidden": 128}, "width is fixed"),
    ({"kind": "mpnet", "heads": 4}, "width is fixed"),
    ({"kind": "mpnet", "path": "/x"}, "only used with kind='hf'"),
    ({"kind": "smollm2", "heads": 3}, "width is fixed"),
    ({"kind": "minilm", "tiny": "yes"}, "True or False"),
])
def test_bad_specs_fail_on_construction(kwargs, match):
    with pytest.raises(ModelSpecError, match=match) as err:
        ModelSpec(**kwargs)
    assert isinstance(err.value, LayerwiseError)


def test_hf_folder_that_does_not_exist_is_a_clear_error(tmp_path):
    spec = ModelSpec("hf", path=str(tmp_path / "nowhere"))
    with pytest.raises(ModelSpecError, match="config.json"):
        models.build_classifier(spec, 2)
    with pytest.raises(ModelSpecError, match="config.json"):
        models.load_tokenizer(spec)


def test_resolve_dims_defaults_and_tiny_caps():
    assert models.resolve_dims(ModelSpec("scratch")) == {"num_layers": 12, "hidden": 256, "heads": 4,
                                                         "intermediate": 1024}
    assert models.resolve_dims(ModelSpec("scratch", num_layers=3, hidden=96, heads=6)) == {
        "num_layers": 3, "hidden": 96, "heads": 6, "intermediate": 384}
    tiny = models.resolve_dims(ModelSpec("scratch", num_layers=12, hidden=256, heads=8, intermediate=1024, tiny=True))
    assert tiny == {"num_layers": 12, "hidden": 64, "heads": 8, "intermediate": 256}
    assert models.resolve_dims(ModelSpec("minilm", tiny=True)) == {"num_layers": 2, "hidden": 64, "heads": 4,
                                                                   "intermediate": 256}
    assert models.resolve_dims(ModelSpec("tiny_llama"))["hidden"] == 64


def test_unknown_num_labels_is_rejected(fake_assets):
    with pytest.raises(LayerwiseError, match="num_labels"):
        models.build_classifier(ModelSpec("scratch", num_layers=1, hidden=32), 0)


# ------------------------------------------------------------------------------------------------ encoders


def test_scratch_classifier_has_the_requested_shape_and_tokenizer_vocab(fake_assets):
    tokenizer = models.load_tokenizer(ModelSpec("scratch"))
    spec = ModelSpec("scratch", num_layers=5, hidden=32, heads=2, intermediate=40)
    model = models.build_classifier(spec, num_labels=3, seed=0)
    c = model.config
    assert (c.model_type, c.num_hidden_layers, c.hidden_size, c.num_attention_heads, c.intermediate_size) == (
        "bert", 5, 32, 2, 40)
    assert c.vocab_size == len(tokenizer) and c.pad_token_id == tokenizer.pad_token_id
    assert c.num_labels == 3 and c.problem_type == "single_label_classification"
    assert layers.num_blocks(model) == 5 and not model.training
    ids = tokenizer(["the movie was good", "bad"], padding=True, return_tensors="pt")
    assert model(**ids).logits.shape == (2, 3)


def test_regression_head_when_one_label(fake_assets):
    model = models.build_classifier(ModelSpec("scratch", num_layers=1, hidden=32), num_labels=1)
    assert model.config.problem_type == "regression"
    out = model(input_ids=torch.tensor([[2, 5, 3]]), labels=torch.tensor([0.7]))
    assert out.logits.shape == (1, 1) and out.loss.ndim == 0


def test_saved_classifiers_name_their_labels(fake_assets, tmp_path):
    from transformers import AutoConfig, AutoModelForSequenceClassification

    spec = ModelSpec("scratch", num_layers=1, hidden=32)
    expected = {1: {0: "rating"}, 2: {0: "negative", 1: "positive"},
                5: {0: "very negative", 1: "negative", 2: "neutral", 3: "positive", 4: "very positive"},
                3: {0: "LABEL_0", 1: "LABEL_1", 2: "LABEL_2"}}  # no project label mode has 3 classes
    for n, names in expected.items():
        folder = tmp_path / f"n{n}"
        models.build_classifier(spec, n, seed=0).save_pretrained(folder)
        config = AutoConfig.from_pretrained(folder)
        assert config.id2label == names and config.label2id == {v: k for k, v in names.items()}
        assert config.num_labels == n
    minilm = models.build_classifier(ModelSpec("minilm"), 2, seed=0)
    assert minilm.config.id2label == {0: "negative", 1: "positive"}
    torch.manual_seed(0)  # names are config only: the head is initialised exactly as without them
    plain = AutoModelForSequenceClassification.from_pretrained(fake_assets, num_labels=2)
    torch.testing.assert_close(minilm.classifier.weight, plain.classifier.weight, rtol=0, atol=0)


def test_same_seed_same_weights_and_global_rng_untouched(fake_assets):
    spec = ModelSpec("scratch", num_layers=2, hidden=32)
    torch.manual_seed(7)
    expected_next = torch.rand(3)
    torch.manual_seed(7)
    a = models.build_classifier(spec, 2, seed=1)
    assert torch.equal(torch.rand(3), expected_next)  # building did not consume the caller's RNG
    b = models.build_classifier(spec, 2, seed=1)
    c = models.build_classifier(spec, 2, seed=2)
    assert _state_equal(a, b)
    assert not _state_equal(a, c)


def test_minilm_keeps_first_blocks_with_pretrained_weights(fake_assets):
    full = models.build_classifier(ModelSpec("minilm"), 2, seed=0)
    assert layers.num_blocks(full) == 3 and full.config.hidden_size == 48
    cut = models.build_classifier(ModelSpec("minilm", num_layers=2), 2, seed=0)
    assert layers.num_blocks(cut) == 2 and cut.config.num_hidden_layers == 2
    pretrained = BertModel.from_pretrained(fake_assets)
    for i in range(2):
        torch.testing.assert_close(layers.get_blocks(cut)[i].state_dict(), pretrained.encoder.layer[i].state_dict(),
                                   rtol=0, atol=0)
    torch.testing.assert_close(cut.classifier.weight, full.classifier.weight, rtol=0, atol=0)  # same seed
    with pytest.raises(ModelSpecError, match="only 3 blocks"):
        models.build_classifier(ModelSpec("minilm", num_layers=4), 2)


def test_tiny_minilm_is_random_and_small(fake_assets):
    model = models.build_classifier(ModelSpec("minilm", num_layers=3, tiny=True), 2, seed=0)
    c = model.config
    assert (c.num_hidden_layers, c.hidden_size, c.num_attention_heads, c.intermediate_size) == (3, 64, 4, 256)
    assert c.max_position_embeddings == 64 and c.vocab_size == len(WORDS) + 5  # the rest comes from the asset
    pretrained = BertModel.from_pretrained(fake_assets)
    assert not torch.equal(model.bert.embeddings.word_embeddings.weight, pretrained.embeddings.word_embeddings.weight)
    wide = models.build_classifier(ModelSpec("scratch", hidden=512, heads=8, tiny=True), 2)
    assert wide.config.hidden_size == 64 and wide.config.num_hidden_layers == 2


def test_mpnet_keeps_first_blocks_with_pretrained_weights_and_its_own_tokenizer(fake_assets, fake_mpnet):
    tokenizer = models.load_tokenizer(ModelSpec("mpnet"))
    assert isinstance(tokenizer, MPNetTokenizerFast) and tokenizer.pad_token == "<pad>"
    assert len(tokenizer) == len(models.load_tokenizer(ModelSpec("minilm"))) == len(WORDS) + 5
    assert tokenizer("good movie")["input_ids"][0] == tokenizer.convert_tokens_to_ids("<s>")  # not MiniLM's [CLS]
    full = models.build_classifier(ModelSpec("mpnet"), 2, seed=0)
    assert isinstance(full, MPNetForSequenceClassification)
    assert layers.num_blocks(full) == 4 and full.config.hidden_size == 48
    assert full.config.id2label == {0: "negative", 1: "positive"}
    cut = models.build_classifier(ModelSpec("mpnet", num_layers=2), 2, seed=0)
    assert layers.num_blocks(cut) == 2 and cut.config.num_hidden_layers == 2
    pretrained = MPNetModel.from_pretrained(fake_mpnet)
    for i in range(2):
        torch.testing.assert_close(layers.get_blocks(cut)[i].state_dict(), pretrained.encoder.layer[i].state_dict(),
                                   rtol=0, atol=0)
    torch.testing.assert_close(cut.classifier.out_proj.weight, full.classifier.out_proj.weight, rtol=0, atol=0)
    with pytest.raises(ModelSpecError, match="only 4 blocks"):
        models.build_classifier(ModelSpec("mpnet", num_layers=5), 2)
    with pytest.raises(ModelSpecError, match="encoder"):
        models.load_causal_lm(ModelSpec("mpnet"))


def test_tiny_mpnet_builds_runs_and_cuts(fake_assets, fake_mpnet):
    spec = ModelSpec("mpnet", num_layers=4, hidden=512, tiny=True)
    model = models.build_classifier(spec, 2, seed=0)
    c = model.config
    assert isinstance(model, MPNetForSequenceClassification) and c.model_type == "mpnet"
    assert (c.num_hidden_layers, c.hidden_size, c.num_attention_heads, c.intermediate_size) == (4, 64, 4, 256)
    assert c.vocab_size == len(WORDS) + 5 and c.max_position_embeddings == 66  # the rest comes from the asset
    pretrained = MPNetModel.from_pretrained(fake_mpnet)
    assert not torch.equal(model.mpnet.embeddings.word_embeddings.weight,
                           pretrained.embeddings.word_embeddings.weight)
    assert _state_equal(model, models.build_classifier(spec, 2, seed=0))  # seeded random init
    tokenizer = models.load_tokenizer(spec)
    batch = tokenizer(["the movie was not very good", "bad"], padding=True, return_tensors="pt")
    with torch.no_grad():
        logits = model(**batch).logits
        assert logits.shape == (2, 2)
        hidden = layers.run_blocks(model, batch)  # the block-by-block engine sees the same model
        torch.testing.assert_close(layers.classify(model, hidden, batch["attention_mask"]), logits)
    assert layers.num_blocks(model) == 4
    kept = layers.keep_blocks(model, [0, 3])
    assert layers.num_blocks(kept) == 2 and kept.config.num_hidden_layers == 2 and layers.num_blocks(model) == 4
    torch.testing.assert_close(layers.get_blocks(kept)[1].state_dict(), layers.get_blocks(model)[3].state_dict(),
                               rtol=0, atol=0)
    with torch.no_grad():
        cut_logits = kept(**batch).logits
        torch.testing.assert_close(cut_logits, layers.classify(model, layers.run_blocks(model, batch, skip={1, 2}),
                                                               batch["attention_mask"]))
    assert models.build_classifier(ModelSpec("mpnet", tiny=True), 1).config.num_hidden_layers == 2  # the default


def test_hf_folder_round_trip(fake_assets, tmp_path):
    source = models.build_classifier(ModelSpec("scratch", num_layers=3, hidden=32), 2, seed=3)
    source.save_pretrained(tmp_path)
    models.load_tokenizer(ModelSpec("scratch")).save_pretrained(tmp_path)
    loaded = models.build_classifier(ModelSpec("hf", path=str(tmp_path)), 2, seed=0)
    assert _state_equal(loaded, source)
    cut = models.build_classifier(ModelSpec("hf", path=str(tmp_path), num_layers=1), 2, seed=0)
    assert layers.num_blocks(cut) == 1
    assert len(models.load_tokenizer(ModelSpec("hf", path=str(tmp_path)))) == len(WORDS) + 5
    with pytest.raises(ModelSpecError, match="encoder"):
        models.load_causal_lm(ModelSpec("scratch"))


# ------------------------------------------------------------------------------------------------ decoders


def test_tiny_llama_classifier_and_causal_lm(fake_assets, fake_decoder_tokenizer):
    spec = ModelSpec("tiny_llama", num_layers=3)
    tokenizer = models.load_tokenizer(spec)
    clf = models.build_classifier(spec, 2, seed=0)
    assert isinstance(clf, LlamaForSequenceClassification)
    assert clf.config.pad_token_id == tokenizer.pad_token_id == 2
    assert (clf.config.num_hidden_layers, clf.config.hidden_size) == (3, 64)
    batch = tokenizer(["the movie was very good", "bad"], padding=True, return_tensors="pt")
    assert clf(**batch).logits.shape == (2, 2)  # batch > 1 needs pad_token_id

    lm = models.load_causal_lm(spec)
    assert isinstance(lm, LlamaForCausalLM)
    assert _state_equal(lm, models.load_causal_lm(spec))  # deterministic random init
    assert lm.lm_head.weight is lm.model.embed_tokens.weight  # tied, like SmolLM2
    out = lm.generate(**tokenizer(["the movie"], return_tensors="pt"), max_new_tokens=3, do_sample=False)
    assert out.shape == (1, 5)
    assert models.build_classifier(ModelSpec("smollm2", num_layers=2, tiny=True), 2).config.hidden_size == 64


def test_tiny_hf_decoder_keeps_architecture_and_gqa_ratio(fake_decoder_tokenizer, tmp_path):
    from transformers import AutoTokenizer, LlamaConfig

    tokenizer = AutoTokenizer.from_pretrained(fake_decoder_tokenizer)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=128, num_hidden_layers=3, num_attention_heads=8,
                         num_key_value_heads=2, head_dim=16, intermediate_size=200, max_position_embeddings=64)
    LlamaForCausalLM(config).save_pretrained(tmp_path)  # no pad_token_id in this config
    tokenizer.save_pretrained(tmp_path)
    model = models.build_classifier(ModelSpec("hf", path=str(tmp_path), tiny=True), 2)
    c = model.config
    assert isinstance(model, LlamaForSequenceClassification)
    assert (c.num_hidden_layers, c.hidden_size, c.num_attention_heads, c.num_key_value_heads, c.head_dim) == (
        2, 64, 4, 1, 16)
    assert c.pad_token_id == tokenizer.pad_token_id
    batch = tokenizer(["the movie was good", "bad"], padding=True, return_tensors="pt")
    assert model(**batch).logits.shape == (2, 2)


def test_count_parameters_counts_tied_weights_once(fake_assets):
    lm = models.load_causal_lm(ModelSpec("tiny_llama", num_layers=2))
    by_name = sum(p.numel() for _, p in lm.named_parameters(remove_duplicate=False))
    embed = lm.model.embed_tokens.weight.numel()
    assert models.count_parameters(lm) == by_name - embed
    for p in lm.model.embed_tokens.parameters():
        p.requires_grad_(False)
    assert models.count_parameters(lm, trainable_only=True) == by_name - 2 * embed


# -------------------------------------------------------------------------------------------- real assets


def _cached_asset(name: str):
    """The asset's folder if it is already in the default cache; skip the test otherwise (never download)."""
    assets = pytest.importorskip("analysis_kit.assets")
    try:
        assets.fetch(name, offline=True)  # offline: fails instead of downloading when the asset is missing
    except LayerwiseError as err:
        pytest.skip(f"asset {name!r} is not in the cache ({err})")


def test_real_minilm_classifier():
    _cached_asset("minilm")
    model = models.build_classifier(ModelSpec("minilm"), 2, seed=0)
    assert layers.num_blocks(model) == 6 and model.config.hidden_size == 384
    tokenizer = models.load_tokenizer(ModelSpec("minilm"))
    assert model(**tokenizer(["a great little camera"], return_tensors="pt")).logits.shape == (1, 2)


def test_real_mpnet_classifier():
    _cached_asset("mpnet")
    model = models.build_classifier(ModelSpec("mpnet"), 2, seed=0)
    assert isinstance(model, MPNetForSequenceClassification)
    assert layers.num_blocks(model) == 12 and model.config.hidden_size == 768
    assert models.count_parameters(model.mpnet) == 108_895_872  # MPNet-base's 109.5 M less the pooler it drops
    tokenizer = models.load_tokenizer(ModelSpec("mpnet"))
    batch = tokenizer(["a great little camera", "it broke"], padding=True, return_tensors="pt")
    with torch.no_grad():
        assert model(**batch).logits.shape == (2, 2)
    assert layers.num_blocks(models.build_classifier(ModelSpec("mpnet", num_layers=6), 2)) == 6


@pytest.mark.slow
def test_real_smollm2_conversion_predicts_paris():
    _cached_asset("smollm2")
    folder = models.smollm2_folder()
    assert (folder / "model.safetensors").is_file()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(folder).eval()  # transformers alone
    tokenizer = AutoTokenizer.from_pretrained(folder)
    assert layers.num_blocks(model) == 30 and model.config.hidden_size == 576
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.pad_token_id == model.config.pad_token_id
    prompt = tokenizer("The capital of France is", return_tensors="pt")
    assert prompt["input_ids"][0, 0].item() != tokenizer.bos_token_id  # SmolLM2 adds no BOS
    out = model.generate(**prompt, max_new_tokens=3, do_sample=False)
    assert tokenizer.decode(out[0, prompt["input_ids"].shape[1]:]).strip().startswith("Paris")
    clf = models.build_classifier(ModelSpec("smollm2", num_layers=4), 2)
    assert layers.num_blocks(clf) == 4 and clf.config.pad_token_id == tokenizer.pad_token_id
