"""Benchmark ``analysis-kit analyze`` beside the peers a practitioner would install instead, in one process run.

The peers (issue 20, item 7), each used through its public API as its source documents it:

- ``short-transformers`` (Gromov et al.'s angular distance): ``ShortTransformer.from_pretrained`` then
  ``remove_layers(tokenizer, block_size=K, dataset, key="text", limit=N)``, which scores every run of
  consecutive blocks on each text's last token and removes one run of K blocks;
- ``optipfair`` (ShortGPT-style 1 - cosine importance): ``analyze_layer_importance(model, dataloader)``, the K
  lowest-scoring blocks, then ``prune_model_depth(model, layer_indices=...)``;

and ours, ``analyze.Analyzer`` doing the same work as ``analysis-kit analyze --task lm --keep L-K``:

- ``analyze (angular run)``: ``--methods angular --strategy angular`` (the matched peer is short-transformers);
- ``analyze (block influence)``: ``--methods block_influence --strategy importance`` (matched with optipfair).

"The same work" for every tool: load the model folder, score the blocks on the same texts, pick K blocks,
remove them, and save a Hugging Face folder with the tokenizer. Each tool is timed from the start of its
load to the end of its save (analyze also checks the data and hashes the model folder: that is part of its
run). The model is SmolLM2-135M (``models.smollm2_folder``), or with ``--tiny`` a tiny random LLaMA with
SmolLM2's tokenizer (a quick check, seconds), or any causal-LM folder with ``--model``. The texts are Amazon
review snippets (``data.load_snippets("amazon")``, a seeded sample): every tool scores the same N texts
(analyze's obligatory held-out split gets two extra snippets, which nothing here evaluates).

Timing is interleaved: ``--repeats`` rounds, each running every tool once, the order rotated by one tool per
round; the table gives the median and range over rounds. After the last round (untimed): the blocks each
tool removed (and whether they were the same in every round), the Jaccard index of the removed sets,
whether the tool's in-memory model generates with the KV cache, and whether its saved folder reloads with
``transformers`` alone (``AutoModelForCausalLM.from_pretrained`` in a subprocess started with ``python -I``
that never imports a peer or ``analysis_kit``, checked through ``sys.modules``), gives the in-memory
model's logits and generates the same greedy tokens with and without the KV cache.

The peers are not dependencies of the package. Install them outside the repo, without touching the
virtualenv, and point ``--peers-path`` at that folder::

    .venv/bin/pip install --no-deps --target /tmp/peers-pkgs short-transformers optipfair seaborn

(``seaborn`` is imported by short-transformers' plotting helpers and is pure Python; torch, transformers,
numpy, matplotlib, tqdm and click come from the virtualenv.)

Output: ``bench_peers.json`` and ``bench_peers.md`` in ``--out`` (default ``results/peers/``, or
``results/peers/tiny/`` with ``--tiny``), with versions, hardware and commit.

Usage: python scripts/bench_peers.py --peers-path /tmp/peers-pkgs [--texts 128] [--drop K] [--repeats 3]
       [--device cpu] [--threads 0] [--max-length 128] [--batch-size 32] [--tiny] [--out DIR]
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import importlib
import json
import logging
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

INSTALL = ".venv/bin/pip install --no-deps --target {path} short-transformers optipfair seaborn"
#: module -> distribution of each peer.
PEERS = {"short_transformers": "short-transformers", "optipfair": "optipfair"}
PROMPT = "I bought this phone case because"
GEN_TOKENS = 8

#: Tools in the order of the tables; ``matched`` names the analyze configuration doing the same kind of work.
TOOLS = {
    "analyze_angular": {"label": "analyze (angular run)", "kind": "ours",
                        "api": "Analyzer(task='lm').importance(['angular']); plan(keep=L-K, strategy='angular'); "
                               "compress(heal='none')",
                        "cli": "analysis-kit analyze MODEL --task lm --methods angular --strategy angular --keep L-K"},
    "analyze_bi": {"label": "analyze (block influence)", "kind": "ours",
                   "api": "Analyzer(task='lm').importance(['block_influence']); plan(keep=L-K, strategy='importance'); "
                          "compress(heal='none')",
                   "cli": "analysis-kit analyze MODEL --task lm --methods block_influence --keep L-K"},
    "short_transformers": {"label": "short-transformers", "kind": "peer", "matched": "analyze_angular",
                           "api": "ShortTransformer.from_pretrained; remove_layers(tokenizer, block_size=K, dataset, "
                                  "key='text', limit=N, max_length)"},
    "optipfair": {"label": "optipfair", "kind": "peer", "matched": "analyze_bi",
                  "api": "analyze_layer_importance(model, dataloader); K lowest scores; "
                         "prune_model_depth(model, layer_indices=...)"},
}

#: What the peers do that analyze does not, from reading their installed source (short-transformers 1.0.0,
#: optipfair 0.4.2); the versions actually used are in the output.
PEERS_ONLY = [
    ("short-transformers", "distance measured at one token position (the last token by default, any position with "
     "`get_angular_distance_ith_token(i)`); analyze averages over every non-padding token"),
    ("short-transformers", "pluggable block distances through `set_metric`: linear-approximation error (\"Your "
     "Transformer is Secretly Linear\"), Euclidean distance, relative magnitude (weight subcloning), BI score, "
     "or any callable"),
    ("short-transformers", "inputs through the tokenizer's chat template (`use_chat_template=True`)"),
    ("short-transformers", "heat-map diagrams of the distance of every (start, length) run (`draw_diagram`, "
     "`draw_layers_heatmap`)"),
    ("short-transformers", "model surgery beyond removal (`model_factory`): merging a removed block into its "
     "neighbour by averaging weights, duplicating blocks, remove-one-duplicate-another, replacing a run of "
     "blocks by a trained linear layer"),
    ("optipfair", "width pruning of GLU MLPs (gate/up/down neuron pairs) by weight criteria MAW, VOW, PON, L2, "
     "or MAW combined with calibration activation norms; sized by a pruning percentage or a target expansion "
     "rate, rounded to a divisor, optionally on chosen layers only (`prune_model_mlp_glu`, `zero_neurons_mlp`)"),
    ("optipfair", "depth removal without scores: the first or the last N blocks, or a percentage of blocks "
     "(`layer_selection_method`, `depth_pruning_percentage`)"),
    ("optipfair", "bias analysis: activation differences between prompt pairs that differ in a demographic "
     "attribute, heat maps and PCA (`visualize_bias`, `visualize_pca`), and fairness-aware neuron pruning "
     "scores (`compute_fairness_pruning_scores`)"),
    ("optipfair", "knowledge distillation with configurable layer maps between student and teacher blocks "
     "(`distill_model`, `MAPPING_UNIFORM`, `MAPPING_LAST`); analyze heals by distillation too, with its own "
     "block map"),
    ("optipfair", "a command-line pruner (`optipfair prune`)"),
]


# --------------------------------------------------------------------------------------------------
# Peers: import from --peers-path, with a clear error naming the install command


def import_peers(peers_path: Path | None, wanted: list[str], verbose: bool) -> dict[str, Any]:
    """The peer modules in ``wanted``, imported with ``peers_path`` first on ``sys.path``."""
    if peers_path is not None:
        if not peers_path.is_dir():
            raise SystemExit(f"--peers-path {peers_path} is not a folder. Install the peers there first:\n  "
                             + INSTALL.format(path=peers_path))
        sys.path.insert(0, str(peers_path))
    if not verbose:
        os.environ.setdefault("TQDM_DISABLE", "1")  # the peers' own progress bars
    mods = {}
    for mod in wanted:
        try:
            mods[mod] = importlib.import_module(mod)
        except ImportError as exc:
            where = peers_path or "sys.path (no --peers-path given)"
            raise SystemExit(f"peer {PEERS[mod]!r} cannot be imported from {where}: {exc}.\nInstall the peers "
                             "outside the repo (the package does not depend on them) and pass that folder:\n  "
                             + INSTALL.format(path=peers_path or "/tmp/peers-pkgs")
                             + f"\n  python scripts/bench_peers.py --peers-path {peers_path or '/tmp/peers-pkgs'}"
                             ) from None
    if not verbose:  # optipfair configures INFO logging at import; short-transformers logs at DEBUG to stdout
        for name in ("optipfair", "short-transformers"):
            logging.getLogger(name).setLevel(logging.WARNING)
    return mods


def peer_versions(mods: dict[str, Any]) -> dict[str, dict[str, str]]:
    out = {}
    for mod, module in mods.items():
        try:
            version = metadata.version(PEERS[mod])
        except metadata.PackageNotFoundError:
            version = getattr(module, "__version__", "unknown")
        out[PEERS[mod]] = {"version": version, "path": str(Path(module.__file__).parent)}
    for extra in ("seaborn", "tqdm", "click", "matplotlib"):
        with contextlib.suppress(metadata.PackageNotFoundError):
            out[extra] = {"version": metadata.version(extra)}
    return out


# --------------------------------------------------------------------------------------------------
# One run of one tool


@dataclass
class Run:
    """What one tool produced in one round."""

    seconds: float = 0.0
    phases: dict[str, float] = field(default_factory=dict)
    removed: list[int] = field(default_factory=list)
    folder: Path | None = None
    model: Any = None
    notes: list[str] = field(default_factory=list)


class Clock:
    """Phase times (perf_counter; CUDA synchronised at each boundary)."""

    def __init__(self, device: str) -> None:
        self.device = device
        self.t0 = self.last = self._now()
        self.phases: dict[str, float] = {}

    def _now(self) -> float:
        import torch

        if self.device == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter()

    def lap(self, name: str) -> None:
        now = self._now()
        self.phases[name] = self.phases.get(name, 0.0) + now - self.last
        self.last = now

    @property
    def total(self) -> float:
        return self.last - self.t0


def removed_by_identity(before: list[Any], after: Any) -> list[int]:
    """Indices of the blocks of ``before`` that are no longer in ``after`` (by object identity)."""
    kept = {id(b) for b in after}
    return [i for i, b in enumerate(before) if id(b) not in kept]


def run_ours(cfg: dict[str, Any], ctx: Context, out: Path) -> Run:
    from analysis_kit import analyze

    method, strategy = ("angular", "angular") if cfg["key"] == "analyze_angular" else ("block_influence",
                                                                                       "importance")
    clock = Clock(ctx.device)
    a = analyze.Analyzer(ctx.model_dir, ctx.frame, out, task="lm", held_out=ctx.held_out, seed=ctx.seed,
                         device=ctx.device, max_length=ctx.max_length, calib_examples=len(ctx.texts),
                         calib_batch_size=ctx.batch_size, latency_rounds=1)
    clock.lap("check")
    a.load()
    clock.lap("load")
    a.importance([method])
    clock.lap("score")
    plan = a.plan(keep=ctx.n_blocks - ctx.drop, strategy=strategy)
    clock.lap("select")
    small = a.compress(heal="none")
    clock.lap("remove+save")
    run = Run(clock.total, clock.phases, list(plan.drop), out / analyze.MODEL_DIR, small)
    if ctx.device != "cpu":
        run.notes.append(f"analyze scored the blocks on {next(a.model.parameters()).device} (its importance stage "
                         "runs where the model was loaded)")
    return run


def _load_lm(folder: Path, device: str) -> tuple[Any, Any]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).to(device).eval()
    return model, tokenizer


def _save(model: Any, tokenizer: Any, folder: Path) -> None:
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)


def _unbatched(distance: Callable[[Any, Any], float]) -> Callable[[Any, Any], float]:
    """short-transformers' distance, given back the batch dimension that its layer wrapper drops.

    Its wrapper stores ``result[0]`` of each decoder layer, which was the hidden states when layers returned
    tuples; transformers >= 4.56 LLaMA layers return the tensor itself, so ``result[0]`` is the first (and,
    with its enforced batch size 1, only) sequence. Re-adding the batch dimension restores what it meant.
    """

    def dist(a: Any, b: Any) -> float:
        return distance(a if a.dim() == 3 else a.unsqueeze(0), b if b.dim() == 3 else b.unsqueeze(0))

    return dist


def run_short_transformers(cfg: dict[str, Any], ctx: Context, out: Path, *, shim: bool, limit: int | None = None,
                           save: bool = True) -> Run:
    import torch
    from transformers import AutoTokenizer

    st = ctx.peers["short_transformers"]
    from short_transformers.dist import angular_distance_last_token

    clock = Clock(ctx.device)
    tokenizer = AutoTokenizer.from_pretrained(ctx.model_dir)
    model = st.ShortTransformer.from_pretrained(ctx.model_dir, dtype=torch.float32).to(ctx.device)
    before = list(model.model.layers)
    clock.lap("load")
    if shim:
        model.set_metric(_unbatched(angular_distance_last_token))
    texts = ctx.texts if limit is None else ctx.texts[:limit]
    returned = model.remove_layers(tokenizer=tokenizer, block_size=ctx.drop, dataset=[{"text": t} for t in texts],
                                   key="text", limit=len(texts), max_length=ctx.max_length)
    clock.lap("score+select+remove")
    pruned = returned if returned is not None else model
    run = Run(model=pruned, removed=removed_by_identity(before, pruned.model.layers))
    if save:
        run.folder = out
        _save(pruned, tokenizer, out)
        clock.lap("save")
    run.seconds, run.phases = clock.total, clock.phases
    if shim:
        run.notes.append("ran with `set_metric` given the batch dimension back (the shipped layer wrapper fails on "
                         "this transformers; see peer issues)")
    idx = [getattr(layer.self_attn, "layer_idx", None) for layer in pruned.model.layers]
    if idx and idx != list(range(len(idx))):
        run.notes.append(f"in-memory model keeps self_attn.layer_idx = {idx} (not 0..{len(idx) - 1})")
    return run


def run_optipfair(cfg: dict[str, Any], ctx: Context, out: Path) -> Run:
    op = ctx.peers["optipfair"]
    clock = Clock(ctx.device)
    model, tokenizer = _load_lm(ctx.model_dir, ctx.device)
    before = list(model.model.layers)
    clock.lap("load")
    if tokenizer.pad_token is None:  # batches need padding; a practitioner sets this too
        tokenizer.pad_token = tokenizer.eos_token
    loader = [dict(tokenizer(ctx.texts[i:i + ctx.batch_size], padding=True, truncation=True,
                             max_length=ctx.max_length, return_tensors="pt"))
              for i in range(0, len(ctx.texts), ctx.batch_size)]
    scores = op.analyze_layer_importance(model, loader, show_progress=False)
    clock.lap("score")
    drop = sorted(sorted(scores, key=lambda i: (scores[i], i))[:ctx.drop])
    clock.lap("select")
    returned = op.prune_model_depth(model, layer_indices=drop, show_progress=False)
    clock.lap("remove")
    pruned = returned if returned is not None else model
    _save(pruned, tokenizer, out)
    clock.lap("save")
    run = Run(clock.total, clock.phases, removed_by_identity(before, pruned.model.layers), out, pruned)
    if returned is None:
        run.notes.append("prune_model_depth returned None (the model is pruned in place; the script uses it)")
    if run.removed != drop:
        run.notes.append(f"asked to remove {drop}, removed {run.removed}")
    if all(float(s) == 0.0 for s in scores.values()):
        run.notes.append("every importance score is 0.0 (its hooks captured nothing)")
    return run


RUNNERS = {"analyze_angular": run_ours, "analyze_bi": run_ours, "short_transformers": run_short_transformers,
           "optipfair": run_optipfair}


# --------------------------------------------------------------------------------------------------
# Checks of what each tool produced (untimed)


RELOAD_CHECK = r"""
import json, sys, time
t0 = time.perf_counter()
out = {"loaded": False}
try:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    folder, ref_path, device, n_new = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
    torch.set_num_threads(int(sys.argv[5]) or torch.get_num_threads())
    tok = AutoTokenizer.from_pretrained(folder)
    model, info = AutoModelForCausalLM.from_pretrained(folder, output_loading_info=True)
    model = model.to(device).eval()
    base = model.base_model
    blocks = getattr(base, "layers", None) or getattr(base, "h", None) or []
    out.update(loaded=True, n_blocks=len(blocks), config_layers=int(model.config.num_hidden_layers),
               missing_keys=len(info["missing_keys"]), unexpected_keys=len(info["unexpected_keys"]),
               mismatched_keys=len(info["mismatched_keys"]))
    ref = torch.load(ref_path)
    ids = ref["input_ids"].to(device)
    with torch.no_grad():
        logits = model(input_ids=ids, use_cache=False).logits.float().cpu()
    out["max_abs_logit_diff_vs_tool"] = float((logits - ref["logits"]).abs().max())
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    gen = {}
    for use_cache in (True, False):
        try:
            with torch.no_grad():
                seq = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=n_new,
                                     do_sample=False, use_cache=use_cache, pad_token_id=pad)
            gen[use_cache] = seq[0, ids.shape[1]:].tolist()
        except Exception as exc:
            out["generate_error" if use_cache else "generate_no_cache_error"] = f"{type(exc).__name__}: {exc}"
    out["generates_with_cache"] = True in gen and len(gen[True]) == n_new
    out["cache_matches_no_cache"] = (gen[True] == gen[False]) if len(gen) == 2 else None
    out["tokens"] = gen.get(True)
except Exception as exc:
    out["error"] = f"{type(exc).__name__}: {exc}"
out["forbidden_imports"] = sorted({m.split(".")[0] for m in sys.modules}
                                  & {"analysis_kit", "short_transformers", "optipfair"})
out["seconds"] = round(time.perf_counter() - t0, 2)
print("RELOAD_CHECK " + json.dumps(out))
"""


def prompt_ids(tokenizer: Any) -> Any:
    return tokenizer(PROMPT, return_tensors="pt")["input_ids"]


def in_memory_check(model: Any, ids: Any, device: str, ref_path: Path) -> dict[str, Any]:
    """Logits of the tool's in-memory model (saved for the reload check) and greedy generation with/without cache."""
    import torch

    out: dict[str, Any] = {}
    ids = ids.to(device)
    model.eval()
    with torch.no_grad():
        logits = model(input_ids=ids, use_cache=False).logits.float().cpu()
    torch.save({"input_ids": ids.cpu(), "logits": logits}, ref_path)
    gen = {}
    for use_cache in (True, False):
        try:
            with torch.no_grad():
                seq = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=GEN_TOKENS,
                                     do_sample=False, use_cache=use_cache,
                                     pad_token_id=model.config.pad_token_id or model.config.eos_token_id)
            gen[use_cache] = seq[0, ids.shape[1]:].tolist()
        except Exception as exc:  # noqa: BLE001 (a peer's model may fail in any way; the error is the result)
            out["generate_error" if use_cache else "generate_no_cache_error"] = f"{type(exc).__name__}: {exc}"
    out["generates_with_cache"] = True in gen and len(gen[True]) == GEN_TOKENS
    out["cache_matches_no_cache"] = (gen[True] == gen[False]) if len(gen) == 2 else None
    out["tokens"] = gen.get(True)
    return out


def reload_check(folder: Path, ref_path: Path, device: str, threads: int) -> dict[str, Any]:
    """Reload ``folder`` with transformers alone in a fresh, isolated interpreter (``python -I``)."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONSTARTUP")}
    try:
        proc = subprocess.run([sys.executable, "-I", "-c", RELOAD_CHECK, str(folder), str(ref_path), device,
                               str(GEN_TOKENS), str(threads)], capture_output=True, text=True, timeout=900,
                              cwd=ref_path.parent, env=env)
    except subprocess.TimeoutExpired:
        return {"loaded": False, "error": "reload check timed out after 900 s"}
    line = next((ln for ln in proc.stdout.splitlines()[::-1] if ln.startswith("RELOAD_CHECK ")), None)
    if line is None:
        return {"loaded": False, "error": f"subprocess exited {proc.returncode}: {proc.stderr.strip()[-500:]}"}
    return json.loads(line[len("RELOAD_CHECK "):])


# --------------------------------------------------------------------------------------------------
# Setup


@dataclass
class Context:
    model_dir: Path
    model_name: str
    n_blocks: int
    drop: int
    texts: list[str]
    frame: Any
    held_out: float
    seed: int
    device: str
    max_length: int
    batch_size: int
    peers: dict[str, Any]


def build_tiny(folder: Path, n_layers: int) -> Path:
    """A tiny random LLaMA with SmolLM2's tokenizer (``models.ModelSpec('tiny_llama')``), saved to ``folder``."""
    from analysis_kit import models

    spec = models.ModelSpec("tiny_llama", num_layers=n_layers)
    model, tokenizer = models.load_causal_lm(spec), models.load_tokenizer(spec)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def pick_texts(n: int, seed: int, held_out: float, tokenizer: Any) -> tuple[list[str], Any]:
    """N + 2 seeded Amazon review snippets; the N that analyze calibrates on (and that the peers get)."""
    import pandas as pd

    from analysis_kit import analyze, data

    snippets = data.load_snippets("amazon", label_mode="regression")  # every snippet, no neutral band
    # a language model needs a next token to predict: keep snippets of at least four tokens
    snippets = snippets[[len(tokenizer(t)["input_ids"]) >= 4 for t in snippets["text"]]]
    if len(snippets) < n + 2:
        raise SystemExit(f"--texts {n}: only {len(snippets)} Amazon snippets; use --texts {len(snippets) - 2} or fewer.")
    frame = pd.DataFrame({"text": snippets.sample(n=n + 2, random_state=seed)["text"].to_numpy()})
    split = analyze.load_data(frame, "lm", held_out=held_out, seed=seed)
    texts = split.train["text"].tolist()
    short = [t for t in texts if len(tokenizer(t)["input_ids"]) < 2]
    if len(texts) != n or short:
        raise SystemExit(f"text selection went wrong: {len(texts)} calibration texts for --texts {n}, "
                         f"{len(short)} shorter than two tokens.")
    return texts, frame


# --------------------------------------------------------------------------------------------------
# Output


def jaccard(a: list[int], b: list[int]) -> float:
    sa, sb = set(a), set(b)
    return 1.0 if not sa | sb else len(sa & sb) / len(sa | sb)


def _fmt_s(x: float | None) -> str:
    return "–" if x is None else f"{x:.2f}"


def _fmt_e(x: float | None) -> str:
    return "–" if x is None else f"{x:.1e}"


def _yes(x: Any) -> str:
    return {True: "yes", False: "**no**", None: "–"}.get(x, str(x))


#: Order of the timed phases in the table (the JSON stores them by name).
PHASES = ("check", "load", "score", "score+select+remove", "select", "remove", "remove+save", "save")


def markdown(res: dict[str, Any]) -> str:
    tools = {k: res["tools"][k] for k in TOOLS if k in res["tools"]}  # table order, not the JSON's sorted keys
    lines: list[str] = []
    setup = res["setup"]
    lines += [f"# `analysis-kit analyze` beside the peers ({setup['model']['name']})", "",
              f"Model `{setup['model']['name']}` ({setup['model']['n_blocks']} blocks); remove **{setup['drop']}** "
              f"blocks; {setup['texts']['n']} Amazon review snippets (seed {setup['seed']}, at most "
              f"{setup['max_length']} tokens each), the same texts for every tool; device {setup['device']}, "
              f"{setup['torch_threads']} torch threads. Timing: {setup['order']}", "",
              "## Wall time and agreement", "",
              "| tool | removed blocks | wall time, median [min, max] (s) | phases, median (s) | matched analyze | "
              "time / matched analyze | Jaccard vs analyze (angular) | Jaccard vs analyze (block influence) |",
              "|---|---|---|---|---|---|---|---|"]
    for key, t in tools.items():
        if t["status"] != "ok":
            lines.append(f"| {t['label']} | failed: {t['error']} | – | – | – | – | – | – |")
            continue
        m = t.get("matched")
        ratio = res["pairs"].get(key, {}).get("time_ratio")
        phases = ", ".join(f"{k} {v:.2f}" for k, v in sorted(
            t["phases_median_s"].items(), key=lambda kv: PHASES.index(kv[0]) if kv[0] in PHASES else len(PHASES)))
        removed = ", ".join(map(str, t["removed"])) + ("" if t["stable"] else " (varied between rounds)")
        lines.append(f"| {t['label']} | {removed} | {_fmt_s(t['median_s'])} [{_fmt_s(min(t['seconds']))}, "
                     f"{_fmt_s(max(t['seconds']))}] | {phases} | {tools[m]['label'] if m else '–'} | "
                     f"{'–' if ratio is None else f'{ratio:.2f}×'} | "
                     f"{_fmt_s(res['jaccard'].get(key, {}).get('analyze_angular'))} | "
                     f"{_fmt_s(res['jaccard'].get(key, {}).get('analyze_bi'))} |")
    lines += ["", "Time / matched analyze above 1 means the peer took longer than analyze for the same work.", "",
              "## Does the output reload with transformers alone and generate?", "",
              "| tool | in memory: generates with KV cache | in memory: cache = no cache | reloads (`python -I`, "
              "transformers only) | blocks (layers / config) | missing / unexpected keys | max abs logit diff vs "
              "in memory | reloaded: generates with KV cache | reloaded: cache = no cache | imports seen |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    for t in tools.values():
        if t["status"] != "ok":
            continue
        mem, rel = t["in_memory"], t["reload"]
        lines.append(
            f"| {t['label']} | {_yes(mem.get('generates_with_cache'))} | {_yes(mem.get('cache_matches_no_cache'))} | "
            f"{_yes(rel.get('loaded'))}{' (' + rel['error'] + ')' if rel.get('error') else ''} | "
            f"{rel.get('n_blocks', '–')} / {rel.get('config_layers', '–')} | {rel.get('missing_keys', '–')} / "
            f"{rel.get('unexpected_keys', '–')} | {_fmt_e(rel.get('max_abs_logit_diff_vs_tool'))} | "
            f"{_yes(rel.get('generates_with_cache'))} | {_yes(rel.get('cache_matches_no_cache'))} | "
            f"{', '.join(rel.get('forbidden_imports') or []) or 'none of analysis_kit, peers'} |")
    lines += ["", "## Jaccard index of the removed blocks", "", "| | " + " | ".join(t["label"] for t in tools.values())
              + " |", "|---|" + "---|" * len(tools)]
    for key, t in tools.items():
        row = [_fmt_s(res["jaccard"].get(key, {}).get(other)) for other in tools]
        lines.append(f"| {t['label']} | " + " | ".join(row) + " |")
    lines += ["", "## How each tool was called", ""]
    for t in tools.values():
        lines.append(f"- **{t['label']}**: `{t['api']}`" + (f" (CLI: `{t['cli']}`)" if t.get("cli") else ""))
    lines += ["", "## Peer API issues seen", ""]
    lines += [f"- {x}" for x in res["peer_issues"]] or ["- none"]
    lines += ["", "## What the peers do that analyze does not", "",
              "From the peers' installed source (the versions below); analyze scores blocks with nine methods and "
              "intervals, plans by several strategies, heals and measures retention and latency, but removes whole "
              "blocks only.", ""]
    lines += [f"- **{who}**: {what}" for who, what in res["peers_only"]]
    prov = res["provenance"]
    lines += ["", "## Versions, hardware, commit", "",
              f"- commit `{prov['git_commit']}`, started {prov['start_time']}, took {prov['duration_s']} s",
              f"- hardware: {prov['hardware']['cpu']}, {prov['hardware']['cpu_cores']} cores, "
              f"{prov['hardware']['memory_gib']} GiB, GPU {prov['hardware']['gpu'] or 'none'}; "
              f"{prov['hardware']['platform']}, Python {prov['hardware']['python']}",
              "- " + ", ".join(f"{k} {v}" for k, v in prov["versions"].items() if v != "not installed"
                               and k in ("analysis-kit", "torch", "transformers", "numpy")),
              "- peers: " + ", ".join(f"{k} {v['version']}" for k, v in res["peer_versions"].items()),
              "", "Every number here is in `bench_peers.json` beside this file."]
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--peers-path", type=Path, default=None,
                        help="folder holding the peers (pip --target), put first on sys.path; "
                             "e.g. /tmp/peers-pkgs")
    parser.add_argument("--texts", type=int, default=None, help="calibration texts (default 128, --tiny 16)")
    parser.add_argument("--drop", type=int, default=None, help="blocks to remove (default round(L / 4))")
    parser.add_argument("--repeats", type=int, default=3, help="interleaved timing rounds (default 3)")
    parser.add_argument("--tiny", action="store_true", help="a tiny random LLaMA instead of SmolLM2 (quick check)")
    parser.add_argument("--tiny-layers", type=int, default=8, help="blocks of the --tiny model (default 8)")
    parser.add_argument("--model", type=Path, default=None, help="another causal-LM folder instead of SmolLM2")
    parser.add_argument("--tools", nargs="+", choices=list(TOOLS), default=list(TOOLS), help="tools to run")
    parser.add_argument("--device", default="cpu", help="cpu (default), cuda or auto; the same for every tool")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads, 0 leaves the default")
    parser.add_argument("--max-length", type=int, default=128, help="tokens per text (default 128)")
    parser.add_argument("--batch-size", type=int, default=32,
                        help="calibration batch size of analyze and optipfair (short-transformers only takes 1)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=None, help="output folder (default results/peers/)")
    parser.add_argument("--work", type=Path, default=None, help="scratch folder (default a new temporary one)")
    parser.add_argument("--keep-work", action="store_true", help="keep the scratch folder (the saved models)")
    parser.add_argument("--verbose", action="store_true", help="show the tools' progress bars and logs")
    args = parser.parse_args(argv)
    if args.repeats < 1 or args.batch_size < 1 or args.max_length < 8 or args.tiny_layers < 2:
        parser.error("--repeats and --batch-size must be >= 1, --max-length >= 8, --tiny-layers >= 2")
    if args.tiny and args.model:
        parser.error("--tiny and --model exclude each other")
    n_texts = args.texts if args.texts is not None else (16 if args.tiny else 128)
    if n_texts < 2:
        parser.error("--texts must be >= 2")
    if not args.verbose:
        os.environ.setdefault("LAYERWISE_PROGRESS", "0")

    start = time.time()
    wanted = [k for k in TOOLS if k in args.tools and TOOLS[k]["kind"] == "peer"]
    peers = import_peers(args.peers_path, wanted, args.verbose)  # before any model work: fail fast

    import torch

    from analysis_kit import models
    from analysis_kit.cache import atomic_write_json, atomic_write_text
    from analysis_kit.paths import results_dir
    from analysis_kit.report import provenance

    if args.threads:
        torch.set_num_threads(args.threads)
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    if device not in ("cpu", "cuda") or (device == "cuda" and not torch.cuda.is_available()):
        parser.error(f"--device {args.device}: use cpu, auto, or cuda on a machine with CUDA")
    out_dir = args.out or results_dir() / "peers" / ("tiny" if args.tiny else "")
    work = args.work or Path(tempfile.mkdtemp(prefix="bench-peers-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        if args.tiny:
            model_dir, name = build_tiny(work / "model", args.tiny_layers), f"tiny random LLaMA ({args.tiny_layers} blocks)"
        elif args.model:
            model_dir, name = args.model.expanduser(), str(args.model)
        else:
            model_dir, name = models.smollm2_folder(), "SmolLM2-135M-Instruct"
        from transformers import AutoConfig, AutoTokenizer

        n_blocks = int(AutoConfig.from_pretrained(model_dir).num_hidden_layers)
        drop = args.drop if args.drop is not None else max(1, round(n_blocks / 4))
        if not 1 <= drop <= n_blocks - 1:
            parser.error(f"--drop {drop}: the model has {n_blocks} blocks; remove 1 to {n_blocks - 1}")
        held_out = 1.5 / (n_texts + 2)  # two held-out snippets: round() and sklearn's ceil() both give 2
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
        texts, frame = pick_texts(n_texts, args.seed, held_out, tokenizer)
        ctx = Context(model_dir, name, n_blocks, drop, texts, frame, held_out, args.seed, device, args.max_length,
                      args.batch_size, peers)
        keys = [k for k in TOOLS if k in args.tools]
        results: dict[str, dict[str, Any]] = {k: {**TOOLS[k], "key": k, "status": "ok", "seconds": [], "phases": [],
                                                  "removed_each_round": [], "notes": []} for k in keys}
        issues: list[str] = []

        st_shim = False
        if "short_transformers" in keys:  # as shipped, untimed, on two texts: does it run on this transformers?
            try:
                run_short_transformers(results["short_transformers"], ctx, work / "st-probe", shim=False, limit=2,
                                       save=False)
                results["short_transformers"]["as_shipped"] = {"ok": True}
            except Exception as exc:  # noqa: BLE001 (whatever the peer raises is the finding)
                err = f"{type(exc).__name__}: {exc}".strip().rstrip(":")
                cause = exc.__cause__ or exc.__context__
                if cause is not None:  # it prints the real error and raises a bare RuntimeError
                    err += f", raised while handling {type(cause).__name__}: {cause}"
                results["short_transformers"]["as_shipped"] = {"ok": False, "error": err}
                st_shim = True
                issues.append(f"short-transformers {peer_versions(peers).get('short-transformers', {}).get('version')} "
                              f"fails as shipped on this LLaMA with transformers {_version('transformers')} ({err}): "
                              "its layer wrapper keeps `result[0]` of each decoder layer, but LLaMA layers now return "
                              "the hidden-states tensor, so it keeps a 2-D slice and the angular distance cannot index "
                              "it. The timed runs pass `set_metric` a distance that re-adds the batch dimension "
                              "(exact, since it only takes batch size 1).")
            gc.collect()

        last: dict[str, Run] = {}
        order_note = (f"interleaved: {args.repeats} round(s); each round runs every tool once, back to back, in the "
                      "order " + " → ".join(TOOLS[k]["label"] for k in keys) + " rotated by one tool per round; "
                      "median and range over rounds")
        for r in range(args.repeats):
            order = keys[r % len(keys):] + keys[:r % len(keys)]
            for key in order:
                res = results[key]
                if res["status"] != "ok":
                    continue
                target = work / f"round{r}" / key
                target.parent.mkdir(parents=True, exist_ok=True)
                gc.collect()
                try:
                    if key == "short_transformers":
                        run = run_short_transformers(res, ctx, target, shim=st_shim)
                    else:
                        run = RUNNERS[key](res, ctx, target)
                except Exception as exc:  # noqa: BLE001 (a failing tool is a result, the others go on)
                    res.update(status="failed", error=f"{type(exc).__name__}: {exc}".strip()[:400])
                    issues.append(f"{res['label']} failed in round {r}: {res['error']}")
                    print(f"[bench_peers] {res['label']} failed: {res['error']}", file=sys.stderr)
                    continue
                res["seconds"].append(run.seconds)
                res["phases"].append(run.phases)
                res["removed_each_round"].append(run.removed)
                print(f"[bench_peers] round {r + 1}/{args.repeats} {res['label']}: {run.seconds:.2f} s, removed "
                      f"{run.removed}", file=sys.stderr, flush=True)
                if r == args.repeats - 1:
                    last[key] = run
                else:
                    del run
                    shutil.rmtree(target.parent / key, ignore_errors=True)

        ids = prompt_ids(tokenizer)
        for key, run in last.items():
            res = results[key]
            res["notes"] += run.notes
            res["in_memory"] = in_memory_check(run.model, ids, device, work / f"{key}-ref.pt")
            res["reload"] = reload_check(run.folder, work / f"{key}-ref.pt", device, args.threads)
            res["params_after"] = models.count_parameters(run.model)
            res["folder_mb"] = round(sum(p.stat().st_size for p in run.folder.rglob("*") if p.is_file()) / 2**20, 1)
            last[key] = None
            gc.collect()
        for key, res in results.items():
            if res["status"] != "ok":
                continue
            res["removed"] = res["removed_each_round"][-1]
            res["stable"] = all(x == res["removed"] for x in res["removed_each_round"])
            res["median_s"] = statistics.median(res["seconds"])
            names = list(dict.fromkeys(n for p in res["phases"] for n in p))
            res["phases_median_s"] = {n: statistics.median(p.get(n, 0.0) for p in res["phases"]) for n in names}
            for label, ok in (("in memory", res["in_memory"].get("generates_with_cache")),
                              ("reloaded", res["reload"].get("generates_with_cache"))):
                if not ok:
                    err = res["in_memory" if label == "in memory" else "reload"]
                    issues.append(f"{res['label']}: the {label} model does not generate with the KV cache "
                                  f"({err.get('generate_error') or err.get('error') or 'see JSON'})")
            if not res["reload"].get("loaded"):
                issues.append(f"{res['label']}: the saved folder does not reload with transformers alone "
                              f"({res['reload'].get('error')})")
            for note in res["notes"]:
                if TOOLS[key]["kind"] == "peer" and not note.startswith("ran with"):
                    issues.append(f"{res['label']}: {note}")
        if "short_transformers" in results:
            issues.append("short-transformers (from its source): `remove_layers(block_size=K)` picks the start from "
                          "row K of its distance table, whose entries compare the input of block s with the output "
                          "of block s + K, i.e. runs of K + 1 blocks, then removes the first K of that run; it "
                          "scores only each text's last token, one text at a time (`batch_size > 1` is refused)")
        ok = [k for k in keys if results[k]["status"] == "ok"]
        jac = {a: {b: jaccard(results[a]["removed"], results[b]["removed"]) for b in ok} for a in ok}
        pairs = {}
        for key in ok:
            m = TOOLS[key].get("matched")
            if m in ok:
                pairs[key] = {"matched": m, "time_ratio": results[key]["median_s"] / results[m]["median_s"],
                              "jaccard": jac[key][m]}
        prov = provenance(start)
        record = {
            "benchmark": "analysis-kit analyze beside short-transformers and optipfair (issue 20, item 7)",
            "setup": {"model": {"name": name, "folder": str(model_dir), "n_blocks": n_blocks,
                                "params": None}, "drop": drop,
                      "texts": {"source": "analysis_kit.data.load_snippets('amazon', label_mode='regression'), "
                                          f"seeded sample of {n_texts} + 2", "n": n_texts, "first": texts[:3]},
                      "seed": args.seed, "max_length": args.max_length, "batch_size": args.batch_size,
                      "device": device, "torch_threads": torch.get_num_threads(), "repeats": args.repeats,
                      "order": order_note, "prompt": PROMPT, "generated_tokens": GEN_TOKENS},
            "tools": {k: {kk: vv for kk, vv in v.items() if kk != "key"} for k, v in results.items()},
            "jaccard": jac, "pairs": pairs, "peer_issues": issues,
            "peers_only": PEERS_ONLY, "peer_versions": peer_versions(peers),
            "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
            "provenance": prov,
        }
        with contextlib.suppress(Exception):
            from transformers import AutoModelForCausalLM

            with torch.device("meta"):
                record["setup"]["model"]["params"] = models.count_parameters(
                    AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(model_dir)))
        atomic_write_json(out_dir / "bench_peers.json", record)
        record = json.loads((out_dir / "bench_peers.json").read_text())
        atomic_write_text(out_dir / "bench_peers.md", markdown(record))
    finally:
        if not args.keep_work and args.work is None:
            shutil.rmtree(work, ignore_errors=True)

    for key in ok:
        res = results[key]
        pair = pairs.get(key)
        print(f"{res['label']:28s} {res['median_s']:7.2f} s  removed {res['removed']}"
              + (f"  {pair['time_ratio']:.2f}x analyze, Jaccard {pair['jaccard']:.2f}" if pair else "")
              + f"  reload {'ok' if res['reload'].get('loaded') else 'FAILED'}"
              + f", KV-cache generate {'ok' if res['reload'].get('generates_with_cache') else 'FAILED'}")
    for key in keys:
        if results[key]["status"] != "ok":
            print(f"{results[key]['label']:28s} FAILED: {results[key]['error']}")
    print(f"peer issues: {len(issues)}; wrote {out_dir / 'bench_peers.json'} and {out_dir / 'bench_peers.md'}")
    return 0


def _version(dist: str) -> str:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "unknown"


if __name__ == "__main__":
    sys.exit(main())
