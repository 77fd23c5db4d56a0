"""Every cache key of the kit holds the code that computes its entry, or its gap is declared and pinned.

``cache.code_key(*code)`` hashes the functions a key names; a helper they call but the key does not name can
change without invalidating anything, and the cache then serves results of the old code. New keys use
``cache.reachable`` (the builder and every helper of its module it reaches). Some keys predate it; widening
one re-computes its entries, hours of training for the trained models, the 214 healed arms and the 72 QLoRA
runs, whose keys were widened when the kit's one optimizer (``train.Optimizer``) changed them anyway. This
test finds every ``code_key(...)`` call in the package, computes which helpers of the named functions' own
modules it misses, and pins a digest of those helpers. Changing one of them fails here: either add it to the
key (and re-run what it feeds) or, if the change cannot alter a cached number, update the pin and say so in
the commit.
"""

from __future__ import annotations

import ast
import importlib
import inspect
import pkgutil
import types
from typing import Any

import analysis_kit
from analysis_kit import cache

#: Key site → digest (``cache.code_key``) of the helpers it reaches but does not name. A site whose gap is empty
#: (``cache.reachable`` keys, or a key that names its whole module) is not listed.
KNOWN_GAPS = {
    # SmolLM2's converted folder: the file search and the error class
    "analysis_kit.models:_smollm2_key": "317180da68d4",
    # the chapters' units: their Params classes (the values are in the key; the methods that read them are not)
    "analysis_kit.studies.dynamic_selection:_cached_unit": "09f054ed2fde",
    "analysis_kit.studies.sensitivity:_cached_unit": "bfe9383c04dd",
    "analysis_kit.studies.theoretical_validation:_cached_unit": "8e592d1afaa7",
}


def _key_sites():
    """(module, function node, ``code_key`` call) for every ``code_key(...)`` call in the package."""
    for info in pkgutil.walk_packages(analysis_kit.__path__, "analysis_kit."):
        module = importlib.import_module(info.name)
        for fn in ast.walk(ast.parse(inspect.getsource(module))):
            if isinstance(fn, ast.FunctionDef) and fn.name != "code_key":
                for call in ast.walk(fn):
                    if isinstance(call, ast.Call) and (getattr(call.func, "id", None) == "code_key"
                                                       or getattr(call.func, "attr", None) == "code_key"):
                        yield module, fn, call


def _local_imports(module: types.ModuleType, fn: ast.FunctionDef) -> dict[str, Any]:
    """Names a function imports inside its body (``from . import train as train_mod``)."""
    package = module.__name__.rsplit(".", 1)[0] if "." in module.__name__ else module.__name__
    names = {}
    for node in ast.walk(fn):
        if isinstance(node, ast.ImportFrom) and node.level:
            base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
            if node.module:
                source = importlib.import_module(f"{base}.{node.module}")
                names |= {a.asname or a.name: getattr(source, a.name) for a in node.names}
            else:
                names |= {a.asname or a.name: importlib.import_module(f"{base}.{a.name}") for a in node.names}
    return names


def _resolve(node: ast.AST, names: dict[str, Any], module: types.ModuleType) -> list[Any]:
    """The objects a ``code_key`` argument names."""
    if isinstance(node, ast.Starred):
        return list(_resolve(node.value, names, module)[0])
    if isinstance(node, ast.Name):
        return [names[node.id]]
    if isinstance(node, ast.Attribute):
        return [getattr(_resolve(node.value, names, module)[0], node.attr)]
    if isinstance(node, ast.Call):
        return [_resolve(node.func, names, module)[0]()]
    if isinstance(node, ast.Subscript):  # sys.modules[__name__]
        return [module]
    raise AssertionError(f"{module.__name__}: a code_key argument this test cannot read: {ast.unparse(node)}")


def _gaps() -> dict[str, tuple[list[str], str]]:
    gaps = {}
    for module, fn, call in _key_sites():
        names = {**vars(module), **_local_imports(module, fn)}
        keyed = [obj for arg in call.args for obj in _resolve(arg, names, module)]
        modules = {obj for obj in keyed if isinstance(obj, types.ModuleType)}
        functions = [obj for obj in keyed if obj not in modules]
        missing = [obj for obj in (cache.reachable(*functions) if functions else ())
                   if obj not in keyed and inspect.getmodule(obj) not in modules]
        if missing:
            gaps[f"{module.__name__}:{fn.name}"] = ([f"{o.__module__}.{o.__qualname__}" for o in missing],
                                                    cache.code_key(*missing)[:12])
    return gaps


def test_every_cache_key_holds_its_helpers_or_declares_the_gap():
    gaps = _gaps()
    for site, (names, digest) in gaps.items():
        assert site in KNOWN_GAPS, (
            f"{site}'s cache key misses helpers it calls: {', '.join(names)}. Key it with "
            f"cache.code_key(*cache.reachable(builder, ...)) so a change to them re-computes the entry.")
        assert digest == KNOWN_GAPS[site], (
            f"code that feeds {site}'s cached entries but is not in their key changed ({', '.join(names)}). Add "
            f"it to the key and re-run what it feeds, or, if no cached number can change, update KNOWN_GAPS.")
    assert set(KNOWN_GAPS) <= set(gaps), f"gaps now closed, remove them from KNOWN_GAPS: {set(KNOWN_GAPS) - set(gaps)}"


def test_the_scan_finds_the_keys_it_must_read():
    """The scan is not vacuous: it finds the trained models', the exit heads' and analyze's keys and resolves
    their arguments (a ``*tuple``, a call, a module, a name imported inside the function)."""
    sites = {f"{m.__name__}:{fn.name}" for m, fn, _ in _key_sites()}
    assert {"analysis_kit.train:trained_record", "analysis_kit.dynamic:exit_model", "analysis_kit.analyze:base_key",
            "analysis_kit.quantize:run", "analysis_kit.studies.compression:_arm_spec"} <= sites
    gaps = _gaps()
    for site in ("dynamic:exit_model", "train:trained_record", "quantize:run", "studies.compression:_arm_spec"):
        assert f"analysis_kit.{site}" not in gaps  # cache.reachable: no gap by construction
