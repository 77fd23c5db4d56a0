"""Execute the chapter notebooks with papermill: profiles, parameter validation, skipping, the book build.

The ``parameters`` cell of each notebook is the single source of truth for its parameters: the name,
the default (whose Python type is the parameter's type) and, in the trailing comment, optional
constraints ``range: LO..HI`` or ``choices: a, b, c``. Profiles (``smoke``, ``default``, ``full``) are
sets of overrides in ``notebooks/<slug>.profiles.yml``. Overrides from the command line are checked
against the cell before any notebook starts, so a typo never costs a 15-minute run.
"""

from __future__ import annotations

import ast
import contextlib
import hashlib
import io
import json
import os
import re
import shutil
import subprocess
import sys
import time
import tokenize
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .cache import atomic_write_json
from .errors import LayerwiseError
from .paths import REPO_ROOT, results_dir

#: Experiments in book order (slugs are contracts: notebook, executed copy and results folder names).
EXPERIMENTS = (
    "baselines",
    "theoretical_validation",
    "compression",
    "multilayer_exploration",
    "qlora",
    "sensitivity",
    "dynamic_selection",
)
PROFILES = ("smoke", "default", "full")
NOTEBOOKS = REPO_ROOT / "notebooks"
BOOK = REPO_ROOT / "book"
SMOKE_OUT = REPO_ROOT / "_build" / "smoke" / "experiments"


class ParameterError(LayerwiseError):
    """An override names an unknown parameter, has the wrong type or is out of range."""


@dataclass(frozen=True)
class Param:
    """One notebook parameter as declared in its ``parameters`` cell."""

    name: str
    default: Any
    help: str = ""
    lo: float | None = None
    hi: float | None = None
    choices: tuple[str, ...] | None = None

    @property
    def type_name(self) -> str:
        return type(self.default).__name__

    def describe(self) -> str:
        """One line for ``analysis-kit list``: name, type, default and the help comment (which already
        states any range or choices)."""
        return f"{self.name} ({self.type_name}, default {self.default!r}) {self.help}".rstrip()


def available() -> list[str]:
    """Experiments whose notebook exists, in book order."""
    return [s for s in EXPERIMENTS if (NOTEBOOKS / f"{s}.ipynb").exists()]


def _check_slug(slug: str) -> Path:
    path = NOTEBOOKS / f"{slug}.ipynb"
    if slug not in EXPERIMENTS:
        raise LayerwiseError(f"unknown experiment {slug!r}; choose from {', '.join(EXPERIMENTS)} (see `analysis-kit list`).")
    if not path.exists():
        raise LayerwiseError(f"experiment {slug!r} has no notebook yet ({path}); available: {', '.join(available())}.")
    return path


_RANGE = re.compile(r"range:\s*([-+0-9.eE]*)\s*\.\.\s*([-+0-9.eE]*)")
_CHOICES = re.compile(r"choices:\s*([^;]+)")


def _parameters_source(slug: str) -> str:
    import nbformat

    nb = nbformat.read(_check_slug(slug), as_version=4)
    cells = [c for c in nb.cells if c.cell_type == "code" and "parameters" in c.metadata.get("tags", [])]
    if len(cells) != 1:
        raise LayerwiseError(f"notebooks/{slug}.ipynb must have exactly one cell tagged 'parameters' (has {len(cells)}).")
    return cells[0].source


def notebook_params(slug: str) -> dict[str, Param]:
    """Parse the ``parameters`` cell of ``notebooks/<slug>.ipynb`` (names, literal defaults, comments)."""
    source = _parameters_source(slug)
    comments = {tok.start[0]: tok.string.lstrip("#").strip()
                for tok in tokenize.generate_tokens(io.StringIO(source).readline) if tok.type == tokenize.COMMENT}
    out: dict[str, Param] = {}
    for node in ast.parse(source).body:
        target = node.targets[0] if isinstance(node, ast.Assign) and len(node.targets) == 1 else \
            node.target if isinstance(node, ast.AnnAssign) else None
        if not isinstance(target, ast.Name) or node.value is None:
            raise LayerwiseError(f"{slug}: the parameters cell may only hold `name = literal  # help` lines "
                                 f"(line {node.lineno}).")
        try:
            default = ast.literal_eval(node.value)
        except ValueError as exc:
            raise LayerwiseError(f"{slug}: parameter {target.id} (line {node.lineno}) is not a literal") from exc
        helptext = comments.get(node.end_lineno, "")
        lo = hi = None
        if m := _RANGE.search(helptext):
            lo = float(m.group(1)) if m.group(1) else None
            hi = float(m.group(2)) if m.group(2) else None
        choices = None
        if m := _CHOICES.search(helptext):
            choices = tuple(c.strip() for c in m.group(1).split(","))
        out[target.id] = Param(target.id, default, helptext, lo, hi, choices)
    return out


def parse_override(text: str) -> tuple[str, Any]:
    """``name=value`` → (name, python value); values are Python literals, else plain strings."""
    if "=" not in text:
        raise ParameterError(f"override {text!r} is not name=value (example: -p n_seeds=5).")
    name, value = text.split("=", 1)
    try:
        parsed = ast.literal_eval(value)
    except (ValueError, SyntaxError):
        parsed = value
    return name.strip(), parsed


def _coerce(p: Param, value: Any, where: str) -> Any:
    """Check ``value`` against the parameter's type and constraints; ints are accepted for floats."""
    want = type(p.default)
    if want is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if p.default is None:
        pass  # a None default accepts any literal
    elif want is bool and not isinstance(value, bool):
        raise ParameterError(f"{where}: {p.name} must be True or False, got {value!r}.")
    elif not isinstance(value, want) or (want is int and isinstance(value, bool)):
        raise ParameterError(f"{where}: {p.name} must be {want.__name__} (default {p.default!r}), got {value!r} "
                             f"({type(value).__name__}). Example: -p {p.name}={p.default!r}")
    items = value if isinstance(value, (list, tuple)) else [value]
    for item in items:
        if isinstance(item, (int, float)) and not isinstance(item, bool):
            if (p.lo is not None and item < p.lo) or (p.hi is not None and item > p.hi):
                raise ParameterError(f"{where}: {p.name}={value!r} is outside its range {p.lo}..{p.hi}.")
        if p.choices and isinstance(item, str) and item not in p.choices:
            raise ParameterError(f"{where}: {p.name}={item!r} is not one of {', '.join(p.choices)}.")
    return value


def profile_overrides(slug: str, profile: str) -> dict[str, Any]:
    """The overrides that ``profile`` applies to ``slug`` (``notebooks/<slug>.profiles.yml``)."""
    if profile not in PROFILES:
        raise ParameterError(f"unknown profile {profile!r}; choose one of {', '.join(PROFILES)}.")
    path = NOTEBOOKS / f"{slug}.profiles.yml"
    table = yaml.safe_load(path.read_text()) if path.exists() else {}
    return dict((table or {}).get(profile) or {})


def resolve(slug: str, profile: str, overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """Full parameter set for one run: cell defaults ← profile ← command-line overrides, all validated."""
    params = notebook_params(slug)
    out = {name: p.default for name, p in params.items()}
    for where, layer in ((f"profile {profile}", profile_overrides(slug, profile)), ("command line", overrides or {})):
        for name, value in layer.items():
            if name not in params:
                raise ParameterError(f"{where}: {slug} has no parameter {name!r}; it has: {', '.join(params)}.")
            out[name] = _coerce(params[name], value, f"{where} ({slug})")
    if "profile" in params:
        out["profile"] = profile
    return out


def _imports(source: str, package: str = "analysis_kit") -> set[str]:
    """Modules of ``package`` that ``source`` imports (``analysis_kit.x``, ``from analysis_kit import x``, ``from .x``)."""
    found: set[str] = set()
    try:
        tree = ast.parse(source)
    except SyntaxError:  # notebook magics: fall back to a line scan
        return {m for m in re.findall(rf"{package}\.(\w+)", source)} | {"__init__"}
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            mod = node.module or ""
            if node.level == 1 or mod == package or mod.startswith(package + "."):
                base = mod.removeprefix(package).lstrip(".") if node.level == 0 else mod
                found.update([base.split(".")[0]] if base else [a.name for a in node.names])
        elif isinstance(node, ast.Import):
            found.update(a.name.split(".")[1] for a in node.names if a.name.startswith(package + "."))
    return found | {"__init__"}


def _source_fingerprint(slug: str) -> str:
    """Hash of the package modules a notebook uses, followed transitively through their imports.

    Editing a module's code re-runs exactly the notebooks that depend on it, not the whole book; editing
    its comments or docstrings re-runs nothing (see ``code_digest``).
    """
    import nbformat

    pkg = REPO_ROOT / "analysis_kit"
    nb = nbformat.read(NOTEBOOKS / f"{slug}.ipynb", as_version=4)
    todo = _imports("\n".join(c.source for c in nb.cells if c.cell_type == "code" and not c.source.startswith("%")))
    seen: set[str] = set()
    while todo:
        mod = todo.pop()
        path = pkg / f"{mod}.py"
        if mod in seen or not path.exists():
            continue
        seen.add(mod)
        todo |= _imports(path.read_text()) - seen
    h = hashlib.sha256()
    for mod in sorted(seen):
        h.update(mod.encode())
        h.update(code_digest((pkg / f"{mod}.py").read_text()).encode())
    return h.hexdigest()


def code_digest(source: str) -> str:
    """Hash of what a module *does*: its syntax tree without docstrings (comments are not in the tree).

    Editing a comment or a docstring, or re-wrapping lines, does not invalidate hours of executed notebooks;
    any change to code does. A module that does not parse is hashed byte for byte.
    """
    try:
        tree = ast.parse(source)
    except SyntaxError:
        return hashlib.sha256(source.encode()).hexdigest()
    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        if (isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef) and body
                and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant)
                and isinstance(body[0].value.value, str)):
            node.body = body[1:] or [ast.Pass()]
    return hashlib.sha256(ast.dump(tree, include_attributes=False).encode()).hexdigest()


def fingerprint(slug: str, profile: str, params: dict[str, Any]) -> str:
    """Everything that determines a notebook's results: its source, parameters and the package code."""
    h = hashlib.sha256()
    h.update((NOTEBOOKS / f"{slug}.ipynb").read_bytes())
    h.update(json.dumps(params, sort_keys=True, default=str).encode())
    h.update(profile.encode())
    h.update(_source_fingerprint(slug).encode())
    return h.hexdigest()


def output_path(slug: str, profile: str) -> Path:
    """Where the executed notebook lands: the book for default/full, ``_build/smoke`` for smoke."""
    return (SMOKE_OUT if profile == "smoke" else BOOK / "experiments") / f"{slug}.ipynb"


@contextlib.contextmanager
def _env(**values: str):
    """Temporarily set environment variables (inherited by the notebook kernel)."""
    old = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@dataclass
class RunResult:
    """Outcome of one notebook execution."""

    slug: str
    status: str  # "ran", "skipped", "failed"
    seconds: float = 0.0
    output: Path | None = None
    error: str = ""
    params: dict[str, Any] = field(default_factory=dict)


def run_one(slug: str, profile: str, overrides: dict[str, Any] | None = None, force: bool = False) -> RunResult:
    """Execute one notebook unless its code, parameters and inputs are unchanged since the last run."""
    import papermill as pm

    params = resolve(slug, profile, overrides)
    out = output_path(slug, profile)
    stamp_path = results_dir() / slug / profile / "run.json"
    fp = fingerprint(slug, profile, params)
    if not force and out.exists() and stamp_path.exists():
        stamp = json.loads(stamp_path.read_text())
        if stamp.get("fingerprint") == fp and stamp.get("status") == "ran":
            return RunResult(slug, "skipped", 0.0, out, params=params)
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_name(f".{out.stem}.running.ipynb")
    start = time.time()
    try:
        # progress: papermill's per-cell bar on the console; tqdm bars inside the notebook would only clutter
        # the published page, so the kernel inherits LAYERWISE_PROGRESS=0. Libraries that import tqdm.auto
        # inside a kernel without ipywidgets warn "IProgress not found" on stderr; that line says nothing
        # about the results, so the kernel ignores exactly that warning (all others are published).
        warn = ",".join(filter(None, [os.environ.get("PYTHONWARNINGS"), "ignore:IProgress not found"]))
        with _env(LAYERWISE_PROGRESS=os.environ.get("LAYERWISE_NOTEBOOK_PROGRESS", "0"), PYTHONWARNINGS=warn):
            pm.execute_notebook(str(NOTEBOOKS / f"{slug}.ipynb"), str(partial), parameters=params,
                                kernel_name="python3", cwd=str(NOTEBOOKS),
                                progress_bar=os.environ.get("LAYERWISE_PROGRESS", "1") != "0", log_output=False)
    except pm.PapermillExecutionError as exc:
        failed = out.with_name(f"{out.stem}.failed.ipynb")
        partial.replace(failed)
        msg = f"cell {exc.exec_count} raised {exc.ename}: {exc.evalue} (partial notebook kept at {failed})"
        atomic_write_json(stamp_path, {"fingerprint": fp, "status": "failed", "error": msg, "params": params})
        return RunResult(slug, "failed", time.time() - start, failed, msg, params)
    partial.replace(out)
    secs = time.time() - start
    atomic_write_json(stamp_path, {"fingerprint": fp, "status": "ran", "seconds": round(secs, 1), "params": params,
                                   "output": os.path.relpath(out, REPO_ROOT)})
    return RunResult(slug, "ran", secs, out, params=params)


def run(slugs: list[str] | None, profile: str, overrides: dict[str, Any] | None = None,
        force: bool = False) -> list[RunResult]:
    """Validate every requested notebook's parameters first, then execute them in book order.

    A failing notebook is reported (cell and error) and the others still run; what finished is kept.
    """
    slugs = list(slugs or available())
    for slug in slugs:  # validate everything before the first heavy run
        resolve(slug, profile, overrides)
    results = []
    for slug in slugs:
        print(f"[analysis-kit] {slug} ({profile}) …", flush=True)
        res = run_one(slug, profile, overrides, force)
        detail = f" — {res.error}" if res.error else ""
        print(f"[analysis-kit] {slug}: {res.status} in {res.seconds:.0f}s{detail}", flush=True)
        results.append(res)
    return results


def build_book(profile: str = "default", strict: bool = True) -> Path:
    """Build the HTML book with jupyter-book (notebooks are not re-executed: papermill did it).

    ``default``/``full`` build the committed book at the repository root. ``smoke`` assembles a copy of
    the book with the smoke notebooks under ``_build/smoke_book`` and builds that instead.
    """
    root = REPO_ROOT
    if profile == "smoke":
        root = REPO_ROOT / "_build" / "smoke_book"
        if root.exists():
            shutil.rmtree(root)
        root.mkdir(parents=True)
        for name in ("_config.yml", "_toc.yml"):
            shutil.copy(REPO_ROOT / name, root / name)
        shutil.copytree(BOOK, root / "book", ignore=shutil.ignore_patterns("experiments", "_build"))
        (root / "book" / "experiments").mkdir()
        for slug in available():
            src = output_path(slug, "smoke")
            if not src.exists():
                raise LayerwiseError(f"no smoke run of {slug}; run `analysis-kit run --profile smoke` first.")
            shutil.copy(src, root / "book" / "experiments" / src.name)
    cmd = [str(Path(sys.executable).parent / "jupyter-book"), "build", str(root), "--path-output", str(root)]
    if strict:
        cmd += ["-W", "-n", "--keep-going"]
    proc = subprocess.run(cmd, cwd=root, text=True, capture_output=True)
    sys.stdout.write(proc.stdout[-6000:])
    if proc.returncode != 0:
        sys.stderr.write(proc.stderr[-6000:])
        raise LayerwiseError(f"jupyter-book build failed (exit {proc.returncode}); see the warnings above.")
    return root / "_build" / "html"
