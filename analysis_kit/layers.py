"""The block stack of a transformer: find it, cut it, and run it block by block.

Every experiment in the book asks a question about the *blocks* (layers) of a model: which ones matter,
what happens without them, where a prediction could exit early. This module gives one vocabulary for
that across the supported families (``SUPPORTED``), for bare models and for task heads alike:

- ``get_blocks`` / ``num_blocks`` / ``block_path`` locate the ``nn.ModuleList`` of blocks;
- ``keep_blocks`` / ``drop_blocks`` build a *new*, valid Hugging Face model with fewer blocks (config
  updated, per-layer config lists subset, decoder ``layer_idx`` renumbered so the KV cache works), which
  round-trips through ``save_pretrained`` / ``from_pretrained`` with ``transformers`` alone;
- ``embed`` / ``block_forward`` / ``run_blocks`` / ``classify`` re-run the model's forward pass one block
  at a time, so that a block can be skipped (ablation) or the pass stopped early (early exit) without
  building a new model. ``classify(model, run_blocks(model, batch), batch["attention_mask"])`` equals
  ``model(**batch).logits``.
"""

from __future__ import annotations

import copy
import operator
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from .errors import LayerwiseError

#: ``config.model_type`` values whose block stack this module knows.
SUPPORTED = ("bert", "mpnet", "llama", "mistral", "qwen2", "gpt2")

#: Where the blocks live, relative to the base model (``model.base_model``).
_BLOCKS = {"bert": "encoder.layer", "mpnet": "encoder.layer", "llama": "layers", "mistral": "layers",
           "qwen2": "layers", "gpt2": "h"}
_ENCODERS = ("bert", "mpnet")
_LLAMA_LIKE = ("llama", "mistral", "qwen2")

#: Config attributes that hold one entry per block and must be subset with the blocks.
_PER_LAYER_CONFIG = ("layer_types", "no_rope_layers")


class UnsupportedArchitectureError(LayerwiseError):
    """The model's family has no known block stack here."""


class BlockSelectionError(LayerwiseError):
    """Block indices that do not fit the model (out of range, repeated, unordered, empty)."""


# --------------------------------------------------------------------------------------------------
# Finding the blocks


def family(model: nn.Module) -> str:
    """The model's ``config.model_type`` if it is in ``SUPPORTED``; otherwise a clear error."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in SUPPORTED:
        raise UnsupportedArchitectureError(
            f"{type(model).__name__} (model_type={model_type!r}) is not a supported architecture. "
            f"Supported families (config.model_type): {', '.join(SUPPORTED)}. Use a model of one of these "
            "families (e.g. a BERT/MPNet encoder or a LLaMA/Mistral/Qwen2/GPT-2 decoder).")
    return model_type


def _base_prefix(model: nn.Module) -> str:
    """Attribute name of the base model inside a task-head model ("" for a bare model)."""
    prefix = getattr(model, "base_model_prefix", "")
    if prefix and isinstance(getattr(model, prefix, None), nn.Module):
        return prefix
    return ""


def block_path(model: nn.Module) -> str:
    """Dotted path of the block ``ModuleList`` inside ``model``, e.g. ``"bert.encoder.layer"``, ``"model.layers"``."""
    fam = family(model)
    prefix = _base_prefix(model)
    path = f"{prefix}.{_BLOCKS[fam]}" if prefix else _BLOCKS[fam]
    try:
        blocks = model.get_submodule(path)
    except AttributeError:
        blocks = None
    if not isinstance(blocks, nn.ModuleList):
        raise UnsupportedArchitectureError(
            f"{type(model).__name__} has model_type={fam!r} but no block list at {path!r}; only the standard "
            f"Hugging Face classes of the supported families ({', '.join(SUPPORTED)}) are supported.")
    return path


def get_blocks(model: nn.Module) -> nn.ModuleList:
    """The ``nn.ModuleList`` of transformer blocks (the live modules, not copies)."""
    return model.get_submodule(block_path(model))


def num_blocks(model: nn.Module) -> int:
    """How many blocks the model has."""
    return len(get_blocks(model))


# --------------------------------------------------------------------------------------------------
# Cutting the stack


def _as_index(value: Any) -> int:
    if isinstance(value, bool):
        raise TypeError
    return operator.index(value)


def _validate_indices(indices: Iterable[int], n: int, what: str, *, ordered: bool) -> list[int]:
    """Integers in ``[0, n)``, each once; with ``ordered`` also strictly increasing (sets are sorted)."""
    if isinstance(indices, (str, bytes)) or not isinstance(indices, Iterable):
        raise BlockSelectionError(f"{what} must be a collection of block indices, got {indices!r}; "
                                  f"pass e.g. [0, 2] (the model has blocks 0..{n - 1}).")
    raw = list(indices)
    if isinstance(indices, (set, frozenset)):
        raw = sorted(raw)
    try:
        idx = [_as_index(i) for i in raw]
    except TypeError:
        raise BlockSelectionError(f"{what} must hold integers, got {raw!r}; pass block numbers such as [0, 2].") from None
    bad = [i for i in idx if not 0 <= i < n]
    if bad:
        raise BlockSelectionError(f"{what} has indices {bad} outside 0..{n - 1} (the model has {n} blocks); "
                                  "negative indices are not accepted, use n - k instead.")
    if len(set(idx)) != len(idx):
        raise BlockSelectionError(f"{what} repeats indices: {idx}; pass each block once.")
    if ordered and idx != sorted(idx):
        raise BlockSelectionError(f"{what}={idx} is not in increasing order; blocks always keep their original "
                                  f"order, so pass sorted(...) = {sorted(idx)}.")
    return idx


def _check_cuttable(model: nn.Module, fam: str) -> None:
    config = model.config
    if fam == "gpt2" and getattr(config, "scale_attn_by_inverse_layer_idx", False):
        raise UnsupportedArchitectureError(
            "This GPT-2 config has scale_attn_by_inverse_layer_idx=True: each block's attention depends on its "
            "position in the stack, so a model with blocks removed cannot reproduce the kept blocks. Use a "
            "config with scale_attn_by_inverse_layer_idx=False.")
    if fam == "bert" and getattr(config, "add_cross_attention", False):
        raise UnsupportedArchitectureError("BERT with cross-attention (an encoder-decoder half) is not supported; "
                                           "use an encoder-only BERT model.")


def _update_config(config: Any, keep: list[int], old_n: int) -> None:
    """Make ``config`` describe the kept blocks (depth, per-layer lists, per-layer dicts)."""
    config.num_hidden_layers = len(keep)  # GPT-2 maps this to n_layer through its attribute_map
    for key in _PER_LAYER_CONFIG:
        value = getattr(config, key, None)
        if isinstance(value, (list, tuple)) and len(value) == old_n:
            setattr(config, key, [value[i] for i in keep])
    mwl = getattr(config, "max_window_layers", None)
    if isinstance(mwl, int):  # Qwen2: the first max_window_layers blocks use full attention
        config.max_window_layers = sum(1 for i in keep if i < mwl)
    pruned = getattr(config, "pruned_heads", None)
    if pruned:  # {layer: heads}, applied again when the model is re-loaded
        config.pruned_heads = {new: pruned[old] for new, old in enumerate(keep) if old in pruned}


def keep_blocks(model: nn.Module, keep: Sequence[int]) -> nn.Module:
    """A new model (deep copy) holding only blocks ``keep`` of ``model``, in their original order.

    The config is updated (``num_hidden_layers`` / ``n_layer``; per-layer lists such as ``layer_types``
    subset; ``max_window_layers`` and ``pruned_heads`` remapped) and every ``layer_idx`` inside a kept
    block is renumbered 0..k-1, so KV-cache generation works and ``save_pretrained`` → ``from_pretrained``
    rebuilds the same model with ``transformers`` alone. ``model`` itself is left unchanged.

    ``keep`` holds distinct indices in increasing order (a ``set`` is sorted for you); at least one block.
    """
    fam = family(model)
    n = num_blocks(model)
    idx = _validate_indices(keep, n, "keep", ordered=True)
    if not idx:
        raise BlockSelectionError("keep is empty; a model needs at least one block. To measure a model without "
                                  "any block, use run_blocks(model, batch, skip=set(range(n))) instead.")
    _check_cuttable(model, fam)

    parent_path, _, attr = block_path(model).rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    full = getattr(parent, attr)
    # Swap the kept blocks in only for the copy, so the dropped blocks are never copied.
    setattr(parent, attr, nn.ModuleList([full[i] for i in idx]))
    try:
        new = copy.deepcopy(model)
    finally:
        setattr(parent, attr, full)

    for new_i, block in enumerate(get_blocks(new)):
        for module in block.modules():
            if isinstance(getattr(module, "layer_idx", None), int):
                module.layer_idx = new_i
    _update_config(new.config, idx, n)
    base = new.base_model
    if hasattr(base, "has_sliding_layers"):  # Qwen2 decides once at init whether to build sliding masks
        base.has_sliding_layers = "sliding_attention" in (getattr(new.config, "layer_types", None) or [])
    return new


def drop_blocks(model: nn.Module, drop: Iterable[int]) -> nn.Module:
    """A new model without blocks ``drop`` (= ``keep_blocks`` of the complement); ``model`` is unchanged."""
    n = num_blocks(model)
    idx = _validate_indices(drop, n, "drop", ordered=False)
    dropped = set(idx)
    return keep_blocks(model, [i for i in range(n) if i not in dropped])


# --------------------------------------------------------------------------------------------------
# Running the stack block by block


def _device_of(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def _mask_of(batch: Mapping[str, Any], shape: tuple[int, int], device: torch.device) -> torch.Tensor:
    mask = batch.get("attention_mask")
    if mask is None:
        return torch.ones(shape, dtype=torch.long, device=device)
    if tuple(mask.shape) != tuple(shape):
        raise LayerwiseError(f"attention_mask has shape {tuple(mask.shape)} but the inputs are {tuple(shape)}; "
                             "pass the attention_mask that belongs to this batch.")
    return mask.to(device)


def _check_runnable(model: nn.Module) -> str:
    fam = family(model)
    if fam == "bert" and (getattr(model.config, "is_decoder", False)
                          or getattr(model.base_model, "position_embedding_type", "absolute") != "absolute"):
        raise UnsupportedArchitectureError("run_blocks supports BERT encoders with absolute position embeddings "
                                           "(is_decoder=False); use a standard BERT encoder config.")
    return fam


def embed(model: nn.Module, batch: Mapping[str, Any]) -> torch.Tensor:
    """The hidden states that enter block 0: the embedding layer's output for ``batch["input_ids"]``.

    BERT: word + position + token-type embeddings, LayerNorm, dropout; MPNet: likewise; LLaMA-like:
    the token embeddings (rotary positions are applied inside each block); GPT-2: token + position
    embeddings, dropout. Tensors in ``batch`` are moved to the model's device.
    """
    fam = _check_runnable(model)
    if "input_ids" not in batch:
        raise LayerwiseError("batch has no 'input_ids'; pass the tokenizer output (input_ids, attention_mask).")
    device = _device_of(model)
    ids = batch["input_ids"].to(device)
    base = model.base_model
    if fam == "bert":
        tt = batch.get("token_type_ids")
        return base.embeddings(input_ids=ids, token_type_ids=None if tt is None else tt.to(device))
    if fam == "mpnet":
        return base.embeddings(input_ids=ids)
    if fam in _LLAMA_LIKE:
        return base.embed_tokens(ids)
    position_ids = torch.arange(ids.shape[1], device=device).unsqueeze(0)  # gpt2
    hidden = base.wte(ids) + base.wpe(position_ids)
    tt = batch.get("token_type_ids")
    if tt is not None:
        hidden = hidden + base.wte(tt.to(device))
    return base.drop(hidden)


def _context(model: nn.Module, fam: str, hidden: torch.Tensor, mask: torch.Tensor) -> dict[str, Any]:
    """What every block needs besides the hidden states: the attention mask in the form the family's
    forward builds it, plus position information (MPNet relative bias, rotary embeddings)."""
    base = model.base_model
    seq_len = hidden.shape[1]
    if fam == "bert":
        if base.config._attn_implementation == "sdpa":
            from transformers.modeling_attn_mask_utils import _prepare_4d_attention_mask_for_sdpa

            return {"mask": _prepare_4d_attention_mask_for_sdpa(mask, hidden.dtype, tgt_len=seq_len)}
        return {"mask": base.get_extended_attention_mask(mask, tuple(mask.shape))}
    if fam == "mpnet":
        return {"mask": base.get_extended_attention_mask(mask, tuple(mask.shape)),
                "position_bias": base.encoder.compute_position_bias(hidden)}

    from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask

    cache_position = torch.arange(seq_len, device=hidden.device)
    position_ids = cache_position.unsqueeze(0)
    kwargs = {"config": base.config, "input_embeds": hidden, "attention_mask": mask,
              "cache_position": cache_position, "past_key_values": None, "position_ids": position_ids}
    ctx: dict[str, Any] = {"cache_position": cache_position, "position_ids": position_ids,
                           "masks": {"full_attention": create_causal_mask(**kwargs)}}
    if fam in ("mistral", "qwen2") and getattr(base.config, "sliding_window", None) is not None:
        ctx["masks"]["sliding_attention"] = create_sliding_window_causal_mask(**kwargs)
    if fam in _LLAMA_LIKE:
        ctx["position_embeddings"] = base.rotary_emb(hidden, position_ids)
    return ctx


def _call_block(model: nn.Module, fam: str, block: nn.Module, hidden: torch.Tensor, ctx: dict[str, Any]) -> torch.Tensor:
    if fam == "bert":
        out = block(hidden, attention_mask=ctx["mask"])
    elif fam == "mpnet":
        out = block(hidden, attention_mask=ctx["mask"], position_bias=ctx["position_bias"])
    elif fam == "gpt2":
        out = block(hidden, attention_mask=ctx["masks"]["full_attention"], cache_position=ctx["cache_position"],
                    use_cache=False)
    else:
        if fam == "mistral":  # Mistral applies its sliding window (if any) to every block
            kind = "sliding_attention" if "sliding_attention" in ctx["masks"] else "full_attention"
        else:
            kind = getattr(block, "attention_type", "full_attention")
        out = block(hidden, attention_mask=ctx["masks"][kind], position_ids=ctx["position_ids"],
                    cache_position=ctx["cache_position"], position_embeddings=ctx["position_embeddings"])
    return out[0] if isinstance(out, tuple) else out


def block_forward(model: nn.Module, i: int, hidden: torch.Tensor, attention_mask: torch.Tensor | None = None,
                  ) -> torch.Tensor:
    """Run block ``i`` alone on ``hidden`` (batch, seq, hidden) and return its output hidden states.

    ``attention_mask`` is the usual 2-D 0/1 padding mask (None = no padding); it is expanded the way the
    family's own forward does it (additive/SDPA mask for encoders, causal mask and rotary positions for
    decoders). For many blocks in a row prefer ``run_blocks``, which prepares the mask once.
    """
    fam = _check_runnable(model)
    blocks = get_blocks(model)
    (i,) = _validate_indices([i], len(blocks), "block index i", ordered=True)
    mask = _mask_of({"attention_mask": attention_mask}, tuple(hidden.shape[:2]), hidden.device)
    return _call_block(model, fam, blocks[i], hidden, _context(model, fam, hidden, mask))


def run_blocks(model: nn.Module, batch: Mapping[str, Any], skip: Iterable[int] = frozenset(), start: int = 0,
               hidden: torch.Tensor | None = None, return_all: bool = False,
               ) -> torch.Tensor | list[torch.Tensor]:
    """Forward ``batch`` through blocks ``start..n-1``, treating the blocks in ``skip`` as identity.

    - ``hidden=None``: start from ``embed(model, batch)`` (then ``start`` must be 0);
      otherwise ``hidden`` is the input of block ``start`` (e.g. an earlier call's output), which lets an
      early-exit loop continue where it stopped.
    - Returns the hidden states after the last block (the residual stream, before any final norm; use
      ``classify`` to apply the head), or with ``return_all`` a list whose entry ``j`` is the output of
      block ``start + j`` (a skipped block's output is its input).

    The model's train/eval mode is respected (dropout is active in train mode) and gradients flow.
    """
    fam = _check_runnable(model)
    blocks = get_blocks(model)
    n = len(blocks)
    skip_set = set(_validate_indices(skip, n, "skip", ordered=False))
    try:
        start = _as_index(start)
    except TypeError:
        raise LayerwiseError(f"start must be an integer block index, got {start!r}.") from None
    if not 0 <= start <= n:
        raise LayerwiseError(f"start={start} is outside 0..{n} (the model has {n} blocks).")
    if hidden is None:
        if start != 0:
            raise LayerwiseError(f"start={start} needs hidden= (the input of block {start}); pass the output of "
                                 f"block {start - 1} from an earlier run_blocks(..., return_all=True) call.")
        hidden = embed(model, batch)
    else:
        hidden = hidden.to(_device_of(model))
    mask = _mask_of(batch, tuple(hidden.shape[:2]), hidden.device)
    ctx = _context(model, fam, hidden, mask)
    outputs: list[torch.Tensor] = []
    for i in range(start, n):
        if i not in skip_set:
            hidden = _call_block(model, fam, blocks[i], hidden, ctx)
        if return_all:
            outputs.append(hidden)
    return outputs if return_all else hidden


def _last_token(hidden: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
    """Index of the last real token per row (works for left and right padding)."""
    if attention_mask is None:
        return torch.full((hidden.shape[0],), hidden.shape[1] - 1, dtype=torch.long, device=hidden.device)
    mask = attention_mask.to(hidden.device)
    positions = torch.arange(mask.shape[1], device=hidden.device)
    return (positions * (mask != 0)).argmax(-1)


def classify(model: nn.Module, hidden: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Apply the model's head to the output of the last block and return its logits.

    - BERT ``*ForSequenceClassification``: pooler ([CLS] dense + tanh) → dropout → classifier;
    - MPNet ``*ForSequenceClassification``: its classification head on the first token;
    - decoder ``*ForSequenceClassification``: final norm → score, taken at the last real token (the last 1
      in ``attention_mask``; the last position when it is None);
    - decoder causal LM: final norm → LM head, logits for every position.

    Together with ``run_blocks`` this equals ``model(**batch).logits`` (in eval mode).
    """
    fam = _check_runnable(model)
    name = type(model).__name__
    base = model.base_model
    if name.endswith("ForSequenceClassification"):
        if fam == "bert":
            if base.pooler is None:
                raise LayerwiseError(f"{name} was built without a pooler; classify needs the standard head.")
            return model.classifier(model.dropout(base.pooler(hidden)))
        if fam == "mpnet":
            return model.classifier(hidden)
        final_norm = base.ln_f if fam == "gpt2" else base.norm
        logits = model.score(final_norm(hidden))
        return logits[torch.arange(logits.shape[0], device=logits.device), _last_token(hidden, attention_mask)]
    if fam not in _ENCODERS and hasattr(model, "lm_head"):
        final_norm = base.ln_f if fam == "gpt2" else base.norm
        return model.lm_head(final_norm(hidden))
    raise LayerwiseError(f"classify does not know the head of {name}; it supports *ForSequenceClassification "
                         "models of the supported families and decoder causal LMs. Load the model with "
                         "AutoModelForSequenceClassification (or AutoModelForCausalLM for a decoder).")
