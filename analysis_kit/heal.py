"""Healing a model after block removal: the cut model trains so its kept blocks fit their new inputs.

Two families live here:

- **Recipes at fine-tuning scale** (:func:`heal_recipe`, :data:`RECIPES`), what the compression chapter
  compares: plain fine-tuning, distillation from the full model, LoRA, partial fine-tuning, and the baseline
  that fine-tunes the pretrained model's first k blocks. Every recipe runs the kit's one training loop,
  ``train.fine_tune`` (epochs over the whole training split, early stopping on validation loss), so budgets
  are equal by construction; only the learning rate and the recipe's own options differ.
- **A fixed step budget** (:func:`heal`, ``distill``/``lora`` with a :class:`HealConfig`), what
  ``analysis-kit analyze --heal`` runs on a user's data when there is no validation split to stop on (and
  on causal LMs, which ``train.fine_tune`` does not train). It steps through the same optimizer as the
  recipes (``train.Optimizer``) and distils with the same loss (``_distill_loss``):

  - ``distill``: knowledge distillation from the full (teacher) model. Loss = ``kd_weight`` · T² ·
    KL(teacher ‖ student) on temperature-softened logits (Hinton et al., 2015) + ``hidden_weight`` ·
    relative MSE between hidden states over a map from kept blocks to teacher blocks (``teacher_map``)
    + optionally ``ce_weight`` · the label loss. All student weights train.
  - ``lora``: low-rank adapters (peft; Hu et al., 2022) on every linear layer of the blocks, plus the
    task head, trained on the labels (classifiers) or the next-token loss (causal LMs), then merged, so
    the result is again a plain Hugging Face model.
  - ``none``: the compressed model as it is.

Everything runs on ``device.pick``; one seed gives the same weights on CPU.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import pandas as pd
import torch
import torch.nn.functional as F

from . import layers, train
from .device import pick, progress, seed_everything
from .errors import LayerwiseError

HEAL_METHODS = ("none", "distill", "lora")


def lora_targets(model: torch.nn.Module) -> list[str]:
    """The block linears LoRA adapts in ``model``'s family (``layers.FamilyAdapter.lora_targets``)."""
    return list(layers.adapter_for(model).lora_targets)


class HealError(LayerwiseError):
    """A healing request that cannot run (unknown method, bad config, mismatched teacher)."""


@dataclass(frozen=True)
class RecipeOptions:
    """The recipe-specific knobs of :func:`heal_recipe` (the shared schedule is a ``train.TrainConfig``)."""

    temperature: float = 2.0
    kd_weight: float = 1.0
    hidden_weight: float = 1.0
    ce_weight: float = 1.0
    lora_r: int = 8
    lora_alpha: int = 16
    lora_dropout: float = 0.05
    partial_blocks: int = 1

    def validate(self) -> None:
        """Fail before any training on settings no recipe can use."""
        if self.temperature <= 0 or self.lora_r < 1 or self.lora_alpha < 1 or self.partial_blocks < 1:
            raise HealError("temperature, lora_r, lora_alpha and partial_blocks must be positive.")
        if min(self.kd_weight, self.hidden_weight, self.ce_weight) < 0 or \
                self.kd_weight + self.hidden_weight + self.ce_weight == 0:
            raise HealError("distillation weights must be >= 0 and not all zero (kd_weight, hidden_weight, ce_weight).")
        if not 0 <= self.lora_dropout < 1:
            raise HealError(f"lora_dropout={self.lora_dropout} must lie in [0, 1).")


@dataclass(frozen=True)
class HealConfig(RecipeOptions):
    """One fixed step budget for :func:`distill` and :func:`lora` (the path ``analysis-kit analyze`` heals a
    user's model with), plus the recipe knobs they share with :func:`heal_recipe` (inherited from
    :class:`RecipeOptions`; only the label-loss weight defaults to 0 here: distillation alone)."""

    ce_weight: float = 0.0
    steps: int = 100
    batch_size: int = 16
    lr_distill: float = 5e-5
    lr_lora: float = 5e-4
    weight_decay: float = 0.01
    warmup_ratio: float = 0.1
    grad_clip: float = 1.0

    def validate(self) -> None:
        """Fail fast on impossible settings: the recipe knobs, then the step budget."""
        super().validate()
        if self.steps < 1 or self.batch_size < 1:
            raise HealError(f"steps={self.steps} and batch_size={self.batch_size} must be >= 1.")
        if min(self.lr_distill, self.lr_lora) <= 0:
            raise HealError("learning rates must be positive.")


def teacher_map(keep: Sequence[int], n_teacher: int) -> list[int]:
    """For student block ``j`` (teacher block ``keep[j]``), the teacher block whose output it should match.

    The student's block ``j`` feeds block ``keep[j+1]``, which in the teacher read the output of block
    ``keep[j+1] - 1``; so that is the target. The last student block targets the teacher's last block.
    Example: keep (0, 2, 5) of 6 → (1, 4, 5).
    """
    keep = list(keep)
    if not keep or keep != sorted(set(keep)) or keep[0] < 0 or keep[-1] >= n_teacher:
        raise HealError(f"keep={keep} must be increasing block indices of the {n_teacher}-block teacher.")
    return [keep[j + 1] - 1 for j in range(len(keep) - 1)] + [n_teacher - 1]


def _is_causal_lm(model: torch.nn.Module) -> bool:
    return hasattr(model, "lm_head") and not type(model).__name__.endswith("ForSequenceClassification")


def _task_loss(model: torch.nn.Module, logits: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Label loss (cross-entropy, or MSE for one output) or, for a causal LM, the next-token loss."""
    if _is_causal_lm(model):
        mask = batch["attention_mask"][:, 1:].float()
        nll = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(),
                              batch["input_ids"][:, 1:].reshape(-1), reduction="none").view_as(mask)
        return (nll * mask).sum() / mask.sum().clamp_min(1.0)
    if batch.get("labels") is None:
        raise HealError("this batch has no labels; encode the training texts with labels= for LoRA or ce_weight > 0.")
    return train._loss(logits, batch["labels"])


def _kd_loss(student: torch.Tensor, teacher: torch.Tensor, temperature: float, mask: torch.Tensor | None) -> torch.Tensor:
    """T² · KL(teacher ‖ student) of temperature-softened distributions (per token for LMs, masked)."""
    s = torch.log_softmax(student.float() / temperature, -1)
    t = torch.log_softmax(teacher.float() / temperature, -1)
    kl = (t.exp() * (t - s)).sum(-1)
    if kl.dim() == 2 and mask is not None:  # (batch, tokens)
        kl = (kl * mask).sum() / mask.sum().clamp_min(1.0)
    else:
        kl = kl.mean()
    return kl * temperature**2


def _hidden_loss(student: list[torch.Tensor], teacher: list[torch.Tensor], pairs: list[int],
                 mask: torch.Tensor) -> torch.Tensor:
    """Mean over mapped blocks of ‖s − t‖² / ‖t‖² over real tokens (scale-free, so deep pre-norm residual
    streams with large norms do not dominate)."""
    m = mask.unsqueeze(-1).float()
    losses = []
    for j, t_idx in enumerate(pairs):
        t = teacher[t_idx].float()
        diff = ((student[j].float() - t) ** 2 * m).sum()
        losses.append(diff / ((t**2) * m).sum().clamp_min(1e-12))
    return torch.stack(losses).mean()


def _batches(batches: Sequence[dict[str, torch.Tensor]], steps: int, seed: int):
    """``steps`` batches, cycling through ``batches`` in a seeded new order on every pass."""
    g = torch.Generator().manual_seed(seed)
    done = 0
    while done < steps:
        for i in torch.randperm(len(batches), generator=g).tolist():
            if done >= steps:
                return
            done += 1
            yield batches[i]


def _optimise(model: torch.nn.Module, loss_fn: train.LossFn, batches: Sequence[dict[str, torch.Tensor]],
              cfg: HealConfig, lr: float, seed: int, dev: torch.device, desc: str) -> pd.DataFrame:
    """Exactly ``cfg.steps`` updates of ``train.Optimizer`` (the kit's AdamW, warm-up and clipping) on
    ``loss_fn(model, batch, labels)``, the signature ``train.fine_tune`` takes; returns the loss history."""
    opt = train.Optimizer([(model.parameters(), lr)], cfg.steps, cfg.weight_decay, cfg.warmup_ratio, cfg.grad_clip)
    rows, start = [], time.time()
    model.train()
    for step, batch in enumerate(progress(_batches(batches, cfg.steps, seed), total=cfg.steps, desc=desc), 1):
        batch = {k: v.to(dev) for k, v in batch.items()}
        labels = batch.pop("labels", None)
        loss = loss_fn(model, batch, labels)
        opt.step(loss)
        rows.append({"step": step, "loss": float(loss.detach()), "seconds": time.time() - start})
    model.eval()
    return pd.DataFrame(rows)


def distill(student: torch.nn.Module, teacher: torch.nn.Module, keep: Sequence[int],
            batches: Sequence[dict[str, torch.Tensor]], cfg: HealConfig = HealConfig(), seed: int = 0,
            device: str | torch.device = "auto") -> tuple[torch.nn.Module, pd.DataFrame]:
    """Distil ``teacher`` into ``student`` (= ``teacher`` with only blocks ``keep``); see the module doc.

    Returns a trained copy of ``student`` (the argument is not modified) and the loss history.
    """
    cfg.validate()
    n_t, n_s = layers.num_blocks(teacher), layers.num_blocks(student)
    if len(keep) != n_s:
        raise HealError(f"keep has {len(keep)} blocks but the student has {n_s}; pass the keep used to build it.")
    pairs = teacher_map(keep, n_t)
    dev = pick(device)
    seed_everything(seed)
    student = copy.deepcopy(student).to(dev)
    teacher = teacher.to(dev).eval()
    for p in student.parameters():
        p.requires_grad_(True)

    label = "distill" if cfg.kd_weight or cfg.hidden_weight else "fine-tune"  # ce only: plain fine-tuning
    hist = _optimise(student, _distill_loss(teacher, pairs, cfg), batches, cfg, cfg.lr_distill, seed, dev, label)
    return student, hist


def lora(student: torch.nn.Module, batches: Sequence[dict[str, torch.Tensor]], cfg: HealConfig = HealConfig(),
         seed: int = 0, device: str | torch.device = "auto") -> tuple[torch.nn.Module, pd.DataFrame]:
    """LoRA-tune a copy of ``student`` on its task loss (labels, or next tokens for a causal LM), then merge
    the adapters into the weights (``merge_and_unload``) so the result is a plain Hugging Face model."""
    from peft import LoraConfig, TaskType, get_peft_model

    cfg.validate()
    causal = _is_causal_lm(student)
    dev = pick(device)
    seed_everything(seed)
    base = copy.deepcopy(student)
    config = LoraConfig(task_type=TaskType.CAUSAL_LM if causal else TaskType.SEQ_CLS, r=cfg.lora_r,
                        lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout, target_modules=lora_targets(student))
    model = get_peft_model(base, config).to(dev)

    def loss_fn(model: torch.nn.Module, batch: dict[str, torch.Tensor], labels: torch.Tensor | None) -> torch.Tensor:
        return _task_loss(student, model(**batch).logits, {**batch, "labels": labels})

    hist = _optimise(model, loss_fn, batches, cfg, cfg.lr_lora, seed, dev, "lora")
    merged = model.merge_and_unload()
    merged.eval()
    for p in merged.parameters():
        p.requires_grad_(False)
    return merged, hist


def heal(method: str, student: torch.nn.Module, teacher: torch.nn.Module | None, keep: Sequence[int],
         batches: Sequence[dict[str, torch.Tensor]], cfg: HealConfig = HealConfig(), seed: int = 0,
         device: str | torch.device = "auto") -> tuple[torch.nn.Module, pd.DataFrame]:
    """Heal ``student`` by ``method`` (one of ``HEAL_METHODS``) and return ``(model, history)``.

    ``"none"`` returns ``student`` unchanged with an empty history; ``"distill"`` needs ``teacher``.
    """
    if method not in HEAL_METHODS:
        raise HealError(f"unknown healing method {method!r}; choose from {', '.join(HEAL_METHODS)}.")
    if method != "none" and not batches:
        raise HealError("no training batches; pass compress.encode(tokenizer, texts, labels) batches.")
    if method == "none":
        return student, pd.DataFrame(columns=["step", "loss", "seconds"])
    if method == "distill":
        if teacher is None:
            raise HealError("distillation needs the full model as teacher=.")
        return distill(student, teacher, keep, batches, cfg, seed, device)
    return lora(student, batches, cfg, seed, device)


def describe(cfg: HealConfig) -> dict[str, Any]:
    """The config as a plain dict (for cache keys and reports)."""
    return asdict(cfg)


# ------------------------------------------------------------------------------------------------------------
# Healing at fine-tuning scale: recipes on the kit's one training loop (``train.fine_tune``)

#: The healing recipes the compression chapter compares at equal budget (same epochs, batch size, early
#: stopping on validation loss; only the learning rate is chosen per recipe, on validation):
#:
#: - ``finetune``: every weight of the pruned model on the label loss (Sajjad et al.'s drop-then-fine-tune);
#: - ``distill``: every weight, label loss + logit distillation + hidden-state matching from the full model
#:   (DistilBERT's and Minitron's recipe; ``teacher_map`` pairs the blocks);
#: - ``lora``: low-rank adapters on every linear layer of the blocks plus the trained head, merged afterwards;
#: - ``partial``: only the last ``partial_blocks`` blocks and the head train (Lu et al., 2026);
#: - ``first_k``: the baseline that skips pruning: the *pretrained* model's first k blocks and a new head,
#:   fine-tuned on the same schedule as the other recipes (the kept set is always the first k blocks).
RECIPES = ("finetune", "distill", "lora", "partial", "first_k")


def _distill_loss(teacher: torch.nn.Module, pairs: list[int], opts: RecipeOptions) -> train.LossFn:
    """The one distillation loss, for ``train.fine_tune`` (the ``distill`` recipe) and the step budget
    (:func:`distill`): kd · T² KL(teacher ‖ student) on logits (per real token for a causal LM) + hidden ·
    relative MSE of each student block's output against its teacher block (``teacher_map``) + ce · the label
    loss (the next-token loss for a causal LM)."""

    def loss_fn(model: torch.nn.Module, batch: dict[str, torch.Tensor], labels: torch.Tensor | None) -> torch.Tensor:
        mask = batch["attention_mask"]
        with torch.no_grad():
            t_states = layers.run_blocks(teacher, batch, return_all=True)
            t_logits = layers.classify(teacher, t_states[-1], mask)
        s_states = layers.run_blocks(model, batch, return_all=True)
        s_logits = layers.classify(model, s_states[-1], mask)
        token_mask = mask.float() if s_logits.dim() == 3 else None  # a causal LM's logits: one row per token
        loss = opts.kd_weight * _kd_loss(s_logits, t_logits, opts.temperature, token_mask)
        loss = loss + opts.hidden_weight * _hidden_loss(s_states, t_states, pairs, mask)
        if opts.ce_weight > 0:
            loss = loss + opts.ce_weight * _task_loss(model, s_logits, {**batch, "labels": labels})
        return loss

    return loss_fn


def _freeze_but_last(model: torch.nn.Module, n_last: int) -> None:
    """Train only the last ``n_last`` blocks and what reads their output (the head outside the base model,
    the base model's pooler or final norm); freeze the embeddings, every earlier block and whatever else the
    blocks share (e.g. MPNet's relative position bias)."""
    blocks = layers.get_blocks(model)
    if n_last > len(blocks):
        raise HealError(f"partial_blocks={n_last} but the pruned model has {len(blocks)} blocks.")
    base = model.base_model
    after = {id(p) for b in list(blocks)[len(blocks) - n_last:] for p in b.parameters()}
    after |= {id(p) for name, p in base.named_parameters() if name.split(".")[0] in ("pooler", "norm", "ln_f")}
    in_base = {id(p) for p in base.parameters()}
    for p in model.parameters():
        p.requires_grad_(id(p) in after or id(p) not in in_base)


def recipe_student(recipe: str, teacher: torch.nn.Module, keep: Sequence[int],
                   first_k: Callable[[int], torch.nn.Module] | None = None) -> torch.nn.Module:
    """The model a recipe starts from: ``teacher`` cut to ``keep`` (a copy), or for ``first_k`` the pretrained
    model's first ``len(keep)`` blocks with a new head (``first_k(k)`` builds it)."""
    if recipe not in RECIPES:
        raise HealError(f"unknown healing recipe {recipe!r}; choose from {', '.join(RECIPES)}.")
    if recipe == "first_k":
        if first_k is None:
            raise HealError("recipe 'first_k' needs first_k=, a function k -> the pretrained model's first k blocks "
                            "with a new head.")
        return first_k(len(keep))
    return layers.keep_blocks(teacher, sorted(keep))


def heal_recipe(recipe: str, teacher: torch.nn.Module, keep: Sequence[int], tokenizer: Any,
                train_df: pd.DataFrame, val_df: pd.DataFrame, cfg: Any, seed: int, *,
                options: RecipeOptions = RecipeOptions(), first_k: Callable[[int], torch.nn.Module] | None = None,
                device: str | torch.device = "auto") -> tuple[torch.nn.Module, pd.DataFrame, dict[str, Any]]:
    """Heal ``teacher`` cut to ``keep`` by ``recipe`` (one of :data:`RECIPES`) with the schedule ``cfg``
    (a ``train.TrainConfig``: epochs, learning rate, batch size, early stopping) on the whole ``train_df``.

    Every recipe runs through ``train.fine_tune``, so the budgets are equal by construction (same batches,
    same schedule, same early stopping on the validation label loss). Returns the healed plain Hugging Face
    model (LoRA merged), the training history and ``info``: trainable and total parameters, steps, examples
    seen and wall seconds.
    """
    options.validate()
    cfg.validate()
    keep = sorted(int(i) for i in keep)
    student = recipe_student(recipe, teacher, keep, first_k)
    dev = pick(device)
    seed_everything(seed)
    student = student.to(dev)
    for p in student.parameters():
        p.requires_grad_(True)
    loss_fn = None
    if recipe == "distill":
        teacher = teacher.to(dev).eval()
        for p in teacher.parameters():
            p.requires_grad_(False)
        loss_fn = _distill_loss(teacher, teacher_map(keep, layers.num_blocks(teacher)), options)
    elif recipe == "partial":
        _freeze_but_last(student, options.partial_blocks)
    elif recipe == "lora":
        from peft import LoraConfig, TaskType, get_peft_model

        config = LoraConfig(task_type=TaskType.SEQ_CLS, r=options.lora_r, lora_alpha=options.lora_alpha,
                            lora_dropout=options.lora_dropout, target_modules=lora_targets(student))
        student = get_peft_model(student, config)
    trainable = sum(p.numel() for p in student.parameters() if p.requires_grad)
    start = time.time()
    student, hist = train.fine_tune(student, tokenizer, train_df, val_df, cfg, seed, dev, loss_fn=loss_fn)
    seconds = time.time() - start
    if recipe == "lora":
        student = student.merge_and_unload()
    student.eval()
    for p in student.parameters():
        p.requires_grad_(False)
    info = {"recipe": recipe, "keep": tuple(keep), "trainable_parameters": int(trainable),
            "parameters": int(sum(p.numel() for p in student.parameters())), "seconds": seconds,
            "steps": int(hist["step"].max()) if len(hist) else 0,
            "examples": int(hist["examples"].max()) if len(hist) else 0}
    return student, hist, info
