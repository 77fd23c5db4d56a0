"""Seeded fine-tuning and evaluation, with a content-addressed cache of trained models.

``fine_tune`` is a plain loop (AdamW, linear warm-up/decay, gradient clipping, early stopping on
validation loss, best weights restored) so that every step is visible and deterministic on CPU. Its optimizer,
:class:`Optimizer`, is the kit's one update rule: the step-budget healing of ``analyze`` and the exit heads'
joint training step through it too, so a change to the schedule or the clipping reaches every trainer.
``get_trained`` wraps it in the cache: the key is everything that determines the weights (model spec,
task spec, training config, seed), so notebooks stay independent and nothing is trained twice.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, replace
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from sklearn.metrics import f1_score

from . import data as data_mod
from . import models
from .cache import atomic_write_json, cached_dir, code_key, file_digest, reachable
from .device import pick, progress, seed_everything
from .errors import LayerwiseError


@dataclass(frozen=True)
class TrainConfig:
    """Hyper-parameters of one fine-tuning run."""

    epochs: int = 4
    lr: float = 5e-5
    batch_size: int = 32
    weight_decay: float = 0.01
    warmup_ratio: float = 0.1
    patience: int = 2
    max_steps: int | None = None
    max_length: int = 128
    eval_every: int | None = None
    grad_clip: float = 1.0

    def validate(self) -> None:
        """Fail fast on impossible settings."""
        if self.epochs < 1 or self.batch_size < 1 or self.lr <= 0 or self.max_length < 8:
            raise LayerwiseError(f"invalid TrainConfig {self}: need epochs>=1, batch_size>=1, lr>0, max_length>=8.")


@dataclass(frozen=True)
class TaskSpec:
    """Which data a model is trained on: domain, label mode, neutral band, training-set cap.

    A task read from your own file (:func:`file_task`) has ``source`` (the file's absolute path), ``source_name``
    (its name in metric keys), ``digest`` (SHA-256 of its content: part of every cache key, so an edited file
    retrains) and ``labels`` (the class names); ``domain``, ``label_mode`` and ``neutral_band`` are then unused.
    """

    domain: str = "amazon"
    label_mode: str = "polarity"
    neutral_band: float = 0.5
    max_train: int | None = None
    max_eval: int | None = None
    source: str | None = None
    source_name: str | None = None
    digest: str | None = None
    labels: tuple[str, ...] | None = None

    @property
    def num_labels(self) -> int:
        if self.labels is not None:
            return len(self.labels)
        return {"polarity": 2, "bins5": 5, "regression": 1}[self.label_mode]

    @property
    def name(self) -> str:
        """The task's name in metric keys: ``amazon``, ``mr`` (the movie-review snippets) or a file's name."""
        return self.source_name or data_mod.domain_task(self.domain)


def task_spec(name: str = "amazon", tiny: bool = False, label_mode: str = "polarity",
              neutral_band: float = 0.5) -> TaskSpec:
    """The TaskSpec of a named task (``amazon`` or ``mr``); capped at :data:`SMOKE_TASK` sizes when ``tiny``."""
    base = SMOKE_TASK if tiny else TaskSpec()
    return replace(base, domain=data_mod.task_domain(name), label_mode=label_mode, neutral_band=neutral_band)


def file_task(name: str, path: str | Path, tiny: bool = False) -> TaskSpec:
    """The TaskSpec of your own labelled data file (``data.load_labelled_file``: CSV/TSV/JSONL with ``text`` and
    ``label`` columns, Amazon Reviews 2023 JSONL, a ``datasets`` folder), named ``name`` in metric keys.

    The file is read and checked here (columns, labels, rows per label), before any model loads; it is split
    70/15/15 by seed like the built-in tasks. ``tiny`` caps it at :data:`SMOKE_TASK` sizes. A chapter asks
    for the same task once per unit, so the result is kept for as long as the file's size and time stay.
    """
    path = Path(path).expanduser().resolve()
    stat = path.stat() if path.exists() else None
    return _file_task(name, str(path), tiny, (stat.st_size, stat.st_mtime_ns) if stat else None)


@lru_cache(maxsize=64)
def _file_task(name: str, path: str, tiny: bool, stamp: tuple[int, int] | None) -> TaskSpec:
    _, labels = data_mod.load_labelled_file(path)
    base = SMOKE_TASK if tiny else TaskSpec()
    return replace(base, source=path, source_name=name, digest=file_digest(Path(path)), labels=labels)


#: A training run whose validation accuracy is within this many points of the majority class learned nothing
#: usable (evidence protocol, rule 3): it is counted and reported, never averaged into a result.
FAILED_MARGIN = 0.01


def majority_share(labels: Any) -> float:
    """Share of the most frequent label: the accuracy of always predicting it."""
    values = np.asarray(labels)
    if values.size == 0:
        raise LayerwiseError("majority_share needs at least one label.")
    return float(np.unique(values, return_counts=True)[1].max() / values.size)


def failed_accuracy(accuracy: float, majority: float) -> bool:
    """Whether a validation ``accuracy`` marks a failed training: at most ``majority`` (the share of the most
    frequent label, :func:`majority_share`) + :data:`FAILED_MARGIN`.

    A model that does no better than always predicting the majority class learned nothing usable, so
    its results are counted and reported apart, never averaged in (evidence protocol, rule 3). The one
    place the rule is written: :func:`is_failed` applies it to a training record, and the exit-trained
    models of :mod:`analysis_kit.dynamic` to their last exit.
    """
    return bool(accuracy <= majority + FAILED_MARGIN)


def is_failed(record: dict[str, Any]) -> bool:
    """Whether a trained model is a failed training (:func:`failed_accuracy` of its validation accuracy)."""
    acc, majority = record.get("val", {}).get("accuracy"), record.get("val_majority")
    if acc is None or majority is None:
        return False  # regression, or a record without the majority share: not decidable, not failed
    return failed_accuracy(acc, majority)


def load_task(task: TaskSpec, seed: int) -> dict[str, pd.DataFrame]:
    """Load, split (seeded, stratified) and optionally subsample the task's data."""
    if task.label_mode not in data_mod.LABEL_MODES:
        raise LayerwiseError(f"label_mode {task.label_mode!r} unknown; choose from {data_mod.LABEL_MODES}.")
    if task.source is not None:
        df, labels = data_mod.load_labelled_file(task.source)
        if labels != task.labels or file_digest(Path(task.source)) != task.digest:
            raise LayerwiseError(f"{task.source} changed since its task was set up (labels or content differ); "
                                 "start the run again so that every model sees the same data.")
    else:
        df = data_mod.load_snippets(task.domain, task.label_mode, task.neutral_band)
    splits = data_mod.split(df, seed=seed, stratify=task.label_mode != "regression")
    strat = task.label_mode != "regression"
    if task.max_train is not None and len(splits["train"]) > task.max_train:
        splits["train"] = data_mod.subsample(splits["train"], task.max_train, seed, stratify=strat)
    if task.max_eval is not None:
        for name in ("val", "test"):
            if len(splits[name]) > task.max_eval:
                splits[name] = data_mod.subsample(splits[name], task.max_eval, seed, stratify=strat)
    return splits


def _loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    if logits.shape[-1] == 1:
        return F.mse_loss(logits.squeeze(-1), labels.float())
    return F.cross_entropy(logits, labels.long())


def _batches(tokenizer, df: pd.DataFrame, cfg_batch: int, max_length: int, shuffle: bool, seed: int):
    labels = df["label"].to_numpy()
    return data_mod.make_loader(tokenizer, df["text"].tolist(), labels, batch_size=cfg_batch, shuffle=shuffle,
                                seed=seed, max_length=max_length, bucket=True)


class Optimizer:
    """The kit's one update rule: AdamW, linear warm-up then linear decay to zero, gradient clipping.

    ``sources`` are ``(parameters, learning rate)`` pairs (one for a model; the exit heads' joint training
    adds its heads at their own rate); of each, only the parameters that require gradients train, weights
    (``ndim > 1``) with ``weight_decay`` and biases and norms without, as BERT's recipe does. The learning
    rate rises linearly over the first ``max(1, int(warmup_ratio · total))`` steps and falls linearly to zero
    at step ``total``. :meth:`step` clips the gradient norm over every trained parameter (in ``sources``'
    order) to ``grad_clip`` before the update.
    """

    def __init__(self, sources: Sequence[tuple[Iterable[torch.nn.Parameter], float]], total: int,
                 weight_decay: float, warmup_ratio: float, grad_clip: float) -> None:
        trained = [[p for p in params if p.requires_grad] for params, _ in sources]
        self.params = [p for group in trained for p in group]
        if not self.params:
            raise LayerwiseError("no parameter of the model requires gradients; unfreeze the part to train.")
        groups = [{"params": [p for p in group if (p.ndim > 1) == decay], "lr": lr,
                   "weight_decay": weight_decay if decay else 0.0}
                  for group, (_, lr) in zip(trained, sources, strict=True) for decay in (True, False)]
        self.opt = torch.optim.AdamW([g for g in groups if g["params"]])
        self.total, self.warm, self.grad_clip = total, max(1, int(warmup_ratio * total)), grad_clip
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, self.lr_factor)

    def lr_factor(self, s: int) -> float:
        """The schedule's multiplier of the learning rate at step ``s`` (0-based)."""
        return (s + 1) / self.warm if s < self.warm else max(0.0, (self.total - s) / max(1, self.total - self.warm))

    def step(self, loss: torch.Tensor) -> None:
        """One update from ``loss``: gradients, clipping, AdamW, the schedule's next rate."""
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.params, self.grad_clip)
        self.opt.step()
        self.sched.step()


@torch.no_grad()
def predict(model, tokenizer, texts: list[str], batch_size: int = 64, max_length: int = 128,
            device: str | torch.device = "auto") -> np.ndarray:
    """Logits for ``texts`` in their original order, shape (n, num_labels).

    Texts are batched in order of length (then put back in order), so a batch pads to similar lengths:
    padding is masked, so this changes only the speed (about 2x on snippets), not the logits.
    """
    dev = pick(device)
    model.eval().to(dev)
    texts = list(texts)
    order = np.argsort([len(t) for t in texts], kind="stable")
    loader = data_mod.make_loader(tokenizer, [texts[i] for i in order], np.zeros(len(texts)), batch_size=batch_size,
                                  shuffle=False, seed=0, max_length=max_length, bucket=False)
    out = []
    for batch in loader:
        batch = {k: v.to(dev) for k, v in batch.items() if k != "labels"}
        out.append(model(**batch).logits.float().cpu())
    logits = torch.cat(out).numpy()
    restored = np.empty_like(logits)
    restored[order] = logits
    return restored


def metrics_from_logits(logits: np.ndarray, labels: np.ndarray) -> dict[str, Any]:
    """Accuracy, macro-F1, loss and per-example arrays (probs, preds, correct, entropy)."""
    logits_t = torch.as_tensor(logits)
    labels = np.array(labels)  # a copy: pandas' copy-on-write arrays are read-only, which torch warns about
    if logits.shape[1] == 1:
        pred = logits[:, 0]
        mse = float(np.mean((pred - labels) ** 2))
        return {"mse": mse, "loss": mse, "pearson": float(np.corrcoef(pred, labels)[0, 1]), "preds": pred}
    probs = torch.softmax(logits_t, -1).numpy()
    preds = probs.argmax(1)
    loss = float(F.cross_entropy(logits_t, torch.as_tensor(labels).long()).item())
    entropy = -(probs * np.log(np.clip(probs, 1e-12, 1))).sum(1)
    return {
        "accuracy": float((preds == labels).mean()),
        "macro_f1": float(f1_score(labels, preds, average="macro", labels=list(range(logits.shape[1])),
                                   zero_division=0)),
        "loss": loss,
        "probs": probs,
        "preds": preds,
        "correct": preds == labels,
        "entropy": entropy,
    }


def evaluate(model, tokenizer, df: pd.DataFrame, batch_size: int = 64, max_length: int = 128,
             device: str | torch.device = "auto") -> dict[str, Any]:
    """Evaluate on a frame with ``text`` and ``label`` columns; see :func:`metrics_from_logits`."""
    logits = predict(model, tokenizer, df["text"].tolist(), batch_size, max_length, device)
    return metrics_from_logits(logits, df["label"].to_numpy())


#: ``loss_fn(model, batch, labels) -> loss`` of :func:`fine_tune` (``batch`` without its labels, on the device).
LossFn = Callable[[Any, dict[str, torch.Tensor], torch.Tensor], torch.Tensor]


def fine_tune(model, tokenizer, train_df: pd.DataFrame, val_df: pd.DataFrame, cfg: TrainConfig, seed: int,
              device: str | torch.device = "auto", loss_fn: LossFn | None = None) -> tuple[Any, pd.DataFrame]:
    """Train ``model`` on ``train_df``; early-stop on validation loss and restore the best weights.

    The kit's fine-tuning loop: :class:`Optimizer` (AdamW without decay on biases and norms, linear warm-up then
    decay, gradient clipping) over the parameters that require gradients (freeze some to train a part), validation every
    ``cfg.eval_every`` steps of each epoch and at its end (default: once, at the end). ``loss_fn`` replaces
    the label loss (e.g. distillation from a teacher, :mod:`analysis_kit.heal`); validation always reads the
    label loss, so early stopping and the best weights are chosen on the task whatever the training objective.

    Returns the model (best validation weights) and a history frame (step, epoch, examples, train_loss,
    val_loss, val_accuracy or val_mse, seconds).
    """
    cfg.validate()
    if len(train_df) == 0 or len(val_df) == 0:
        raise LayerwiseError("empty training or validation set; lower neutral_band or raise max_train.")
    dev = pick(device)
    seed_everything(seed)
    model.to(dev)
    steps_per_epoch = math.ceil(len(train_df) / cfg.batch_size)
    total = cfg.epochs * steps_per_epoch if cfg.max_steps is None else min(cfg.max_steps, cfg.epochs * steps_per_epoch)
    eval_every = cfg.eval_every or steps_per_epoch
    opt = Optimizer([(model.parameters(), cfg.lr)], total, cfg.weight_decay, cfg.warmup_ratio, cfg.grad_clip)
    state = {"best": math.inf, "weights": None, "bad": 0}
    step, seen, rows, run_loss = 0, 0, [], []
    start = time.time()

    def validate() -> None:
        """Evaluate, log a history row, keep the best weights and count evaluations without progress."""
        val = evaluate(model, tokenizer, val_df, max_length=cfg.max_length, device=dev)
        row = {"step": step, "epoch": step / steps_per_epoch, "examples": seen, "train_loss": float(np.mean(run_loss)),
               "val_loss": val["loss"], "seconds": time.time() - start}
        row.update({f"val_{k}": val[k] for k in ("accuracy", "macro_f1", "mse") if k in val})
        rows.append(row)
        run_loss.clear()
        if val["loss"] < state["best"] - 1e-6:
            state.update(best=val["loss"], bad=0,
                         weights={k: v.detach().cpu().clone() for k, v in model.state_dict().items()})
        else:
            state["bad"] += 1

    bar = progress(total=total, desc="fine-tune")
    for epoch in range(cfg.epochs):
        loader = _batches(tokenizer, train_df, cfg.batch_size, cfg.max_length, True, seed * 1000 + epoch)
        for in_epoch, batch in enumerate(loader, 1):
            model.train()
            batch = {k: v.to(dev) for k, v in batch.items()}
            labels = batch.pop("labels")
            loss = _loss(model(**batch).logits, labels) if loss_fn is None else loss_fn(model, batch, labels)
            opt.step(loss)
            step += 1
            seen += int(labels.shape[0])
            run_loss.append(loss.item())
            bar.update(1)
            if in_epoch % eval_every == 0:  # counted within the epoch, so the points sit alike in every epoch
                validate()
            if step >= total or state["bad"] >= cfg.patience:
                break
        if run_loss:  # the epoch ended between evaluations
            validate()
        if step >= total or state["bad"] >= cfg.patience:
            break
    bar.close()
    if state["weights"] is not None:
        model.load_state_dict(state["weights"])
    model.eval()
    return model, pd.DataFrame(rows)


def trained_record(model_spec, task: TaskSpec, cfg: TrainConfig, seed: int, device: str | torch.device = "auto",
                   ) -> dict[str, Any]:
    """Train (once; cached on disk) the classifier for (model, task, config, seed) and return its record.

    The record holds the training history, the validation metrics at the best step, the wall time, the
    device, ``folder`` (the cached Hugging Face folder), ``val_majority`` (the majority class's validation
    accuracy) and ``failed`` (:func:`is_failed`). Use :func:`get_trained` for the model itself.
    """
    spec = {"kind": "trained_classifier", "model": asdict(model_spec), "task": asdict(task), "train": asdict(cfg),
            "seed": seed, "code": code_key(*_TRAINED_CODE)}

    def build(folder: Path) -> None:
        tokenizer = models.load_tokenizer(model_spec)
        splits = load_task(task, seed)
        seed_everything(seed)
        model = models.build_classifier(model_spec, task.num_labels, seed=seed)
        start = time.time()
        model, hist = fine_tune(model, tokenizer, splits["train"], splits["val"], cfg, seed, device)
        secs = time.time() - start
        val = evaluate(model, tokenizer, splits["val"], max_length=cfg.max_length, device=device)
        model.cpu().save_pretrained(folder)
        tokenizer.save_pretrained(folder)
        atomic_write_json(folder / "record.json", {
            "history": hist.to_dict(orient="records"), "train_seconds": secs, "device": str(pick(device)),
            "val": {k: v for k, v in val.items() if isinstance(v, float)},
            "n_train": len(splits["train"]), "steps": int(hist["step"].max()) if len(hist) else 0})

    folder = cached_dir("trained", spec, build)
    record = json.loads((folder / "record.json").read_text())
    record["folder"] = str(folder)
    if task.label_mode != "regression":  # cheap to recompute, so older cache entries get it too
        record["val_majority"] = majority_share(load_task(task, seed)["val"]["label"])
    record["failed"] = is_failed(record)
    return record


def get_trained(model_spec, task: TaskSpec, cfg: TrainConfig, seed: int, device: str | torch.device = "auto",
                ) -> tuple[Any, Any, dict[str, Any]]:
    """Fine-tuned classifier for (model, task, config, seed), trained once and cached on disk.

    Returns ``(model, tokenizer, record)``; see :func:`trained_record` for the record.
    """
    from transformers import AutoModelForSequenceClassification

    record = trained_record(model_spec, task, cfg, seed, device)
    model = AutoModelForSequenceClassification.from_pretrained(record["folder"]).eval()
    return model, models.load_tokenizer(model_spec), record


#: The standard fine-tuned models every chapter shares (same spec → same cache entry → trained once).
#: 64 tokens cover the 99th percentile snippet. ``minilm``'s entry is the schedule of its recipe search
#: (see :data:`RECIPE_SEARCH`); the learning rate is chosen there on validation loss.
STANDARD_TRAIN = {
    "minilm": TrainConfig(epochs=4, lr=1e-4, batch_size=32, patience=1, max_length=64, max_steps=450),
    "mpnet": TrainConfig(epochs=4, lr=5e-5, batch_size=32, patience=1, max_length=64, max_steps=450),
    "smollm2": TrainConfig(epochs=4, lr=3e-5, batch_size=32, patience=1, max_length=64, max_steps=450),
    "scratch": TrainConfig(epochs=8, lr=5e-4, batch_size=32, patience=2, warmup_ratio=0.06, max_length=64),
}
SMOKE_TRAIN = TrainConfig(epochs=1, lr=1e-3, batch_size=16, patience=1, max_length=64)
SMOKE_TASK = TaskSpec(max_train=240, max_eval=120)


@dataclass(frozen=True)
class RecipeSearch:
    """A fine-tuning recipe chosen on validation: learning rates tried on one seed, epochs by early stopping.

    Every candidate trains with ``base``'s schedule (at most ``base.epochs`` epochs or ``base.max_steps``
    optimizer steps, validation loss after every epoch, stop after ``base.patience`` epochs without
    improvement, best weights restored), so the epoch count is chosen per run on validation loss. The
    learning rate with the lowest best validation loss wins; the winner's run on ``seed`` is that seed's
    model (same config, same cache entry), so the search costs ``len(lrs) - 1`` extra trainings.
    """

    lrs: tuple[float, ...]
    base: TrainConfig
    seed: int = 0
    #: Budget of one run in example passes: a large training split gets fewer epochs (at least one), so that
    #: every task costs about the same (Amazon: 2,060 sentences x 4 epochs; mr: 3,500 x 2).
    max_examples: int | None = 9000

    def schedule(self, n_train: int) -> TrainConfig:
        """``base`` with its epoch budget fitted to a training split of ``n_train`` examples."""
        if self.max_examples is None:
            return self.base
        return replace(self.base, epochs=max(1, min(self.base.epochs, self.max_examples // max(1, n_train))))


#: Literature-strength grids (BERT-style fine-tuning uses 2e-5…1e-4 and 2–4 epochs); sized for 2 CPU cores.
RECIPE_SEARCH = {
    "minilm": RecipeSearch(lrs=(3e-5, 1e-4), base=STANDARD_TRAIN["minilm"]),
    "mpnet": RecipeSearch(lrs=(2e-5, 5e-5), base=STANDARD_TRAIN["mpnet"]),
    "smollm2": RecipeSearch(lrs=(1e-5, 3e-5), base=STANDARD_TRAIN["smollm2"]),
}
#: The smoke profile's search: tiny random models, one epoch, two learning rates (checks the pipeline only).
SMOKE_SEARCH = RecipeSearch(lrs=(1e-3, 3e-3), base=SMOKE_TRAIN)


def search_recipe(model_spec, task: TaskSpec, search: RecipeSearch, device: str | torch.device = "auto",
                  allow_failed: bool = False) -> tuple[TrainConfig, pd.DataFrame]:
    """Run (or read from the cache) a recipe search; return the chosen config and the search table.

    The table has one row per (learning rate, epoch evaluated): ``lr, epoch, step, val_loss, val_accuracy,
    chosen`` plus each run's ``train_seconds``, ``best_epoch`` and whether it is a failed training; the row
    of the chosen learning rate's best epoch has ``chosen`` True. Failed trainings never win; when every
    candidate failed this is an error, unless ``allow_failed`` (the smoke profile's tiny random models,
    which only check the pipeline), which then takes the lowest validation loss.
    """
    if not search.lrs:
        raise LayerwiseError("a recipe search needs at least one learning rate.")
    rows, best = [], None
    base = search.base if search.max_examples is None else \
        search.schedule(len(load_task(task, search.seed)["train"]))
    for lr in search.lrs:
        cfg = replace(base, lr=lr)
        record = trained_record(model_spec, task, cfg, search.seed, device)
        hist = pd.DataFrame(record["history"])
        at = int(hist["val_loss"].idxmin())
        for i, row in hist.iterrows():
            rows.append({"lr": lr, "max_epochs": cfg.epochs, "epoch": float(row["epoch"]), "step": int(row["step"]),
                         "val_loss": float(row["val_loss"]), "val_accuracy": row.get("val_accuracy", math.nan),
                         "best_epoch": float(hist.loc[at, "epoch"]), "train_seconds": record["train_seconds"],
                         "failed": record["failed"], "is_best_epoch": i == at})
        key = (record["failed"], float(hist.loc[at, "val_loss"]))
        if (allow_failed or not record["failed"]) and (best is None or key < best[1]):
            best = (cfg, key)
    if best is None:
        raise LayerwiseError(f"every candidate of the recipe search for {getattr(model_spec, 'kind', model_spec)} on {task.name} is a failed "
                             f"training (validation accuracy within {FAILED_MARGIN:.0%} of the majority class); "
                             "widen the learning-rate grid or raise the epoch budget.")
    table = pd.DataFrame(rows)
    table["chosen"] = (table["lr"] == best[0].lr) & table["is_best_epoch"]
    return best[0], table.drop(columns="is_best_epoch")


def recipe_search(name: str, tiny: bool = False) -> RecipeSearch | None:
    """The validation search of model ``name`` (built-in or your folder), or None for a fixed recipe.

    Tiny models (smoke) use :data:`SMOKE_SEARCH`; your folder gets the grid of the built-in model of its kind
    (an encoder MiniLM's, a decoder SmolLM2's); ``scratch`` trains with its fixed :data:`STANDARD_TRAIN` entry.
    """
    if name == "scratch":
        return None
    if tiny:
        return SMOKE_SEARCH
    if name in RECIPE_SEARCH:
        return RECIPE_SEARCH[name]
    if name in STANDARD_MODELS:
        return None
    return RECIPE_SEARCH["smollm2" if is_decoder(name) else "minilm"]


def recipe(name: str, task: TaskSpec, tiny: bool = False, device: str | torch.device = "auto") -> TrainConfig:
    """The fine-tuning config of model ``name`` (built-in or your folder) on ``task``: searched on validation
    where a search is defined (:func:`recipe_search`), else the fixed :data:`STANDARD_TRAIN` entry."""
    search = recipe_search(name, tiny)
    if search is not None:
        return search_recipe(standard_spec(name, tiny), task, search, device, allow_failed=tiny)[0]
    if tiny:
        return SMOKE_TRAIN
    if name not in STANDARD_TRAIN:
        raise LayerwiseError(f"unknown standard model {name!r}; choose from {sorted(STANDARD_TRAIN)}.")
    return STANDARD_TRAIN[name]


def standard_task(tiny: bool = False) -> TaskSpec:
    """The default task (Amazon snippets, polarity, band 0.5); capped in size for the smoke profile."""
    return SMOKE_TASK if tiny else TaskSpec()


#: The built-in models :func:`standard_spec` names; anything else is the path of your Hugging Face folder.
STANDARD_MODELS = ("minilm", "mpnet", "smollm2", "scratch")


def model_folder(ref: str) -> Path | None:
    """The Hugging Face folder a model reference names, or None for a built-in model (:data:`STANDARD_MODELS`).

    A folder must hold a ``config.json`` of a family ``layers`` supports (read without loading weights), so a
    wrong path or an unsupported architecture fails here, before any training.
    """
    if ref in STANDARD_MODELS:
        return None
    folder = Path(ref).expanduser()
    if not (folder / "config.json").is_file():
        raise LayerwiseError(f"model {ref!r} is neither a built-in model ({', '.join(STANDARD_MODELS)}) nor a Hugging "
                             "Face folder (no config.json there); point it at a folder written by save_pretrained.")
    _folder_family(str(folder.resolve()))
    return folder.resolve()


@lru_cache(maxsize=32)
def _folder_family(folder: str) -> bool:
    """Whether the folder's model is an encoder (True) or a decoder (False); refuses unsupported families."""
    from . import layers

    model_type = json.loads((Path(folder) / "config.json").read_text()).get("model_type")
    adapter = layers.adapter_for_type(model_type)
    if adapter is None:
        raise LayerwiseError(f"{folder}: model_type {model_type!r} is not supported; supported families: "
                             f"{', '.join(layers.SUPPORTED)}.")
    return bool(adapter.is_encoder)


@lru_cache(maxsize=32)
def _folder_digest(folder: str, stamp: tuple[tuple[str, int, int], ...]) -> str:
    """SHA-256 of a model folder's files (``stamp``: names, sizes and mtimes, so an edited folder re-hashes)."""
    return file_digest(Path(folder))


def _spec_of_folder(folder: Path, tiny: bool, num_layers: int | None):
    from .models import ModelSpec

    stamp = tuple((str(p.relative_to(folder)), p.stat().st_size, p.stat().st_mtime_ns)
                  for p in sorted(folder.rglob("*")) if p.is_file())
    return ModelSpec("hf", path=str(folder), num_layers=num_layers or (3 if tiny else None), tiny=tiny,
                     digest=_folder_digest(str(folder), stamp))


def standard_spec(name: str, tiny: bool = False, num_layers: int | None = None):
    """ModelSpec of a standard model: ``minilm`` (pretrained, 6 blocks), ``mpnet`` (pretrained, 12 blocks),
    ``smollm2`` (pretrained LLaMA decoder, 30 blocks, as a sequence classifier: full fine-tuning),
    ``scratch`` (12-block BERT-style, random init; the depth study's model), or the path of your Hugging Face
    folder (:func:`model_folder`; its content digest is part of every cache key).

    ``tiny`` gives the smoke-profile stand-in of the same architecture (random init, ≤ 4 blocks, hidden ≤ 64).
    """
    from .models import ModelSpec

    if name in ("minilm", "mpnet", "smollm2"):
        return ModelSpec(name, num_layers=num_layers or (3 if tiny else None), tiny=tiny)
    if name == "scratch":
        if tiny:
            return ModelSpec("scratch", num_layers=num_layers or 4, hidden=32, heads=2, intermediate=64, tiny=True)
        return ModelSpec("scratch", num_layers=num_layers or 12, hidden=128, heads=4, intermediate=512)
    return _spec_of_folder(model_folder(name), tiny, num_layers)


def is_decoder(name: str) -> bool:
    """Whether model ``name`` (built-in or your folder) is a causal decoder (SmolLM2, LLaMA, GPT-2, ...)."""
    folder = model_folder(name)
    return name == "smollm2" if folder is None else not _folder_family(str(folder))


def baseline(name: str, seed: int, tiny: bool = False, task: TaskSpec | None = None, num_layers: int | None = None,
             device: str | torch.device = "auto") -> tuple[Any, Any, dict[str, Any]]:
    """The standard fine-tuned classifier ``name`` for ``seed`` on ``task`` (cached; shared by chapters).

    The recipe comes from :func:`recipe` (a validation search for the pretrained models). With ``tiny``
    (smoke profile) the model is the tiny stand-in and the task is capped at :data:`SMOKE_TASK` sizes, so
    the pipeline runs in seconds. ``record["failed"]`` says whether this run is a failed training.
    """
    task = task or standard_task(tiny)
    cfg = recipe(name, task, tiny, device)
    return get_trained(standard_spec(name, tiny, num_layers), task, cfg, seed, device)


def baseline_folder(name: str, seed: int, tiny: bool = False, task: TaskSpec | None = None,
                    device: str | torch.device = "auto") -> str:
    """The cache folder name of :func:`baseline`'s model (trained on first use, then read from its record).

    A cached unit that reads the baseline holds this name in its key, as a healed arm holds its teacher's: the
    name is the hash of everything that determined the weights, so a re-trained baseline re-computes the unit
    instead of serving scores of the old model.
    """
    task = task or standard_task(tiny)
    cfg = recipe(name, task, tiny, device)
    return Path(trained_record(standard_spec(name, tiny), task, cfg, seed, device)["folder"]).name


#: The code whose hash keys a trained classifier (``cache.code_key``): :func:`trained_record` and every helper of
#: this module it reaches (``cache.reachable``: the loop, :class:`Optimizer`, the batches, the loss, evaluation
#: and the scores it records), the model builder with its helpers, and the loader and split that feed it.
#: Bound at the end of the module, when every helper exists.
_TRAINED_CODE = reachable(trained_record, models.build_classifier, data_mod.make_loader, data_mod.split)
