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

All family knowledge sits in one ``FamilyAdapter`` subclass per family, found through ``adapter_for`` (a
registry keyed on ``config.model_type``, which also refuses unsupported architectures up front).
"""

from __future__ import annotations

import copy
import operator
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from .errors import LayerwiseError

#: Config attributes that hold one entry per block and must be subset with the blocks.
_PER_LAYER_CONFIG = ("layer_types", "no_rope_layers")


class UnsupportedArchitectureError(LayerwiseError):
    """The model's family has no known block stack here."""


class BlockSelectionError(LayerwiseError):
    """Block indices that do not fit the model (out of range, repeated, unordered, empty)."""


# --------------------------------------------------------------------------------------------------
# One adapter per family
#
# Everything this module knows about a family (where its blocks live, how its forward embeds the
# tokens, builds the attention mask and position information, calls one block and applies its head,
# and what a cut must fix in the config) lives in one ``FamilyAdapter`` subclass. The public functions
# below look the adapter up once (``adapter_for``) and never test the family themselves, so supporting
# a new family is one class plus ``@_register``.


class FamilyAdapter:
    """How to find, cut and run the block stack of one model family.

    Subclasses set ``model_types`` (the ``config.model_type`` values they serve), ``blocks_attr`` (the
    dotted path of the block ``nn.ModuleList`` inside the base model) and ``is_encoder``, and implement
    ``embed``, ``context``, ``run_block`` and ``finish``. The other methods are shared and may be
    extended (``check_cuttable``, ``check_runnable``, ``fix_cut``).
    """

    #: ``config.model_type`` values served by this adapter (registry keys).
    model_types: tuple[str, ...] = ()
    #: Path of the block ``ModuleList`` relative to ``model.base_model``.
    blocks_attr: str = ""
    #: Bidirectional encoder (no LM head, no causal mask) rather than a causal decoder.
    is_encoder: bool = False
    #: Name suffixes of the block linears that LoRA adapts (peft ``target_modules``).
    lora_targets: tuple[str, ...] = ()
    #: Substring that marks an attention projection inside a block's linear names; None where the family
    #: keeps its block weights in ``Conv1D`` (GPT-2), which 4-bit quantization here cannot take.
    attention_mark: str | None = None

    # ---- finding and swapping the block list

    def block_path(self, model: nn.Module) -> str:
        """Dotted path of the block ``ModuleList`` inside ``model`` (with the base-model prefix of head models)."""
        prefix = _base_prefix(model)
        path = f"{prefix}.{self.blocks_attr}" if prefix else self.blocks_attr
        try:
            blocks = model.get_submodule(path)
        except AttributeError:
            blocks = None
        if not isinstance(blocks, nn.ModuleList):
            raise UnsupportedArchitectureError(
                f"{type(model).__name__} has model_type={model.config.model_type!r} but no block list at {path!r}; "
                f"only the standard Hugging Face classes of the supported families ({', '.join(SUPPORTED)}) are "
                "supported.")
        return path

    def blocks(self, model: nn.Module) -> nn.ModuleList:
        """The live block ``ModuleList`` of ``model`` (not a copy)."""
        return model.get_submodule(self.block_path(model))

    def set_blocks(self, model: nn.Module, new_list: nn.ModuleList) -> nn.ModuleList:
        """Put ``new_list`` in place of ``model``'s block list (in place) and return the list it replaced."""
        parent_path, _, attr = self.block_path(model).rpartition(".")
        parent = model.get_submodule(parent_path) if parent_path else model
        old = getattr(parent, attr)
        setattr(parent, attr, new_list)
        return old

    # ---- cutting

    def check_cuttable(self, model: nn.Module) -> None:
        """Raise ``UnsupportedArchitectureError`` if a model of this family cannot lose blocks faithfully."""

    def fix_cut(self, model: nn.Module, keep: list[int], old_n: int) -> None:
        """Make the freshly cut ``model`` (holding blocks ``keep`` of ``old_n``) consistent with its new depth:
        renumber ``layer_idx`` (the KV cache is indexed by it) and update the config."""
        for new_i, block in enumerate(self.blocks(model)):
            for module in block.modules():
                if isinstance(getattr(module, "layer_idx", None), int):
                    module.layer_idx = new_i
        config = model.config
        config.num_hidden_layers = len(keep)  # GPT-2 maps this to n_layer through its attribute_map
        for key in _PER_LAYER_CONFIG:
            value = getattr(config, key, None)
            if isinstance(value, (list, tuple)) and len(value) == old_n:
                setattr(config, key, [value[i] for i in keep])
        pruned = getattr(config, "pruned_heads", None)
        if pruned:  # {layer: heads}, applied again when the model is re-loaded
            config.pruned_heads = {new: pruned[old] for new, old in enumerate(keep) if old in pruned}

    # ---- running block by block

    def check_runnable(self, model: nn.Module) -> None:
        """Raise ``UnsupportedArchitectureError`` if this module cannot re-run the model's forward block by block."""

    def embed(self, model: nn.Module, ids: torch.Tensor, batch: Mapping[str, Any]) -> torch.Tensor:
        """The input of block 0 for token ids ``ids`` (already on the model's device)."""
        raise NotImplementedError

    def context(self, model: nn.Module, hidden: torch.Tensor, mask: torch.Tensor) -> dict[str, Any]:
        """What every block needs besides the hidden states, built once per pass from the 2-D padding
        ``mask``: the attention mask in the form the family's forward builds it, plus position information."""
        raise NotImplementedError

    def run_block(self, block: nn.Module, hidden: torch.Tensor, ctx: dict[str, Any]) -> torch.Tensor:
        """Output hidden states of ``block`` on ``hidden``, called as the family's forward calls it."""
        raise NotImplementedError

    def finish(self, model: nn.Module, hidden: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
        """The head's logits for the output of the last block (see ``classify``)."""
        raise NotImplementedError

    def final_norm(self, model: nn.Module) -> nn.Module | None:
        """The norm the family applies after the last block (pre-norm decoders), or None (post-norm encoders,
        whose blocks end in their own LayerNorm)."""
        return None

    def mask_optional(self, model: nn.Module) -> bool:
        """Whether the blocks accept ``ctx["mask"] = None`` for an unpadded batch (the fast unmasked attention
        kernel); decoders always need their causal mask."""
        return self.is_encoder


def _unknown_head(model: nn.Module) -> LayerwiseError:
    name = type(model).__name__
    return LayerwiseError(f"classify does not know the head of {name}; it supports *ForSequenceClassification "
                          "models of the supported families and decoder causal LMs. Load the model with "
                          "AutoModelForSequenceClassification (or AutoModelForCausalLM for a decoder).")


def _is_sequence_classifier(model: nn.Module) -> bool:
    return type(model).__name__.endswith("ForSequenceClassification")


_REGISTRY: dict[str, FamilyAdapter] = {}


def _register(cls: type[FamilyAdapter]) -> type[FamilyAdapter]:
    """Class decorator: serve each of ``cls.model_types`` with one shared instance of ``cls``."""
    instance = cls()
    for model_type in cls.model_types:
        _REGISTRY[model_type] = instance
    return cls


@_register
class BertAdapter(FamilyAdapter):
    """BERT encoders (incl. MiniLM checkpoints): word + position + token-type embeddings, additive/SDPA mask,
    pooler → dropout → classifier head."""

    model_types = ("bert",)
    blocks_attr = "encoder.layer"
    is_encoder = True
    lora_targets = ("query", "key", "value", "attention.output.dense", "intermediate.dense", "output.dense")
    attention_mark = ".attention."

    def check_cuttable(self, model: nn.Module) -> None:
        if getattr(model.config, "add_cross_attention", False):
            raise UnsupportedArchitectureError("BERT with cross-attention (an encoder-decoder half) is not "
                                               "supported; use an encoder-only BERT model.")

    def check_runnable(self, model: nn.Module) -> None:
        if (getattr(model.config, "is_decoder", False)
                or getattr(model.base_model, "position_embedding_type", "absolute") != "absolute"):
            raise UnsupportedArchitectureError("run_blocks supports BERT encoders with absolute position embeddings "
                                               "(is_decoder=False); use a standard BERT encoder config.")

    def embed(self, model: nn.Module, ids: torch.Tensor, batch: Mapping[str, Any]) -> torch.Tensor:
        tt = batch.get("token_type_ids")
        return model.base_model.embeddings(input_ids=ids, token_type_ids=None if tt is None else tt.to(ids.device))

    def context(self, model: nn.Module, hidden: torch.Tensor, mask: torch.Tensor) -> dict[str, Any]:
        base = model.base_model
        if base.config._attn_implementation == "sdpa":
            from transformers.modeling_attn_mask_utils import _prepare_4d_attention_mask_for_sdpa

            return {"mask": _prepare_4d_attention_mask_for_sdpa(mask, hidden.dtype, tgt_len=hidden.shape[1])}
        return {"mask": base.get_extended_attention_mask(mask, tuple(mask.shape))}

    def run_block(self, block: nn.Module, hidden: torch.Tensor, ctx: dict[str, Any]) -> torch.Tensor:
        return _first(block(hidden, attention_mask=ctx["mask"]))

    def finish(self, model: nn.Module, hidden: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
        if not _is_sequence_classifier(model):
            raise _unknown_head(model)
        pooler = model.base_model.pooler
        if pooler is None:
            raise LayerwiseError(f"{type(model).__name__} was built without a pooler; classify needs the standard head.")
        return model.classifier(model.dropout(pooler(hidden)))


@_register
class RobertaAdapter(BertAdapter):
    """RoBERTa and XLM-R encoders: BERT's blocks and masks; the embeddings number positions after the
    padding index (done inside ``embeddings``), and the head is dense → tanh → out_proj on the first token,
    with no pooler."""

    model_types = ("roberta", "xlm-roberta")

    def finish(self, model: nn.Module, hidden: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
        if not _is_sequence_classifier(model):
            raise _unknown_head(model)
        return model.classifier(hidden)


@_register
class DistilBertAdapter(FamilyAdapter):
    """DistilBERT encoders: word + position embeddings (no token types), blocks at ``transformer.layer``
    called with the 2-D padding mask (eager) or the 4-D SDPA mask, head pre_classifier → ReLU → dropout →
    classifier on the first token."""

    model_types = ("distilbert",)
    blocks_attr = "transformer.layer"
    is_encoder = True
    lora_targets = ("q_lin", "k_lin", "v_lin", "out_lin", "ffn.lin1", "ffn.lin2")
    attention_mark = ".attention."

    def fix_cut(self, model: nn.Module, keep: list[int], old_n: int) -> None:
        super().fix_cut(model, keep, old_n)  # num_hidden_layers maps to n_layers
        model.base_model.transformer.n_layers = len(keep)

    def check_runnable(self, model: nn.Module) -> None:
        if model.config._attn_implementation not in ("eager", "sdpa"):
            raise UnsupportedArchitectureError(
                f"run_blocks supports DistilBERT with eager or SDPA attention, not "
                f"{model.config._attn_implementation!r}; load it with attn_implementation='sdpa'.")

    def embed(self, model: nn.Module, ids: torch.Tensor, batch: Mapping[str, Any]) -> torch.Tensor:
        return model.base_model.embeddings(ids)

    def context(self, model: nn.Module, hidden: torch.Tensor, mask: torch.Tensor) -> dict[str, Any]:
        if model.config._attn_implementation == "sdpa":
            from transformers.modeling_attn_mask_utils import _prepare_4d_attention_mask_for_sdpa

            return {"mask": _prepare_4d_attention_mask_for_sdpa(mask, hidden.dtype, tgt_len=hidden.shape[1])}
        return {"mask": mask}

    def run_block(self, block: nn.Module, hidden: torch.Tensor, ctx: dict[str, Any]) -> torch.Tensor:
        return _first(block(hidden, attn_mask=ctx["mask"]))

    def finish(self, model: nn.Module, hidden: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
        if not _is_sequence_classifier(model):
            raise _unknown_head(model)
        pooled = nn.functional.relu(model.pre_classifier(hidden[:, 0]))
        return model.classifier(model.dropout(pooled))

    def mask_optional(self, model: nn.Module) -> bool:
        return model.config._attn_implementation == "sdpa"  # the eager attention indexes the mask itself


@_register
class MPNetAdapter(FamilyAdapter):
    """MPNet encoders: embeddings, extended mask plus the relative position bias shared by all blocks,
    classification head on the first token."""

    model_types = ("mpnet",)
    blocks_attr = "encoder.layer"
    is_encoder = True
    lora_targets = ("q", "k", "v", "o", "intermediate.dense", "output.dense")
    attention_mark = ".attention."

    def embed(self, model: nn.Module, ids: torch.Tensor, batch: Mapping[str, Any]) -> torch.Tensor:
        return model.base_model.embeddings(input_ids=ids)

    def context(self, model: nn.Module, hidden: torch.Tensor, mask: torch.Tensor) -> dict[str, Any]:
        base = model.base_model
        return {"mask": base.get_extended_attention_mask(mask, tuple(mask.shape)),
                "position_bias": base.encoder.compute_position_bias(hidden)}

    def run_block(self, block: nn.Module, hidden: torch.Tensor, ctx: dict[str, Any]) -> torch.Tensor:
        return _first(block(hidden, attention_mask=ctx["mask"], position_bias=ctx["position_bias"]))

    def finish(self, model: nn.Module, hidden: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
        if not _is_sequence_classifier(model):
            raise _unknown_head(model)
        return model.classifier(hidden)


class _CausalDecoderAdapter(FamilyAdapter):
    """Shared part of the causal decoders: causal mask (plus a sliding-window one where the family builds
    it), final norm, then the score head at the last real token or the LM head at every position."""

    #: Whether the family's forward also builds a sliding-window causal mask (when ``config.sliding_window``).
    sliding_mask: bool = False

    def final_norm(self, model: nn.Module) -> nn.Module:
        raise NotImplementedError

    def context(self, model: nn.Module, hidden: torch.Tensor, mask: torch.Tensor) -> dict[str, Any]:
        from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask

        base = model.base_model
        cache_position = torch.arange(hidden.shape[1], device=hidden.device)
        position_ids = cache_position.unsqueeze(0)
        kwargs = {"config": base.config, "input_embeds": hidden, "attention_mask": mask,
                  "cache_position": cache_position, "past_key_values": None, "position_ids": position_ids}
        ctx: dict[str, Any] = {"cache_position": cache_position, "position_ids": position_ids,
                               "masks": {"full_attention": create_causal_mask(**kwargs)}}
        if self.sliding_mask and getattr(base.config, "sliding_window", None) is not None:
            ctx["masks"]["sliding_attention"] = create_sliding_window_causal_mask(**kwargs)
        return ctx

    def finish(self, model: nn.Module, hidden: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
        if _is_sequence_classifier(model):
            logits = model.score(self.final_norm(model)(hidden))
            return logits[torch.arange(logits.shape[0], device=logits.device), _last_token(hidden, attention_mask)]
        if hasattr(model, "lm_head"):
            return model.lm_head(self.final_norm(model)(hidden))
        raise _unknown_head(model)


@_register
class LlamaAdapter(_CausalDecoderAdapter):
    """LLaMA decoders: token embeddings only (rotary positions are computed once and applied inside each
    block), each block given the mask of its ``attention_type``, RMSNorm before the head."""

    model_types = ("llama",)
    blocks_attr = "layers"
    lora_targets = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    attention_mark = ".self_attn."

    def final_norm(self, model: nn.Module) -> nn.Module:
        return model.base_model.norm

    def embed(self, model: nn.Module, ids: torch.Tensor, batch: Mapping[str, Any]) -> torch.Tensor:
        return model.base_model.embed_tokens(ids)

    def context(self, model: nn.Module, hidden: torch.Tensor, mask: torch.Tensor) -> dict[str, Any]:
        ctx = super().context(model, hidden, mask)
        ctx["position_embeddings"] = model.base_model.rotary_emb(hidden, ctx["position_ids"])
        return ctx

    def mask_kind(self, block: nn.Module, ctx: dict[str, Any]) -> str:
        """Which of ``ctx["masks"]`` this block attends with."""
        return getattr(block, "attention_type", "full_attention")

    def run_block(self, block: nn.Module, hidden: torch.Tensor, ctx: dict[str, Any]) -> torch.Tensor:
        return _first(block(hidden, attention_mask=ctx["masks"][self.mask_kind(block, ctx)],
                            position_ids=ctx["position_ids"], cache_position=ctx["cache_position"],
                            position_embeddings=ctx["position_embeddings"]))


@_register
class MistralAdapter(LlamaAdapter):
    """Mistral: LLaMA-like, but its sliding window (if configured) applies to every block."""

    model_types = ("mistral",)
    sliding_mask = True

    def mask_kind(self, block: nn.Module, ctx: dict[str, Any]) -> str:
        return "sliding_attention" if "sliding_attention" in ctx["masks"] else "full_attention"


@_register
class Qwen2Adapter(LlamaAdapter):
    """Qwen2: LLaMA-like with per-block full/sliding attention (``layer_types``); the first
    ``max_window_layers`` blocks use full attention, and the base model decides once at init whether to
    build sliding masks (``has_sliding_layers``), so a cut must update both."""

    model_types = ("qwen2",)
    sliding_mask = True

    def fix_cut(self, model: nn.Module, keep: list[int], old_n: int) -> None:
        super().fix_cut(model, keep, old_n)
        config = model.config
        mwl = getattr(config, "max_window_layers", None)
        if isinstance(mwl, int):
            config.max_window_layers = sum(1 for i in keep if i < mwl)
        base = model.base_model
        if hasattr(base, "has_sliding_layers"):
            base.has_sliding_layers = "sliding_attention" in (getattr(config, "layer_types", None) or [])


@_register
class GPT2Adapter(_CausalDecoderAdapter):
    """GPT-2: token + learned position embeddings, causal mask, ``ln_f`` before the head."""

    model_types = ("gpt2",)
    blocks_attr = "h"
    lora_targets = ("c_attn", "c_proj", "c_fc")

    def check_cuttable(self, model: nn.Module) -> None:
        if getattr(model.config, "scale_attn_by_inverse_layer_idx", False):
            raise UnsupportedArchitectureError(
                "This GPT-2 config has scale_attn_by_inverse_layer_idx=True: each block's attention depends on "
                "its position in the stack, so a model with blocks removed cannot reproduce the kept blocks. Use "
                "a config with scale_attn_by_inverse_layer_idx=False.")

    def final_norm(self, model: nn.Module) -> nn.Module:
        return model.base_model.ln_f

    def embed(self, model: nn.Module, ids: torch.Tensor, batch: Mapping[str, Any]) -> torch.Tensor:
        base = model.base_model
        position_ids = torch.arange(ids.shape[1], device=ids.device).unsqueeze(0)
        hidden = base.wte(ids) + base.wpe(position_ids)
        tt = batch.get("token_type_ids")
        if tt is not None:
            hidden = hidden + base.wte(tt.to(ids.device))
        return base.drop(hidden)

    def run_block(self, block: nn.Module, hidden: torch.Tensor, ctx: dict[str, Any]) -> torch.Tensor:
        return _first(block(hidden, attention_mask=ctx["masks"]["full_attention"],
                            cache_position=ctx["cache_position"], use_cache=False))


#: ``config.model_type`` values whose block stack this module knows (the registry's keys, in order).
SUPPORTED: tuple[str, ...] = tuple(_REGISTRY)


def _first(out: Any) -> torch.Tensor:
    """The hidden states of a block's output (blocks return a tensor or a tuple led by it)."""
    return out[0] if isinstance(out, tuple) else out


# --------------------------------------------------------------------------------------------------
# Finding the blocks


def adapter_for(model: nn.Module) -> FamilyAdapter:
    """The ``FamilyAdapter`` of the model's ``config.model_type``; an unsupported architecture is refused
    here, before any work, with an error naming the supported families."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    adapter = _REGISTRY.get(model_type) if isinstance(model_type, str) else None
    if adapter is None:
        raise UnsupportedArchitectureError(
            f"{type(model).__name__} (model_type={model_type!r}) is not a supported architecture. "
            f"Supported families (config.model_type): {', '.join(SUPPORTED)}. Use a model of one of these "
            "families (e.g. a BERT/RoBERTa/DistilBERT/MPNet encoder or a LLaMA/Mistral/Qwen2/GPT-2 decoder); "
            "vision and encoder-decoder models are not supported: the kit's data, tokenisation and heads are "
            "for text classifiers and causal LMs.")
    return adapter


def adapter_for_type(model_type: str | None) -> FamilyAdapter | None:
    """The ``FamilyAdapter`` serving a ``config.model_type`` (read from a config.json, no model built), or None."""
    return _REGISTRY.get(model_type) if isinstance(model_type, str) else None


def family(model: nn.Module) -> str:
    """The model's ``config.model_type`` if it is in ``SUPPORTED``; otherwise a clear error."""
    adapter_for(model)
    return model.config.model_type


def _base_prefix(model: nn.Module) -> str:
    """Attribute name of the base model inside a task-head model ("" for a bare model)."""
    prefix = getattr(model, "base_model_prefix", "")
    if prefix and isinstance(getattr(model, prefix, None), nn.Module):
        return prefix
    return ""


def block_path(model: nn.Module) -> str:
    """Dotted path of the block ``ModuleList`` inside ``model``, e.g. ``"bert.encoder.layer"``, ``"model.layers"``."""
    return adapter_for(model).block_path(model)


def get_blocks(model: nn.Module) -> nn.ModuleList:
    """The ``nn.ModuleList`` of transformer blocks (the live modules, not copies)."""
    return adapter_for(model).blocks(model)


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


def keep_blocks(model: nn.Module, keep: Sequence[int]) -> nn.Module:
    """A new model (deep copy) holding only blocks ``keep`` of ``model``, in their original order.

    The config is updated (``num_hidden_layers`` / ``n_layer``; per-layer lists such as ``layer_types``
    subset; ``max_window_layers`` and ``pruned_heads`` remapped) and every ``layer_idx`` inside a kept
    block is renumbered 0..k-1, so KV-cache generation works and ``save_pretrained`` → ``from_pretrained``
    rebuilds the same model with ``transformers`` alone. ``model`` itself is left unchanged.

    ``keep`` holds distinct indices in increasing order (a ``set`` is sorted for you); at least one block.
    """
    adapter = adapter_for(model)
    full = adapter.blocks(model)
    n = len(full)
    idx = _validate_indices(keep, n, "keep", ordered=True)
    if not idx:
        raise BlockSelectionError("keep is empty; a model needs at least one block. To measure a model without "
                                  "any block, use run_blocks(model, batch, skip=set(range(n))) instead.")
    adapter.check_cuttable(model)

    # Swap the kept blocks in only for the copy, so the dropped blocks are never copied.
    adapter.set_blocks(model, nn.ModuleList([full[i] for i in idx]))
    try:
        new = copy.deepcopy(model)
    finally:
        adapter.set_blocks(model, full)
    adapter.fix_cut(new, idx, n)
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


def _runnable(model: nn.Module) -> FamilyAdapter:
    """The model's adapter, once it is known that its forward can be re-run block by block."""
    adapter = adapter_for(model)
    adapter.check_runnable(model)
    return adapter


def embed(model: nn.Module, batch: Mapping[str, Any]) -> torch.Tensor:
    """The hidden states that enter block 0: the embedding layer's output for ``batch["input_ids"]``.

    BERT/RoBERTa: word + position + token-type embeddings, LayerNorm, dropout; DistilBERT and MPNet: likewise
    without token types; LLaMA-like:
    the token embeddings (rotary positions are applied inside each block); GPT-2: token + position
    embeddings, dropout. Tensors in ``batch`` are moved to the model's device.
    """
    adapter = _runnable(model)
    if "input_ids" not in batch:
        raise LayerwiseError("batch has no 'input_ids'; pass the tokenizer output (input_ids, attention_mask).")
    return adapter.embed(model, batch["input_ids"].to(_device_of(model)), batch)


def block_forward(model: nn.Module, i: int, hidden: torch.Tensor, attention_mask: torch.Tensor | None = None,
                  ) -> torch.Tensor:
    """Run block ``i`` alone on ``hidden`` (batch, seq, hidden) and return its output hidden states.

    ``attention_mask`` is the usual 2-D 0/1 padding mask (None = no padding); it is expanded the way the
    family's own forward does it (additive/SDPA mask for encoders, causal mask and rotary positions for
    decoders). For many blocks in a row prefer ``run_blocks``, which prepares the mask once.
    """
    adapter = _runnable(model)
    blocks = adapter.blocks(model)
    (i,) = _validate_indices([i], len(blocks), "block index i", ordered=True)
    mask = _mask_of({"attention_mask": attention_mask}, tuple(hidden.shape[:2]), hidden.device)
    return adapter.run_block(blocks[i], hidden, adapter.context(model, hidden, mask))


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
    adapter = _runnable(model)
    blocks = adapter.blocks(model)
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
    ctx = adapter.context(model, hidden, mask)
    outputs: list[torch.Tensor] = []
    for i in range(start, n):
        if i not in skip_set:
            hidden = adapter.run_block(blocks[i], hidden, ctx)
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
    - RoBERTa: its classification head (dense → tanh → out_proj) on the first token; DistilBERT:
      pre_classifier → ReLU → dropout → classifier on the first token;
    - MPNet ``*ForSequenceClassification``: its classification head on the first token;
    - decoder ``*ForSequenceClassification``: final norm → score, taken at the last real token (the last 1
      in ``attention_mask``; the last position when it is None);
    - decoder causal LM: final norm → LM head, logits for every position.

    Together with ``run_blocks`` this equals ``model(**batch).logits`` (in eval mode).
    """
    return _runnable(model).finish(model, hidden, attention_mask)
