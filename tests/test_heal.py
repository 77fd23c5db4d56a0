"""Healing after block removal (distillation, LoRA) on tiny random models with planted structure."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from transformers import (
    AutoModelForSequenceClassification,
    BertConfig,
    BertForSequenceClassification,
    LlamaConfig,
    LlamaForCausalLM,
)

from analysis_kit import compress, heal, layers
from analysis_kit.heal import HealConfig, HealError

VOCAB = 40


def batches(n_batches: int = 4, size: int = 8, seq: int = 10, seed: int = 0, labels: bool = True):
    """Random token batches whose label is a learnable rule: does token 7 occur in the text?"""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n_batches):
        ids = torch.randint(5, VOCAB, (size, seq), generator=g)
        ids[: size // 2, int(torch.randint(1, seq, (1,), generator=g))] = 7
        mask = torch.ones_like(ids)
        mask[-2:, seq - 3:] = 0  # some padding
        batch = {"input_ids": ids, "attention_mask": mask}
        if labels:
            batch["labels"] = (ids * mask == 7).any(1).long()
        out.append(batch)
    return out


def bert(n_blocks: int = 4, seed: int = 0, init: float = 0.02) -> BertForSequenceClassification:
    """A tiny BERT; ``init=0.2`` (10x the usual weight scale) makes every block change its input a lot, so
    removing blocks changes the predictions (at 0.02 a random BERT block is close to the identity)."""
    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=n_blocks, num_attention_heads=4,
                     intermediate_size=64, max_position_embeddings=32, num_labels=2, pad_token_id=0,
                     hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, initializer_range=init)
    return BertForSequenceClassification(cfg).eval()


def llama(n_blocks: int = 4, seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=n_blocks, num_attention_heads=4,
                      num_key_value_heads=2, intermediate_size=64, max_position_embeddings=64, pad_token_id=0)
    return LlamaForCausalLM(cfg).eval()


@torch.no_grad()
def kd_gap(student, teacher, data) -> float:
    """Mean KL(teacher || student) of the output distributions over ``data``."""
    total = 0.0
    for b in data:
        inputs = {k: v for k, v in b.items() if k != "labels"}
        t = torch.log_softmax(teacher(**inputs).logits, -1)
        s = torch.log_softmax(student(**inputs).logits, -1)
        total += float(F.kl_div(s, t, log_target=True, reduction="batchmean"))
    return total / len(data)


@torch.no_grad()
def hidden_gap(student, teacher, keep, data) -> float:
    """Mean relative MSE between each student block's output and the teacher block it stands in for."""
    pairs = heal.teacher_map(keep, layers.num_blocks(teacher))
    return float(np.mean([heal._hidden_loss(layers.run_blocks(student, b, return_all=True),
                                            layers.run_blocks(teacher, b, return_all=True), pairs,
                                            b["attention_mask"]).item() for b in data]))


@torch.no_grad()
def task_loss(model, data) -> float:
    return float(np.mean([model(**{k: v for k, v in b.items()}).loss.item() for b in data]))


def test_teacher_map():
    assert heal.teacher_map((0, 2, 5), 6) == [1, 4, 5]
    assert heal.teacher_map((0, 1, 2), 6) == [0, 1, 5]
    assert heal.teacher_map((3,), 6) == [5]
    assert heal.teacher_map(range(4), 4) == [0, 1, 2, 3]
    with pytest.raises(HealError, match="increasing"):
        heal.teacher_map((2, 1), 6)


def test_distill_of_identical_student_has_zero_loss():
    teacher = bert(3)
    student = compress.compact(teacher, (0, 1, 2))
    _, hist = heal.distill(student, teacher, (0, 1, 2), batches(1), HealConfig(steps=1, lr_distill=1e-9), device="cpu")
    assert hist["loss"].iloc[0] == pytest.approx(0.0, abs=1e-6)  # kd and hidden terms are both >= 0


def test_distill_closes_the_gap_and_leaves_input_alone():
    teacher = bert(4, seed=1, init=0.2)
    keep = (0, 3)
    student = compress.compact(teacher, keep)
    before = {k: v.clone() for k, v in student.state_dict().items()}
    data = batches(4)
    cfg = HealConfig(steps=40, batch_size=8, lr_distill=1e-3)
    healed, hist = heal.distill(student, teacher, keep, data, cfg, seed=0, device="cpu")
    assert len(hist) == 40 and list(hist.columns) == ["step", "loss", "seconds"]
    gap_before = kd_gap(student, teacher, data)
    assert gap_before > 0.1  # removing two blocks changes the predictions
    assert kd_gap(healed, teacher, data) < 0.1 * gap_before
    assert hidden_gap(healed, teacher, keep, data) < 0.5 * hidden_gap(student, teacher, keep, data)
    assert hist["loss"].iloc[-5:].mean() < hist["loss"].iloc[:5].mean()
    assert all(torch.equal(v, student.state_dict()[k]) for k, v in before.items())  # a copy was trained
    assert type(healed) is type(student) and layers.num_blocks(healed) == 2


def test_distill_is_deterministic():
    teacher = bert(3, seed=2)
    student = compress.compact(teacher, (0, 2))
    cfg = HealConfig(steps=5, lr_distill=1e-3)
    a, _ = heal.distill(student, teacher, (0, 2), batches(2), cfg, seed=3, device="cpu")
    b, _ = heal.distill(student, teacher, (0, 2), batches(2), cfg, seed=3, device="cpu")
    assert all(torch.equal(v, b.state_dict()[k]) for k, v in a.state_dict().items())


def test_lora_learns_and_merges_into_a_plain_model(tmp_path):
    model = compress.compact(bert(4, seed=4), (0, 1))
    data = batches(4, seed=1)
    cfg = HealConfig(steps=60, lr_lora=1e-2, lora_r=4)
    healed, hist = heal.lora(model, data, cfg, seed=0, device="cpu")
    assert type(healed) is BertForSequenceClassification
    assert not any("lora" in name for name, _ in healed.named_modules())
    assert task_loss(healed, data) < task_loss(model, data)
    assert hist["loss"].iloc[-10:].mean() < hist["loss"].iloc[:10].mean()
    healed.save_pretrained(tmp_path)
    again = AutoModelForSequenceClassification.from_pretrained(tmp_path).eval()
    inputs = {k: v for k, v in data[0].items() if k != "labels"}
    with torch.no_grad():
        torch.testing.assert_close(again(**inputs).logits, healed(**inputs).logits)


def test_heal_causal_lm_both_methods():
    teacher = llama(4)
    keep = (0, 2)
    student = compress.compact(teacher, keep)
    data = batches(3, labels=False)
    cfg = HealConfig(steps=30, lr_distill=3e-3, lr_lora=1e-2)
    distilled, _ = heal.heal("distill", student, teacher, keep, data, cfg, device="cpu")
    assert kd_gap(distilled, teacher, data) < kd_gap(student, teacher, data)
    tuned, hist = heal.heal("lora", student, None, keep, data, cfg, device="cpu")
    assert type(tuned) is LlamaForCausalLM and hist["loss"].iloc[-5:].mean() < hist["loss"].iloc[:5].mean()


def test_heal_dispatch_and_errors():
    teacher = bert(2)
    student = compress.compact(teacher, (1,))
    same, hist = heal.heal("none", student, teacher, (1,), batches(1))
    assert same is student and isinstance(hist, pd.DataFrame) and hist.empty
    with pytest.raises(HealError, match="unknown healing"):
        heal.heal("prune", student, teacher, (1,), batches(1))
    with pytest.raises(HealError, match="teacher"):
        heal.heal("distill", student, None, (1,), batches(1))
    with pytest.raises(HealError, match="student has 1"):
        heal.distill(student, teacher, (0, 1), batches(1))
    with pytest.raises(HealError, match="no labels"):
        heal.lora(student, batches(1, labels=False), HealConfig(steps=1), device="cpu")
    with pytest.raises(HealError, match="steps"):
        HealConfig(steps=0).validate()


@pytest.mark.parametrize("family", ["roberta", "distilbert"])
def test_lora_heals_the_newer_encoder_families(family):
    """LoRA finds its target linears in RoBERTa and DistilBERT (their adapters' ``lora_targets``), learns, and
    merges back into a plain model of the family."""
    from transformers import DistilBertConfig, RobertaConfig

    torch.manual_seed(4)
    if family == "roberta":
        cfg = RobertaConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=4, num_attention_heads=4,
                            intermediate_size=64, max_position_embeddings=40, num_labels=2, pad_token_id=0)
    else:
        cfg = DistilBertConfig(vocab_size=VOCAB, dim=32, n_layers=4, n_heads=4, hidden_dim=64, num_labels=2,
                               max_position_embeddings=40, pad_token_id=0)
    model = compress.compact(AutoModelForSequenceClassification.from_config(cfg).eval(), (0, 1))
    data = batches(4, seed=1)
    healed, hist = heal.lora(model, data, HealConfig(steps=60, lr_lora=1e-2, lora_r=4), seed=0, device="cpu")
    assert type(healed) is type(model) and layers.num_blocks(healed) == 2
    assert not any("lora" in name for name, _ in healed.named_modules())
    assert task_loss(healed, data) < task_loss(model, data)


def test_heal_config_shares_the_recipe_knobs_and_checks_them():
    """HealConfig is RecipeOptions plus a step budget: one definition of each knob, one check."""
    cfg = HealConfig()
    assert isinstance(cfg, heal.RecipeOptions) and cfg.ce_weight == 0.0 and heal.RecipeOptions().ce_weight == 1.0
    assert cfg.lora_r == heal.RecipeOptions().lora_r and cfg.steps == 100
    with pytest.raises(HealError, match="lora_dropout"):
        HealConfig(lora_dropout=1.0).validate()
    with pytest.raises(HealError, match="learning rates"):
        HealConfig(lr_lora=0).validate()
