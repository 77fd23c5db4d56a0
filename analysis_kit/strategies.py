"""Block-selection strategies: one class per way of answering "which ``k`` of the ``L`` blocks do we keep?".

Every strategy is a ``Strategy`` subclass with one call, ``select(model, k, calib) -> kept blocks`` (distinct
block indices in increasing order, ``k`` of them), and declares what it needs instead of a central if/elif
deciding for it: ``needs_data`` (calibration batches, ``Calibration.data``) and ``needs_importance``
(an importance table and method, ``Calibration.scores``/``method``). ``compress.select``,
``compress.compress_folder`` and the ``analysis-kit compress --strategy`` choices all read the registry and
these declarations, so adding a strategy is one class here (or anywhere, with ``@register``).

``top_k`` is the one "keep the k best-ranked items" rule that ``compress.keep_top_k``,
``importance.choose`` and the studies share (ties: the lower index; NaN ranks last).

This module imports neither torch nor ``compress`` at import time, so the CLI can list the strategies
without loading torch; the built-in strategies call into ``compress`` when they run.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

from .errors import LayerwiseError

if TYPE_CHECKING:
    import pandas as pd
    import torch

    from .compress import Encoded

Keep = tuple[int, ...]


class StrategyError(LayerwiseError):
    """A misuse of the strategy family itself (a bad ``top_k`` request, a clashing registration)."""


# --------------------------------------------------------------------------------------------------
# The one top-k rule


def top_k(scores: Mapping[Any, float] | Iterable[float], k: int, *, largest: bool = True) -> Keep:
    """The ``k`` items ranked first, as increasing indices: the highest scores (``largest=True``, "keep the
    most important") or the lowest (``largest=False``, "drop the least important").

    ``scores``: a mapping or ``pandas.Series`` ``{index: score}`` (its labels are the indices), or a sequence
    indexed by position. Ties go to the lower index, whichever the direction; a NaN score ranks after every
    number (never chosen before a scored item), as ``pandas.sort_values`` places it. One rule for every
    caller, so that the same scores always give the same blocks.
    """
    items = [(int(i), float(v)) for i, v in (scores.items() if hasattr(scores, "items") else enumerate(scores))]
    try:
        count = operator.index(k)
    except TypeError:
        count = -1
    if isinstance(k, bool) or not 0 <= count <= len(items):
        raise StrategyError(f"cannot pick k={k!r} of {len(items)} scored items; pass k in 0..{len(items)}.")
    sign = -1.0 if largest else 1.0

    def rank(item: tuple[int, float]) -> tuple[bool, float, int]:
        index, score = item
        return (math.isnan(score), 0.0 if math.isnan(score) else sign * score, index)

    return tuple(sorted(i for i, _ in sorted(items, key=rank)[:count]))


# --------------------------------------------------------------------------------------------------
# The family


@dataclass(frozen=True)
class Calibration:
    """What the data-guided strategies look at; data-free strategies ignore it.

    ``data``: tokenized calibration batches (``compress.encode``), for strategies that run the model;
    ``scores``/``method``: an ``importance.compute`` table and the method to rank by (``method`` may be
    ``None`` when the table holds one method); ``seed``: for random choices; ``criterion``: how greedy search
    measures harm (``compress.greedy_removal``); ``device``: where the model runs.
    """

    data: Encoded | None = None
    scores: pd.DataFrame | None = None
    method: str | None = None
    seed: int = 0
    criterion: str = "auto"
    device: str | torch.device = "auto"


class Strategy:
    """One way of choosing the blocks to keep. Subclass it, set ``name`` and the declarations, implement
    ``select``, and decorate the class with ``@register``.

    ``select`` receives ``k`` already checked to lie in ``1..L`` and a ``Calibration`` that holds what the
    declarations ask for (``check`` has run); it returns ``k`` distinct block indices in increasing order.
    """

    #: The name ``compress.select``, ``compress_folder`` and ``--strategy`` know the strategy by.
    name: ClassVar[str] = ""
    #: Needs calibration batches (``Calibration.data``): it runs the model on data.
    needs_data: ClassVar[bool] = False
    #: Needs an importance table (``Calibration.scores``) and accepts an importance ``method``.
    needs_importance: ClassVar[bool] = False

    @property
    def data_guided(self) -> bool:
        """Whether the choice depends on calibration texts (directly or through importance scores)."""
        return self.needs_data or self.needs_importance

    def check(self, calib: Calibration) -> None:
        """Fail, naming what to pass, when ``calib`` lacks what this strategy declares it needs."""
        if self.needs_importance and calib.scores is None:
            raise _compress_error(f"strategy {self.name!r} needs scores= (an importance.compute table) and method=.")
        if self.needs_data and calib.data is None:
            raise _compress_error(f"strategy {self.name!r} needs calibration data= "
                                  "(compress.encode(tokenizer, texts)).")

    def select(self, model: torch.nn.Module, k: int, calib: Calibration) -> Keep:
        """The ``k`` blocks of ``model`` to keep, in increasing order."""
        raise NotImplementedError(f"{type(self).__name__} must implement select(model, k, calib).")


_REGISTRY: dict[str, Strategy] = {}


def register(cls: type[Strategy]) -> type[Strategy]:
    """Class decorator: make strategy ``cls`` known under ``cls.name`` (after those registered before it)."""
    if not (isinstance(cls, type) and issubclass(cls, Strategy)):
        raise StrategyError(f"register() takes a Strategy subclass, not {cls!r}.")
    if not isinstance(cls.name, str) or not cls.name.isidentifier():
        raise StrategyError(f"{cls.__name__}.name={cls.name!r}; give the strategy a name such as 'drop_last'.")
    if cls.name in _REGISTRY:
        raise StrategyError(f"a strategy named {cls.name!r} is already registered "
                            f"({type(_REGISTRY[cls.name]).__name__}); choose another name or unregister it first.")
    _REGISTRY[cls.name] = cls()
    return cls


def unregister(name: str) -> None:
    """Forget the strategy called ``name`` (e.g. one a test registered)."""
    if name not in _REGISTRY:
        raise StrategyError(f"no strategy named {name!r} is registered; registered: {', '.join(_REGISTRY)}.")
    del _REGISTRY[name]


def names() -> tuple[str, ...]:
    """The registered strategies' names, in registration order."""
    return tuple(_REGISTRY)


def lookup(name: str) -> Strategy:
    """The strategy registered as ``name``."""
    if name not in _REGISTRY:
        raise _compress_error(f"unknown strategy {name!r}; choose from {', '.join(_REGISTRY)}.")
    return _REGISTRY[name]


def _compress_error(message: str) -> Exception:
    """Errors a user meets through ``compress`` stay ``compress.CompressError``, as before the family existed."""
    from .compress import CompressError

    return CompressError(message)


# --------------------------------------------------------------------------------------------------
# The built-in strategies (registration order is the order of ``compress.STRATEGIES``)


@register
class Importance(Strategy):
    """The ``k`` blocks an importance method scores highest (``compress.keep_top_k``)."""

    name = "importance"
    needs_importance = True

    def select(self, model: torch.nn.Module, k: int, calib: Calibration) -> Keep:
        from . import compress, layers

        return compress.keep_top_k(calib.scores, k, layers.num_blocks(model), calib.method)


@register
class Distributed(Strategy):
    """``k`` blocks spread evenly over depth, first and last included (``compress.keep_distributed``)."""

    name = "distributed"

    def select(self, model: torch.nn.Module, k: int, calib: Calibration) -> Keep:
        from . import compress, layers

        return compress.keep_distributed(layers.num_blocks(model), k)


@register
class Angular(Strategy):
    """Drop the contiguous run of ``L - k`` blocks whose input and output are closest in angle
    (``compress.keep_angular``, Gromov et al., 2024)."""

    name = "angular"
    needs_data = True

    def select(self, model: torch.nn.Module, k: int, calib: Calibration) -> Keep:
        from . import compress

        return compress.keep_angular(model, calib.data, k, device=calib.device)


@register
class DropLast(Strategy):
    """The first ``k`` blocks (``compress.keep_drop_last``, Sajjad et al., 2023)."""

    name = "drop_last"

    def select(self, model: torch.nn.Module, k: int, calib: Calibration) -> Keep:
        from . import compress, layers

        return compress.keep_drop_last(layers.num_blocks(model), k)


@register
class Greedy(Strategy):
    """Remove, one at a time, the block whose removal hurts the calibration set least
    (``compress.greedy_removal`` with ``calib.criterion``)."""

    name = "greedy"
    needs_data = True

    def select(self, model: torch.nn.Module, k: int, calib: Calibration) -> Keep:
        from . import compress

        return compress.greedy_removal(model, calib.data, k, calib.criterion, calib.device)[0]


@register
class Random(Strategy):
    """One seeded uniformly random ``k``-subset (``compress.random_keeps``; the null distribution)."""

    name = "random"

    def select(self, model: torch.nn.Module, k: int, calib: Calibration) -> Keep:
        from . import compress, layers

        n = layers.num_blocks(model)
        return compress.random_keeps(n, k, 1, calib.seed)[0] if math.comb(n, k) > 1 else tuple(range(n))
