"""Single source for a chapter's parameters: the notebook's ``parameters`` cell feeds the study's ``Params``.

Papermill injects the parameters as notebook globals; :func:`params_from` builds the study's frozen
``Params`` from exactly those names (lists become tuples), so a notebook never retypes them, and
``tests/test_study_dynamic.py::test_parameters_cell_and_params_are_one_source`` checks, for every study,
that each name and default of the cell equals the dataclass's.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import fields
from typing import Any, TypeVar

from ..errors import LayerwiseError

P = TypeVar("P")

#: Notebook-only names: the profile label is a run setting, not a study parameter.
NOTEBOOK_ONLY = ("profile",)


def params_from(cls: type[P], namespace: Mapping[str, Any]) -> P:
    """``cls(**the namespace's values of cls's fields)``; missing fields keep their defaults.

    Lists are turned into tuples (``Params`` are frozen and hashable; papermill passes lists). The
    result is validated when ``cls`` has ``validate()``.
    """
    if not isinstance(namespace, Mapping):
        raise LayerwiseError(f"params_from needs a mapping of names (e.g. globals()), got {type(namespace).__name__}.")
    values = {}
    for f in fields(cls):
        if f.name in namespace:
            v = namespace[f.name]
            values[f.name] = tuple(v) if isinstance(v, list) else v
    params = cls(**values)
    if hasattr(params, "validate"):
        params.validate()
    return params
