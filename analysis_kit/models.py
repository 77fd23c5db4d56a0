"""Which model an experiment uses, as one small, hashable spec, and how to build it.

A ``ModelSpec`` names a model family and its shape; it is part of every cache key, so two runs that
use the same spec share trained weights. The kinds:

- ``"minilm"``: all-MiniLM-L6-v2 (BERT, 6 blocks, hidden 384) from the ``minilm`` asset; ``num_layers``
  keeps its first blocks.
- ``"mpnet"``: all-mpnet-base-v2 (MPNet, 12 blocks, hidden 768) from the ``mpnet`` asset, with its own
  tokenizer; ``num_layers`` keeps its first blocks.
- ``"scratch"``: a randomly initialised BERT of any depth/width with the MiniLM tokenizer's vocabulary
  (defaults: 12 blocks, hidden 256, 4 heads, intermediate 4 × hidden).
- ``"smollm2"``: SmolLM2-135M-Instruct (LLaMA, 30 blocks, hidden 576), converted once from the GGUF
  asset to a safetensors folder in the cache (``smollm2_folder``).
- ``"tiny_llama"``: a randomly initialised small LLaMA with SmolLM2's tokenizer (smoke tests).
- ``"hf"``: any local Hugging Face model folder (``path``).

``tiny=True`` (the smoke profile) replaces the weights by a random initialisation of a tiny config of
the same architecture: ``num_layers`` blocks (default 2), width at most 64 (``hidden`` above 64 is
capped, heads fall back to 4 when they do not divide the width), intermediate at most 4 × hidden.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from . import layers
from .cache import cached_dir, code_key
from .errors import LayerwiseError

KINDS = ("minilm", "mpnet", "scratch", "smollm2", "tiny_llama", "hf")
_ENCODER_KINDS = ("minilm", "mpnet", "scratch")
#: The asset of each pretrained encoder kind (its weights, config and tokenizer).
_ENCODER_ASSETS = {"minilm": "minilm", "mpnet": "mpnet"}
_DECODER_KINDS = ("smollm2", "tiny_llama")
#: Defaults of a from-scratch BERT (kind "scratch").
SCRATCH_DEFAULTS = {"num_layers": 12, "hidden": 256, "heads": 4}
#: Defaults of tiny random models (kind "tiny_llama", and any kind with tiny=True).
TINY_DEFAULTS = {"num_layers": 2, "hidden": 64, "heads": 4}
#: tiny=True caps the width here (the smoke profile's "hidden <= 64").
TINY_MAX_HIDDEN = 64

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


class ModelSpecError(LayerwiseError):
    """A model spec that cannot be built."""


@dataclass(frozen=True)
class ModelSpec:
    """What to build: ``kind`` (one of ``KINDS``) plus optional shape overrides; see the module docstring.

    Checked on construction, so a bad spec fails before any download, conversion or training.
    """

    kind: str
    num_layers: int | None = None
    hidden: int | None = None
    heads: int | None = None
    intermediate: int | None = None
    path: str | None = None
    tiny: bool = False
    #: SHA-256 of an ``hf`` folder's files (``train.standard_spec`` fills it), so cache keys follow its content.
    digest: str | None = None

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ModelSpecError(f"Unknown model kind {self.kind!r}; use one of {', '.join(KINDS)} "
                                 "(kind='hf' with path=... for your own Hugging Face folder).")
        for name in ("num_layers", "hidden", "heads", "intermediate"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ModelSpecError(f"ModelSpec.{name}={value!r} must be a positive integer or None.")
        if not isinstance(self.tiny, bool):
            raise ModelSpecError(f"ModelSpec.tiny={self.tiny!r} must be True or False.")
        if self.kind == "hf" and not self.path:
            raise ModelSpecError("kind='hf' needs path= pointing at a local Hugging Face model folder "
                                 "(one holding config.json), e.g. ModelSpec('hf', path='/models/my-bert').")
        if self.kind != "hf" and (self.path is not None or self.digest is not None):
            raise ModelSpecError(f"path= is only used with kind='hf' (got kind={self.kind!r}); drop path or "
                                 "use kind='hf'.")
        pretrained = self.kind in (*_ENCODER_ASSETS, "smollm2", "hf") and not self.tiny
        if pretrained:
            given = [n for n in ("hidden", "heads", "intermediate") if getattr(self, n) is not None]
            if given:
                raise ModelSpecError(f"kind={self.kind!r} loads pretrained weights whose width is fixed, so "
                                     f"{', '.join(given)} cannot be set; drop them, or use kind='scratch' "
                                     "(or tiny=True) for a model of your own width.")
        else:
            dims = resolve_dims(self)
            if dims["hidden"] % dims["heads"]:
                raise ModelSpecError(f"hidden={dims['hidden']} is not divisible by heads={dims['heads']}; "
                                     "choose heads that divide hidden (e.g. hidden=256, heads=4).")


def resolve_dims(spec: ModelSpec) -> dict[str, int]:
    """Depth and width of a randomly initialised model (scratch, tiny_llama or tiny=True), defaults filled in."""
    defaults = SCRATCH_DEFAULTS if spec.kind == "scratch" and not spec.tiny else TINY_DEFAULTS
    layers_ = spec.num_layers or defaults["num_layers"]
    hidden = spec.hidden or defaults["hidden"]
    heads = spec.heads or defaults["heads"]
    if spec.tiny:
        hidden = min(hidden, TINY_MAX_HIDDEN)
        if hidden % heads:
            heads = 4 if hidden % 4 == 0 else 1
    intermediate = spec.intermediate or 4 * hidden
    if spec.tiny:
        intermediate = min(intermediate, 4 * hidden)
    return {"num_layers": layers_, "hidden": hidden, "heads": heads, "intermediate": intermediate}


# --------------------------------------------------------------------------------------------------
# Folders


def _locate(name: str) -> Path:
    from .assets import locate  # imported lazily: assets may fetch, models must stay cheap to import

    return Path(locate(name))


def _hf_folder(spec: ModelSpec) -> Path:
    folder = Path(spec.path).expanduser()
    if not (folder / "config.json").is_file():
        raise ModelSpecError(f"kind='hf' path {str(folder)!r} is not a Hugging Face model folder (no config.json "
                             "there); point path at a folder written by save_pretrained.")
    return folder


def _gguf_file() -> Path:
    folder = _locate("smollm2")
    gguf = folder / SMOLLM2_GGUF
    if not gguf.is_file():
        raise ModelSpecError(f"{SMOLLM2_GGUF} is missing from {folder}; run `analysis-kit fetch smollm2` to "
                             "fetch and verify the asset again.")
    return gguf


def _fix_gguf_tokenizer(tokenizer: Any, gguf: Path) -> Any:
    """Apply the GGUF file's own special-token metadata, which transformers' GGUF loader partly ignores
    (it reports eos = <|im_start|>, no pad token, and adds a BOS token that SmolLM2 does not use)."""
    from gguf import GGUFReader

    fields = GGUFReader(str(gguf)).fields

    def meta(key: str) -> Any:
        return fields[key].contents() if key in fields else None

    for attr, key in (("bos_token", "tokenizer.ggml.bos_token_id"), ("eos_token", "tokenizer.ggml.eos_token_id"),
                      ("unk_token", "tokenizer.ggml.unknown_token_id"),
                      ("pad_token", "tokenizer.ggml.padding_token_id")):
        token_id = meta(key)
        if token_id is not None:
            setattr(tokenizer, attr, tokenizer.convert_ids_to_tokens(int(token_id)))
    for attr, key in (("add_bos_token", "tokenizer.ggml.add_bos_token"),
                      ("add_eos_token", "tokenizer.ggml.add_eos_token")):
        flag = meta(key)
        if flag is not None and hasattr(tokenizer, attr):
            setattr(tokenizer, attr, bool(flag))
    return tokenizer


def _smollm2_tokenizer_folder() -> Path:
    """SmolLM2's tokenizer, read from the GGUF file once and cached as a plain tokenizer folder."""
    gguf = _gguf_file()

    def build(folder: Path) -> None:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        _fix_gguf_tokenizer(tokenizer, gguf).save_pretrained(folder)

    return cached_dir("tokenizers", _smollm2_key(gguf, "tokenizer"), build)


def _smollm2_key(gguf: Path, what: str) -> dict[str, Any]:
    import transformers

    return {"what": what, "source": gguf.name, "bytes": gguf.stat().st_size,
            "transformers": transformers.__version__,
            "code": code_key(smollm2_folder, _smollm2_tokenizer_folder, _fix_gguf_tokenizer)}


def smollm2_folder() -> Path:
    """SmolLM2-135M-Instruct as a plain safetensors Hugging Face folder in the cache (converted once).

    The GGUF file is loaded with ``from_pretrained(..., gguf_file=...)``, which dequantizes Q4_1 to fp32
    (so the weights carry the Q4_1 rounding error of the asset). A fresh model is built from the config
    (without any ``quantization_config``), the state dict loaded into it, and it is saved with
    ``save_pretrained`` next to the tokenizer, so that ``transformers`` alone can load the folder.
    """
    gguf = _gguf_file()
    tokenizer_folder = _smollm2_tokenizer_folder()

    def build(folder: Path) -> None:
        from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

        loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        config_dict = loaded.config.to_dict()
        config_dict.pop("quantization_config", None)
        config_dict.pop("_name_or_path", None)
        model_type = config_dict.pop("model_type")
        config = AutoConfig.for_model(model_type, **config_dict)
        with torch.device("meta"):
            fresh = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        state = loaded.state_dict()
        fresh.load_state_dict(state, strict=True, assign=True)
        fresh.tie_weights()
        fresh.eval()
        fresh.save_pretrained(folder)
        AutoTokenizer.from_pretrained(tokenizer_folder).save_pretrained(folder)

    return cached_dir("models", _smollm2_key(gguf, "smollm2-safetensors"), build)


# --------------------------------------------------------------------------------------------------
# Tokenizers and models


def load_tokenizer(spec: ModelSpec) -> Any:
    """The tokenizer for ``spec``: MiniLM's for minilm/scratch, MPNet's for mpnet, SmolLM2's for
    smollm2/tiny_llama, the folder's own for hf. A tokenizer without a pad token gets its EOS token as pad
    (needed for batches)."""
    from transformers import AutoTokenizer

    if spec.kind in _ENCODER_KINDS:
        tokenizer = AutoTokenizer.from_pretrained(_locate(_ENCODER_ASSETS.get(spec.kind, "minilm")))
    elif spec.kind in _DECODER_KINDS:
        tokenizer = AutoTokenizer.from_pretrained(_smollm2_tokenizer_folder())
    else:
        tokenizer = AutoTokenizer.from_pretrained(_hf_folder(spec))
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


@contextlib.contextmanager
def _seeded(seed: int) -> Iterator[None]:
    """Deterministic random initialisation without disturbing the caller's global RNG state."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


#: Class names of the project's label modes, keyed by their number of labels (``train.TaskSpec.num_labels``):
#: ``regression`` has one output (the rating), ``polarity`` two classes, ``bins5`` five (the bins of
#: ``data.BIN_EDGES``, or 1…5 stars). Saved into ``config.id2label``/``label2id`` so that whoever loads a
#: saved classifier can tell which output means what; any other count keeps transformers' ``LABEL_i``.
LABEL_NAMES = {1: ("rating",), 2: ("negative", "positive"),
               5: ("very negative", "negative", "neutral", "positive", "very positive")}


def _label_config(num_labels: int) -> dict[str, Any]:
    """Config entries for a head with ``num_labels`` outputs: problem type and, where known, named labels.

    Names only touch the config, never the weights or the random initialisation.
    """
    if isinstance(num_labels, bool) or not isinstance(num_labels, int) or num_labels < 1:
        raise LayerwiseError(f"num_labels={num_labels!r} must be a positive integer (1 = regression, 2 = binary, ...).")
    problem = "regression" if num_labels == 1 else "single_label_classification"
    out: dict[str, Any] = {"num_labels": num_labels, "problem_type": problem}
    names = LABEL_NAMES.get(num_labels)
    if names:  # after num_labels: setting num_labels on a config resets id2label to LABEL_i
        out["id2label"] = dict(enumerate(names))
        out["label2id"] = {name: i for i, name in enumerate(names)}
    return out


def _shrink(config: Any, dims: dict[str, int]) -> Any:
    """A copy of a pretrained config with the depth/width of ``dims`` (same architecture otherwise)."""
    config = config.__class__.from_dict(config.to_dict())
    old_heads = config.num_attention_heads
    config.num_hidden_layers = dims["num_layers"]
    config.hidden_size = dims["hidden"]
    config.num_attention_heads = dims["heads"]
    if hasattr(config, "intermediate_size"):
        config.intermediate_size = dims["intermediate"]
    if getattr(config, "head_dim", None) is not None:
        config.head_dim = dims["hidden"] // dims["heads"]
    kv = getattr(config, "num_key_value_heads", None)
    if kv:
        group = max(1, old_heads // kv)  # keep the grouped-query ratio where it divides
        config.num_key_value_heads = dims["heads"] // group if dims["heads"] % group == 0 else dims["heads"]
    if isinstance(getattr(config, "layer_types", None), list):
        types = config.layer_types
        config.layer_types = [types[i % len(types)] for i in range(dims["num_layers"])]
    return config


def _tiny_llama_config(tokenizer: Any, dims: dict[str, int]) -> Any:
    """A small LLaMA shaped like SmolLM2 (SiLU MLP, RMSNorm, RoPE θ=1e5, tied embeddings, 3:1 GQA where it divides)."""
    from transformers import LlamaConfig

    heads = dims["heads"]
    kv = heads // 3 if heads % 3 == 0 else (heads // 2 if heads % 2 == 0 else heads)
    return LlamaConfig(vocab_size=len(tokenizer), hidden_size=dims["hidden"], num_hidden_layers=dims["num_layers"],
                       num_attention_heads=heads, num_key_value_heads=kv, intermediate_size=dims["intermediate"],
                       max_position_embeddings=2048, rope_theta=100000.0, rms_norm_eps=1e-5, tie_word_embeddings=True,
                       bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                       pad_token_id=tokenizer.pad_token_id)


def _random_config(spec: ModelSpec, tokenizer: Any) -> Any:
    """The config of a randomly initialised model (scratch, tiny_llama, or any kind with tiny=True)."""
    from transformers import AutoConfig, BertConfig

    dims = resolve_dims(spec)
    if spec.kind in _DECODER_KINDS:
        return _tiny_llama_config(tokenizer, dims)
    if spec.kind in _ENCODER_ASSETS:
        return _shrink(AutoConfig.from_pretrained(_locate(_ENCODER_ASSETS[spec.kind])), dims)
    if spec.kind == "hf":
        return _shrink(AutoConfig.from_pretrained(_hf_folder(spec)), dims)
    return BertConfig(vocab_size=len(tokenizer), hidden_size=dims["hidden"], num_hidden_layers=dims["num_layers"],
                      num_attention_heads=dims["heads"], intermediate_size=dims["intermediate"],
                      max_position_embeddings=512, type_vocab_size=2, pad_token_id=tokenizer.pad_token_id)


def _pretrained_folder(spec: ModelSpec) -> Path:
    if spec.kind in _ENCODER_ASSETS:
        return _locate(_ENCODER_ASSETS[spec.kind])
    if spec.kind == "smollm2":
        return smollm2_folder()
    return _hf_folder(spec)


def _first_blocks(model: Any, spec: ModelSpec) -> Any:
    """Keep the first ``spec.num_layers`` blocks of a pretrained model (all when None)."""
    if spec.num_layers is None:
        return model
    n = layers.num_blocks(model)
    if spec.num_layers > n:
        raise ModelSpecError(f"num_layers={spec.num_layers} but the pretrained {spec.kind} model has only {n} blocks; "
                             f"use num_layers <= {n}, or kind='scratch' for a deeper model.")
    return model if spec.num_layers == n else layers.keep_blocks(model, range(spec.num_layers))


def build_classifier(spec: ModelSpec, num_labels: int, seed: int = 0) -> Any:
    """A sequence classifier (``AutoModelForSequenceClassification``) for ``spec``; regression when
    ``num_labels == 1``. Randomly initialised parts (the head; everything for scratch/tiny) are seeded by
    ``seed``. Decoders get ``pad_token_id`` set, so batches with padding pool at the last real token."""
    from transformers import AutoModelForSequenceClassification

    labels = _label_config(num_labels)
    random_init = spec.tiny or spec.kind in ("scratch", "tiny_llama")
    tokenizer = load_tokenizer(spec) if random_init else None
    with _seeded(seed):
        if random_init:
            config = _random_config(spec, tokenizer)
            for key, value in labels.items():
                setattr(config, key, value)
            model = AutoModelForSequenceClassification.from_config(config)
        else:
            model = AutoModelForSequenceClassification.from_pretrained(_pretrained_folder(spec), **labels)
            model = _first_blocks(model, spec)
    if model.config.pad_token_id is None:
        model.config.pad_token_id = (tokenizer or load_tokenizer(spec)).pad_token_id
    return model.eval()


def load_causal_lm(spec: ModelSpec) -> Any:
    """A causal language model for a decoder spec (smollm2, tiny_llama, or an hf decoder folder).

    ``num_layers`` keeps the first blocks of a pretrained model; random ones (tiny_llama, tiny=True) are
    initialised with seed 0, so the same spec always gives the same weights.
    """
    from transformers import AutoModelForCausalLM

    if spec.kind in _ENCODER_KINDS:
        raise ModelSpecError(f"kind={spec.kind!r} is an encoder and has no causal LM; use kind='smollm2', "
                             "'tiny_llama' or an hf decoder folder.")
    if spec.tiny or spec.kind == "tiny_llama":
        config = _random_config(spec, load_tokenizer(spec))
        with _seeded(0):
            model = AutoModelForCausalLM.from_config(config)
    else:
        model = _first_blocks(AutoModelForCausalLM.from_pretrained(_pretrained_folder(spec)), spec)
    return model.eval()


def count_parameters(model: torch.nn.Module, trainable_only: bool = False) -> int:
    """Number of parameters (tied weights counted once; 4-bit packed weights counted at their logical size)."""
    total = 0
    for p in model.parameters():
        if trainable_only and not p.requires_grad:
            continue
        quant_state = getattr(p, "quant_state", None)
        shape = getattr(quant_state, "shape", None)
        total += int(torch.Size(shape).numel()) if shape is not None else p.numel()
    return total

