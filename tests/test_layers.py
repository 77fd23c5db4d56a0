"""Block surgery and block-by-block execution on tiny random models of every supported family."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
import torch
from transformers import (
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    BertConfig,
    DistilBertConfig,
    ElectraConfig,
    GPT2Config,
    LlamaConfig,
    MistralConfig,
    MPNetConfig,
    Qwen2Config,
    RobertaConfig,
    T5Config,
    ViTConfig,
    XLMRobertaConfig,
)

from analysis_kit import layers
from analysis_kit.errors import LayerwiseError

N_BLOCKS = 4
VOCAB = 101
_COMMON = {"vocab_size": VOCAB, "hidden_size": 32, "num_hidden_layers": N_BLOCKS, "num_attention_heads": 4,
           "intermediate_size": 64, "pad_token_id": 0, "num_labels": 3}
_DECODER = {"num_key_value_heads": 2, "max_position_embeddings": 64}


def make_config(family: str):
    """A tiny config (hidden 32, 4 blocks). Mistral and Qwen2 use a sliding window of 4 tokens, and Qwen2
    mixes full and sliding blocks, so subsetting ``layer_types`` and the masks is exercised."""
    if family == "bert":
        return BertConfig(**_COMMON, max_position_embeddings=64)
    if family == "roberta":  # positions start after the padding index, so 2 more than the longest input
        return RobertaConfig(**_COMMON, max_position_embeddings=66)
    if family == "xlm-roberta":
        return XLMRobertaConfig(**_COMMON, max_position_embeddings=66)
    if family == "distilbert":
        return DistilBertConfig(vocab_size=VOCAB, dim=32, n_layers=N_BLOCKS, n_heads=4, hidden_dim=64, pad_token_id=0,
                                max_position_embeddings=64, num_labels=3)
    if family == "mpnet":
        return MPNetConfig(**_COMMON, max_position_embeddings=64)
    if family == "llama":
        return LlamaConfig(**_COMMON, **_DECODER)
    if family == "mistral":
        return MistralConfig(**_COMMON, **_DECODER, sliding_window=4)
    if family == "qwen2":
        return Qwen2Config(**_COMMON, **_DECODER, use_sliding_window=True, sliding_window=4, max_window_layers=2)
    if family == "gpt2":
        return GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=N_BLOCKS, n_head=4, n_positions=64, pad_token_id=0,
                          num_labels=3)
    raise KeyError(family)


ENCODERS = ["bert", "roberta", "xlm-roberta", "distilbert", "mpnet"]
DECODERS = ["llama", "mistral", "qwen2", "gpt2"]
FAMILIES = ENCODERS + DECODERS
EXPECTED_PATH = {"bert": "bert.encoder.layer", "roberta": "roberta.encoder.layer", "xlm-roberta": "roberta.encoder.layer",
                 "distilbert": "distilbert.transformer.layer", "mpnet": "mpnet.encoder.layer", "llama": "model.layers",
                 "mistral": "model.layers", "qwen2": "model.layers", "gpt2": "transformer.h"}
EXPECTED_ADAPTER = {"bert": layers.BertAdapter, "roberta": layers.RobertaAdapter, "xlm-roberta": layers.RobertaAdapter,
                    "distilbert": layers.DistilBertAdapter, "mpnet": layers.MPNetAdapter, "llama": layers.LlamaAdapter,
                    "mistral": layers.MistralAdapter, "qwen2": layers.Qwen2Adapter, "gpt2": layers.GPT2Adapter}


def make_model(family: str, head: str = "seq", seed: int = 0):
    config = make_config(family)
    torch.manual_seed(seed)
    cls = {"seq": AutoModelForSequenceClassification, "lm": AutoModelForCausalLM, "bare": AutoModel}[head]
    return cls.from_config(config).eval()


@pytest.fixture(scope="module")
def batch() -> dict[str, torch.Tensor]:
    """Three sequences of 9 tokens, two of them right-padded."""
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(3, VOCAB, (3, 9), generator=gen)
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0
    mask[2, 4:] = 0
    ids[mask == 0] = 0
    return {"input_ids": ids, "attention_mask": mask}


def _identity_hook(module, args, kwargs, output):
    """Forward hook that turns a block into the identity (the reference for a skipped block)."""
    hidden = args[0] if args else kwargs["hidden_states"]
    return (hidden, *output[1:]) if isinstance(output, tuple) else hidden


def skipped_logits(model, batch, skip) -> torch.Tensor:
    """Logits of ``model`` with the blocks in ``skip`` bypassed by hooks: independent of layers.run_blocks."""
    handles = [layers.get_blocks(model)[i].register_forward_hook(_identity_hook, with_kwargs=True) for i in skip]
    try:
        with torch.no_grad():
            return model(**batch, use_cache=False).logits if hasattr(model, "lm_head") else model(**batch).logits
    finally:
        for h in handles:
            h.remove()


# ----------------------------------------------------------------------------------------------- finding


@pytest.mark.parametrize("family", FAMILIES)
def test_blocks_found_in_bare_and_head_models(family):
    heads = ["bare", "seq"] + (["lm"] if family in DECODERS else [])
    for head in heads:
        model = make_model(family, head)
        assert layers.num_blocks(model) == N_BLOCKS
        blocks = layers.get_blocks(model)
        assert isinstance(blocks, torch.nn.ModuleList)
        expected = EXPECTED_PATH[family] if head != "bare" else EXPECTED_PATH[family].split(".", 1)[1]
        assert layers.block_path(model) == expected
        assert model.get_submodule(expected) is blocks


@pytest.mark.parametrize("family", FAMILIES)
def test_family_lora_targets_and_attention_mark_name_real_block_linears(family):
    """The adapter's LoRA targets and attention mark match linears inside the blocks of a real model (peft
    and the 4-bit code select by these names, so a typo would silently adapt nothing)."""
    model = make_model(family)
    adapter = layers.adapter_for(model)
    prefix = layers.block_path(model) + "."
    names = [n for n, m in model.named_modules() if n.startswith(prefix) and len(list(m.children())) == 0
             and hasattr(m, "weight") and m.weight is not None and m.weight.dim() == 2]
    assert adapter.lora_targets
    for target in adapter.lora_targets:
        assert any(n == target or n.endswith("." + target) for n in names), (family, target)
    if family == "gpt2":
        assert adapter.attention_mark is None  # Conv1D weights: no 4-bit here
    else:
        assert any(adapter.attention_mark in n for n in names)


def test_distilbert_eager_attention_runs_block_by_block_but_keeps_its_mask(batch):
    """DistilBERT's eager attention indexes the 2-D mask itself, so it never takes the unmasked fast path."""
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_config(make_config("distilbert"), attn_implementation="eager").eval()
    adapter = layers.adapter_for(model)
    assert not adapter.mask_optional(model)
    assert adapter.mask_optional(make_model("distilbert"))  # SDPA, the default
    with torch.no_grad():
        got = layers.classify(model, layers.run_blocks(model, batch), batch["attention_mask"])
        torch.testing.assert_close(got, model(**batch).logits, rtol=0, atol=1e-6)


def test_supported_is_exactly_the_adapter_registry():
    assert set(layers.SUPPORTED) == set(FAMILIES)
    assert all(f in EXPECTED_ADAPTER[f].model_types for f in FAMILIES)


@pytest.mark.parametrize("family", FAMILIES)
def test_each_family_resolves_to_its_adapter(family):
    for head in ["bare", "seq"] + (["lm"] if family in DECODERS else []):
        model = make_model(family, head)
        adapter = layers.adapter_for(model)
        assert type(adapter) is EXPECTED_ADAPTER[family]
        assert isinstance(adapter, layers.FamilyAdapter)
        assert adapter is layers.adapter_for(make_model(family, head))  # one shared instance per family
        assert adapter.is_encoder == (family in ENCODERS)
        assert layers.family(model) == family
        assert adapter.blocks(model) is layers.get_blocks(model)


@pytest.mark.parametrize("config", [T5Config(d_model=32, num_layers=2, num_heads=4, d_ff=64, d_kv=8, vocab_size=50),
                                    ElectraConfig(vocab_size=50, hidden_size=32, num_hidden_layers=2,
                                                  num_attention_heads=4, intermediate_size=64, embedding_size=32)],
                         ids=["t5", "electra"])
def test_unsupported_model_type_is_refused_by_the_adapter_lookup(config):
    """Refused by ``config.model_type`` before any work, even where the module layout looks like a supported
    family's (ELECTRA has ``electra.encoder.layer`` like BERT but is not a supported family)."""
    model = AutoModelForSequenceClassification.from_config(config) if config.model_type == "electra" \
        else AutoModel.from_config(config)
    for call in (layers.adapter_for, layers.family, lambda m: layers.run_blocks(m, {"input_ids": torch.ones(1, 3)})):
        with pytest.raises(layers.UnsupportedArchitectureError) as err:
            call(model)
        message = str(err.value)
        assert f"model_type={config.model_type!r}" in message
        assert "Supported families (config.model_type): " + ", ".join(layers.SUPPORTED) in message


@pytest.mark.parametrize("config", [T5Config(d_model=32, num_layers=2, num_heads=4, d_ff=64, d_kv=8, vocab_size=50),
                                    ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                              intermediate_size=64, image_size=16, patch_size=8)],
                         ids=["t5", "vit"])
def test_unsupported_architecture_lists_families(config):
    model = AutoModel.from_config(config)
    for call in (layers.get_blocks, layers.num_blocks, lambda m: layers.keep_blocks(m, [0])):
        with pytest.raises(layers.UnsupportedArchitectureError) as err:
            call(model)
        assert isinstance(err.value, LayerwiseError)
        for fam in layers.SUPPORTED:
            assert fam in str(err.value)
        assert config.model_type in str(err.value)


def test_gpt2_with_position_dependent_attention_is_refused():
    config = make_config("gpt2")
    config.scale_attn_by_inverse_layer_idx = True
    model = AutoModelForCausalLM.from_config(config)
    with pytest.raises(layers.UnsupportedArchitectureError, match="scale_attn_by_inverse_layer_idx"):
        layers.drop_blocks(model, [1])


# ----------------------------------------------------------------------------------------------- cutting


@pytest.mark.parametrize("bad, match", [([4], "outside"), ([-1], "outside"), ([1, 1], "repeats"),
                                        ([2, 0], "increasing order"), ([], "empty"), (["a"], "integers"),
                                        ([0.5], "integers"), (3, "collection"), ([True], "integers")])
def test_keep_blocks_rejects_bad_indices(bad, match):
    model = make_model("bert")
    with pytest.raises(layers.BlockSelectionError, match=match):
        layers.keep_blocks(model, bad)


def test_drop_blocks_rejects_bad_indices_and_dropping_everything():
    model = make_model("llama")
    with pytest.raises(LayerwiseError, match="outside"):
        layers.drop_blocks(model, [7])
    with pytest.raises(LayerwiseError, match="at least one block"):
        layers.drop_blocks(model, range(N_BLOCKS))


def test_keep_accepts_sets_numpy_ints_and_leaves_the_original_alone():
    import numpy as np

    model = make_model("bert")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    full = layers.get_blocks(model)
    a = layers.keep_blocks(model, {3, 1})
    b = layers.keep_blocks(model, np.array([1, 3]))
    assert layers.num_blocks(a) == layers.num_blocks(b) == 2
    assert layers.num_blocks(model) == N_BLOCKS and model.config.num_hidden_layers == N_BLOCKS
    assert layers.get_blocks(model) is full  # the block list was swapped on the copy only
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert layers.get_blocks(a)[0] is not layers.get_blocks(model)[1]  # a copy, not shared modules
    assert torch.equal(layers.get_blocks(a)[0].output.dense.weight, layers.get_blocks(model)[1].output.dense.weight)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("drop", [[1], [0, 2], [3]], ids=str)
def test_drop_equals_skipping_blocks(family, drop, batch):
    model = make_model(family)
    small = layers.drop_blocks(model, drop)
    kept = [i for i in range(N_BLOCKS) if i not in drop]
    assert layers.num_blocks(small) == len(kept)
    assert small.config.num_hidden_layers == len(kept)
    if family == "gpt2":
        assert small.config.n_layer == len(kept)
    with torch.no_grad():
        got = small(**batch).logits
    ref = skipped_logits(model, batch, drop)
    full = skipped_logits(model, batch, [])
    torch.testing.assert_close(got, ref, rtol=0, atol=1e-6)
    assert (got - full).abs().max() > 1e-5  # dropping a block changes the output well beyond the tolerance


@pytest.mark.parametrize("family", DECODERS)
def test_decoder_layer_indices_and_layer_types_follow_the_kept_blocks(family):
    model = make_model(family, "lm")
    keep = [1, 3]
    small = layers.keep_blocks(model, keep)
    for new_i, block in enumerate(layers.get_blocks(small)):
        idxs = {m.layer_idx for m in block.modules() if isinstance(getattr(m, "layer_idx", None), int)}
        assert idxs == {new_i}
    for old_i, block in enumerate(layers.get_blocks(model)):  # the original keeps its numbering
        idxs = {m.layer_idx for m in block.modules() if isinstance(getattr(m, "layer_idx", None), int)}
        assert idxs == {old_i}
    original_types = getattr(model.config, "layer_types", None)
    if family == "qwen2":
        assert original_types == ["full_attention", "full_attention", "sliding_attention", "sliding_attention"]
        assert small.config.layer_types == ["full_attention", "sliding_attention"]
        assert [b.attention_type for b in layers.get_blocks(small)] == small.config.layer_types
        assert small.config.max_window_layers == 1
        assert small.model.has_sliding_layers


@pytest.mark.parametrize("family", DECODERS)
def test_generate_with_kv_cache_matches_no_cache_after_dropping(family):
    model = make_model(family, "lm")
    small = layers.drop_blocks(model, [0, 2])
    prompt = torch.tensor([[5, 17, 42, 8, 9]])
    kwargs = {"max_new_tokens": 8, "do_sample": False, "pad_token_id": 0, "attention_mask": torch.ones_like(prompt)}
    with torch.no_grad():
        cached = small.generate(prompt, use_cache=True, **kwargs)
        uncached = small.generate(prompt, use_cache=False, **kwargs)
    assert cached.shape == (1, prompt.shape[1] + 8)
    assert torch.equal(cached, uncached)


# ---------------------------------------------------------------------------------------------- round trip

_LOADER = textwrap.dedent("""
    import json, sys
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification
    jobs = json.loads(sys.argv[1])
    out = {}
    for name, job in jobs.items():
        cls = AutoModelForCausalLM if job["head"] == "lm" else AutoModelForSequenceClassification
        model = cls.from_pretrained(job["folder"]).eval()
        with torch.no_grad():
            ids = torch.tensor(job["input_ids"])
            mask = torch.tensor(job["attention_mask"])
            out[name] = {"logits": model(input_ids=ids, attention_mask=mask).logits.tolist(),
                         "num_hidden_layers": model.config.num_hidden_layers}
    print(json.dumps(out))
""")


@pytest.fixture(scope="module")
def round_trip(tmp_path_factory, batch):
    """Save a cut model of every family (classifier and LM heads), reload all of them in one fresh
    Python process that imports only torch and transformers, and return both sets of logits."""
    root = tmp_path_factory.mktemp("cut")
    jobs, expected = {}, {}
    for family in FAMILIES:
        for head in ["seq"] + (["lm"] if family in DECODERS else []):
            small = layers.keep_blocks(make_model(family, head), [0, 3])
            folder = root / f"{family}-{head}"
            small.save_pretrained(folder)
            name = f"{family}-{head}"
            jobs[name] = {"folder": str(folder), "head": head, "input_ids": batch["input_ids"].tolist(),
                          "attention_mask": batch["attention_mask"].tolist()}
            with torch.no_grad():
                expected[name] = small(**batch).logits
    proc = subprocess.run([sys.executable, "-c", _LOADER, json.dumps(jobs)], capture_output=True, text=True,
                          timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "analysis_kit" not in proc.stderr
    return expected, json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("name", [f"{f}-seq" for f in FAMILIES] + [f"{f}-lm" for f in DECODERS])
def test_save_and_reload_with_transformers_alone(name, round_trip):
    expected, reloaded = round_trip
    assert reloaded[name]["num_hidden_layers"] == 2
    torch.testing.assert_close(torch.tensor(reloaded[name]["logits"]), expected[name], rtol=0, atol=1e-5)


# --------------------------------------------------------------------------------------- running blocks


@pytest.mark.parametrize("family", FAMILIES)
def test_run_blocks_and_classify_reproduce_the_model(family, batch):
    heads = ["seq"] + (["lm"] if family in DECODERS else [])
    for head in heads:
        model = make_model(family, head)
        with torch.no_grad():
            ref = model(**batch).logits
            got = layers.classify(model, layers.run_blocks(model, batch), batch["attention_mask"])
        torch.testing.assert_close(got, ref, rtol=0, atol=1e-6)


@pytest.mark.parametrize("family", FAMILIES)
def test_run_blocks_skip_matches_hooked_model(family, batch):
    model = make_model(family)
    with torch.no_grad():
        got = layers.classify(model, layers.run_blocks(model, batch, skip={1, 2}), batch["attention_mask"])
    torch.testing.assert_close(got, skipped_logits(model, batch, [1, 2]), rtol=0, atol=1e-6)


@pytest.mark.parametrize("family", ENCODERS)
def test_return_all_matches_hidden_states_and_resumes(family, batch):
    model = make_model(family)
    with torch.no_grad():
        outs = layers.run_blocks(model, batch, return_all=True)
        hf = model(**batch, output_hidden_states=True).hidden_states  # embeddings, then each block
        assert len(outs) == N_BLOCKS
        for i in range(N_BLOCKS):
            torch.testing.assert_close(outs[i], hf[i + 1], rtol=0, atol=1e-6)
        torch.testing.assert_close(layers.embed(model, batch), hf[0], rtol=0, atol=1e-6)
        resumed = layers.run_blocks(model, batch, start=2, hidden=outs[1])
        torch.testing.assert_close(resumed, outs[-1], rtol=0, atol=1e-6)
        single = layers.block_forward(model, 2, outs[1], batch["attention_mask"])
        torch.testing.assert_close(single, outs[2], rtol=0, atol=1e-6)
        tail = layers.run_blocks(model, batch, start=1, hidden=outs[0], return_all=True, skip={2})
        assert len(tail) == 3 and torch.equal(tail[1], tail[0])


@pytest.mark.parametrize("family", DECODERS)
def test_block_forward_chains_to_run_blocks_for_decoders(family, batch):
    model = make_model(family)
    with torch.no_grad():
        hidden = layers.embed(model, batch)
        for i in range(N_BLOCKS):
            hidden = layers.block_forward(model, i, hidden, batch["attention_mask"])
        torch.testing.assert_close(hidden, layers.run_blocks(model, batch), rtol=0, atol=1e-6)


def test_run_blocks_gradients_flow_in_train_mode(batch):
    model = make_model("bert").train()
    hidden = layers.run_blocks(model, batch, skip={0})
    layers.classify(model, hidden).sum().backward()
    grads = [p.grad for p in layers.get_blocks(model)[1].parameters()]
    assert all(g is not None for g in grads)
    assert all(p.grad is None for p in layers.get_blocks(model)[0].parameters())


def test_run_blocks_rejects_bad_arguments(batch):
    model = make_model("bert")
    with pytest.raises(LayerwiseError, match="needs hidden"):
        layers.run_blocks(model, batch, start=2)
    with pytest.raises(LayerwiseError, match="outside"):
        layers.run_blocks(model, batch, skip={9})
    with pytest.raises(LayerwiseError, match="outside"):
        layers.run_blocks(model, batch, start=9, hidden=torch.zeros(3, 9, 32))
    with pytest.raises(LayerwiseError, match="attention_mask"):
        layers.run_blocks(model, {"input_ids": batch["input_ids"], "attention_mask": torch.ones(3, 5)})
    with pytest.raises(LayerwiseError, match="input_ids"):
        layers.run_blocks(model, {"attention_mask": batch["attention_mask"]})
    with pytest.raises(LayerwiseError, match="classify"):
        bare = make_model("bert", "bare")
        layers.classify(bare, layers.run_blocks(bare, batch))
