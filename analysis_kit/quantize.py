"""4-bit NF4 weights (bitsandbytes) and QLoRA (peft): build, measure the error, train, and count the cost.

How a model is quantized. ``quantize(model)`` writes the fp32 model to a temporary folder with
``save_pretrained`` and loads it back with ``from_pretrained(..., quantization_config=BitsAndBytesConfig)``,
the route every Hugging Face user takes. We chose it over swapping ``nn.Linear`` for
``bnb.nn.Linear4bit`` by hand because it (a) applies the quantization exactly as ``transformers`` does
(``llm_int8_skip_modules``, compute dtype, double quantization), (b) marks the model
``is_loaded_in_4bit``, which ``peft.prepare_model_for_kbit_training`` relies on, and (c) works for any
model we build, including block-pruned ones (``layers.keep_blocks`` round-trips ``save_pretrained``).
The cost is one save/load; because bitsandbytes' CPU quantizer is slow (about a minute for SmolLM2), the
4-bit model is cached under a hash of the weights it quantizes. Only the ``nn.Linear`` layers *inside the block
stack* are quantized: embeddings are never quantized by bitsandbytes, and every linear layer outside the
blocks (BERT's pooler and classifier, a decoder's ``score`` head) is listed in ``llm_int8_skip_modules``
and later trained in full (peft ``modules_to_save``), as in the QLoRA recipe of Dettmers et al. (2023).

Quantization error. ``weight_errors`` compares every dequantized 4-bit weight with its fp32 source
(relative Frobenius error), ``per_block_error`` sums them per block. ``matmul_check`` compares a ``Linear4bit`` forward against fp32 and against the dequantized weight: on
Gaussian weights NF4 (block size 64) has a relative error near 0.09, and a correct kernel reproduces the
dequantized-weight product to float rounding (bitsandbytes 0.49-0.50 do not for widths that are not a
multiple of 64 on CPU; the project pins 0.48.2).

Training. ``prepare`` turns a classifier into a ``full`` / ``lora`` / ``qlora`` training candidate;
``run`` trains it with :func:`analysis_kit.train.fine_tune`, evaluates it and measures trainable
parameters, weight bytes, peak training memory and time per step, cached on disk per run.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import math
import os
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator, Mapping
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn

from . import layers
from . import train as train_mod
from .cache import cached_dir, cached_json, code_key, reachable
from .device import pick, seed_everything
from .errors import LayerwiseError

#: bitsandbytes 0.48 calls torch._check_is_size, which torch 2.13 deprecates with a FutureWarning on every 4-bit
#: call; the call still does what it should, so the warning is silenced here, for that message only.
warnings.filterwarnings("ignore", message=r".*_check_is_size will be removed.*", category=FutureWarning)

QUANT_TYPES = ("nf4", "fp4")
COMPUTE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
TARGETS = ("attention", "all_linear")
METHODS = ("full", "lora", "qlora")


class QuantizeError(LayerwiseError):
    """A quantization or LoRA request that cannot work (bad setting, unsupported model, missing backend)."""


# --------------------------------------------------------------------------------------------------
# Settings


@dataclass(frozen=True)
class QuantConfig:
    """How the block weights are stored: 4-bit ``quant_type``, double quantization of the block scales
    (8-bit absmax, saving about 0.37 bit per weight), and the dtype the 4-bit layers compute in."""

    quant_type: str = "nf4"
    double_quant: bool = True
    compute_dtype: str = "float32"

    def __post_init__(self) -> None:
        if self.quant_type not in QUANT_TYPES:
            raise QuantizeError(f"quant_type={self.quant_type!r} is unknown; use one of {', '.join(QUANT_TYPES)}.")
        if self.compute_dtype not in COMPUTE_DTYPES:
            raise QuantizeError(f"compute_dtype={self.compute_dtype!r} is unknown; use one of "
                                f"{', '.join(COMPUTE_DTYPES)} (float32 on CPU, bfloat16 on recent GPUs).")
        if not isinstance(self.double_quant, bool):
            raise QuantizeError(f"double_quant={self.double_quant!r} must be True or False.")

    @property
    def dtype(self) -> torch.dtype:
        return COMPUTE_DTYPES[self.compute_dtype]

    def bnb_config(self, skip_modules: list[str]) -> Any:
        """The ``transformers.BitsAndBytesConfig`` for these settings, leaving ``skip_modules`` in full precision."""
        from transformers import BitsAndBytesConfig

        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=self.quant_type,
                                  bnb_4bit_use_double_quant=self.double_quant, bnb_4bit_compute_dtype=self.dtype,
                                  llm_int8_skip_modules=list(skip_modules))


@dataclass(frozen=True)
class LoraSpec:
    """A LoRA adapter: ``rank``, which block linears it adapts (``targets``), scale ``alpha = alpha_ratio * rank``
    (a constant ratio keeps the update's scale the same across ranks) and dropout on the adapter input."""

    rank: int = 16
    targets: str = "all_linear"
    alpha_ratio: float = 2.0
    dropout: float = 0.05
    gradient_checkpointing: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank < 1:
            raise QuantizeError(f"LoRA rank={self.rank!r} must be a positive integer (e.g. 8 or 16).")
        if self.targets not in TARGETS:
            raise QuantizeError(f"targets={self.targets!r} is unknown; use one of {', '.join(TARGETS)}.")
        if not self.alpha_ratio > 0 or not 0 <= self.dropout < 1:
            raise QuantizeError(f"alpha_ratio={self.alpha_ratio!r} must be > 0 and dropout={self.dropout!r} in [0, 1).")


# --------------------------------------------------------------------------------------------------
# Which modules


def _linear_like(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear)  # bnb.nn.Linear4bit subclasses nn.Linear


def block_linears(model: nn.Module, targets: str = "all_linear") -> list[str]:
    """Full names of the linear layers inside the block stack (``targets="attention"``: attention projections only).

    Full names (not suffixes) keep a pooler or head whose name also ends in ``dense`` out of the match.
    """
    if targets not in TARGETS:
        raise QuantizeError(f"targets={targets!r} is unknown; use one of {', '.join(TARGETS)}.")
    mark = layers.adapter_for(model).attention_mark
    if mark is None:
        usable = [t for t in layers.SUPPORTED if layers.adapter_for_type(t).attention_mark is not None]
        raise QuantizeError(f"model_type={model.config.model_type!r} keeps its weights in Conv1D, not nn.Linear; "
                            f"4-bit/LoRA here support {', '.join(usable)}. Use one of those families.")
    prefix = layers.block_path(model) + "."
    names = [n for n, m in model.named_modules() if n.startswith(prefix) and _linear_like(m)]
    if targets == "attention":
        names = [n for n in names if mark in n]
    if not names:
        raise QuantizeError(f"no {targets} linear layers found under {prefix!r}; is this a standard "
                            f"{type(model).__name__}?")
    return names


def head_modules(model: nn.Module) -> list[str]:
    """Full names of the linear layers outside the blocks (pooler, classifier, score, LM head).

    They stay in full precision when quantizing and are trained in full alongside a LoRA adapter.
    """
    prefix = layers.block_path(model) + "."
    return [n for n, m in model.named_modules() if n and not n.startswith(prefix) and _linear_like(m)]


def is_quantized(model: nn.Module) -> bool:
    """Whether any layer of ``model`` holds 4-bit bitsandbytes weights."""
    import bitsandbytes as bnb

    return any(isinstance(m, bnb.nn.Linear4bit) for m in model.modules())


# --------------------------------------------------------------------------------------------------
# Quantizing


def _weights_digest(model: nn.Module, names: list[str]) -> str:
    """SHA-256 of the named modules' weights (names, shapes, dtypes, bytes): what quantization depends on."""
    modules = dict(model.named_modules())
    h = hashlib.sha256()
    for name in names:
        w = modules[name].weight.detach().to("cpu").contiguous()
        h.update(f"{name}:{tuple(w.shape)}:{w.dtype}".encode())
        h.update(w.view(torch.uint8).reshape(-1).numpy())
    return h.hexdigest()


def quantize(model: nn.Module, qcfg: QuantConfig = QuantConfig(), device: str | torch.device = "auto",
             cache: bool = True) -> nn.Module:
    """A 4-bit copy of ``model``: block linears in ``qcfg.quant_type``, everything else fp32; ``model`` is unchanged.

    Goes through ``save_pretrained`` → ``from_pretrained(quantization_config=...)`` (see the module
    docstring). Works on CPU (bitsandbytes 0.48 has a CPU backend) and on CUDA. bitsandbytes' CPU
    quantizer is slow (about a minute for SmolLM2's 210 layers on 2 cores), so with ``cache`` the 4-bit
    model is stored with ``save_pretrained`` under a key made of a hash of the block weights, the config,
    ``qcfg``, the device type and the library versions; every tensor that is not a 4-bit weight (embeddings,
    norms, biases, head) is then copied from ``model``, so two models that share blocks but differ in their
    head (another seed) share one cache entry and still get their own head.
    """
    if is_quantized(model):
        raise QuantizeError("model is already 4-bit; pass the full-precision model to quantize().")
    if not hasattr(model, "save_pretrained"):
        raise QuantizeError(f"{type(model).__name__} is not a Hugging Face PreTrainedModel; quantize() needs "
                            "save_pretrained/from_pretrained.")
    names = block_linears(model)  # also fails early on unsupported families
    dev = pick(device)
    skip = head_modules(model)

    def fresh() -> nn.Module:
        with tempfile.TemporaryDirectory(prefix="layerwise-q4-") as tmp:
            model.save_pretrained(tmp)
            return type(model).from_pretrained(tmp, quantization_config=qcfg.bnb_config(skip), dtype=torch.float32,
                                               device_map={"": str(dev)})

    if not cache:
        return fresh().eval()
    import bitsandbytes
    import transformers

    config = {k: v for k, v in model.config.to_dict().items() if k not in ("_name_or_path", "transformers_version")}
    key = {"kind": "nf4_model", "class": type(model).__name__, "config": config, "weights": _weights_digest(model, names),
           "qcfg": asdict(qcfg), "skip": skip, "device": dev.type, "bitsandbytes": bitsandbytes.__version__,
           "transformers": transformers.__version__}
    folder = cached_dir("quantized", key, lambda out: fresh().save_pretrained(out))
    quantized = type(model).from_pretrained(folder, dtype=torch.float32, device_map={"": str(dev)})
    four_bit = {f"{n}.weight" for n in names}
    rest = {k: v for k, v in model.state_dict().items() if k not in four_bit}
    result = quantized.load_state_dict(rest, strict=False)
    if result.unexpected_keys:
        raise QuantizeError(f"cached 4-bit model lacks {result.unexpected_keys[:3]}; clear the 'quantized' cache.")
    return quantized.eval()


def dequantized_weight(module: nn.Module) -> torch.Tensor:
    """The fp32 weight a ``bnb.nn.Linear4bit`` actually multiplies with (dequantized from 4 bits)."""
    import bitsandbytes.functional as bnbf

    weight = module.weight
    state = getattr(weight, "quant_state", None)
    if state is None:
        raise QuantizeError(f"{type(module).__name__} has no 4-bit quant_state; pass a Linear4bit of a quantized model.")
    return bnbf.dequantize_4bit(weight.data, state).float()


def roundtrip_error(weight: torch.Tensor, qcfg: QuantConfig = QuantConfig(), blocksize: int = 64) -> float:
    """Relative Frobenius error of quantizing ``weight`` to 4 bits and back (bitsandbytes.functional)."""
    import bitsandbytes.functional as bnbf

    w = weight.detach().float()
    q, state = bnbf.quantize_4bit(w, blocksize=blocksize, compress_statistics=qcfg.double_quant,
                                  quant_type=qcfg.quant_type)
    back = bnbf.dequantize_4bit(q, state).float().reshape(w.shape)
    return float(torch.linalg.norm(back - w) / torch.linalg.norm(w))


def matmul_check(in_features: int, out_features: int = 64, batch: int = 32, qcfg: QuantConfig = QuantConfig(),
                 seed: int = 0, device: str | torch.device = "auto", corrupt: bool = False) -> dict[str, float]:
    """Is the installed bitsandbytes' 4-bit matmul right for this width? Random N(0, 1) weights and inputs.

    Returns ``weight_error`` (‖Ŵ − W‖/‖W‖ of the layer's own dequantized weight), ``roundtrip_error``
    (the same through ``bitsandbytes.functional``, the reference), ``output_error`` (‖y₄ − xWᵀ‖/‖xWᵀ‖: the
    error a user sees) and ``kernel_error`` (‖y₄ − xŴᵀ‖/‖xŴᵀ‖: must be float rounding for a correct kernel).
    ``corrupt=True`` zeroes the block scales of the last quarter of the weight after quantizing (a
    stand-in for a broken kernel), so that tests can show this check fails when it should.
    """
    import bitsandbytes as bnb

    if in_features < 1 or out_features < 1 or batch < 1:
        raise QuantizeError("in_features, out_features and batch must be positive integers.")
    dev = pick(device)
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out_features, in_features, generator=g)
    x = torch.randn(batch, in_features, generator=g)
    layer = bnb.nn.Linear4bit(in_features, out_features, bias=False, compute_dtype=qcfg.dtype,
                              compress_statistics=qcfg.double_quant, quant_type=qcfg.quant_type)
    layer.weight = bnb.nn.Params4bit(w.clone(), requires_grad=False, compress_statistics=qcfg.double_quant,
                                     quant_type=qcfg.quant_type)
    layer = layer.to(dev)  # quantizes on the move
    if corrupt:
        state = layer.weight.quant_state
        absmax = state.state2.absmax if state.nested else state.absmax  # double quant: corrupt the outer scales
        absmax[-max(1, absmax.numel() // 4):] = 0
    with torch.no_grad():
        y4 = layer(x.to(dev, qcfg.dtype)).float().cpu()
        w_hat = dequantized_weight(layer).cpu().reshape(w.shape)
    y = x @ w.T
    y_hat = x @ w_hat.T

    def rel(a: torch.Tensor, b: torch.Tensor) -> float:
        return float(torch.linalg.norm(a - b) / torch.linalg.norm(b))

    return {"in_features": in_features, "out_features": out_features, "weight_error": rel(w_hat, w),
            "roundtrip_error": roundtrip_error(w, qcfg), "output_error": rel(y4, y), "kernel_error": rel(y4, y_hat)}


def weight_errors(fp_model: nn.Module, q_model: nn.Module) -> pd.DataFrame:
    """Per quantized linear layer: relative Frobenius error of its dequantized weight against ``fp_model``'s.

    Columns ``block, module, numel, sq_error, sq_norm, rel_error``; ``q_model`` must be ``quantize(fp_model)``.
    Aggregate per block with :func:`per_block_error`.
    """
    import bitsandbytes as bnb

    fp_modules = dict(fp_model.named_modules())
    prefix = layers.block_path(q_model) + "."
    rows = []
    for name, module in q_model.named_modules():
        if not isinstance(module, bnb.nn.Linear4bit):
            continue
        if name not in fp_modules:
            raise QuantizeError(f"{name} is in the 4-bit model but not in fp_model; pass the model it was quantized from.")
        w = fp_modules[name].weight.detach().float().cpu()
        w_hat = dequantized_weight(module).cpu().reshape(w.shape)
        sq_err, sq_norm = float(((w_hat - w) ** 2).sum()), float((w**2).sum())
        rest = name[len(prefix):] if name.startswith(prefix) else name
        block, _, sub = rest.partition(".")
        rows.append({"block": int(block) if block.isdigit() else -1, "module": sub or rest, "numel": w.numel(),
                     "sq_error": sq_err, "sq_norm": sq_norm, "rel_error": math.sqrt(sq_err / sq_norm)})
    if not rows:
        raise QuantizeError("q_model has no 4-bit layers; pass quantize(fp_model) as q_model.")
    return pd.DataFrame(rows)


def per_block_error(weights: pd.DataFrame) -> pd.DataFrame:
    """Block-level relative weight error sqrt(Σ‖Ŵ−W‖² / Σ‖W‖²) from a :func:`weight_errors` table."""
    agg = weights.groupby("block", as_index=False)[["sq_error", "sq_norm", "numel"]].sum()
    agg["rel_error"] = np.sqrt(agg["sq_error"] / agg["sq_norm"])
    return agg[["block", "numel", "rel_error"]]


# --------------------------------------------------------------------------------------------------
# LoRA and QLoRA


def add_lora(model: nn.Module, lora: LoraSpec, seed: int = 0) -> nn.Module:
    """Wrap ``model`` (fp32 or 4-bit) in a peft LoRA adapter; only the adapter and the head train.

    For a 4-bit model, ``peft.prepare_model_for_kbit_training`` runs first (freezes the base, keeps
    layer norms and the head in fp32, and with gradient checkpointing makes the inputs require grad).
    The head (every linear outside the blocks) is trained in full via ``modules_to_save``. The adapter's
    random initialisation (A ~ Kaiming uniform, B = 0) is seeded with ``seed``.
    """
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    targets = block_linears(model, lora.targets)
    heads = head_modules(model)
    if is_quantized(model):
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=lora.gradient_checkpointing)
    elif lora.gradient_checkpointing:
        model.gradient_checkpointing_enable()
        model.enable_input_require_grads()
    config = LoraConfig(r=lora.rank, lora_alpha=lora.alpha_ratio * lora.rank, lora_dropout=lora.dropout,
                        target_modules=targets, modules_to_save=heads or None, bias="none")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return get_peft_model(model, config)


def prepare(model: nn.Module, method: str, lora: LoraSpec = LoraSpec(), qcfg: QuantConfig = QuantConfig(),
            seed: int = 0, device: str | torch.device = "auto") -> nn.Module:
    """A training candidate built from an fp32 classifier (``model`` itself is left unchanged).

    ``full``: a copy with every parameter trainable; ``lora``: fp32 base frozen + LoRA + trainable head;
    ``qlora``: the base quantized to 4 bits (``quantize``) + LoRA + trainable head.
    """
    if method not in METHODS:
        raise QuantizeError(f"method={method!r} is unknown; use one of {', '.join(METHODS)}.")
    if is_quantized(model):
        raise QuantizeError("prepare() needs the full-precision model; it quantizes for method='qlora' itself.")
    if method == "full":
        out = copy.deepcopy(model)
        for p in out.parameters():
            p.requires_grad_(True)
        if lora.gradient_checkpointing:
            out.gradient_checkpointing_enable()
        return out
    base = quantize(model, qcfg, device) if method == "qlora" else copy.deepcopy(model)
    return add_lora(base, lora, seed)


class _TrainableState(nn.Module):
    """A view of a model whose ``state_dict`` holds only the trainable tensors.

    ``train.fine_tune`` snapshots ``state_dict()`` at the best validation step and restores it with
    ``load_state_dict``; a 4-bit model's state dict carries quantization statistics that
    ``load_state_dict`` rejects, and copying frozen weights is wasted work anyway. Forward is unchanged.
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        self.inner = model

    def forward(self, **kwargs: Any) -> Any:
        return self.inner(**kwargs)

    def state_dict(self, *args: Any, **kwargs: Any) -> dict[str, torch.Tensor]:  # type: ignore[override]
        return {n: p.detach() for n, p in self.inner.named_parameters() if p.requires_grad}

    def load_state_dict(self, state: Mapping[str, torch.Tensor], strict: bool = True, assign: bool = False) -> Any:  # type: ignore[override]
        params = dict(self.inner.named_parameters())
        missing = [n for n, p in params.items() if p.requires_grad and n not in state]
        if strict and missing:
            raise QuantizeError(f"trainable state lacks {missing[:3]}…; restore a snapshot of the same model.")
        with torch.no_grad():
            for name, value in state.items():
                params[name].copy_(value)
        return None


# --------------------------------------------------------------------------------------------------
# Cost


def state_bytes(model: nn.Module) -> int:
    """Bytes of every tensor in ``model.state_dict()`` (4-bit packed weights, their scales and quantization
    maps, fp32 embeddings/norms/head, LoRA matrices), shared storage counted once. This is the weight
    memory a reader pays to hold the model, including what ``nn.Module.parameters()`` does not list."""
    seen: set[tuple[int, int]] = set()
    total = 0
    for tensor in model.state_dict().values():
        if not isinstance(tensor, torch.Tensor):
            continue
        key = (tensor.untyped_storage().data_ptr(), tensor.untyped_storage().nbytes())
        if key in seen and key[0] != 0:
            continue
        seen.add(key)
        total += tensor.numel() * tensor.element_size()
    return total


def trainable_parameters(model: nn.Module) -> int:
    """Number of parameters that receive gradients."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


@contextlib.contextmanager
def _quiet_native_stderr() -> Iterator[None]:
    """Silence C-level writes to stderr (the profiler prints start/stop lines there on every use); Python
    exceptions are unaffected and still propagate."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def _cpu_peak_bytes(step: Callable[[], None]) -> int:
    """Peak of bytes allocated by torch's CPU allocator during ``step()``, above what was live before.

    Uses the profiler's memory events (every allocation and free, in time order), so it is exact for
    tensors and independent of the process's RSS history (which only grows).
    """
    from torch.profiler import ProfilerActivity, profile

    with _quiet_native_stderr(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    kineto = getattr(prof.profiler, "kineto_results", None)
    if kineto is None:
        raise QuantizeError("this torch build's profiler exposes no memory events; CPU peak memory cannot be measured.")
    events = sorted((e for e in kineto.events() if e.name() == "[memory]"), key=lambda e: e.start_ns())
    live = peak = 0
    for e in events:
        live += e.nbytes()
        peak = max(peak, live)
    return peak


def train_step_cost(model: nn.Module, batch: Mapping[str, torch.Tensor], lr: float = 1e-4, repeats: int = 3,
                    device: str | torch.device = "auto") -> dict[str, Any]:
    """Peak training memory and time of one optimizer step (forward, cross-entropy, backward, AdamW).

    ``peak_train_bytes`` = :func:`state_bytes` + the peak of what one step allocates (activations,
    gradients, AdamW state, dequantization buffers), measured from a fresh optimizer: CUDA's allocator
    peak on GPU, the profiler's allocation trace on CPU. ``step_seconds`` is the median of ``repeats``
    further steps. Trainable parameters are restored afterwards, so measuring does not change the model's
    weights; a full-precision model is moved to ``device`` (a 4-bit one must already be there).
    """
    from .measure import cuda_peak_bytes

    dev = pick(device)
    if "labels" not in batch:
        raise QuantizeError("batch needs 'labels' (class indices) to take a training step.")
    if is_quantized(model):
        where = sorted({str(p.device.type) for p in model.parameters()})
        if where != [dev.type]:
            raise QuantizeError(f"the 4-bit model is on {where} but device={str(dev)!r}: quantize it where you "
                                "measure, prepare(model, 'qlora', device=...) with the same device.")
    else:
        model.to(dev)  # prepare() builds full and LoRA candidates on CPU; they are measured where asked
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise QuantizeError("model has no trainable parameters; prepare it with prepare(model, method) first.")
    saved = [p.detach().clone() for p in params]
    batch = {k: v.to(dev) for k, v in batch.items()}
    labels = batch.pop("labels")
    model.train()
    opt = torch.optim.AdamW(params, lr=lr)

    def step() -> None:
        loss = F.cross_entropy(model(**batch).logits.float(), labels.long())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    weights = state_bytes(model)
    try:
        if dev.type == "cuda":
            transient, kind = cuda_peak_bytes(step, dev), "cuda allocator peak"
        else:
            transient, kind = _cpu_peak_bytes(step), "torch CPU allocation trace"
        times = []
        for _ in range(repeats):
            if dev.type == "cuda":
                torch.cuda.synchronize(dev)
            t0 = time.perf_counter()
            step()
            if dev.type == "cuda":
                torch.cuda.synchronize(dev)
            times.append(time.perf_counter() - t0)
    finally:
        with torch.no_grad():
            for p, value in zip(params, saved, strict=True):
                p.copy_(value)
        opt.zero_grad(set_to_none=True)
        model.eval()
    return {"weight_bytes": weights, "peak_train_bytes": weights + int(transient), "memory_kind": kind,
            "step_seconds": statistics.median(times), "step_repeats": repeats}


def cost_batch(tokenizer: Any, batch_size: int, seq_len: int, num_labels: int = 2, seed: int = 0,
               ) -> dict[str, torch.Tensor]:
    """``measure.fixed_batch`` (random token ids, no padding) plus random labels: the same training batch for
    every method, so memory and time differ only by the method."""
    from .measure import fixed_batch

    batch = fixed_batch(tokenizer, batch_size, seq_len, seed)
    g = torch.Generator().manual_seed(seed + 1)
    batch["labels"] = torch.randint(0, num_labels, (batch_size,), generator=g)
    return batch


# --------------------------------------------------------------------------------------------------
# One training run


@dataclass(frozen=True)
class RunSpec:
    """One cell of the grid: method, adapter, quantization, training recipe and seed."""

    method: str
    seed: int
    lora: LoraSpec = LoraSpec()
    qcfg: QuantConfig = QuantConfig()
    train: Any = None  # train.TrainConfig
    cost_batch_size: int = 16
    cost_seq_len: int = 64

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise QuantizeError(f"method={self.method!r} is unknown; use one of {', '.join(METHODS)}.")
        if self.train is None:
            raise QuantizeError("RunSpec needs train=TrainConfig(...) (the fine-tuning recipe).")

    def key(self) -> dict[str, Any]:
        """Everything that determines this run's numbers (LoRA/quant settings only where they apply)."""
        out = {"method": self.method, "seed": self.seed, "train": asdict(self.train),
               "cost": [self.cost_batch_size, self.cost_seq_len]}
        if self.method != "full":
            out["lora"] = asdict(self.lora)
        else:
            out["gradient_checkpointing"] = self.lora.gradient_checkpointing
        if self.method == "qlora":
            out["qcfg"] = asdict(self.qcfg)
        return out


def run(spec: RunSpec, build_base: Callable[[], nn.Module], tokenizer: Any, splits: Mapping[str, pd.DataFrame],
        data_key: Mapping[str, Any], device: str | torch.device = "auto", cache: bool = True) -> dict[str, Any]:
    """Train one candidate (``prepare`` of ``build_base()``), evaluate it on ``splits["test"]`` and measure its cost.

    ``build_base`` returns the fp32 classifier to start from (a fresh pretrained model with a seeded head,
    or a pruned fine-tuned model); it is only called when the run is not cached. ``data_key`` must
    identify the base model and the data (e.g. model spec, task, seed, pruning) because together with
    ``spec.key()`` it is the cache key. Returns a flat record: accuracy, macro_f1, trainable_params,
    total_params, weight_bytes, peak_train_bytes, step_seconds, train_seconds, steps, and ``correct``
    (per test example, for paired tests on examples).
    """
    for name in ("train", "val", "test"):
        if name not in splits or len(splits[name]) == 0:
            raise QuantizeError(f"splits lacks a non-empty {name!r} frame; pass train.load_task(...) output.")
    spec.train.validate()

    def compute() -> dict[str, Any]:
        seed_everything(spec.seed)
        base = build_base()
        model = prepare(base, spec.method, spec.lora, spec.qcfg, spec.seed, device)
        del base
        total = sum(p.numel() for p in model.parameters())
        start = time.time()
        _, hist = train_mod.fine_tune(_TrainableState(model), tokenizer, splits["train"], splits["val"], spec.train,
                                      spec.seed, device)
        seconds = time.time() - start
        test = train_mod.evaluate(model, tokenizer, splits["test"], max_length=spec.train.max_length, device=device)
        cost = train_step_cost(model, cost_batch(tokenizer, spec.cost_batch_size, spec.cost_seq_len,
                                                 num_labels=int(model.config.num_labels)), lr=spec.train.lr,
                               device=device)
        best = hist.loc[hist["val_loss"].idxmin()] if len(hist) else None
        return {"accuracy": test["accuracy"], "macro_f1": test["macro_f1"], "loss": test["loss"],
                "val_loss": None if best is None else float(best["val_loss"]),
                "val_accuracy": None if best is None else float(best.get("val_accuracy", float("nan"))),
                "history": hist.to_dict(orient="records"),
                "trainable_params": trainable_parameters(model), "total_params": total, **cost,
                "train_seconds": seconds, "steps": int(hist["step"].max()) if len(hist) else 0,
                "device": str(pick(device)), "correct": [bool(c) for c in test["correct"]]}

    key = {"kind": "qlora_run", "code": code_key(*_QLORA_CODE), "data": dict(data_key), "run": spec.key()}
    record = cached_json("qlora_runs", key, compute) if cache else json.loads(json.dumps(compute()))
    return {"method": spec.method, "seed": spec.seed, "rank": spec.lora.rank if spec.method != "full" else 0,
            "targets": spec.lora.targets if spec.method != "full" else "all", **record}


#: The code whose hash keys a QLoRA run (``cache.code_key``): :func:`run`, the quantization and adapter code and
#: every helper of this module they reach (``cache.reachable``: the run's dataclasses, the cost probe), and the
#: kit's fine-tuning loop with its helpers (optimizer, batches, evaluation). Bound at the end of the module.
_QLORA_CODE = reachable(run, quantize, add_lora, prepare, train_mod.fine_tune)
