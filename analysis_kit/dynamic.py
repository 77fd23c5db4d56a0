"""Dynamic depth: spend fewer blocks on easy inputs, and measure what that really saves.

An encoder classifier runs every input through all of its blocks, although many inputs are already
decided after a few. This module attaches an *exit classifier* after every block and asks when an input
may leave early:

- ``ExitHeads``: one pooler-style head per block (pooled block output → dense → tanh → dropout →
  linear), each initialised from the model's own pooler and classifier. They read the mean of the
  tokens by default (``pool``): in a sentence encoder trained with mean pooling such as MiniLM, the
  [CLS] state of the early blocks hardly varies between inputs (``state_spread`` measures it).
- ``train_exits``: ``mode="joint"`` trains backbone and heads together on a depth-weighted loss (weights
  growing with depth, as PABEE's weighted average, Zhou et al. 2020); ``mode="frozen"`` trains only the
  heads on a frozen backbone (DeeBERT's second stage, Xin et al. 2020). ``exit_model`` caches the result.
- Policies (``ExitPolicy``, one registered class each, built by ``make_policy(name, setting, **needs)``):
  normalised-entropy and confidence thresholds (DeeBERT), patience (PABEE), a planned depth per input
  (``PlannedPolicy``: static truncation, or the complexity predictor's budget), and the oracle (the
  earliest exit that is correct, ``oracle_depths``) as the bound no policy can beat. Each class declares
  its inputs and its settings grid. One ``step`` function serves both the simulation on all exits
  (``simulate``) and real early exit (``ExitRunner``), so the two cannot disagree.
  ``consistency_threshold`` calibrates the confidence threshold CALM-style (Learn-then-Test: at most
  ``delta`` disagreement with the last exit, with probability 1 - ``epsilon``).
- ``ComplexityFeatures`` / ``ComplexityPredictor``: cheap text features (length, lexical diversity,
  rare-word rate from train-set word counts, semantic density: content-word share and hits of a
  polarity lexicon learned from the training split) and a small sklearn regressor of the blocks an
  input needs, fitted on validation data; it decides the depth *before* the model runs.
- Curves: ``curve`` sweeps a policy's settings (average depth, accuracy, and the latency predicted from
  a ``depth_profile``, the batch-1 latency of stopping at each depth); ``static_depths`` gives static
  truncation at any average depth, the baseline every policy is compared with.
- The fair exit-trained model (``fair_exit_model``, ``recipe_exit_config``): backbone and exits trained
  jointly with the reference's own fine-tuning recipe, epochs and data.
- Runtime: ``ExitRunner`` (real early exit, block by block, at batch 1 or batched with the batch
  shrinking as examples leave); ``encode_each`` and ``time_configs`` time several ways of running the
  same batches, interleaved; ``save_exit_model`` / ``load_exit_model`` (``ExitModel``) ship the model.

All exits are computed in one pass for accuracy-vs-depth curves; latency is only ever measured with
real early exit, never inferred from block counts. The chapter that puts it together per model, task
and seed, and measures the latency, is :mod:`analysis_kit.studies.dynamic_selection`.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import re
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn

from . import layers
from . import train as train_mod
from .cache import atomic_write_json, cached_dir, code_key, reachable
from .device import pick, progress, seed_everything
from .errors import LayerwiseError

# ONLINE_POLICIES and POLICIES come from the policy registry below.
MODES = ("joint", "frozen")
WEIGHTINGS = ("linear", "uniform")
#: What joint training early-stops and picks its checkpoint on (validation loss).
STOP_ON = ("weighted", "last")


class DynamicError(LayerwiseError):
    """Bad input to the dynamic-depth tools (wrong shapes, settings out of range, unsupported models)."""


# --------------------------------------------------------------------------------------------------
# Batching (tokenise per batch; bucket by length so CPU time is not spent on padding)


def _encode(tokenizer: Any, texts: Sequence[str], max_length: int) -> dict[str, torch.Tensor]:
    enc = tokenizer(list(texts), padding=True, truncation=True, max_length=max_length, return_tensors="pt")
    return {k: enc[k] for k in ("input_ids", "attention_mask", "token_type_ids") if k in enc}


def _batch_plan(lengths: np.ndarray, batch_size: int, seed: int | None = None) -> list[np.ndarray]:
    """Index batches of similar length: sorted (``seed=None``), or shuffled, bucketed and in shuffled order."""
    n = len(lengths)
    if seed is None:
        order = np.argsort(lengths, kind="stable")
        return [order[i:i + batch_size] for i in range(0, n, batch_size)]
    rng = np.random.default_rng(seed)
    perm = rng.permutation(n)
    window = batch_size * 20
    chunks = [perm[i:i + window] for i in range(0, n, window)]
    order = np.concatenate([c[np.argsort(lengths[c], kind="stable")] for c in chunks])
    batches = [order[i:i + batch_size] for i in range(0, n, batch_size)]
    return [batches[i] for i in rng.permutation(len(batches))]


def _lengths(tokenizer: Any, texts: Sequence[str], max_length: int) -> np.ndarray:
    ids = tokenizer(list(texts), truncation=True, max_length=max_length)["input_ids"]
    return np.array([len(x) for x in ids])


def _check_frame(df: pd.DataFrame, what: str) -> None:
    if not isinstance(df, pd.DataFrame) or not {"text", "label"} <= set(df.columns) or len(df) == 0:
        raise DynamicError(f"{what} must be a non-empty DataFrame with 'text' and 'label' columns "
                           "(as train.load_task returns).")


# --------------------------------------------------------------------------------------------------
# Exit heads


def _check_encoder(model: nn.Module) -> int:
    """The model's number of labels; a clear error for decoders, regression heads and unknown families."""
    if not layers.adapter_for(model).is_encoder:
        raise DynamicError(f"exit heads read the pooled states of an encoder; {layers.family(model)!r} is a decoder. "
                           "Use an encoder sequence classifier (e.g. train.baseline('minilm', seed)).")
    num_labels = int(getattr(model.config, "num_labels", 0))
    if num_labels < 2:
        raise DynamicError(f"the model has num_labels={num_labels}; early exit needs class probabilities, so "
                           "use a classification task (label_mode 'polarity' or 'bins5'), not regression.")
    return num_labels


POOLINGS = ("mean", "cls")


def pool(hidden: torch.Tensor, attention_mask: torch.Tensor | None, pooling: str = "mean") -> torch.Tensor:
    """One vector per input from a block's token states (batch, seq, hidden): the masked mean of the
    tokens (``mean``) or the first, [CLS], token (``cls``)."""
    if pooling == "cls":
        return hidden[:, 0]
    if pooling != "mean":
        raise DynamicError(f"pooling={pooling!r} unknown; choose from {POOLINGS}.")
    if attention_mask is None:
        return hidden.mean(1)
    m = attention_mask.to(hidden.device, hidden.dtype).unsqueeze(-1)
    return (hidden * m).sum(1) / m.sum(1).clamp_min(1.0)


class ExitHeads(nn.Module):
    """One classifier per block on the pooled block output: dense → tanh → dropout → linear (the shape of
    BERT's pooler + classification head).

    ``pooling`` says what the heads read: ``mean`` (the masked mean of the tokens, the pooling MiniLM was
    trained with) or ``cls`` (the [CLS] token, like BERT's own head). ``heads(states)`` maps pooled states
    (batch, blocks, hidden) to logits (batch, blocks, labels); ``head(k, x)`` is exit ``k`` (0-based
    block index) alone and ``pool(hidden, mask)`` pools one block's output, which real early exit uses.
    """

    def __init__(self, n_blocks: int, hidden: int, num_labels: int, dropout: float = 0.1, pooling: str = "mean"):
        super().__init__()
        if n_blocks < 1 or hidden < 1 or num_labels < 2 or not 0 <= dropout < 1 or pooling not in POOLINGS:
            raise DynamicError(f"ExitHeads(n_blocks={n_blocks}, hidden={hidden}, num_labels={num_labels}, "
                               f"dropout={dropout}, pooling={pooling!r}) needs >= 1 block, hidden >= 1, >= 2 labels, "
                               f"0 <= dropout < 1 and pooling in {POOLINGS}.")
        self.spec = {"n_blocks": n_blocks, "hidden": hidden, "num_labels": num_labels, "dropout": dropout,
                     "pooling": pooling}
        self.pooling = pooling
        self.dense = nn.ModuleList(nn.Linear(hidden, hidden) for _ in range(n_blocks))
        self.out = nn.ModuleList(nn.Linear(hidden, num_labels) for _ in range(n_blocks))
        self.dropout = nn.Dropout(dropout)

    @property
    def n_blocks(self) -> int:
        return len(self.dense)

    def pool(self, hidden: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
        """The vector exit heads read from one block's output (see :func:`pool`)."""
        return pool(hidden, attention_mask, self.pooling)

    def head(self, k: int, x: torch.Tensor) -> torch.Tensor:
        """Logits of exit ``k`` for pooled states ``x`` (batch, hidden)."""
        return self.out[k](self.dropout(torch.tanh(self.dense[k](x))))

    def forward(self, states: torch.Tensor) -> torch.Tensor:
        if states.ndim != 3 or states.shape[1] != self.n_blocks:
            raise DynamicError(f"expected pooled states of shape (batch, {self.n_blocks}, hidden), got "
                               f"{tuple(states.shape)}; build them with pooled_states(model, batch, pooling).")
        return torch.stack([self.head(k, states[:, k]) for k in range(self.n_blocks)], 1)

    @classmethod
    def from_model(cls, model: nn.Module, seed: int = 0, pooling: str = "mean") -> ExitHeads:
        """Heads for every block of ``model``, each a copy of its pooler + classifier when it has them (BERT).

        Starting every exit from the trained head gives the exits a sensible start; with ``pooling="cls"``
        the last exit then equals the model (in eval mode). Models without a pooler get a seeded random init.
        """
        num_labels = _check_encoder(model)
        cfg = model.config
        # the head's dropout as the family names it (BERT/RoBERTa/MPNet; DistilBERT's seq_classif_dropout)
        dropout = next((getattr(cfg, k) for k in ("classifier_dropout", "hidden_dropout_prob", "seq_classif_dropout")
                        if getattr(cfg, k, None) is not None), 0.1)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            heads = cls(layers.num_blocks(model), cfg.hidden_size, num_labels, float(dropout), pooling)
        pooler = getattr(model.base_model, "pooler", None)
        classifier = getattr(model, "classifier", None)
        if pooler is not None and isinstance(classifier, nn.Linear):  # BERT's pooler → classifier head
            for dense, out in zip(heads.dense, heads.out, strict=True):
                dense.load_state_dict(pooler.dense.state_dict())
                out.load_state_dict(classifier.state_dict())
        return heads.to(next(model.parameters()).device)


def pooled_states(model: nn.Module, batch: dict[str, torch.Tensor], pooling: str = "mean") -> torch.Tensor:
    """Pooled output of every block, (batch, blocks, hidden), from one forward pass."""
    outs = layers.run_blocks(model, batch, return_all=True)
    mask = batch.get("attention_mask")
    return torch.stack([pool(h, mask, pooling) for h in outs], 1)


@torch.no_grad()
def state_spread(model: nn.Module, tokenizer: Any, texts: Sequence[str], max_length: int = 128,
                 device: str | torch.device = "auto") -> pd.DataFrame:
    """How much each block's pooled output varies across inputs, per pooling: the mean over dimensions of
    the standard deviation across ``texts``, divided by the mean vector norm. Near 0 means the vector
    is nearly the same for every input, so no head can read the input from it."""
    dev = pick(device)
    model.eval().to(dev)
    rows = []
    for pooling in POOLINGS:
        x = _features(model, tokenizer, list(texts), 64, max_length, dev, pooling)
        for k in range(x.shape[1]):
            rows.append({"pooling": pooling, "depth": k + 1,
                         "relative_spread": float(x[:, k].std(0).mean() / x[:, k].norm(dim=-1).mean())})
    return pd.DataFrame(rows)


def exit_weights(n_blocks: int, weighting: str = "linear") -> torch.Tensor:
    """Loss weight of each exit, summing to 1: ``linear`` ∝ depth (PABEE's weighted average), or ``uniform``."""
    if weighting not in WEIGHTINGS:
        raise DynamicError(f"weighting={weighting!r} unknown; choose from {WEIGHTINGS}.")
    w = torch.arange(1, n_blocks + 1, dtype=torch.float32) if weighting == "linear" else torch.ones(n_blocks)
    return w / w.sum()


def _weighted_loss(logits: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    losses = torch.stack([F.cross_entropy(logits[:, k], labels) for k in range(logits.shape[1])])
    return (losses * weights.to(losses.device)).sum()


def _exit_loss(logits: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor, distill: float) -> torch.Tensor:
    """Joint training loss: every exit's cross-entropy, weighted by depth; with ``distill`` > 0 each exit
    before the last instead takes (1 - distill) x cross-entropy + distill x KL(last exit || this exit),
    the last exit's distribution detached (self-distillation, FastBERT, Liu et al. 2020), so early exits
    learn to agree with the deepest one, which is what an exit policy needs of them."""
    if distill == 0:
        return _weighted_loss(logits, labels, weights)
    teacher = torch.softmax(logits[:, -1].detach().float(), -1)
    losses = []
    for k in range(logits.shape[1]):
        ce = F.cross_entropy(logits[:, k], labels)
        if k < logits.shape[1] - 1:
            kl = F.kl_div(torch.log_softmax(logits[:, k].float(), -1), teacher, reduction="batchmean")
            ce = (1 - distill) * ce + distill * kl
        losses.append(ce)
    return (torch.stack(losses) * weights.to(logits.device)).sum()


# --------------------------------------------------------------------------------------------------
# Training


@dataclass(frozen=True)
class ExitTrainConfig:
    """How exit heads are trained. ``mode``: ``joint`` (backbone + heads, weighted loss) or ``frozen``
    (heads only). ``lr`` is the backbone's learning rate (joint only), ``head_lr`` the heads'.
    ``distill``: weight of self-distillation from the last exit (joint only, :func:`_exit_loss`);
    ``max_steps``: a cap on optimizer steps; ``stop_on``: the validation loss that early stopping and the
    restored checkpoint follow, the weighted loss of all exits or the last exit's alone."""

    mode: str = "joint"
    pooling: str = "mean"
    epochs: int = 2
    lr: float = 2.5e-5
    head_lr: float = 1e-3
    batch_size: int = 32
    weighting: str = "linear"
    weight_decay: float = 0.01
    warmup_ratio: float = 0.1
    patience: int = 2
    max_length: int = 128
    grad_clip: float = 1.0
    distill: float = 0.0
    max_steps: int | None = None
    stop_on: str = "weighted"

    def validate(self) -> None:
        """Fail fast on impossible settings."""
        if self.mode not in MODES:
            raise DynamicError(f"mode={self.mode!r} unknown; choose 'joint' (backbone + heads) or 'frozen' "
                               "(heads only).")
        if self.weighting not in WEIGHTINGS:
            raise DynamicError(f"weighting={self.weighting!r} unknown; choose from {WEIGHTINGS}.")
        if self.pooling not in POOLINGS:
            raise DynamicError(f"pooling={self.pooling!r} unknown; choose from {POOLINGS}.")
        if self.stop_on not in STOP_ON:
            raise DynamicError(f"stop_on={self.stop_on!r} unknown; choose 'weighted' (the weighted loss of all exits) "
                               "or 'last' (the last exit's loss, the criterion a plain fine-tune uses).")
        if self.epochs < 1 or self.batch_size < 1 or self.lr <= 0 or self.head_lr <= 0 or self.max_length < 8 \
                or self.patience < 1 or not 0 <= self.distill < 1 or (self.max_steps is not None and self.max_steps < 1):
            raise DynamicError(f"invalid ExitTrainConfig {self}: need epochs >= 1, batch_size >= 1, lr > 0, "
                               "head_lr > 0, max_length >= 8, patience >= 1, 0 <= distill < 1, max_steps >= 1.")


@torch.no_grad()
def _features(model: nn.Module, tokenizer: Any, texts: list[str], batch_size: int, max_length: int,
              dev: torch.device, pooling: str = "mean") -> torch.Tensor:
    """Pooled states of every block for ``texts`` (n, blocks, hidden), in the original order (eval mode)."""
    model.eval()
    out = torch.empty(len(texts), layers.num_blocks(model), model.config.hidden_size)
    for idx in _batch_plan(_lengths(tokenizer, texts, max_length), batch_size):
        batch = {k: v.to(dev) for k, v in _encode(tokenizer, [texts[i] for i in idx], max_length).items()}
        out[torch.as_tensor(idx)] = pooled_states(model, batch, pooling).float().cpu()
    return out


def _snapshot(*modules: nn.Module) -> list[dict[str, torch.Tensor]]:
    return [{k: v.detach().cpu().clone() for k, v in m.state_dict().items()} for m in modules]


def _history_row(epoch: int, train_loss: float, val_logits: torch.Tensor, val_y: torch.Tensor,
                 weights: torch.Tensor, start: float) -> dict[str, float]:
    acc = (val_logits.argmax(-1) == val_y[:, None]).float().mean(0)
    return {"epoch": epoch, "train_loss": train_loss, "val_loss": float(_weighted_loss(val_logits, val_y, weights)),
            "val_loss_last": float(F.cross_entropy(val_logits[:, -1], val_y)),
            "val_acc_last": float(acc[-1]), "val_acc_mean": float(acc.mean()), "seconds": time.time() - start}


def _train_frozen(model, heads, tokenizer, train_df, val_df, cfg, seed, dev, weights):
    start = time.time()
    x_tr = _features(model, tokenizer, train_df["text"].tolist(), 64, cfg.max_length, dev, cfg.pooling)
    x_va = _features(model, tokenizer, val_df["text"].tolist(), 64, cfg.max_length, dev, cfg.pooling)
    y_tr = torch.tensor(train_df["label"].to_numpy(), dtype=torch.long)
    y_va = torch.tensor(val_df["label"].to_numpy(), dtype=torch.long)
    heads.cpu()
    opt = torch.optim.AdamW(heads.parameters(), lr=cfg.head_lr, weight_decay=cfg.weight_decay)
    gen = torch.Generator().manual_seed(seed)
    best, bad, state, rows = math.inf, 0, None, []
    for epoch in range(cfg.epochs):
        heads.train()
        losses = []
        for idx in torch.randperm(len(y_tr), generator=gen).split(cfg.batch_size):
            loss = _weighted_loss(heads(x_tr[idx]), y_tr[idx], weights)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses.append(loss.item())
        heads.eval()
        with torch.no_grad():
            rows.append(_history_row(epoch + 1, float(np.mean(losses)), heads(x_va), y_va, weights, start))
        if rows[-1]["val_loss"] < best - 1e-6:
            best, bad, state = rows[-1]["val_loss"], 0, _snapshot(heads)
        else:
            bad += 1
            if bad >= cfg.patience:
                break
    heads.load_state_dict(state[0])
    return model, heads.to(dev).eval(), pd.DataFrame(rows)


def _train_joint(model, heads, tokenizer, train_df, val_df, cfg, seed, dev, weights):
    start = time.time()
    texts = train_df["text"].tolist()
    y_all = torch.tensor(train_df["label"].to_numpy(), dtype=torch.long)
    lengths = _lengths(tokenizer, texts, cfg.max_length)
    steps_per_epoch = math.ceil(len(texts) / cfg.batch_size)
    total = cfg.epochs * steps_per_epoch if cfg.max_steps is None else min(cfg.max_steps, cfg.epochs * steps_per_epoch)
    opt = train_mod.Optimizer([(model.parameters(), cfg.lr), (heads.parameters(), cfg.head_lr)], total,
                              cfg.weight_decay, cfg.warmup_ratio, cfg.grad_clip)
    val_texts = val_df["text"].tolist()
    y_va = torch.tensor(val_df["label"].to_numpy(), dtype=torch.long)
    best, bad, state, rows = math.inf, 0, None, []
    bar = progress(total=total, desc="exit heads (joint)")
    step = 0
    for epoch in range(cfg.epochs):
        model.train()
        heads.train()
        losses = []
        for idx in _batch_plan(lengths, cfg.batch_size, seed=seed * 1000 + epoch):
            batch = {k: v.to(dev) for k, v in _encode(tokenizer, [texts[i] for i in idx], cfg.max_length).items()}
            loss = _exit_loss(heads(pooled_states(model, batch, cfg.pooling)), y_all[idx].to(dev), weights,
                              cfg.distill)
            opt.step(loss)
            losses.append(loss.item())
            bar.update(1)
            step += 1
            if step >= total:
                break
        heads.eval()
        with torch.no_grad():
            feats = _features(model, tokenizer, val_texts, 64, cfg.max_length, dev, cfg.pooling)
            val_logits = heads(feats.to(dev)).cpu()
        rows.append(_history_row(epoch + 1, float(np.mean(losses)), val_logits, y_va, weights, start))
        rows[-1]["step"] = step
        watched = rows[-1]["val_loss_last" if cfg.stop_on == "last" else "val_loss"]
        if watched < best - 1e-6:
            best, bad, state = watched, 0, _snapshot(model, heads)
        else:
            bad += 1
            if bad >= cfg.patience:
                break
        if step >= total:
            break
    bar.close()
    model.load_state_dict(state[0])
    heads.load_state_dict(state[1])
    return model.eval(), heads.eval(), pd.DataFrame(rows)


def train_exits(model: nn.Module, tokenizer: Any, train_df: pd.DataFrame, val_df: pd.DataFrame,
                cfg: ExitTrainConfig, seed: int, device: str | torch.device = "auto",
                ) -> tuple[nn.Module, ExitHeads, pd.DataFrame]:
    """Train an exit head after every block; returns ``(model, heads, history)`` at the best validation loss.

    ``joint`` updates ``model`` in place (pass a copy to keep the original); ``frozen`` leaves it untouched.
    The loss is the ``cfg.weighting``-weighted sum of every exit's cross-entropy. History: one row per
    epoch with train/val weighted loss, validation accuracy of the last exit and mean over exits.
    """
    cfg.validate()
    _check_frame(train_df, "train_df")
    _check_frame(val_df, "val_df")
    num_labels = _check_encoder(model)
    labels = np.concatenate([train_df["label"].to_numpy(), val_df["label"].to_numpy()])
    if not np.issubdtype(labels.dtype, np.integer) or labels.min() < 0 or labels.max() >= num_labels:
        raise DynamicError(f"labels must be integers in 0..{num_labels - 1} (the model has {num_labels} labels); "
                           f"got {np.unique(labels)[:6].tolist()}.")
    dev = pick(device)
    seed_everything(seed)
    model.to(dev)
    heads = ExitHeads.from_model(model, seed, cfg.pooling).to(dev)
    weights = exit_weights(heads.n_blocks, cfg.weighting)
    if cfg.mode == "frozen":
        return _train_frozen(model, heads, tokenizer, train_df, val_df, cfg, seed, dev, weights)
    return _train_joint(model, heads, tokenizer, train_df, val_df, cfg, seed, dev, weights)


@torch.no_grad()
def predict_exits(model: nn.Module, heads: ExitHeads, tokenizer: Any, texts: Sequence[str], batch_size: int = 64,
                  max_length: int = 128, device: str | torch.device = "auto") -> np.ndarray:
    """Logits of every exit for ``texts``, shape (n, blocks, labels), in input order, from one pass each."""
    if isinstance(texts, str) or len(texts) == 0:
        raise DynamicError("texts must be a non-empty list of strings.")
    dev = pick(device)
    model.eval().to(dev)
    heads.eval().to(dev)
    feats = _features(model, tokenizer, list(texts), batch_size, max_length, dev, heads.pooling)
    return torch.cat([heads(f.to(dev)).float().cpu() for f in feats.split(512)]).numpy()


def _frame_digest(*dfs: pd.DataFrame) -> str:
    h = hashlib.sha256()
    for df in dfs:
        h.update(json.dumps([df["text"].tolist(), df["label"].tolist()], default=str).encode())
    return h.hexdigest()


def exit_model(model: nn.Module, tokenizer: Any, base_key: str, train_df: pd.DataFrame, val_df: pd.DataFrame,
               cfg: ExitTrainConfig, seed: int, device: str | torch.device = "auto",
               ) -> tuple[nn.Module, ExitHeads, dict[str, Any]]:
    """``train_exits`` on a copy of ``model``, cached on disk; returns ``(model, heads, record)``.

    The cache key holds ``base_key`` (what identifies the starting model, e.g. its cache folder name),
    the config, the seed and a digest of the training and validation data, so heads are never reused
    for another model or split. ``frozen`` returns ``model`` itself with the cached heads.
    """
    from safetensors.torch import load_file, save_file
    from transformers import AutoModelForSequenceClassification

    cfg.validate()
    _check_frame(train_df, "train_df")
    _check_frame(val_df, "val_df")
    spec = {"kind": "exit_heads", "base": base_key, "cfg": asdict(cfg), "seed": seed,
            "data": _frame_digest(train_df, val_df),
            "code": code_key(*_EXIT_CODE)}

    def build(folder: Path) -> None:
        start = time.time()
        work = model if cfg.mode == "frozen" else copy.deepcopy(model)
        trained, heads, hist = train_exits(work, tokenizer, train_df, val_df, cfg, seed, device)
        save_file({k: v.contiguous() for k, v in heads.cpu().state_dict().items()}, str(folder / "heads.safetensors"))
        if cfg.mode == "joint":
            trained.cpu().save_pretrained(folder / "backbone")
        atomic_write_json(folder / "record.json", {"heads": heads.spec, "history": hist.to_dict(orient="records"),
                                                   "train_seconds": time.time() - start, "device": str(pick(device))})

    folder = cached_dir("exit_heads", spec, build)
    record = json.loads((folder / "record.json").read_text())
    heads = ExitHeads(**record["heads"])
    heads.load_state_dict(load_file(str(folder / "heads.safetensors")))
    out = model if cfg.mode == "frozen" else AutoModelForSequenceClassification.from_pretrained(folder / "backbone")
    record["folder"] = str(folder)
    return out.eval(), heads.eval(), record


# --------------------------------------------------------------------------------------------------
# Exit policies


def _probs(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(-1, keepdims=True)


def normalised_entropy(probs: np.ndarray) -> np.ndarray:
    """Entropy of each probability vector divided by log(labels): 0 = certain, 1 = uniform."""
    p = np.clip(probs, 1e-12, 1.0)
    return -(p * np.log(p)).sum(-1) / math.log(probs.shape[-1])


class ExitPolicy:
    """One exit policy: decides, block by block, which examples leave. Subclass it once per policy and
    ``register_policy`` the class to make its ``name`` known to ``make_policy`` and ``settings_grid``.

    The decision method, shared by the simulation (``simulate``) and real early exit
    (``ExitRunner``) so the two cannot disagree: ``start(n)`` resets per-example state;
    ``step(k, probs, rows)`` gets exit ``k``'s probabilities for the still-active examples ``rows``
    (indices into the ``n``) and returns a boolean mask of those that exit after block ``k`` (0-based).

    What a class declares instead of a central if/elif deciding for it:

    - ``needs``: the keyword inputs ``make_policy`` must be given besides the setting (name → what it
      is, for error messages), e.g. a fitted predictor; ``options`` the optional ones. ``from_needs``
      builds the policy from them.
    - ``settings_grid(val_probs)``: the settings that span the policy's range on validation data.
    - ``needs_probs``: ``False`` when it decides without the exits (``probs`` may then be ``None``).
    - ``online``: whether the decision is made from the input or the exits seen so far (a deployable
      policy), not from a bound or a fixed truncation.
    """

    name: ClassVar[str] = "policy"
    needs: ClassVar[dict[str, str]] = {}
    options: ClassVar[dict[str, str]] = {}
    online: ClassVar[bool] = True
    needs_probs = True

    def __init__(self, setting: float):
        self.setting = setting

    @classmethod
    def from_needs(cls, setting: float, **needs: Any) -> ExitPolicy:
        """The policy at ``setting`` from its declared ``needs`` / ``options`` (checked by ``make_policy``)."""
        return cls(setting, **needs)

    @classmethod
    def settings_grid(cls, val_probs: np.ndarray, n_points: int = 41) -> list[float]:
        """Settings that span the policy's range on ``val_probs`` (examples, blocks, labels)."""
        raise DynamicError(f"{cls.__name__} declares no settings grid; define the classmethod settings_grid.")

    def start(self, n: int) -> None:  # noqa: B027 - stateless policies need no reset
        """Reset per-example state for ``n`` examples."""

    def step(self, k: int, probs: np.ndarray | None, rows: np.ndarray) -> np.ndarray:
        """Boolean mask over ``rows``: which of them exit after block ``k`` (0-based)."""
        raise NotImplementedError(f"{type(self).__name__} must define step(k, probs, rows).")

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.setting!r})"


_REGISTRY: dict[str, type[ExitPolicy]] = {}


def register_policy(cls: type[ExitPolicy]) -> type[ExitPolicy]:
    """Class decorator: make ``cls.name`` known to ``make_policy`` and ``settings_grid``. Adding a policy is
    one registered class; ``unregister_policy`` removes it again."""
    if not (isinstance(cls, type) and issubclass(cls, ExitPolicy)):
        raise DynamicError(f"register_policy takes an ExitPolicy subclass, got {cls!r}.")
    name = cls.__dict__.get("name")
    if not isinstance(name, str) or not name:
        raise DynamicError(f"{cls.__name__} needs its own class attribute name = '...' to be registered.")
    if name in _REGISTRY and _REGISTRY[name] is not cls:
        raise DynamicError(f"policy name {name!r} is taken by {_REGISTRY[name].__name__}; choose another name "
                           "or unregister_policy it first.")
    _REGISTRY[name] = cls
    return cls


def unregister_policy(name: str) -> None:
    """Forget the policy ``name`` (e.g. a toy policy registered by a test)."""
    if name not in _REGISTRY:
        raise DynamicError(f"no policy {name!r} is registered; registered: {list(_REGISTRY)}.")
    del _REGISTRY[name]


def policy_names() -> tuple[str, ...]:
    """The registered policy names, in registration order."""
    return tuple(_REGISTRY)


def policy_class(name: str) -> type[ExitPolicy]:
    """The registered class of policy ``name``."""
    if name not in _REGISTRY:
        raise DynamicError(f"unknown policy {name!r}; registered: {list(_REGISTRY)} (add one with "
                           "@register_policy on an ExitPolicy subclass).")
    return _REGISTRY[name]


def _quantile_grid(values: np.ndarray, n_points: int, never: float) -> list[float]:
    """Quantiles of a threshold statistic over the exits (the last excluded), plus a never-exit value."""
    return sorted({float(v) for v in np.quantile(values, np.linspace(0, 1, n_points))} | {never})


@register_policy
class EntropyPolicy(ExitPolicy):
    """DeeBERT: exit once the exit's normalised entropy is at most ``threshold`` (in [0, 1]; < 0 never exits)."""

    name = "entropy"

    @classmethod
    def settings_grid(cls, val_probs, n_points=41):
        """Quantiles of the normalised entropies seen at the exits, plus -1 (never exits)."""
        probs, _ = _check_probs(val_probs)
        return _quantile_grid(normalised_entropy(probs[:, :-1]), n_points, -1.0)

    def step(self, k, probs, rows):
        return normalised_entropy(probs) <= self.setting


@register_policy
class ConfidencePolicy(ExitPolicy):
    """Exit once the exit's top probability is at least ``threshold`` (> 1 never exits)."""

    name = "confidence"

    @classmethod
    def settings_grid(cls, val_probs, n_points=41):
        """Quantiles of the top probabilities seen at the exits, plus 2 (never exits)."""
        probs, _ = _check_probs(val_probs)
        return _quantile_grid(probs[:, :-1].max(-1), n_points, 2.0)

    def step(self, k, probs, rows):
        return probs.max(-1) >= self.setting


@register_policy
class PatiencePolicy(ExitPolicy):
    """PABEE: exit once ``patience`` consecutive exits after the first agree with the one before (0 = block 1)."""

    name = "patience"

    def __init__(self, patience: int):
        if isinstance(patience, bool) or int(patience) != patience or patience < 0:
            raise DynamicError(f"patience={patience!r} must be a non-negative integer (0 exits after block 1).")
        super().__init__(int(patience))

    @classmethod
    def settings_grid(cls, val_probs, n_points=41):
        """Every patience 0..blocks-1 (``n_points`` does not apply)."""
        probs, _ = _check_probs(val_probs)
        return list(range(probs.shape[1]))

    def start(self, n):
        self._prev = np.full(n, -1)
        self._count = np.zeros(n, dtype=int)

    def step(self, k, probs, rows):
        pred = probs.argmax(-1)
        count = np.where((k > 0) & (pred == self._prev[rows]), self._count[rows] + 1, 0)
        self._prev[rows], self._count[rows] = pred, count
        return count >= self.setting


@register_policy
class CalibratedPolicy(ConfidencePolicy):
    """CALM-style (Schuster et al. 2022): a confidence threshold chosen on validation with a stated guarantee.

    It exits like ``confidence``; what differs is how the threshold is set: :func:`consistency_threshold`
    picks the loosest threshold for which "the early prediction disagrees with the last exit's on more
    than ``delta`` of inputs" is rejected at level ``epsilon`` (Learn-then-Test, fixed-sequence testing
    from the strictest threshold, exact binomial p-values). With probability at least 1 - ``epsilon`` over
    the validation draw, inputs exchangeable with validation then disagree with the full-depth prediction
    at most ``delta`` of the time, so the accuracy lost to exiting early is at most ``delta``.
    """

    name = "calibrated"


def consistency_threshold(val_probs: np.ndarray, delta: float, epsilon: float = 0.05,
                          n_points: int = 201) -> dict[str, Any]:
    """Learn-then-Test calibration of :class:`CalibratedPolicy` on validation exits ``val_probs``.

    Candidate thresholds run from "never exit" (2.0) down through the quantiles of the top probabilities
    seen at the exits; for each, the risk is the share of validation inputs whose exit prediction differs
    from the last exit's, and the p-value of H0 "risk > delta" is the exact binomial P(Binom(n, delta) <=
    disagreements). Testing in that fixed order at level ``epsilon`` and stopping at the first
    non-rejection controls the family-wise error without a multiplicity correction (Angelopoulos et al.
    2021). Returns ``{threshold, disagreement, p_value, n, delta, epsilon, avg_depth}`` for the loosest
    rejected threshold (2.0, no early exit, when none is rejected).
    """
    from scipy.stats import binom

    if not 0 < delta < 1 or not 0 < epsilon < 1:
        raise DynamicError(f"delta={delta} and epsilon={epsilon} must lie in (0, 1), e.g. delta=0.02, epsilon=0.05.")
    probs, _ = _check_probs(val_probs)
    n = probs.shape[0]
    final = probs[:, -1].argmax(-1)
    grid = sorted(set(ConfidencePolicy.settings_grid(probs, n_points)), reverse=True)
    chosen = {"threshold": 2.0, "disagreement": 0.0, "p_value": None, "avg_depth": float(probs.shape[1])}
    for thr in grid:
        depths = simulate(make_policy("calibrated", thr), probs)
        k = int((probs[np.arange(n), depths - 1].argmax(-1) != final).sum())
        p = float(binom.cdf(k, n, delta))
        if p > epsilon:
            break
        chosen = {"threshold": float(thr), "disagreement": k / n, "p_value": p, "avg_depth": float(depths.mean())}
    return {**chosen, "n": n, "delta": delta, "epsilon": epsilon}


class PlannedPolicy(ExitPolicy):
    """A depth fixed per example before the model runs (``depths``, 1-based; an int for all), named
    ``name``. The registered planned policies (static, complexity, oracle) are its subclasses; use it
    directly for a one-off plan. ``probe=True`` still evaluates every exit (to time what a threshold
    policy pays for its heads)."""

    def __init__(self, depths: np.ndarray | int, name: str = "static", setting: float | None = None,
                 probe: bool = False):
        self.depths = np.asarray(depths, dtype=int)
        if self.depths.ndim > 1 or (self.depths < 1).any():
            raise DynamicError(f"depths must be an int or a 1-D array of depths >= 1, got {depths!r}.")
        super().__init__(float(self.depths.mean()) if setting is None else setting)
        self.name = name
        self.needs_probs = probe

    def subset(self, rows: np.ndarray) -> PlannedPolicy:
        """The same policy for examples ``rows`` only (a batch of the inputs it was planned for)."""
        out = copy.copy(self)
        out.depths = self.depths if self.depths.ndim == 0 else self.depths[rows]
        return out

    def step(self, k, probs, rows):
        d = self.depths if self.depths.ndim == 0 else self.depths[rows]
        return np.broadcast_to(d == k + 1, rows.shape).copy()


@register_policy
class ComplexityPolicy(PlannedPolicy):
    """The complexity predictor's plan: depth ⌈predicted blocks + ``offset``⌉ clipped to 1..blocks, decided
    from the text before the model runs (``ComplexityPredictor.plan``)."""

    name = "complexity"
    needs = {"predictor": "a fitted ComplexityPredictor (ComplexityPredictor(...).fit(val_texts, needed))",
             "texts": "the input texts to plan depths for"}

    def __init__(self, depths: np.ndarray | int, offset: float, probe: bool = False):
        super().__init__(depths, "complexity", offset, probe)

    @classmethod
    def from_needs(cls, setting, predictor=None, texts=None):
        """Features + prediction for ``texts`` happen here (time them with the policy)."""
        if not isinstance(predictor, ComplexityPredictor) or not hasattr(predictor.model, "estimators_"):
            raise DynamicError(f"predictor must be a fitted ComplexityPredictor, got {predictor!r}; call "
                               "ComplexityPredictor(features, n_blocks).fit(val_texts, blocks_needed(...)) first.")
        return predictor.policy(texts, setting)

    @classmethod
    def settings_grid(cls, val_probs, n_points=41):
        """Offsets -blocks..blocks in steps of 0.25 (``n_points`` does not apply)."""
        probs, _ = _check_probs(val_probs)
        n_blocks = probs.shape[1]
        return [float(o) for o in np.arange(-n_blocks, n_blocks + 0.25, 0.25)]


@register_policy
class StaticPolicy(PlannedPolicy):
    """Static truncation at average depth ``setting`` (the baseline): ⌊d⌋ or ⌈d⌉ blocks per example,
    mixed to the exact mean (``static_depths``)."""

    name = "static"
    needs = {"n": "the number of examples to plan for", "n_blocks": "the number of blocks of the model"}
    options = {"seed": "which examples get ⌈d⌉ blocks (default 0)"}
    online = False

    def __init__(self, depths: np.ndarray | int, setting: float | None = None, probe: bool = False):
        super().__init__(depths, "static", setting, probe)

    @classmethod
    def from_needs(cls, setting, n=None, n_blocks=None, seed=0):
        return cls(static_depths(n, setting, n_blocks, seed), setting)

    @classmethod
    def settings_grid(cls, val_probs, n_points=41):
        """Every whole depth 1..blocks (``n_points`` does not apply)."""
        probs, _ = _check_probs(val_probs)
        return [float(d) for d in range(1, probs.shape[1] + 1)]


@register_policy
class OraclePolicy(PlannedPolicy):
    """The bound no policy can beat: each example leaves at its earliest correct exit (``oracle_depths``);
    it needs the labels, so it is a reference, not a deployable policy. ``setting`` is unused."""

    name = "oracle"
    needs = {"probs": "every exit's probabilities (examples, blocks, labels)", "labels": "the true labels"}
    online = False

    def __init__(self, depths: np.ndarray | int, setting: float = 0.0, probe: bool = False):
        super().__init__(depths, "oracle", setting, probe)

    @classmethod
    def from_needs(cls, setting, probs=None, labels=None):
        return cls(oracle_depths(probs, labels), setting)

    @classmethod
    def settings_grid(cls, val_probs, n_points=41):
        """The one (unused) setting 0."""
        _check_probs(val_probs)
        return [0.0]


#: Policies whose decision is made online, from the input or the exits seen so far.
ONLINE_POLICIES = tuple(name for name, cls in _REGISTRY.items() if cls.online)
#: Every registered policy: the online ones, then the planned ones (static truncation, the oracle bound).
POLICIES = (*ONLINE_POLICIES, *(name for name, cls in _REGISTRY.items() if not cls.online))


def make_policy(name: str, setting: float, **needs: Any) -> ExitPolicy:
    """The registered policy ``name`` at ``setting``, built from the inputs its class declares in ``needs``
    (e.g. ``predictor=`` and ``texts=`` for complexity; ``n=`` and ``n_blocks=`` for static; ``probs=``
    and ``labels=`` for oracle) and optionally ``options``."""
    cls = policy_class(name)
    missing = [k for k in cls.needs if needs.get(k) is None]
    if missing:
        what = "; ".join(f"{k}= ({cls.needs[k]})" for k in missing)
        raise DynamicError(f"make_policy({name!r}, setting) is missing {what}.")
    unknown = sorted(set(needs) - set(cls.needs) - set(cls.options))
    if unknown:
        raise DynamicError(f"make_policy({name!r}, ...) does not take {unknown}; it takes "
                           f"{sorted({**cls.needs, **cls.options}) or 'only the setting'}.")
    return cls.from_needs(setting, **needs)


def _check_probs(probs: np.ndarray, labels: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray | None]:
    probs = np.asarray(probs, dtype=float)
    if probs.ndim != 3 or probs.shape[1] < 1 or probs.shape[2] < 2:
        raise DynamicError(f"probs must have shape (examples, blocks, labels >= 2), got {probs.shape}; use "
                           "exit_probs(predict_exits(...)).")
    if labels is not None:
        labels = np.asarray(labels)
        if labels.shape != (probs.shape[0],):
            raise DynamicError(f"labels has shape {labels.shape} but probs has {probs.shape[0]} examples.")
    return probs, labels


def exit_probs(logits: np.ndarray) -> np.ndarray:
    """Softmax over labels of every exit's logits (n, blocks, labels)."""
    return _probs(np.asarray(logits, dtype=float))


def simulate(policy: ExitPolicy, probs: np.ndarray) -> np.ndarray:
    """Depth (blocks executed, 1-based) at which each example exits under ``policy``, from all exits at once.

    The same ``step`` calls as real early exit; the last block always exits.
    """
    probs, _ = _check_probs(probs)
    n, n_blocks, _ = probs.shape
    depth = np.full(n, n_blocks)
    active = np.arange(n)
    policy.start(n)
    for k in range(n_blocks - 1):
        if active.size == 0:
            break
        ex = np.asarray(policy.step(k, probs[active, k] if policy.needs_probs else None, active), dtype=bool)
        depth[active[ex]] = k + 1
        active = active[~ex]
    return depth


def outcome(probs: np.ndarray, labels: np.ndarray, depths: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Predictions and per-example correctness when each example uses the exit at its depth."""
    probs, labels = _check_probs(probs, labels)
    depths = np.asarray(depths, dtype=int)
    if depths.shape != labels.shape or depths.min() < 1 or depths.max() > probs.shape[1]:
        raise DynamicError(f"depths must be one value in 1..{probs.shape[1]} per example.")
    preds = probs[np.arange(len(labels)), depths - 1].argmax(-1)
    return preds, preds == labels


def oracle_depths(probs: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """The bound: the earliest exit whose prediction is correct; 1 where no exit is (no depth can help)."""
    probs, labels = _check_probs(probs, labels)
    right = probs.argmax(-1) == labels[:, None]
    return np.where(right.any(1), right.argmax(1) + 1, 1)


def blocks_needed(probs: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Smallest depth from which every later exit is correct; all blocks where the last exit is wrong.

    The complexity predictor's target: "stays right from here on" is a steadier notion of difficulty
    than "right once by chance".
    """
    probs, labels = _check_probs(probs, labels)
    right = probs.argmax(-1) == labels[:, None]
    n_blocks = probs.shape[1]
    wrong_after = np.cumsum(~right[:, ::-1], axis=1)[:, ::-1]  # wrong exits at depth >= d
    stays = wrong_after == 0
    return np.where(stays[:, -1], stays.argmax(1) + 1, n_blocks)


def static_depths(n: int, avg_depth: float, n_blocks: int, seed: int = 0) -> np.ndarray:
    """Static truncation at a (possibly fractional) average depth: ⌊d⌋ or ⌈d⌉ blocks, mixed in the exact
    proportion that gives mean ``avg_depth`` (a seeded random choice of which examples get ⌈d⌉)."""
    if not 1 <= avg_depth <= n_blocks:
        raise DynamicError(f"avg_depth={avg_depth} must lie in 1..{n_blocks} (blocks of the model).")
    lo = int(math.floor(avg_depth))
    n_hi = int(round((avg_depth - lo) * n))
    depth = np.full(n, lo)
    depth[np.random.default_rng(seed).permutation(n)[:n_hi]] += 1
    return np.minimum(depth, n_blocks)


def settings_grid(name: str, val_probs: np.ndarray, n_points: int = 41) -> list[float]:
    """Settings that span policy ``name``'s range on validation data (its class's ``settings_grid``): e.g.
    quantiles of the normalised entropies / top probabilities seen at the exits (plus never-exit), or
    every patience 0..blocks-1."""
    return policy_class(name).settings_grid(val_probs, n_points)


# --------------------------------------------------------------------------------------------------
# Complexity features and the budget predictor

_WORD = re.compile(r"[a-z0-9]+(?:'[a-z]+)?")
#: Words that flip or weaken polarity; content-free otherwise.
NEGATIONS = frozenset({"not", "no", "never", "nor", "none", "nothing", "neither", "cannot", "without", "hardly",
                       "barely", "n't", "don't", "doesn't", "didn't", "isn't", "wasn't", "aren't", "weren't",
                       "won't", "wouldn't", "couldn't", "shouldn't", "can't"})
#: Discourse markers of contrast: a sentence that turns is harder to read off its first words.
CONTRASTS = frozenset({"but", "however", "although", "though", "yet", "except", "while", "whereas", "despite"})


class ComplexityFeatures:
    """Per-input text features computed before the model runs; ``fit`` on the training split.

    Features (``NAMES``): words, mean word length, type-token ratio (lexical diversity), rare-word rate
    (share of words seen at most ``rare_max_count`` times in training), content-word share (not an
    English stop word: semantic density), polar-word rate (hits of a polarity lexicon learned from the
    training labels: words with smoothed |log-odds| >= ``polar_min_logodds`` and >= ``polar_min_count``
    occurrences), polar conflict (share of hits that disagree with the majority polarity of the input),
    negations, contrast markers, and '!'/'?' count.
    """

    NAMES = ("n_words", "mean_word_len", "type_token_ratio", "rare_rate", "content_share", "polar_rate",
             "polar_conflict", "negations", "contrasts", "exclaim_question")

    def __init__(self, rare_max_count: int = 1, polar_min_count: int = 3, polar_min_logodds: float = 1.0):
        self.rare_max_count = rare_max_count
        self.polar_min_count = polar_min_count
        self.polar_min_logodds = polar_min_logodds
        self.counts: Counter | None = None
        self.polar: dict[str, int] = {}

    @staticmethod
    def words(text: str) -> list[str]:
        """Lower-cased word tokens (letters/digits, with an optional apostrophe suffix)."""
        return _WORD.findall(text.lower())

    def fit(self, texts: Sequence[str], labels: Sequence[int]) -> ComplexityFeatures:
        """Count training words and learn the polarity lexicon (one-vs-rest smoothed log-odds per class)."""
        labels = np.asarray(labels)
        if len(texts) != len(labels) or len(texts) == 0:
            raise DynamicError(f"fit needs one label per text; got {len(texts)} texts and {len(labels)} labels.")
        self.counts = Counter()
        per_class: dict[int, Counter] = {int(c): Counter() for c in np.unique(labels)}
        for text, y in zip(texts, labels, strict=True):
            ws = self.words(text)
            self.counts.update(ws)
            per_class[int(y)].update(ws)
        vocab = len(self.counts)
        totals = {c: sum(cnt.values()) for c, cnt in per_class.items()}
        grand = sum(totals.values())
        self.polar = {}
        for w, n in self.counts.items():
            if n < self.polar_min_count or len(per_class) < 2:
                continue
            best_c, best_lo = -1, 0.0
            for c, cnt in per_class.items():
                rest = n - cnt[w]
                lo = math.log((cnt[w] + 1) / (totals[c] + vocab)) - math.log((rest + 1) / (grand - totals[c] + vocab))
                if lo > best_lo:
                    best_c, best_lo = c, lo
            if best_lo >= self.polar_min_logodds:
                self.polar[w] = best_c
        return self

    def transform(self, texts: Sequence[str]) -> np.ndarray:
        """Feature matrix (n, len(NAMES)), float64."""
        if self.counts is None:
            raise DynamicError("ComplexityFeatures is not fitted; call fit(train_texts, train_labels) first.")
        from sklearn.feature_extraction.text import ENGLISH_STOP_WORDS

        out = np.zeros((len(texts), len(self.NAMES)))
        for i, text in enumerate(texts):
            ws = self.words(text)
            n = max(len(ws), 1)
            hits = [self.polar[w] for w in ws if w in self.polar]
            major = Counter(hits).most_common(1)[0][1] if hits else 0
            out[i] = (len(ws), sum(map(len, ws)) / n, len(set(ws)) / n,
                      sum(self.counts.get(w, 0) <= self.rare_max_count for w in ws) / n,
                      sum(w not in ENGLISH_STOP_WORDS for w in ws) / n, len(hits) / n,
                      (len(hits) - major) / len(hits) if hits else 0.0,
                      sum(w in NEGATIONS for w in ws), sum(w in CONTRASTS for w in ws),
                      text.count("!") + text.count("?"))
        return out


class ComplexityPredictor:
    """Predicts the blocks an input needs from ``ComplexityFeatures`` with a small gradient-boosted
    regressor (sklearn; 100 depth-2 trees), fitted on validation data; its ``policy`` plans a depth
    per input = ⌈prediction + offset⌉ clipped to 1..blocks, so ``offset`` trades depth for accuracy."""

    def __init__(self, features: ComplexityFeatures, n_blocks: int, seed: int = 0):
        from sklearn.ensemble import GradientBoostingRegressor

        self.features = features
        self.n_blocks = n_blocks
        self.seed = seed
        self.model = GradientBoostingRegressor(n_estimators=100, max_depth=2, learning_rate=0.05, subsample=0.8,
                                               random_state=seed)

    def _target(self, texts: Sequence[str], needed: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        needed = np.asarray(needed, dtype=float)
        if needed.shape != (len(texts),) or needed.min() < 1 or needed.max() > self.n_blocks:
            raise DynamicError(f"needed must hold one depth in 1..{self.n_blocks} per text (blocks_needed(...)).")
        return self.features.transform(texts), needed

    def fit(self, texts: Sequence[str], needed: np.ndarray) -> ComplexityPredictor:
        """Fit on (validation) texts and their ``blocks_needed``."""
        self.model.fit(*self._target(texts, needed))
        return self

    def out_of_fold(self, texts: Sequence[str], needed: np.ndarray, folds: int = 5) -> np.ndarray:
        """Cross-validated predictions on the fitting data, so a setting calibrated on them is not optimistic."""
        from sklearn.base import clone
        from sklearn.model_selection import KFold, cross_val_predict

        x, y = self._target(texts, needed)
        folds = min(folds, len(y))
        if folds < 2:
            raise DynamicError("out_of_fold needs at least 2 examples.")
        return cross_val_predict(clone(self.model), x, y, cv=KFold(folds, shuffle=True, random_state=self.seed))

    def predict(self, texts: Sequence[str]) -> np.ndarray:
        """Predicted blocks needed per text (float). The features are finite by construction, so sklearn's
        finiteness check (a sizeable share of a one-input prediction) is skipped."""
        from sklearn import config_context

        with config_context(assume_finite=True):
            return self.model.predict(self.features.transform(texts))

    def plan(self, predicted: np.ndarray, offset: float) -> np.ndarray:
        """Depths ⌈predicted + offset⌉ clipped to 1..blocks."""
        return np.clip(np.ceil(np.asarray(predicted) + offset - 1e-9), 1, self.n_blocks).astype(int)

    def policy(self, texts: Sequence[str], offset: float) -> ComplexityPolicy:
        """The planned-depth policy for ``texts`` (features + prediction happen here: time them with it)."""
        return ComplexityPolicy(self.plan(self.predict(texts), offset), offset)


@dataclass
class _Timer:
    dev: torch.device

    def now(self) -> float:
        if self.dev.type == "cuda":
            torch.cuda.synchronize(self.dev)
        return time.perf_counter()


# --------------------------------------------------------------------------------------------------
# Curves


def curve(probs: np.ndarray, labels: np.ndarray, name: str, settings: Sequence[float],
          depth_fn: Callable[[float], np.ndarray] | None = None, latency_ms: np.ndarray | None = None,
          ) -> pd.DataFrame:
    """One row per setting: ``policy, setting, avg_depth, accuracy`` (+ ``pred_latency_ms`` when the
    per-depth latency profile ``latency_ms[d - 1]`` is given). ``depth_fn(setting)`` gives depths for
    planned policies; otherwise ``make_policy(name, setting)`` is simulated."""
    probs, labels = _check_probs(probs, labels)
    rows = []
    for s in settings:
        depths = depth_fn(s) if depth_fn is not None else simulate(make_policy(name, s), probs)
        _, correct = outcome(probs, labels, depths)
        row = {"policy": name, "setting": float(s), "avg_depth": float(depths.mean()),
               "accuracy": float(correct.mean())}
        if latency_ms is not None:
            row["pred_latency_ms"] = float(np.asarray(latency_ms)[depths - 1].mean())
        rows.append(row)
    return pd.DataFrame(rows)


# --------------------------------------------------------------------------------------------------
# Latency per depth


@torch.no_grad()
def depth_profile(model: nn.Module, heads: ExitHeads, tokenizer: Any, texts: Sequence[str], max_length: int = 128,
                  device: str | torch.device = "auto") -> pd.DataFrame:
    """Batch-1 latency of stopping at each depth, from one timestamped pass per input (median over inputs).

    Columns: ``depth``, ``planned_ms`` (embed + blocks 1..d + exit d: a depth fixed in advance) and
    ``probed_ms`` (the same plus every earlier exit: what a threshold policy pays).
    """
    dev = pick(device)
    model.eval().to(dev)
    heads.eval().to(dev)
    timer = _Timer(dev)
    n_blocks = layers.num_blocks(model)
    blocks, head_ms = np.zeros((len(texts), n_blocks)), np.zeros((len(texts), n_blocks))
    for i, text in enumerate([texts[0], *texts]):  # the first pass warms up
        batch = {k: v.to(dev) for k, v in _encode(tokenizer, [text], max_length).items()}
        t0 = timer.now()
        hidden = layers.embed(model, batch)
        spent, row_b, row_h = 0.0, [], []  # row_b[k]: ms to the end of block k, exits excluded
        for k in range(n_blocks):
            hidden = layers.block_forward(model, k, hidden, batch["attention_mask"])
            t1 = timer.now()
            row_b.append((t1 - t0) * 1000 - spent)
            heads.head(k, heads.pool(hidden, batch["attention_mask"]))
            row_h.append((timer.now() - t1) * 1000)
            spent += row_h[-1]
        if i > 0:
            blocks[i - 1], head_ms[i - 1] = row_b, row_h
    b, h = np.median(blocks, 0), np.median(head_ms, 0)
    return pd.DataFrame({"depth": np.arange(1, n_blocks + 1), "planned_ms": b + h, "probed_ms": b + np.cumsum(h)})


# --------------------------------------------------------------------------------------------------
# A fair exit-trained model, a lean runtime, and shipping it


def recipe_exit_config(recipe: Any, distill: float = 0.5, head_lr: float = 1e-3, weighting: str = "linear",
                       pooling: str = "mean", epochs_run: int | None = None,
                       steps_run: int | None = None) -> ExitTrainConfig:
    """Joint exit training with the reference's fine-tuning recipe (a ``train.TrainConfig``): same
    learning rate, batch, warm-up, weight decay and clipping, from the same pretrained weights.

    With ``epochs_run`` / ``steps_run`` (what the reference's early stopping actually ran) the exit model
    trains exactly that long, without stopping earlier, and keeps the checkpoint with the lowest
    validation loss of its *last* exit: the reference's own selection rule, so both models get the same
    epochs, data and checkpoint criterion (issue 18's fair reference). Without them it uses the recipe's
    caps and patience. Only the heads (``head_lr``) and the loss (depth-weighted exits plus ``distill``)
    differ from the reference."""
    epochs = epochs_run or recipe.epochs
    cfg = ExitTrainConfig(mode="joint", pooling=pooling, epochs=epochs, lr=recipe.lr, head_lr=head_lr,
                          batch_size=recipe.batch_size, weighting=weighting, weight_decay=recipe.weight_decay,
                          warmup_ratio=recipe.warmup_ratio,
                          patience=epochs if epochs_run else recipe.patience, max_length=recipe.max_length,
                          grad_clip=recipe.grad_clip, distill=distill,
                          max_steps=steps_run or recipe.max_steps, stop_on="last")
    cfg.validate()
    return cfg


def fair_exit_model(name: str, seed: int, task: Any, tiny: bool = False, distill: float = 0.5,
                    head_lr: float = 1e-3, weighting: str = "linear", device: str | torch.device = "auto",
                    ) -> dict[str, Any]:
    """The exit-trained model of standard model ``name`` and its fair reference, for ``seed`` on ``task``.

    The reference is the chapters' shared fine-tuned classifier (``train.baseline``: the recipe searched
    on validation, early-stopped on validation loss). The exit-trained model starts from the same
    pretrained weights (same seed, same head initialisation) and trains backbone + exits jointly with
    that recipe for exactly the epochs and steps the reference ran, keeping its best last-exit validation
    loss (:func:`recipe_exit_config`), on the same split; both are cached. Returns ``{"model", "heads",
    "tokenizer", "reference", "splits", "record", "reference_record", "config"}``; ``record["failed"]``
    applies the failed-training rule to the exit model's last exit.
    """
    from . import models, train

    reference, tok, ref_rec = train.baseline(name, seed, tiny, task, device=device)
    hist = ref_rec["history"]
    epochs_run = max(1, math.ceil(max(r["epoch"] for r in hist) - 1e-9)) if hist else None
    steps_run = int(max(r["step"] for r in hist)) if hist else None
    cfg = recipe_exit_config(train.recipe(name, task, tiny, device), distill, head_lr, weighting,
                             epochs_run=epochs_run, steps_run=steps_run)
    spec = train.standard_spec(name, tiny)
    splits = train.load_task(task, seed)
    seed_everything(seed)
    start = models.build_classifier(spec, task.num_labels, seed=seed)
    base_key = "pretrained:" + hashlib.sha256(json.dumps(asdict(spec), sort_keys=True).encode()).hexdigest()[:16]
    model, heads, rec = exit_model(start, tok, base_key, splits["train"], splits["val"], cfg, seed, device)
    best = min(rec["history"], key=lambda r: r["val_loss_last"])
    rec["failed"] = train.failed_accuracy(best["val_acc_last"], train.majority_share(splits["val"]["label"]))
    return {"model": model, "heads": heads, "tokenizer": tok, "reference": reference, "splits": splits,
            "record": rec, "reference_record": ref_rec, "config": cfg}


class ExitRunner:
    """Real early exit with as little Python around the blocks as possible.

    Measured on MiniLM at batch 1 (25-token snippets, 2 threads), a generic loop
    (``layers.block_forward`` per block, which re-validates the index and rebuilds the attention mask
    every block) costs about 13 % over the plain Hugging Face forward at full depth; the lean loop here
    about 3 %. What it removes: the mask and block context are prepared once
    per batch (again only when the batch shrinks); an unpadded batch (always so at batch 1) runs without
    a mask, on the fast unmasked attention path; exits are evaluated only where the policy reads them.
    The controller (softmax, the policy's ``step``) stays inside the timed region.
    """

    def __init__(self, model: nn.Module, heads: ExitHeads):
        self.model, self.heads = model.eval(), heads.eval()
        self.adapter = layers.adapter_for(model)
        self.adapter.check_runnable(model)
        self.blocks = self.adapter.blocks(model)
        if len(self.blocks) != heads.n_blocks:
            raise DynamicError(f"the model has {len(self.blocks)} blocks but the heads {heads.n_blocks}; load the "
                               "heads trained for this model.")
        self.device = next(model.parameters()).device

    def _context(self, hidden: torch.Tensor, mask: torch.Tensor, padded: bool) -> dict[str, Any]:
        ctx = self.adapter.context(self.model, hidden, mask)
        if not padded and self.adapter.mask_optional(self.model) and "mask" in ctx:
            ctx["mask"] = None  # nothing to mask: take the unmasked attention kernel
        return ctx

    @torch.inference_mode()
    def __call__(self, batch: dict[str, torch.Tensor], policy: ExitPolicy,
                 shrink: bool = True) -> tuple[np.ndarray, np.ndarray]:
        """``(logits, depths)`` of ``batch`` under ``policy``; ``shrink`` drops exited rows from the batch."""
        ids = batch["input_ids"].to(self.device)
        mask = batch.get("attention_mask")
        mask = torch.ones_like(ids) if mask is None else mask.to(self.device)
        padded = bool((mask == 0).any())
        hidden = self.adapter.embed(self.model, ids, batch)
        ctx = self._context(hidden, mask, padded)
        n, last = ids.shape[0], len(self.blocks) - 1
        out = np.zeros((n, self.heads.spec["num_labels"]), dtype=np.float32)
        depth = np.full(n, last + 1)
        active = np.arange(n)  # examples not yet exited
        rows = np.arange(n)  # the row of `hidden` that holds each active example
        policy.start(n)

        def exit_logits(k: int, sel: np.ndarray) -> torch.Tensor:
            """Exit k's logits for the rows ``sel`` of the current ``hidden``."""
            if sel.size == hidden.shape[0]:
                return self.heads.head(k, self.heads.pool(hidden, mask if padded else None))
            t = torch.as_tensor(sel, device=self.device)
            return self.heads.head(k, self.heads.pool(hidden[t], mask[t] if padded else None))

        for k, block in enumerate(self.blocks):
            hidden = self.adapter.run_block(block, hidden, ctx)
            if k == last:
                out[active] = exit_logits(k, rows).float().cpu().numpy()
                break
            if policy.needs_probs:
                logits = exit_logits(k, rows)
                ex = np.asarray(policy.step(k, torch.softmax(logits.float(), -1).cpu().numpy(), active), bool)
                if ex.any():
                    out[active[ex]] = logits[torch.as_tensor(ex, device=self.device)].float().cpu().numpy()
            else:
                ex = np.asarray(policy.step(k, None, active), bool)
                if ex.any():
                    out[active[ex]] = exit_logits(k, rows[ex]).float().cpu().numpy()
            if not ex.any():
                continue
            depth[active[ex]] = k + 1
            active, rows = active[~ex], rows[~ex]
            if active.size == 0:
                break
            if shrink:
                keep = torch.as_tensor(rows, device=self.device)
                hidden, mask = hidden[keep], mask[keep]
                rows = np.arange(active.size)
                padded = bool((mask == 0).any())
                ctx = self._context(hidden, mask, padded)
        return out, depth


def encode_each(tokenizer: Any, texts: Sequence[str], max_length: int, batch_size: int = 1) -> list[tuple]:
    """Tokenised batches for timing: ``(indices, batch)`` per batch, length-bucketed (batch 1: one input each)."""
    texts = list(texts)
    return [(i, _encode(tokenizer, [texts[j] for j in i], max_length))
            for i in _batch_plan(_lengths(tokenizer, texts, max_length), batch_size)]


@torch.no_grad()
def time_configs(configs: dict[str, Callable[[Any, np.ndarray], tuple[np.ndarray, np.ndarray] | None]],
                 batches: list[tuple], repeats: int = 3, device: str | torch.device = "cpu") -> pd.DataFrame:
    """Per-batch latency of several ways of running the same ``batches``, interleaved so drift hits all alike.

    ``configs[name](batch, indices)`` runs one batch (returning ``(logits, depths)`` or None); every
    repeat runs every config over all batches, the configs in a rotated order. Returns one row per
    (config, batch): ``config, batch, n (inputs), ms`` (the median over ``repeats`` of that batch's
    time), ``depth_mean``, and the predictions of the last repeat as ``preds`` (a list per batch).
    """
    if repeats < 1 or not configs or not batches:
        raise DynamicError("time_configs needs >= 1 repeat, >= 1 config and >= 1 batch.")
    timer = _Timer(torch.device(device) if not isinstance(device, torch.device) else device)
    names = list(configs)
    times = {c: np.zeros((repeats, len(batches))) for c in names}
    result: dict[str, list] = {c: [None] * len(batches) for c in names}
    for c in names:  # warm-up
        configs[c](batches[0][1], batches[0][0])
    for r in range(repeats):
        for c in names[r % len(names):] + names[:r % len(names)]:
            fn = configs[c]
            for j, (idx, batch) in enumerate(batches):
                t0 = timer.now()
                got = fn(batch, idx)
                times[c][r, j] = (timer.now() - t0) * 1000
                result[c][j] = got
    rows = []
    for c in names:
        med = np.median(times[c], 0)
        for j, (idx, _) in enumerate(batches):
            got = result[c][j]
            rows.append({"config": c, "batch": j, "n": len(idx), "ms": float(med[j]),
                         "depth_mean": float(np.mean(got[1])) if got is not None else math.nan,
                         "preds": got[0].argmax(-1).tolist() if got is not None else None})
    return pd.DataFrame(rows)


EXIT_FILE = "exit_config.json"


def save_exit_model(folder: str | Path, model: nn.Module, heads: ExitHeads, tokenizer: Any, policy: str,
                    setting: float, info: dict[str, Any] | None = None) -> Path:
    """Save an exit-enabled model: the backbone and tokenizer as a Hugging Face folder (loads with
    transformers alone), ``exit_heads.safetensors`` and ``exit_config.json`` (heads' shape, the policy
    and its setting, and ``info`` such as the calibration's guarantee). Reload with :func:`load_exit_model`."""
    from safetensors.torch import save_file

    if policy not in ONLINE_POLICIES:
        raise DynamicError(f"policy={policy!r}: a saved model needs an online policy, one of {ONLINE_POLICIES}.")
    if policy == "complexity":
        raise DynamicError("the complexity policy needs its fitted predictor, which is not saved; choose a "
                           "threshold policy (entropy, confidence, calibrated or patience).")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    save_file({k: v.detach().cpu().contiguous() for k, v in heads.state_dict().items()},
              str(folder / "exit_heads.safetensors"))
    atomic_write_json(folder / EXIT_FILE, {"heads": heads.spec, "policy": policy, "setting": float(setting),
                                           "max_length": int(getattr(tokenizer, "model_max_length", 512) or 512)
                                           if not info or "max_length" not in info else int(info["max_length"]),
                                           "info": info or {}})
    return folder


class ExitModel:
    """A saved exit-enabled model, loaded: ``predict(texts)`` returns ``(logits, depths)`` with real early
    exit (batch 1 by default: each input leaves at its own depth)."""

    def __init__(self, folder: str | Path, device: str | torch.device = "auto"):
        from safetensors.torch import load_file
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        folder = Path(folder)
        if not (folder / EXIT_FILE).is_file():
            raise DynamicError(f"{folder} has no {EXIT_FILE}; save the model with dynamic.save_exit_model first.")
        self.config = json.loads((folder / EXIT_FILE).read_text())
        dev = pick(device)
        self.model = AutoModelForSequenceClassification.from_pretrained(folder).eval().to(dev)
        self.tokenizer = AutoTokenizer.from_pretrained(folder)
        self.heads = ExitHeads(**self.config["heads"])
        self.heads.load_state_dict(load_file(str(folder / "exit_heads.safetensors")))
        self.heads.eval().to(dev)
        self.runner = ExitRunner(self.model, self.heads)

    def policy(self) -> ExitPolicy:
        """The saved policy at its saved setting."""
        return make_policy(self.config["policy"], self.config["setting"])

    def predict(self, texts: Sequence[str], batch_size: int = 1) -> tuple[np.ndarray, np.ndarray]:
        """Logits (n, labels) and exit depths (n,) of ``texts``, in input order."""
        if isinstance(texts, str) or len(texts) == 0:
            raise DynamicError("texts must be a non-empty list of strings.")
        logits = np.zeros((len(texts), self.heads.spec["num_labels"]), dtype=np.float32)
        depths = np.zeros(len(texts), dtype=int)
        for idx, batch in encode_each(self.tokenizer, texts, self.config["max_length"], batch_size):
            out, d = self.runner(batch, self.policy())
            logits[idx], depths[idx] = out, d
        return logits, depths


def load_exit_model(folder: str | Path, device: str | torch.device = "auto") -> ExitModel:
    """Load a folder written by :func:`save_exit_model`."""
    return ExitModel(folder, device)


#: The code whose hash keys cached exit heads (``cache.code_key``): the builder, every helper of this module it
#: reaches (``cache.reachable``: the training loops, the exit loss, the pooling, the heads) and :mod:`layers`,
#: which runs the blocks they read. Bound at the end of the module, when every helper exists, so that a test
#: replacing one of these names (to prove a second call reads the cache) does not change the key.
_EXIT_CODE = (*reachable(exit_model, train_exits), train_mod.Optimizer, layers)
