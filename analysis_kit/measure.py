"""Cost of a model: parameters, bytes on disk, latency at a batch size, peak memory.

Latency is measured the way a reader would deploy: eval mode, no grad, warm-up runs first, then the
median (and inter-quartile range) of repeated timed runs on the same fixed batch. Peak memory is CUDA's
peak allocator statistic on GPU and the process's peak RSS growth on CPU (coarser: say so in reports).
"""

from __future__ import annotations

import resource
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from .device import pick


def count_parameters(model: torch.nn.Module, trainable_only: bool = False) -> int:
    """Number of (trainable) parameters."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def weight_bytes(model: torch.nn.Module) -> int:
    """Bytes held by parameters and buffers in memory (respects 4-bit/8-bit storage dtypes)."""
    return sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers()))


def file_size(model: Any) -> int:
    """Bytes of ``save_pretrained`` output (safetensors + config) for a Hugging Face model."""
    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp)
        return sum(p.stat().st_size for p in Path(tmp).rglob("*") if p.is_file())


def fixed_batch(tokenizer, batch_size: int, seq_len: int = 64, seed: int = 0) -> dict[str, torch.Tensor]:
    """A reproducible batch of random token ids (all positions attended) for timing."""
    g = torch.Generator().manual_seed(seed)
    low = max(len(tokenizer.all_special_ids), 5)
    ids = torch.randint(low, tokenizer.vocab_size, (batch_size, seq_len), generator=g)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


@torch.no_grad()
def latency(model: torch.nn.Module, batch: dict[str, torch.Tensor], repeats: int = 20, warmup: int = 3,
            device: str | torch.device = "auto") -> dict[str, float]:
    """Median, p25 and p75 wall time in milliseconds of ``model(**batch)``; also per-example ms."""
    dev = pick(device)
    model.eval().to(dev)
    batch = {k: v.to(dev) for k, v in batch.items()}
    for _ in range(warmup):
        model(**batch)
    times = []
    for _ in range(repeats):
        if dev.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        model(**batch)
        if dev.type == "cuda":
            torch.cuda.synchronize()
        times.append((time.perf_counter() - t0) * 1000)
    q = statistics.quantiles(times, n=4) if len(times) > 1 else [times[0]] * 3
    n = next(iter(batch.values())).shape[0]
    return {"median_ms": statistics.median(times), "p25_ms": q[0], "p75_ms": q[2],
            "per_example_ms": statistics.median(times) / n, "repeats": repeats}


def peak_memory(fn, device: str | torch.device = "auto") -> dict[str, float]:
    """Run ``fn()`` and report peak memory in MiB: CUDA peak allocated, or CPU max-RSS growth."""
    dev = pick(device)
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
        base = torch.cuda.memory_allocated(dev)
        fn()
        return {"peak_mib": (torch.cuda.max_memory_allocated(dev) - base) / 2**20, "kind": "cuda_allocated"}
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    fn()
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"peak_mib": (after - before) / 1024, "kind": "cpu_maxrss_growth"}
