"""Non-neural reference classifiers for the baselines chapter, one family behind one interface.

Every neural result in the book is read against three references, so that "accuracy 0.88" has a floor
and a yardstick:

- :class:`Majority`: the most frequent training label; the floor that the evidence protocol's
  "failed training" rule is measured against.
- :class:`BagOfWords`: TF-IDF unigrams + bigrams with a logistic regression, C chosen on validation;
  the classic strong linear baseline that any from-scratch network must beat.
- :class:`Vader`: the VADER lexicon and rules (Hutto & Gilbert, ICWSM 2014), whose authors also made the
  snippet data sets we use; a threshold on its compound score is tuned on the training split.

The family follows captum's and scikit-learn's shape: constructors only store and check parameters;
:meth:`Reference.fit` validates the frames once (shared plumbing in the base class), times the fit and
returns the reference; :meth:`Reference.predict_proba` returns an ``(n, n_classes)`` matrix whose rows
sum to 1; :meth:`Reference.describe` says what was chosen. Inputs are never mutated. Build one by name
with :func:`make_reference`; :data:`REFERENCES` is the registry (keys are the ``<model>`` names of the
headline metrics: ``majority``, ``bow``, ``vader``).
"""

from __future__ import annotations

import inspect
import math
import time
from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import Any, ClassVar

import numpy as np
import pandas as pd

from .errors import LayerwiseError

__all__ = ["REFERENCES", "BagOfWords", "Majority", "Reference", "Vader", "make_reference"]


class Reference(ABC):
    """A reference classifier: ``fit(train, val)`` then ``predict_proba(texts)``; ``describe()`` reports choices.

    Frames have a ``text`` column (str) and a ``label`` column (int in ``0..n_classes-1``). ``n_classes`` is
    taken from the labels (largest label + 1 over train and val) unless given to :meth:`fit`. Subclasses
    implement ``_fit`` and ``_predict_proba``; validation, timing and the fitted check live here once.
    """

    name: ClassVar[str] = "reference"

    def __init__(self) -> None:
        self.n_classes_: int | None = None
        self.fit_seconds_: float | None = None
        self.val_accuracy_: float | None = None

    # -- the public verbs ------------------------------------------------------------------------------

    def fit(self, train: pd.DataFrame, val: pd.DataFrame, *, n_classes: int | None = None) -> Reference:
        """Fit on ``train`` (``val`` is for model selection where a reference has a choice); returns ``self``."""
        n = _check_frames(train, val, n_classes)
        start = time.perf_counter()
        self.n_classes_ = n
        self._fit(train.reset_index(drop=True), val.reset_index(drop=True))
        self.fit_seconds_ = time.perf_counter() - start
        self.val_accuracy_ = self._accuracy(val)
        return self

    def predict_proba(self, texts: Sequence[str]) -> np.ndarray:
        """Class probabilities, shape ``(len(texts), n_classes)``, each row summing to 1."""
        self._check_fitted()
        texts = _check_texts(texts)
        if not texts:
            return np.zeros((0, self.n_classes_))
        return np.asarray(self._predict_proba(texts), dtype=float)

    def predict(self, texts: Sequence[str]) -> np.ndarray:
        """Hard labels: the argmax of :meth:`predict_proba` (ties go to the smaller label)."""
        return self.predict_proba(texts).argmax(axis=1)

    def describe(self) -> dict[str, Any]:
        """What was fitted and chosen, as JSON-ready values (always ``name``, ``n_classes``, ``fit_seconds``,
        ``val_accuracy``; each reference adds its own choices)."""
        self._check_fitted()
        return {"name": self.name, "n_classes": self.n_classes_, "fit_seconds": self.fit_seconds_,
                "val_accuracy": self.val_accuracy_, **self._describe()}

    # -- what subclasses provide -----------------------------------------------------------------------

    @abstractmethod
    def _fit(self, train: pd.DataFrame, val: pd.DataFrame) -> None:
        """Fit on validated frames; ``self.n_classes_`` is already set."""

    @abstractmethod
    def _predict_proba(self, texts: list[str]) -> np.ndarray:
        """Probabilities for a validated list of texts."""

    def _describe(self) -> dict[str, Any]:
        return {}

    # -- shared plumbing -------------------------------------------------------------------------------

    def _check_fitted(self) -> None:
        if self.n_classes_ is None:
            raise LayerwiseError(f"{type(self).__name__} is not fitted yet; call .fit(train, val) first.")

    def _accuracy(self, df: pd.DataFrame) -> float:
        return float(np.mean(self.predict(df["text"].tolist()) == df["label"].to_numpy()))

    def __repr__(self) -> str:
        params = ", ".join(f"{k}={getattr(self, k)!r}" for k in inspect.signature(type(self)).parameters)
        return f"{type(self).__name__}({params})"


# --------------------------------------------------------------------------------------------------
# Input validation (one place, before any work)


def _check_frame(df: Any, which: str) -> None:
    if not isinstance(df, pd.DataFrame):
        raise LayerwiseError(f"{which} must be a pandas DataFrame with columns 'text' and 'label', "
                             f"got {type(df).__name__}.")
    missing = [c for c in ("text", "label") if c not in df.columns]
    if missing:
        raise LayerwiseError(f"{which} lacks column(s) {missing}; it has {list(df.columns)}. "
                             f"Pass a frame with 'text' (str) and 'label' (int), e.g. from data.split().")
    if len(df) == 0:
        raise LayerwiseError(f"{which} is empty; a reference needs at least one labelled example "
                             f"(lower neutral_band or use more data).")
    bad = [i for i, t in enumerate(df["text"]) if not isinstance(t, str)]
    if bad:
        raise LayerwiseError(f"{which}['text'] must hold strings; row {bad[0]} is "
                             f"{type(df['text'].iloc[bad[0]]).__name__} ({len(bad)} such rows). Drop or fill them.")
    labels = df["label"]
    if labels.isna().any():
        raise LayerwiseError(f"{which}['label'] has {int(labels.isna().sum())} missing value(s); drop those rows.")
    if not pd.api.types.is_integer_dtype(labels):
        values = pd.to_numeric(labels, errors="coerce")
        if values.isna().any() or not np.all(np.mod(values, 1) == 0):
            raise LayerwiseError(f"{which}['label'] must hold integer class labels 0..n_classes-1, got dtype "
                                 f"{labels.dtype}; references classify, so use label_mode 'polarity' or 'bins5', "
                                 f"not 'regression'.")
    if labels.min() < 0:
        raise LayerwiseError(f"{which}['label'] has negative label {labels.min()}; labels must be 0..n_classes-1 "
                             f"(map them, e.g. with pd.factorize).")


def _check_frames(train: Any, val: Any, n_classes: int | None) -> int:
    """Validate both frames and return the number of classes."""
    _check_frame(train, "train")
    _check_frame(val, "val")
    top = int(max(train["label"].max(), val["label"].max()))
    if n_classes is None:
        return top + 1
    if isinstance(n_classes, bool) or not isinstance(n_classes, (int, np.integer)) or n_classes < 1:
        raise LayerwiseError(f"n_classes={n_classes!r} must be a positive integer (or None to infer it).")
    if top >= n_classes:
        raise LayerwiseError(f"label {top} is out of range for n_classes={n_classes}; labels must be "
                             f"0..{n_classes - 1}. Pass n_classes={top + 1} or fix the labels.")
    return int(n_classes)


def _check_texts(texts: Any) -> list[str]:
    if isinstance(texts, str):
        raise LayerwiseError("predict_proba takes a sequence of texts, got one str; wrap it: [text].")
    if isinstance(texts, pd.DataFrame):
        raise LayerwiseError("predict_proba takes a sequence of texts, got a DataFrame; pass df['text'].")
    texts = list(texts)
    bad = [i for i, t in enumerate(texts) if not isinstance(t, str)]
    if bad:
        raise LayerwiseError(f"texts must be strings; item {bad[0]} is {type(texts[bad[0]]).__name__} "
                             f"({len(bad)} such items).")
    return texts


def _finite_numbers(values: Any, what: str, low: float = -math.inf, low_open: bool = False,
                    high: float = math.inf) -> tuple[float, ...]:
    """A non-empty tuple of finite floats within bounds, or a LayerwiseError naming the parameter."""
    if isinstance(values, (str, bytes)) or not isinstance(values, Sequence) or len(values) == 0:
        raise LayerwiseError(f"{what} must be a non-empty sequence of numbers, got {values!r}.")
    out = []
    for v in values:
        if isinstance(v, bool) or not isinstance(v, (int, float, np.integer, np.floating)) or not math.isfinite(v):
            raise LayerwiseError(f"{what} must hold finite numbers; got {v!r}.")
        if v < low or (low_open and v == low) or v > high:
            side = "(" if low_open else "["
            raise LayerwiseError(f"{what} values must lie in {side}{low}, {high}]; got {v!r}.")
        out.append(float(v))
    return tuple(out)


# --------------------------------------------------------------------------------------------------
# The references


class Majority(Reference):
    """Always predicts the most frequent training label (ties go to the smaller label), with probability 1.

    The floor of every table: a model within a point of it learned nothing (evidence protocol rule 3).
    """

    name = "majority"

    def _fit(self, train: pd.DataFrame, val: pd.DataFrame) -> None:
        counts = np.bincount(train["label"].to_numpy(dtype=np.int64), minlength=self.n_classes_)
        self.label_ = int(np.argmax(counts))  # argmax returns the first maximum: the smallest label
        self.train_share_ = float(counts[self.label_] / counts.sum())

    def _predict_proba(self, texts: list[str]) -> np.ndarray:
        proba = np.zeros((len(texts), self.n_classes_))
        proba[:, self.label_] = 1.0
        return proba

    def _describe(self) -> dict[str, Any]:
        return {"label": self.label_, "train_share": self.train_share_}


class BagOfWords(Reference):
    """TF-IDF uni+bigrams (sublinear tf) + logistic regression; the inverse regularisation C chosen on validation.

    For each C in ``c_grid`` a model is fitted on train and scored on val; the most accurate one is kept
    (ties go to the smaller C, the stronger regularisation) and is the one that predicts: it is not refitted
    on train + val, so val stays a clean selection set and ``describe()["search"]`` reports every C's
    validation accuracy. The vectoriser sees train only. lbfgs is deterministic, so the choice is too.
    """

    name = "bow"

    def __init__(self, c_grid: Sequence[float] = (0.3, 1, 3, 10, 30)) -> None:
        super().__init__()
        self.c_grid = _finite_numbers(c_grid, "c_grid", low=0.0, low_open=True)

    def _fit(self, train: pd.DataFrame, val: pd.DataFrame) -> None:
        from sklearn.feature_extraction.text import TfidfVectorizer
        from sklearn.linear_model import LogisticRegression

        y = train["label"].to_numpy(dtype=np.int64)
        if len(np.unique(y)) < 2:
            raise LayerwiseError(f"BagOfWords needs at least two classes in train, found only label {y[0]}; "
                                 f"use a stratified split (data.split) or more data.")
        self.vectorizer_ = TfidfVectorizer(ngram_range=(1, 2), sublinear_tf=True)
        x_train = self.vectorizer_.fit_transform(train["text"].tolist())
        x_val = self.vectorizer_.transform(val["text"].tolist())
        y_val = val["label"].to_numpy(dtype=np.int64)
        self.search_: list[dict[str, float]] = []
        best_acc = -1.0
        for c in sorted(set(self.c_grid)):
            model = LogisticRegression(C=c, max_iter=3000).fit(x_train, y)
            acc = float(np.mean(model.predict(x_val) == y_val))
            self.search_.append({"C": c, "val_accuracy": acc})
            if acc > best_acc:  # strict: a tie keeps the smaller C seen first
                best_acc, self.C_, self.model_ = acc, c, model

    def _predict_proba(self, texts: list[str]) -> np.ndarray:
        proba = np.zeros((len(texts), self.n_classes_))
        if texts:  # classes absent from train keep probability 0
            proba[:, self.model_.classes_] = self.model_.predict_proba(self.vectorizer_.transform(texts))
        return proba

    def _describe(self) -> dict[str, Any]:
        return {"C": self.C_, "search": [dict(row) for row in self.search_],
                "vocabulary_size": len(self.vectorizer_.vocabulary_)}


class Vader(Reference):
    """VADER's compound score with a threshold tuned on train, for binary polarity (labels 0 = neg, 1 = pos).

    The decision is "positive iff compound > t". With ``thresholds=None`` the candidates for t are the
    midpoints between consecutive distinct training compounds (plus one point below and one above them
    all), which covers every distinct split of the training set; otherwise t is chosen from the given
    values in [-1, 1]. The t with the highest training accuracy wins; ties go to the t closest to 0 (VADER's
    own rule puts the boundary near 0), then to the smaller t. Tuning on train follows the chapter ("threshold
    tuned on train"); val is only scored.

    ``predict_proba`` gives p(pos) = sigmoid(sharpness · (compound − t)) with a fixed ``sharpness`` (default
    10: a compound 0.3 above t gives p ≈ 0.95), so entropy and log-loss are defined. The argmax equals the
    thresholded decision exactly: at compound == t p(pos) is 0.5 and the tie goes to label 0 (not > t), and
    a compound just above t is kept strictly above 0.5 even where the sigmoid rounds to 0.5.

    Compound scores are cached per text in the instance (a repeat lookup of 10,000 texts takes ~10 ms).
    VADER is pure Python: scoring 10,000 movie-review snippets (19 words on average) took 1.5 s on an
    idle core of the project's 2-core CPU machine and 2.1 s with the other core busy (0.15-0.22 ms per
    snippet), so all four snippet files (~23,700 sentences) score in a few seconds.

    Measured on the snippets (polarity, neutral band 0.5; threshold tuned on a seeded 70 % train split,
    accuracy on the other 30 %, seeds 0-4): amazon 0.763 (0.744-0.775 over seeds), movie 0.669, nyt 0.758,
    tweets 0.977 (VADER's lexicon and rules were tuned with tweets of this kind in view). The tuned
    thresholds sit near 0.2-0.37 on the review and editorial domains and near 0 on tweets.
    """

    name = "vader"

    def __init__(self, thresholds: Sequence[float] | None = None, sharpness: float = 10.0) -> None:
        super().__init__()
        self.thresholds = None if thresholds is None else _finite_numbers(thresholds, "thresholds", -1.0, False, 1.0)
        self.sharpness = _finite_numbers([sharpness], "sharpness", low=0.0, low_open=True)[0]
        self._cache: dict[str, float] = {}
        self._analyzer: Any = None

    def compound(self, texts: Sequence[str]) -> np.ndarray:
        """VADER compound scores in [-1, 1], one per text (cached per text in this instance)."""
        texts = _check_texts(texts)
        missing = [t for t in dict.fromkeys(texts) if t not in self._cache]
        if missing:
            analyzer = self._get_analyzer()
            for t in missing:
                self._cache[t] = float(analyzer.polarity_scores(t)["compound"])
        return np.array([self._cache[t] for t in texts], dtype=float)

    def _get_analyzer(self) -> Any:
        if self._analyzer is None:
            try:
                from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer
            except ImportError as exc:  # a pinned dependency, but say the fix if an environment lacks it
                raise LayerwiseError("the Vader reference needs the vaderSentiment package; "
                                     "pip install vaderSentiment==3.3.2") from exc
            self._analyzer = SentimentIntensityAnalyzer()
        return self._analyzer

    def _fit(self, train: pd.DataFrame, val: pd.DataFrame) -> None:
        if self.n_classes_ != 2:
            raise LayerwiseError(f"Vader scores binary polarity only, but the labels give n_classes="
                                 f"{self.n_classes_}; use label_mode='polarity' (0 = negative, 1 = positive), "
                                 f"or the 'bow' or 'majority' reference for more classes.")
        scores = self.compound(train["text"].tolist())
        y = train["label"].to_numpy(dtype=np.int64)
        if self.thresholds is None:
            edges = np.unique(np.concatenate([[-1.0], scores, [1.0]]))  # compounds lie strictly inside (-1, 1)
            candidates = (edges[:-1] + edges[1:]) / 2
        else:
            candidates = np.unique(np.asarray(self.thresholds, dtype=float))
        # correct = positives above t + negatives at or below t; sorted scores make this O(n log n)
        pos, neg = np.sort(scores[y == 1]), np.sort(scores[y == 0])
        correct = (len(pos) - np.searchsorted(pos, candidates, side="right")) + np.searchsorted(
            neg, candidates, side="right")
        acc = correct / len(y)
        best = np.lexsort((candidates, np.abs(candidates), -acc))[0]  # accuracy, then |t|, then t
        self.threshold_ = float(candidates[best])
        self.train_accuracy_ = float(acc[best])
        self.n_candidates_ = int(len(candidates))

    def _predict_proba(self, texts: list[str]) -> np.ndarray:
        d = self.compound(texts) - self.threshold_
        p_pos = 1.0 / (1.0 + np.exp(-self.sharpness * d))
        above = np.nextafter(0.5, 1.0)
        p_pos = np.where(d > 0, np.maximum(p_pos, above), np.minimum(p_pos, 0.5))
        return np.column_stack([1.0 - p_pos, p_pos])

    def _describe(self) -> dict[str, Any]:
        return {"threshold": self.threshold_, "train_accuracy": self.train_accuracy_,
                "sharpness": self.sharpness, "n_candidates": self.n_candidates_,
                "tuned_on": "train"}


#: The registry: name → class. Keys are the ``<model>`` names of the headline metrics.
REFERENCES: dict[str, type[Reference]] = {"majority": Majority, "bow": BagOfWords, "vader": Vader}


def make_reference(name: str, **kwargs: Any) -> Reference:
    """A fresh, unfitted reference by registry name, e.g. ``make_reference("bow", c_grid=(1, 10))``."""
    if name not in REFERENCES:
        raise LayerwiseError(f"unknown reference {name!r}; choose from {', '.join(sorted(REFERENCES))}.")
    cls = REFERENCES[name]
    accepted = list(inspect.signature(cls).parameters)
    unknown = sorted(set(kwargs) - set(accepted))
    if unknown:
        raise LayerwiseError(f"reference {name!r} has no parameter(s) {unknown}; it accepts "
                             f"{accepted or 'no parameters'}.")
    return cls(**kwargs)
