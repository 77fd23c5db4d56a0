"""Cost of a model: parameters, bytes on disk, latency at a batch size, peak memory.

Latency is measured the way a reader would deploy: eval mode, no grad, warm-up runs first, then the
median (and inter-quartile range) of repeated timed runs on the same fixed batch. Peak memory is CUDA's
peak allocator statistic on GPU and the sampled peak growth of the process's RSS on CPU (coarser: say so
in reports).
"""

from __future__ import annotations

import ctypes
import gc
import statistics
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psutil
import torch

from .device import pick
from .models import count_parameters  # noqa: F401  (re-exported: one definition, tied weights once, 4-bit at logical size)


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
    """Median, p25 and p75 wall time in milliseconds of ``model(**batch)``; also per-example ms and the raw
    ``times_ms`` (for intervals, e.g. a bootstrap of a ratio of medians)."""
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
            "per_example_ms": statistics.median(times) / n, "repeats": repeats, "times_ms": times}


def _malloc_trim() -> None:
    """Return freed heap pages to the OS (glibc), so that RSS growth measures new allocations only."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc (macOS, musl): RSS growth is then a lower bound
        return


def cuda_peak_bytes(fn: Callable[[], Any], dev: torch.device) -> int:
    """Run ``fn()`` on CUDA device ``dev`` and return the allocator's peak above what was allocated before, in
    bytes (synchronised before and after, so asynchronous kernels are inside the window)."""
    torch.cuda.synchronize(dev)
    torch.cuda.reset_peak_memory_stats(dev)
    base = torch.cuda.memory_allocated(dev)
    fn()
    torch.cuda.synchronize(dev)
    return int(torch.cuda.max_memory_allocated(dev) - base)


def peak_memory(fn, device: str | torch.device = "auto", interval_s: float = 0.001) -> dict[str, float]:
    """Run ``fn()`` and report its peak memory in MiB above what was in use before.

    CUDA: the allocator's peak statistic. CPU: the process's resident set size sampled every
    ``interval_s`` by a background thread (psutil), after handing freed heap pages back to the OS
    (glibc ``malloc_trim``) so that memory freed by earlier work is not silently reused unseen. The
    process-lifetime ``ru_maxrss`` used before could only grow, so every measurement after the largest
    one read 0. Sampling can miss a peak shorter than the interval: treat CPU numbers as estimates.
    """
    dev = pick(device)
    if dev.type == "cuda":
        return {"peak_mib": cuda_peak_bytes(fn, dev) / 2**20, "kind": "cuda_allocated"}
    proc = psutil.Process()
    gc.collect()
    _malloc_trim()
    base = proc.memory_info().rss
    peak = [base]
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            peak[0] = max(peak[0], proc.memory_info().rss)
            stop.wait(interval_s)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    try:
        fn()
        peak[0] = max(peak[0], proc.memory_info().rss)
    finally:
        stop.set()
        thread.join()
    return {"peak_mib": max(0, peak[0] - base) / 2**20, "kind": "cpu_rss_sampled"}
