"""Execute the chapter notebooks with papermill: profiles, parameter validation, skipping, the book build.

The ``parameters`` cell of each notebook is the single source of truth for its parameters: the name,
the default (whose Python type is the parameter's type) and, in the trailing comment, optional
constraints separated by ``;``:

- ``range: LO..HI`` bounds a number, or every element of a list;
- ``choices: a, b, c`` for a string, or every element of a list of strings;
- ``length: LO..HI`` bounds a list's length (a list must be non-empty unless it says ``length: 0..``);
- ``items: int|float|str`` names the element type of a list whose default is empty (otherwise the type
  of the default's elements is the element type).

List elements must be distinct. Profiles (``smoke``, ``default``, ``full``) are sets of overrides in
``notebooks/<slug>.profiles.yml``. Overrides from the command line are checked against the cell before
any notebook starts, so a typo never costs a 15-minute run.

Where results go: a run executes into a staging folder under ``_build/runs/`` and is published only when
it succeeds, so a failed or interrupted run never touches the committed ``results/<slug>/<profile>/`` or
``book/experiments/<slug>.ipynb``. A run whose parameters differ from its profile's is published
separately, to ``results/<slug>/<profile>+<hash of the differences>/`` with its executed notebook beside
its tables.
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

from .cache import atomic_write_json, code_digest
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
    "findings",
)
#: Pages that quote other chapters' published results: they run after them, and their fingerprint holds
#: those results, so a re-run chapter re-runs the page that quotes it. (The findings page is run last but
#: shown first: _toc.yml, not this order, places pages in the book.)
READS_RESULTS = {"findings": EXPERIMENTS[:-1]}
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
    min_len: int | None = None
    max_len: int | None = None
    item_type: type | None = None
    #: the help says "choices: ..., or a path": a file or folder (a ``/`` in it, or NAME=PATH) is accepted too
    paths: bool = False

    @property
    def type_name(self) -> str:
        if isinstance(self.default, list) and self.item_type is not None:
            return f"list[{self.item_type.__name__}]"
        return type(self.default).__name__

    def example(self) -> str:
        """A valid ``-p`` argument for this parameter, shell-quoted where the shell would mangle it."""
        text = f"{self.name}={self.default!r}"
        return f"-p '{text}'" if any(ch in text for ch in " []\"'(){}*?$;&|<>") else f"-p {text}"

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
_LENGTH = re.compile(r"length:\s*([0-9]*)\s*\.\.\s*([0-9]*)")
_ITEMS = re.compile(r"items:\s*(int|float|str)\b")
_ITEM_TYPES = {"int": int, "float": float, "str": str}


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
        choices, paths = None, False
        if m := _CHOICES.search(helptext):  # "choices: a, b, or a path" also takes your file or folder
            names, sep, _ = m.group(1).partition(" or a path")
            choices, paths = tuple(c.strip() for c in names.strip().rstrip(",").split(",") if c.strip()), bool(sep)
        min_len = max_len = item_type = None
        if isinstance(default, list):
            min_len, max_len = 1, None
            if m := _LENGTH.search(helptext):
                min_len = int(m.group(1)) if m.group(1) else 0
                max_len = int(m.group(2)) if m.group(2) else None
            if m := _ITEMS.search(helptext):
                item_type = _ITEM_TYPES[m.group(1)]
            elif default:
                kinds = {type(v) for v in default}
                item_type = float if kinds <= {int, float} and float in kinds else kinds.pop() if len(kinds) == 1 else None
            if item_type is None:
                raise LayerwiseError(f"{slug}: list parameter {target.id} (line {node.lineno}) needs `items: int|float|str` "
                                     f"in its comment (its default is empty or mixed).")
        out[target.id] = Param(target.id, default, helptext, lo, hi, choices, min_len, max_len, item_type, paths)
    return out


def parse_override(text: str) -> tuple[str, Any]:
    """``name=value`` → (name, python value); values are Python literals, else plain strings."""
    if "=" not in text:
        raise ParameterError(f"override {text!r} is not name=value (examples: -p n_bootstrap=2000, "
                             f"-p 'seeds=[0, 1, 2, 3, 4]'; `analysis-kit list` shows every parameter).")
    name, value = text.split("=", 1)
    try:
        parsed = ast.literal_eval(value)
    except (ValueError, SyntaxError):
        parsed = value
    return name.strip(), parsed


def _check_number(p: Param, item: Any, value: Any, where: str) -> None:
    if (p.lo is not None and item < p.lo) or (p.hi is not None and item > p.hi):
        lo = "" if p.lo is None else f"{p.lo:g}"
        hi = "" if p.hi is None else f"{p.hi:g}"
        raise ParameterError(f"{where}: {p.name}={value!r} is outside its range {lo}..{hi} ({p.help}). "
                             f"Example: {p.example()}")


def _coerce(p: Param, value: Any, where: str) -> Any:
    """Check ``value`` against the parameter's type and constraints; ints are accepted for floats.

    Lists are checked for their length, the type and range (or choices) of every element and for repeats,
    so a bad list fails here, in a second, rather than deep inside a chapter with an unrelated message.
    """
    want = type(p.default)
    if want is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if p.default is None:
        return value  # a None default accepts any literal
    if want is bool and not isinstance(value, bool):
        raise ParameterError(f"{where}: {p.name} must be True or False, got {value!r}.")
    if want is list and isinstance(value, tuple):
        value = list(value)
    if not isinstance(value, want) or (want is int and isinstance(value, bool)):
        raise ParameterError(f"{where}: {p.name} must be {p.type_name} (default {p.default!r}), got {value!r} "
                             f"({type(value).__name__}). Example: {p.example()}")
    if isinstance(value, list):
        items = []
        for item in value:
            if p.item_type is float and isinstance(item, int) and not isinstance(item, bool):
                item = float(item)
            if not isinstance(item, p.item_type) or isinstance(item, bool):
                raise ParameterError(f"{where}: every element of {p.name} must be {p.item_type.__name__}, got {item!r} "
                                     f"({type(item).__name__}). Example: {p.example()}")
            items.append(item)
        if len(set(items)) != len(items):
            raise ParameterError(f"{where}: {p.name}={value!r} repeats an element; list each value once.")
        value = items
    for item in value if isinstance(value, list) else [value]:
        if isinstance(item, (int, float)) and not isinstance(item, bool):
            _check_number(p, item, value, where)
        if p.choices and isinstance(item, str) and item not in p.choices and \
                not (p.paths and ("/" in item or "=" in item or Path(item).expanduser().exists())):
            also = ", or a path (NAME=PATH names it)" if p.paths else ""
            raise ParameterError(f"{where}: {p.name}={item!r} is not one of {', '.join(p.choices)}{also}.")
    if isinstance(value, list) and (len(value) < (p.min_len or 0) or (p.max_len is not None and len(value) > p.max_len)):
        need = (f"between {p.min_len} and {p.max_len}" if p.max_len is not None else f"at least {p.min_len}")
        raise ParameterError(f"{where}: {p.name} has {len(value)} element(s) but needs {need} ({p.help}). "
                             f"Example: {p.example()}")
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


def _imports(source: str, package: str = "analysis_kit", current: str = "") -> set[str]:
    """Modules of ``package`` that ``source`` imports, as dotted names inside the package.

    ``current`` is the importing module's own dotted name (``""`` for a notebook, ``"studies.baselines"``
    for ``analysis_kit/studies/baselines.py``), so relative imports resolve from its package:
    ``import analysis_kit.x``, ``from analysis_kit import x``, ``from analysis_kit.studies import baselines``
    (→ ``studies`` and ``studies.baselines``), ``from .x import y``, ``from .. import x``. A name that is not a
    module (``from .cache import cached_dir`` also yields ``cache.cached_dir``) is dropped later, when no
    file matches it.
    """
    found: set[str] = set()
    try:
        tree = ast.parse(source)
    except SyntaxError:  # notebook magics: fall back to a line scan
        return {m for m in re.findall(rf"{package}\.([\w.]+)", source)} | {"__init__"}
    here = current.split(".")[:-1] if current else []  # the package the importing module lives in
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                if node.level - 1 > len(here):
                    continue
                parts = here[:len(here) - (node.level - 1)] + (node.module.split(".") if node.module else [])
            elif node.module == package or (node.module or "").startswith(package + "."):
                parts = node.module.split(".")[1:]
            else:
                continue
            if parts:
                found.add(".".join(parts))
            found.update(".".join([*parts, a.name]) for a in node.names if a.name != "*")
        elif isinstance(node, ast.Import):
            found.update(a.name.split(".", 1)[1] for a in node.names if a.name.startswith(package + "."))
    return found | {"__init__"}


def _module_file(pkg: Path, mod: str) -> Path | None:
    """The file of dotted module ``mod`` inside the package folder ``pkg`` (a module or a subpackage)."""
    parts = mod.split(".")
    for path in (pkg.joinpath(*parts).with_suffix(".py"), pkg.joinpath(*parts, "__init__.py")):
        if path.is_file():
            return path
    return None


def _source_fingerprint(slug: str) -> str:
    """Hash of the package modules a notebook uses, followed transitively through their imports
    (subpackages such as ``analysis_kit.studies`` included).

    Editing a module's code re-runs exactly the notebooks that depend on it, not the whole book; editing
    its comments or docstrings re-runs nothing (see ``code_digest``).
    """
    import nbformat

    pkg = REPO_ROOT / "analysis_kit"
    nb = nbformat.read(NOTEBOOKS / f"{slug}.ipynb", as_version=4)
    todo = _imports("\n".join(c.source for c in nb.cells if c.cell_type == "code" and not c.source.startswith("%")))
    seen: dict[str, Path] = {}
    while todo:
        mod = todo.pop()
        path = _module_file(pkg, mod) if mod not in seen else None
        if path is None:
            continue
        seen[mod] = path
        current = mod + ".__init__" if path.name == "__init__.py" and mod != "__init__" else mod
        todo |= _imports(path.read_text(), current=current) - set(seen)
    h = hashlib.sha256()
    for mod in sorted(seen):
        h.update(mod.encode())
        h.update(code_digest(seen[mod].read_text()).encode())
    return h.hexdigest()


def fingerprint(slug: str, profile: str, params: dict[str, Any]) -> str:
    """Everything that determines a notebook's results: its source, parameters and the package code."""
    h = hashlib.sha256()
    h.update((NOTEBOOKS / f"{slug}.ipynb").read_bytes())
    h.update(json.dumps(params, sort_keys=True, default=str).encode())
    h.update(profile.encode())
    h.update(_source_fingerprint(slug).encode())
    for other in READS_RESULTS.get(slug, ()):
        summary = results_dir() / other / profile / "summary.json"
        h.update(other.encode() + (summary.read_bytes() if summary.exists() else b"absent"))
    return h.hexdigest()


RUNS = REPO_ROOT / "_build" / "runs"  #: staging: a run executes here and is published only when it succeeds
FAILED = REPO_ROOT / "_build" / "failed"  #: the partial notebook and error record of the last failed run


def changed_params(slug: str, profile: str, params: dict[str, Any]) -> dict[str, Any]:
    """The parameters in ``params`` whose values differ from what ``profile`` alone resolves to."""
    base = resolve(slug, profile)
    return {k: v for k, v in params.items() if base.get(k) != v}


def run_label(slug: str, profile: str, params: dict[str, Any]) -> str:
    """``profile``, or ``profile+<hash>`` when ``params`` differ from what the profile alone resolves to.

    Runs with command-line overrides are kept apart from the profile's own results, so trying a parameter
    never replaces the committed numbers of the book.
    """
    diff = changed_params(slug, profile, params)
    if not diff:
        return profile
    digest = hashlib.sha256(json.dumps(diff, sort_keys=True, default=str).encode()).hexdigest()[:8]
    return f"{profile}+{digest}"


def output_path(slug: str, profile: str, label: str | None = None) -> Path:
    """Where the executed notebook is published: the book for default/full, ``_build/smoke`` for smoke,
    and beside its own results for a run with overrides (``label`` other than the profile)."""
    if label and label != profile:
        return results_dir() / slug / label / f"{slug}.ipynb"
    return (SMOKE_OUT if profile == "smoke" else BOOK / "experiments") / f"{slug}.ipynb"


@contextlib.contextmanager
def _env(**values: str | None):
    """Temporarily set (or, with ``None``, unset) environment variables inherited by the notebook kernel."""
    old = {k: os.environ.get(k) for k in values}
    for k, v in values.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
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
    reason: str = ""
    label: str = ""


class Interrupted(LayerwiseError):
    """The user stopped a run (Ctrl-C); the message says what was kept and how to resume."""


def _console_progress() -> bool:
    return os.environ.get("LAYERWISE_PROGRESS", "1") != "0"


class _ProgressRelay:
    """Shows, on the console, the progress bars of the long loops running inside the notebook kernel.

    Inside the kernel :func:`analysis_kit.device.progress` writes its bars to the file named by
    ``LAYERWISE_PROGRESS_FILE`` (never into the notebook, whose outputs are the published page); this
    thread reads the newest bar every few seconds and prints it above papermill's per-cell bar.
    """

    def __init__(self, path: Path, every: float = 5.0) -> None:
        import threading

        self.path, self.every = path, every
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def __enter__(self) -> _ProgressRelay:
        self.path.write_text("")
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def _loop(self) -> None:
        from tqdm import tqdm

        shown, pos = "", 0
        while not self._stop.wait(self.every):
            try:
                with open(self.path, "rb") as fh:
                    fh.seek(pos)
                    chunk = fh.read()
                    pos = fh.tell()
            except OSError:
                continue
            parts = [x.strip() for x in re.split(r"[\r\n]", chunk.decode("utf-8", "replace")) if x.strip()]
            if parts and parts[-1] != shown:
                shown = parts[-1]
                tqdm.write(f"    {shown}", file=sys.stderr)


_KERNEL_MANAGER: list[type] = []


def _kernel_manager_class() -> type:
    """jupyter_client's kernel manager, with the kernel process's own stderr sent to a log file.

    That stream never holds results (cell outputs travel over the kernel's sockets into the notebook);
    it holds the kernel's start-up notice "running over TCP without encryption" (a local kernel on
    loopback) and, after Ctrl-C, a socket traceback from its shutdown. On the console they would bury
    the progress bars and the one line that says what was kept; a failed run keeps the log beside its
    partial notebook in ``_build/failed/``.
    """
    if not _KERNEL_MANAGER:
        from jupyter_client.manager import AsyncKernelManager

        class LoggedKernelManager(AsyncKernelManager):
            async def _async_launch_kernel(self, kernel_cmd: list[str], **kw: Any) -> None:
                path = os.environ.get("LAYERWISE_KERNEL_LOG")
                if not path:
                    return await super()._async_launch_kernel(kernel_cmd, **kw)
                with open(path, "ab") as log:  # the child keeps its own copy of the descriptor
                    kw["stderr"] = log
                    return await super()._async_launch_kernel(kernel_cmd, **kw)

        _KERNEL_MANAGER.append(LoggedKernelManager)
    return _KERNEL_MANAGER[0]


def _portable_metadata(executed: Path, slug: str, out: Path) -> None:
    """Record papermill's input and output paths relative to the repository (they are published)."""
    import nbformat

    from .paths import shown

    nb = nbformat.read(executed, as_version=4)
    meta = nb.metadata.get("papermill", {})
    meta["input_path"] = f"notebooks/{slug}.ipynb"
    meta["output_path"] = shown(out)
    nbformat.write(nb, executed)


def _publish(staging: Path, final: Path, record: dict[str, Any]) -> None:
    """Replace ``final`` (a results folder) by the staged one in two renames, then write its run record.

    The new folder is copied next to ``final`` first, so the swap is a rename within one file system and
    a crash leaves either the old or the new results, never a mix (a hidden leftover is removed at the
    next run).
    """
    final.parent.mkdir(parents=True, exist_ok=True)
    incoming = final.with_name(f".{final.name}.incoming")
    outgoing = final.with_name(f".{final.name}.outgoing")
    for leftover in (incoming, outgoing):
        if leftover.exists():
            shutil.rmtree(leftover)
    shutil.copytree(staging, incoming)
    atomic_write_json(incoming / "run.json", record)
    if final.exists():
        os.replace(final, outgoing)
    os.replace(incoming, final)
    if outgoing.exists():
        shutil.rmtree(outgoing)


def _replace_file(src: Path, dest: Path) -> None:
    """Copy ``src`` over ``dest`` atomically (a temporary sibling, then a rename)."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.incoming")
    shutil.copyfile(src, tmp)
    os.replace(tmp, dest)


def clean_stale() -> list[Path]:
    """Remove what killed runs left behind: staging folders, half-published results, stale cache temps.

    Staging folders of runs that are still going (another ``analysis-kit`` process) are kept: each run
    holds a lock on its staging folder while it executes.
    """
    import fcntl

    removed: list[Path] = []
    if RUNS.exists():
        for lock in RUNS.glob("*/*.lock"):
            with open(lock, "a+") as fh:
                try:
                    fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    continue  # a live run
                stage = lock.with_suffix("")
                if stage.exists():
                    shutil.rmtree(stage)
                    removed.append(stage)
                for side in stage.parent.glob(f".{stage.name}.*"):  # its executed copy and kernel log
                    side.unlink()
                    removed.append(side)
                lock.unlink(missing_ok=True)
                fcntl.flock(fh, fcntl.LOCK_UN)
    root = results_dir()
    if root.exists():
        for leftover in [*root.glob("*/.*.incoming"), *root.glob("*/.*.outgoing")]:
            shutil.rmtree(leftover) if leftover.is_dir() else leftover.unlink()
            removed.append(leftover)
    for folder in (BOOK / "experiments", SMOKE_OUT):  # the layout before staging kept these in the book
        for leftover in [*folder.glob(".*.running.ipynb"), *folder.glob(".*.incoming")]:
            leftover.unlink()
            removed.append(leftover)
    from .cache import clean_stale_temps

    return removed + clean_stale_temps()


def _check_writable() -> None:
    """Fail before any notebook starts when the cache or the results folder cannot be written."""
    from .paths import cache_dir

    cache_dir()
    root = results_dir()
    try:
        root.mkdir(parents=True, exist_ok=True)
        if not os.access(root, os.W_OK):
            raise PermissionError(f"no write permission on {root}")
    except OSError as exc:
        raise LayerwiseError(f"results folder {root} is not writable ({exc}); point LAYERWISE_RESULTS at a "
                             f"writable folder or fix the folder's permissions.") from exc


def run_one(slug: str, profile: str, overrides: dict[str, Any] | None = None, force: bool = False) -> RunResult:
    """Execute one notebook unless its code, parameters and inputs are unchanged since its last good run.

    The notebook runs in a staging folder (``_build/runs/<slug>/<label>/``: its results and the executed
    copy); only a successful run is published over the last good one. A failure keeps the partial notebook
    in ``_build/failed/`` and leaves the published results and their run record as they were.
    """
    import fcntl

    import papermill as pm

    params = resolve(slug, profile, overrides)
    label = run_label(slug, profile, params)
    out = output_path(slug, profile, label)
    final = results_dir() / slug / label
    stamp_path = final / "run.json"
    fp = fingerprint(slug, profile, params)
    if not force and out.exists() and stamp_path.exists():
        stamp = json.loads(stamp_path.read_text())
        if stamp.get("fingerprint") == fp and stamp.get("status") == "ran":
            when = stamp.get("finished", "its last run")
            return RunResult(slug, "skipped", 0.0, out, params=params, label=label,
                             reason=f"notebook, parameters and package code unchanged since {when}; --force re-runs it")
    stage = RUNS / slug / label
    RUNS.joinpath(slug).mkdir(parents=True, exist_ok=True)
    failed_nb = FAILED / f"{slug}-{label}.ipynb"
    with open(RUNS / slug / f"{label}.lock", "a+") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as exc:
            raise LayerwiseError(f"{slug} ({label}) is already running in another analysis-kit process; "
                                 f"wait for it to finish.") from exc
        if stage.exists():
            shutil.rmtree(stage)
        stage.mkdir(parents=True)
        executed = stage / f"{slug}.ipynb"
        start = time.time()
        # Library warnings that say nothing about the results stay out of the kernel's outputs: tqdm.auto's
        # "IProgress not found" and jupyter_client's "connection over TCP without encryption" notice.
        warn = ",".join(filter(None, [os.environ.get("PYTHONWARNINGS"), "ignore:IProgress not found",
                                      "ignore:Jupyter is connecting over TCP"]))
        relay_file = stage / ".progress"
        relay = _console_progress()
        try:
            with _env(LAYERWISE_PROGRESS="0", PYTHONWARNINGS=warn, LAYERWISE_RUN_DIR=str(stage),
                      LAYERWISE_PUBLISH_AS=f"{slug}/{label}",
                      LAYERWISE_KERNEL_LOG=str(stage.parent / f".{label}.kernel.log"),
                      LAYERWISE_PROGRESS_FILE=str(relay_file) if relay else None), \
                    (_ProgressRelay(relay_file) if relay else contextlib.nullcontext()):
                # The per-cell bar is named after the chapter and shows elapsed time and ETA; the kernel
                # process's own stderr goes to a log file (see _kernel_manager_class).
                pm.execute_notebook(str(NOTEBOOKS / f"{slug}.ipynb"), str(executed), parameters=params,
                                    kernel_name="python3", cwd=str(NOTEBOOKS), log_output=False,
                                    progress_bar={"desc": f"{slug} cells", "unit": "cell"} if relay else False,
                                    kernel_manager_class=_kernel_manager_class())
        except pm.PapermillExecutionError as exc:
            FAILED.mkdir(parents=True, exist_ok=True)
            if executed.exists():
                _replace_file(executed, failed_nb)
            kernel_log = stage.parent / f".{label}.kernel.log"
            if kernel_log.exists():
                kernel_log.replace(failed_nb.with_suffix(".kernel.log"))
            msg = (f"cell {exc.exec_count} raised {exc.ename}: {exc.evalue} (partial notebook: "
                   f"{os.path.relpath(failed_nb, REPO_ROOT)}; the last good results are untouched)")
            atomic_write_json(failed_nb.with_suffix(".json"), {"fingerprint": fp, "status": "failed", "error": msg,
                                                                "params": params})
            return RunResult(slug, "failed", time.time() - start, failed_nb, msg, params, label=label)
        secs = time.time() - start
        _portable_metadata(executed, slug, out)
        executed.rename(stage.parent / f".{label}.executed.ipynb")
        relay_file.unlink(missing_ok=True)
        record = {"fingerprint": fp, "status": "ran", "seconds": round(secs, 1), "params": params,
                  "finished": time.strftime("%Y-%m-%d %H:%M", time.localtime()),
                  "output": os.path.relpath(out, REPO_ROOT)}
        if label != profile:
            record["overrides"] = changed_params(slug, profile, params)
        _publish(stage, final, record)
        _replace_file(stage.parent / f".{label}.executed.ipynb", out)
        (stage.parent / f".{label}.executed.ipynb").unlink()
        (stage.parent / f".{label}.kernel.log").unlink(missing_ok=True)
        shutil.rmtree(stage)
        for stale in (failed_nb, failed_nb.with_suffix(".json"), failed_nb.with_suffix(".kernel.log"),
                      out.with_name(f"{out.stem}.failed.ipynb")):
            stale.unlink(missing_ok=True)
    return RunResult(slug, "ran", secs, out, params=params, label=label)


def _carry_units(direction: str, since: float | None = None) -> None:
    """Restore the ledger's finished units into the cache before a run, or save after it the units finished
    since ``since``, the run's start (:mod:`analysis_kit.ledger`; ``LAYERWISE_LEDGER=0`` skips both), and say
    what moved."""
    from . import ledger
    from .paths import shown

    if not ledger.enabled():
        return
    moved = ledger.restore() if direction == "restore" else ledger.save(since=since)
    if sum(moved.counts.values()):
        verb = "restored from" if direction == "restore" else "saved to"
        print(f"[analysis-kit] finished units {verb} {shown(ledger.ledger_dir())}: {moved}", flush=True)


def run(slugs: list[str] | None, profile: str, overrides: dict[str, Any] | None = None,
        force: bool = False) -> list[RunResult]:
    """Validate every requested notebook's parameters first, then execute them in book order.

    A failing notebook is reported (cell and error) and the others still run; what finished is kept.
    Ctrl-C stops the run with :class:`Interrupted`, whose message says what was kept and how to resume.
    """
    slugs = list(slugs or available())
    for slug in slugs:  # validate everything before the first heavy run
        resolve(slug, profile, overrides)
    _check_writable()
    from .assets import check_present

    check_present()  # a damaged asset stops the run here, in a second, with the fix named
    clean_stale()
    started = time.time()
    _carry_units("restore")
    results: list[RunResult] = []
    for i, slug in enumerate(slugs, 1):
        print(f"[analysis-kit] {slug} ({profile}, {i}/{len(slugs)}) …", flush=True)
        try:
            res = run_one(slug, profile, overrides, force)
        except KeyboardInterrupt:
            done = [r.slug for r in results if r.status in ("ran", "skipped")]
            raise Interrupted(
                f"interrupted during {slug}; kept: {', '.join(done) or 'no finished chapter'} (published) and "
                f"every model already trained (in the cache); the last good results of {slug} are untouched. "
                f"Run the same command again to resume: finished chapters are skipped.") from None
        finally:  # what the run finished travels with the results, whatever happened to the run
            _carry_units("save", since=started)
        detail = f" — {res.error}" if res.error else f" ({res.reason})" if res.reason else ""
        where = f" → {os.path.relpath(res.output, REPO_ROOT)}" if res.status == "ran" and res.output else ""
        print(f"[analysis-kit] {slug}: {res.status} in {res.seconds:.0f}s{where}{detail}", flush=True)
        results.append(res)
    return results


def stale_chapters(profile: str = "default") -> dict[str, str]:
    """Chapters whose published run of ``profile`` no longer matches their notebook, parameters or code.

    Returns ``{slug: why}`` for a reader: the date of the shown run and what to run to refresh it. A chapter
    never run under ``profile`` is stale too. Cheap (hashes, no execution); the book puts the reason on the
    page (:mod:`analysis_kit.book_ext`) and the findings page labels its numbers with it.
    """
    out = {}
    for slug in available():
        params = resolve(slug, profile)
        stamp_path = results_dir() / slug / profile / "run.json"
        stamp = json.loads(stamp_path.read_text()) if stamp_path.exists() else {}
        if stamp.get("status") == "ran" and stamp.get("fingerprint") == fingerprint(slug, profile, params):
            continue
        when = f"on {stamp['finished']} UTC" if stamp.get("finished") else "never"
        out[slug] = (f"Stale page: these numbers come from this chapter's last {profile} run ({when}); its notebook or "
                     f"the package code it uses has changed since, so they may not match what the code computes now. "
                     f"`analysis-kit run {slug}` re-computes them.")
    return out


def _stage_mathjax(root: Path) -> None:
    """Copy the pinned MathJax (asset ``mathjax``) into the book's static folder, so math renders offline."""
    from .assets import locate

    src = locate("mathjax")
    dest = root / "book" / "_static" / "mathjax"
    dest.mkdir(parents=True, exist_ok=True)
    for name in ("es5/tex-svg.js", "LICENSE"):
        shutil.copy(src / name, dest / Path(name).name)


def build_book(profile: str = "default", strict: bool = True) -> Path:
    """Build the HTML book with jupyter-book (notebooks are not re-executed: papermill did it).

    ``default``/``full`` build the committed book at the repository root. ``smoke`` assembles a copy of
    the book with the smoke notebooks and their results under ``_build/smoke_book`` and builds that
    instead. Chapters whose shown run is stale (:func:`stale_chapters`) get a warning under their title.
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
            # the pages link their results (Report.footer): ../../results/<slug>/smoke/ from book/experiments
            shutil.copytree(results_dir() / slug / "smoke", root / "results" / slug / "smoke")
    _stage_mathjax(root)
    state = root / "_build" / "book_state.json"
    state.parent.mkdir(parents=True, exist_ok=True)
    stale = json.dumps({"stale": {f"book/experiments/{slug}": why for slug, why in stale_chapters(profile).items()}})
    if not state.exists() or state.read_text() != stale:  # the pages depend on it: rewrite only on change
        state.write_text(stale)
    cmd = [str(Path(sys.executable).parent / "jupyter-book"), "build", str(root), "--path-output", str(root)]
    if strict:
        cmd += ["-W", "-n", "--keep-going"]
    proc = subprocess.run(cmd, cwd=root, text=True, capture_output=True,
                          env={**os.environ, "LAYERWISE_BOOK_STATE": str(state)})
    sys.stdout.write(proc.stdout[-6000:])
    if proc.returncode != 0:
        sys.stderr.write(proc.stderr[-6000:])
        raise LayerwiseError(f"jupyter-book build failed (exit {proc.returncode}); see the warnings above.")
    return root / "_build" / "html"
