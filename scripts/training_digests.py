"""Digests of what every training path of the kit produces on tiny random models, to check a refactor.

Why: a cached model's key holds the hash of the code that trained it, so a refactor of a trainer re-keys hours
of cached work even when it cannot change a number. What the cache cannot tell, this script shows: it trains
tiny models through every trainer (``train.fine_tune`` with and without early stopping, each healing recipe,
the step-budget healing of ``analyze`` on a classifier and on a causal LM, the exit heads' joint and frozen
training) and prints a SHA-256 prefix of the weights and of the loss history (timings and per-term loss
columns aside) of each. Equal digests before and after a change mean the change trains bit-identical models
on this CPU at one thread.

Use: ``python scripts/training_digests.py > after.json``; ``git stash``; the same into ``before.json``;
``git stash pop``; ``diff before.json after.json``.
"""

from __future__ import annotations

import hashlib
import json
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from transformers import BertConfig, BertForSequenceClassification, BertTokenizerFast, LlamaConfig, LlamaForCausalLM

from analysis_kit import dynamic, heal, layers, train

WORDS = ["good", "bad", "film", "plot", "actor", "great", "awful", "story", "the", "a", "was", "is"]
VOCAB = 40  # ids the random LM batches draw from; the word tokenizer's ids are a prefix of them


def tokenizer(folder: Path) -> BertTokenizerFast:
    """A word-level tokenizer: BERT's special tokens and :data:`WORDS`."""
    vocab = folder / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]) + "\n")
    return BertTokenizerFast(vocab_file=str(vocab))


def frame(n: int, seed: int) -> pd.DataFrame:
    """Texts of varying length whose label is a word rule ('good'/'great' against 'bad'/'awful')."""
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        words = list(rng.choice(WORDS[3:], size=int(rng.integers(3, 8))))
        words[int(rng.integers(0, len(words)))] = rng.choice(["good", "great"] if i % 2 else ["bad", "awful"])
        rows.append({"text": " ".join(words), "label": i % 2})
    return pd.DataFrame(rows)


def bert(seed: int = 0) -> BertForSequenceClassification:
    """A 4-block BERT classifier with dropout (so the seeded dropout masks are part of what is compared)."""
    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=4, num_attention_heads=4,
                     intermediate_size=64, max_position_embeddings=64, num_labels=2, pad_token_id=0,
                     hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.0)
    return BertForSequenceClassification(cfg).eval()


def llama(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=4, num_attention_heads=4,
                      num_key_value_heads=2, intermediate_size=64, max_position_embeddings=64, pad_token_id=0)
    return LlamaForCausalLM(cfg).eval()


def token_batches(labels: bool = True) -> list[dict[str, torch.Tensor]]:
    """Four padded batches of random ids (the step-budget healing's input), labelled by 'token 7 occurs'."""
    g = torch.Generator().manual_seed(0)
    out = []
    for _ in range(4):
        ids = torch.randint(5, VOCAB, (8, 10), generator=g)
        ids[:4, 3] = 7
        mask = torch.ones_like(ids)
        mask[-2:, 7:] = 0
        batch = {"input_ids": ids, "attention_mask": mask}
        if labels:
            batch["labels"] = (ids * mask == 7).any(1).long()
        out.append(batch)
    return out


def digest(*objs: torch.nn.Module | pd.DataFrame) -> str:
    """One SHA-256 prefix per object: a module's state dict, or a history without timings and loss terms."""
    parts = []
    for obj in objs:
        h = hashlib.sha256()
        if isinstance(obj, torch.nn.Module):
            for k, v in sorted(obj.state_dict().items()):
                h.update(k.encode())
                h.update(v.detach().cpu().contiguous().numpy().tobytes())
        else:
            h.update(obj.drop(columns=[c for c in obj.columns if c in ("seconds", "kd", "hidden", "ce", "task")])
                     .to_csv().encode())
        parts.append(h.hexdigest()[:16])
    return " | ".join(parts)


def main() -> None:
    torch.set_num_threads(1)
    tok = tokenizer(Path(tempfile.mkdtemp()))
    tr, val = frame(48, 0), frame(24, 1)
    out = {}
    cfg = train.TrainConfig(epochs=2, lr=3e-3, batch_size=8, patience=10, max_length=16, eval_every=4)
    out["fine_tune"] = digest(*train.fine_tune(bert(), tok, tr, val, cfg, seed=3, device="cpu"))
    stop = train.TrainConfig(epochs=3, lr=3e-3, batch_size=8, patience=1, max_length=16, max_steps=14)
    out["fine_tune_stop"] = digest(*train.fine_tune(bert(), tok, tr, val, stop, seed=4, device="cpu"))
    for recipe in heal.RECIPES:
        model, hist, _ = heal.heal_recipe(recipe, bert(), (0, 2), tok, tr, val, cfg, seed=1, device="cpu",
                                          first_k=lambda k: layers.keep_blocks(bert(seed=5), range(k)))
        out[f"recipe_{recipe}"] = digest(model, hist)
    steps = heal.HealConfig(steps=7, batch_size=8)
    for method in ("distill", "lora"):
        out[f"step_{method}_bert"] = digest(*heal.heal(method, layers.keep_blocks(bert(), [0, 3]), bert(), [0, 3],
                                                       token_batches(), steps, seed=2, device="cpu"))
        out[f"step_{method}_llama"] = digest(*heal.heal(method, layers.keep_blocks(llama(), [0, 3]), llama(), [0, 3],
                                                        token_batches(labels=False), steps, seed=2, device="cpu"))
    ce_only = heal.HealConfig(steps=5, kd_weight=0.0, hidden_weight=0.0, ce_weight=1.0)
    out["step_finetune_bert"] = digest(*heal.heal("distill", layers.keep_blocks(bert(), [0, 3]), bert(), [0, 3],
                                                  token_batches(), ce_only, seed=2, device="cpu"))
    for mode in ("joint", "frozen"):
        exits = dynamic.ExitTrainConfig(mode=mode, epochs=3, lr=1e-3, head_lr=1e-3, batch_size=16, max_length=16,
                                        patience=2)
        out[f"exits_{mode}"] = digest(*dynamic.train_exits(bert(), tok, tr, val, exits, seed=7, device="cpu"))
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
