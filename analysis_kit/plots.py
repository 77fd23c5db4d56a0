"""Altair charts in one house style, rendered to static SVG offline.

``theme()`` registers and enables the "layerwise" theme and Altair's ``svg`` renderer, which converts
each chart with vl-convert (bundled Vega, no network, no JavaScript), so an executed notebook holds an
``image/svg+xml`` output that the book shows as is. Every chart shows the data behind a summary:
per-seed points next to means and 95% intervals, never bars alone.

Charts embed their data, so keep it small: aggregate first (Altair refuses more than 5000 rows).
Intervals computed here come from ``stats.summarize`` (t interval for a few seeds, BCa otherwise), the
same numbers that go into ``summary.json``.
"""

from __future__ import annotations

from collections.abc import Sequence

import altair as alt
import numpy as np
import pandas as pd
import vl_convert as vlc

from . import stats
from .errors import LayerwiseError

THEME = "layerwise"
WIDTH, HEIGHT = 520, 300
#: Okabe & Ito's categorical palette, chosen to stay distinguishable under the common colour-vision
#: deficiencies (tableau10, used before, puts red beside green); black is last so it is used least.
PALETTE = ("#0072B2", "#E69F00", "#009E73", "#D55E00", "#56B4E9", "#CC79A7", "#F0E442", "#000000")
MAX_ROWS = 5000  # altair's default cap on embedded rows


class PlotError(LayerwiseError):
    """Bad input to a chart function (missing columns, empty or oversized data)."""


def _config() -> alt.theme.ThemeConfig:
    axis = {"labelFontSize": 12, "titleFontSize": 13, "titleFontWeight": "normal", "gridColor": "#e8e8e8",
            "domainColor": "#888888", "tickColor": "#888888", "labelColor": "#333333", "titleColor": "#333333"}
    return {
        "config": {
            "font": "DejaVu Sans, Helvetica, Arial, sans-serif",
            "view": {"continuousWidth": WIDTH, "continuousHeight": HEIGHT, "discreteWidth": WIDTH, "stroke": None},
            "axis": axis,
            "legend": {"labelFontSize": 12, "titleFontSize": 12, "titleFontWeight": "normal", "symbolSize": 80},
            "header": {"labelFontSize": 12, "titleFontSize": 13},
            "title": {"fontSize": 15, "subtitleFontSize": 12, "anchor": "start", "fontWeight": "normal",
                      "color": "#222222"},
            "range": {"category": list(PALETTE)},
            "point": {"size": 50, "filled": True},
            "line": {"strokeWidth": 2},
            "errorbar": {"thickness": 1.5, "ticks": {"size": 12}},
        }
    }


def theme(renderer: str = "svg") -> None:
    """Enable the house style and the offline renderer (``"svg"`` via vl-convert; ``"png"`` also works).

    Call once at the top of a notebook. Idempotent.
    """
    alt.theme.register(THEME, enable=True)(_config)
    alt.renderers.enable(renderer)


def to_svg(chart: alt.TopLevelMixin) -> str:
    """The chart as an SVG string (vl-convert, offline); for saving figures next to results."""
    return vlc.vegalite_to_svg(chart.to_dict())


# ------------------------------------------------------------------------------------------------ helpers


def _check(df: pd.DataFrame, *cols: str | None) -> None:
    if not isinstance(df, pd.DataFrame):
        raise PlotError(f"expected a pandas DataFrame, got {type(df).__name__}.")
    missing = [c for c in cols if c is not None and c not in df.columns]
    if missing:
        raise PlotError(f"column(s) {missing} not in the data (columns: {list(df.columns)}); pass existing names.")
    if df.empty:
        raise PlotError("the data frame is empty: nothing to plot. Check the filter that produced it.")
    if len(df) > MAX_ROWS:
        raise PlotError(f"{len(df)} rows would be embedded in the chart (limit {MAX_ROWS}); aggregate first, e.g. "
                        "one row per setting and seed.")


def _discrete(df: pd.DataFrame, col: str, title: str | None = None, axis: str = "x") -> alt.X | alt.Y:
    """Nominal axis in order of appearance for labels, ordinal ascending for numbers (layer indices).

    x labels stay horizontal when they fit the width, else they are angled.
    """
    labels = pd.unique(df[col])
    fits = sum(len(str(v)) for v in labels) * 8 + 10 * len(labels) < WIDTH
    kw = {"title": title if title is not None else col, "axis": alt.Axis(labelAngle=0 if fits else -35)}
    if axis == "y":
        return alt.Y(f"{col}:O" if pd.api.types.is_numeric_dtype(df[col]) else f"{col}:N",
                     title=kw["title"], sort="ascending" if pd.api.types.is_numeric_dtype(df[col]) else list(labels))
    if pd.api.types.is_numeric_dtype(df[col]):
        return alt.X(f"{col}:O", sort="ascending", **kw)
    return alt.X(f"{col}:N", sort=list(labels), **kw)


def _colour(color: str | None) -> dict:
    if color is None:
        return {}
    return {"color": alt.Color(f"{color}:N", title=color)}


def _summary(df: pd.DataFrame, keys: list[str], y: str) -> pd.DataFrame:
    """Mean and 95% CI of ``y`` per group, via ``stats.summarize`` (same intervals as summary.json)."""
    rows = []
    for key, g in df.groupby(keys, sort=False, dropna=False):
        rec = stats.summarize(g[y].to_numpy(), over="seeds")
        vals = key if isinstance(key, tuple) else (key,)
        rows.append({**dict(zip(keys, vals, strict=True)), y: rec["mean"], "ci_low": rec["ci_low"],
                     "ci_high": rec["ci_high"], "n_seeds": rec["n"], "interval": rec["method"]})
    clash = {y, "ci_low", "ci_high", "n_seeds", "interval"} & set(keys)
    if clash:
        raise PlotError(f"grouping column(s) {sorted(clash)} clash with the summary columns; rename them.")
    return pd.DataFrame(rows)


def _titled(chart: alt.TopLevelMixin, title: str | None) -> alt.TopLevelMixin:
    return chart.properties(title=title) if title else chart


# ------------------------------------------------------------------------------------------------- charts


def points_with_ci(df: pd.DataFrame, x: str, y: str, color: str | None = None,
                   ci: tuple[str, str] | None = None, title: str | None = None, x_title: str | None = None,
                   y_title: str | None = None) -> alt.LayerChart:
    """Every seed as a point, plus the mean (large diamond) and its 95% CI (error bar), per x (and colour).

    ``df`` holds one row per seed. With ``ci=None`` the interval is computed per group with
    ``stats.summarize``; with ``ci=("ci_low", "ci_high")`` those columns are used as given.
    """
    _check(df, x, y, color, *(ci or ()))
    keys = [x] + ([color] if color else [])
    if ci is None:
        summ = _summary(df, keys, y)
        lo, hi = "ci_low", "ci_high"
    else:
        lo, hi = ci
        summ = df.groupby(keys, sort=False, dropna=False).agg(
            **{y: (y, "mean"), lo: (lo, "first"), hi: (hi, "first"), "n_seeds": (y, "size")}).reset_index()
    xenc = _discrete(df, x, x_title)
    yenc = alt.Y(f"{y}:Q", title=y_title or y, scale=alt.Scale(zero=False))
    offset = {"xOffset": alt.XOffset(f"{color}:N")} if color else {}
    enc = {"x": xenc, **offset, **_colour(color)}
    pts = alt.Chart(df[keys + [y]]).mark_point(opacity=0.55, size=40).encode(
        y=yenc, tooltip=[*keys, alt.Tooltip(y, format=".4g")], **enc)
    bars = alt.Chart(summ).mark_errorbar().encode(y=alt.Y(f"{lo}:Q", title=y_title or y), y2=f"{hi}:Q", **enc)
    means = alt.Chart(summ).mark_point(shape="diamond", size=130, filled=True, opacity=1).encode(
        y=f"{y}:Q", tooltip=[*keys, alt.Tooltip(y, title="mean", format=".4g"), alt.Tooltip(lo, format=".4g"),
                             alt.Tooltip(hi, format=".4g"), "n_seeds"], **enc)
    return _titled(alt.layer(bars, pts, means), title)


def line_ci(df: pd.DataFrame, x: str, y: str, color: str | None = None, lo: str | None = None,
            hi: str | None = None, title: str | None = None, x_title: str | None = None,
            y_title: str | None = None) -> alt.LayerChart:
    """Mean line with a shaded 95% CI band and points, over a numeric x (e.g. layers removed).

    With ``lo``/``hi`` given, ``df`` is already one row per x (and colour). With both ``None``, ``df``
    holds one row per seed: the mean and CI are computed (``stats.summarize``) and each seed is drawn
    as a faint point.
    """
    if (lo is None) != (hi is None):
        raise PlotError("pass both lo and hi (columns with the CI bounds), or neither to compute them per seed.")
    _check(df, x, y, color, lo, hi)
    keys = [x] + ([color] if color else [])
    if lo is None:
        summ, lo, hi, seeds = _summary(df, keys, y), "ci_low", "ci_high", df[keys + [y]]
    else:
        summ, seeds = df, None
    xenc = alt.X(f"{x}:Q", title=x_title or x)
    enc = {"x": xenc, **_colour(color)}
    base = alt.Chart(summ)
    layers = [
        base.mark_area(opacity=0.18).encode(y=alt.Y(f"{lo}:Q", title=y_title or y), y2=f"{hi}:Q", **enc),
        base.mark_line().encode(y=alt.Y(f"{y}:Q", title=y_title or y, scale=alt.Scale(zero=False)), **enc),
        base.mark_point(size=55).encode(y=f"{y}:Q", tooltip=[*keys, alt.Tooltip(y, format=".4g"),
                                                             alt.Tooltip(lo, format=".4g"),
                                                             alt.Tooltip(hi, format=".4g")], **enc),
    ]
    if seeds is not None:
        layers.append(alt.Chart(seeds).mark_point(size=22, opacity=0.35).encode(y=f"{y}:Q", **enc))
    return _titled(alt.layer(*layers), title)


def heatmap(df: pd.DataFrame, x: str, y: str, value: str, text: bool = True,
            domain: Sequence[float] | None = None, scheme: str | None = None, fmt: str = ".2f",
            title: str | None = None, x_title: str | None = None, y_title: str | None = None) -> alt.LayerChart:
    """Grid of ``value`` over (x, y), e.g. accuracy for every (start layer, end layer) pair.

    ``domain`` fixes the colour range (use the same across charts you compare). ``scheme`` defaults to
    viridis, or the diverging blueorange when the domain is symmetric around 0. With ``text`` each cell
    is labelled (``fmt``), in white on dark cells.
    """
    _check(df, x, y, value)
    vals = df[value].to_numpy(dtype=float)
    if domain is None:
        finite = vals[np.isfinite(vals)]
        if finite.size == 0:
            raise PlotError(f"column {value!r} has no finite values to colour.")
        domain = (float(finite.min()), float(finite.max()))
    lo_d, hi_d = float(domain[0]), float(domain[1])
    if not hi_d > lo_d:
        hi_d = lo_d + 1.0  # one distinct value: any span gives the same single colour
    diverging = np.isclose(lo_d, -hi_d) and lo_d < 0
    scheme = scheme or ("blueorange" if diverging else "viridis")
    pos = (vals - lo_d) / (hi_d - lo_d)
    dark = np.abs(pos - 0.5) > 0.3 if diverging else pos < 0.55
    data = df[[x, y, value]].assign(_dark=dark)
    nx, ny = data[x].nunique(), data[y].nunique()
    cell = int(np.clip(WIDTH / max(nx, 1), 16, 56))
    base = alt.Chart(data).encode(x=_discrete(data, x, x_title), y=_discrete(data, y, y_title, axis="y"))
    rect = base.mark_rect().encode(
        color=alt.Color(f"{value}:Q", title=value, scale=alt.Scale(domain=[lo_d, hi_d], scheme=scheme)),
        tooltip=[x, y, alt.Tooltip(value, format=fmt)])
    layers = [rect]
    if text:
        layers.append(base.mark_text(fontSize=10 if cell < 30 else 11).encode(
            text=alt.Text(f"{value}:Q", format=fmt), color=alt.condition("datum._dark", alt.value("white"), alt.value("black"))))
    chart = alt.layer(*layers).properties(width=min(WIDTH, cell * nx), height=min(2 * HEIGHT, cell * ny))
    return _titled(chart, title)


def bar_ci(df: pd.DataFrame, x: str, y: str, lo: str = "ci_low", hi: str = "ci_high", color: str | None = None,
           title: str | None = None, x_title: str | None = None, y_title: str | None = None) -> alt.LayerChart:
    """Bars of already-summarised means with 95% CI error bars (one row per x and colour).

    For per-seed data prefer ``points_with_ci``, which also shows the spread.
    """
    _check(df, x, y, lo, hi, color)
    offset = {"xOffset": alt.XOffset(f"{color}:N")} if color else {}
    enc = {"x": _discrete(df, x, x_title), **offset}
    base = alt.Chart(df)
    bars = base.mark_bar(opacity=0.85).encode(
        y=alt.Y(f"{y}:Q", title=y_title or y), **enc, **_colour(color),
        tooltip=[x, *([color] if color else []), alt.Tooltip(y, format=".4g"), alt.Tooltip(lo, format=".4g"),
                 alt.Tooltip(hi, format=".4g")])
    err = base.mark_errorbar(color="#333333").encode(y=alt.Y(f"{lo}:Q", title=y_title or y), y2=f"{hi}:Q", **enc)
    return _titled(alt.layer(bars, err), title)


def pareto_front(df: pd.DataFrame, x: str, y: str, maximize_x: bool = False, maximize_y: bool = True) -> pd.Series:
    """Boolean mask of the Pareto-optimal rows: no other row is at least as good on both and better on one."""
    _check(df, x, y)
    sx = df[x].to_numpy(dtype=float) * (-1 if maximize_x else 1)  # smaller is better after the sign flip
    sy = df[y].to_numpy(dtype=float) * (1 if maximize_y else -1)  # larger is better after the sign flip
    order = np.lexsort((-sy, sx))
    mask = np.zeros(len(df), dtype=bool)
    best, best_x = -np.inf, np.nan
    for i in order:
        if sy[i] > best or (sy[i] == best and sx[i] == best_x):  # exact duplicates of a frontier point stay on it
            mask[i], best, best_x = True, sy[i], sx[i]
    return pd.Series(mask, index=df.index, name="pareto")


def pareto(df: pd.DataFrame, x: str, y: str, color: str | None = None, label: str | None = None,
           maximize_x: bool = False, maximize_y: bool = True, title: str | None = None,
           x_title: str | None = None, y_title: str | None = None) -> alt.LayerChart:
    """Trade-off scatter (e.g. parameters vs accuracy) with the Pareto frontier drawn as a step line.

    By default smaller x (cost) and larger y (quality) are better. ``label`` names a column shown as
    text next to frontier points.
    """
    _check(df, x, y, color, label)
    data = df.assign(pareto=pareto_front(df, x, y, maximize_x, maximize_y))
    enc = {"x": alt.X(f"{x}:Q", title=x_title or x, scale=alt.Scale(zero=False)),
           "y": alt.Y(f"{y}:Q", title=y_title or y, scale=alt.Scale(zero=False))}
    front = data[data["pareto"]].sort_values(x, ascending=not maximize_x)
    extra = [c for c in (color, label) if c]
    layers = [
        alt.Chart(front).mark_line(color="#555555", strokeDash=[4, 3], interpolate="step-after",
                                   strokeWidth=1.5).encode(**enc),
        alt.Chart(data).mark_point(size=60).encode(
            **enc, **_colour(color), opacity=alt.condition("datum.pareto", alt.value(1.0), alt.value(0.45)),
            tooltip=[*extra, alt.Tooltip(x, format=".4g"), alt.Tooltip(y, format=".4g"), "pareto"]),
    ]
    if label:
        layers.append(alt.Chart(front).mark_text(align="left", dx=6, dy=-6, fontSize=11).encode(**enc, text=label))
    return _titled(alt.layer(*layers), title)


def tradeoff(points: pd.DataFrame, anchors: pd.DataFrame, goal_kept: float | None = None,
             title: str = "Accuracy kept against measured speed-up") -> alt.LayerChart:
    """The book's summary figure: accuracy kept (% of the full model) against measured speed-up (log scale).

    ``points``: ``what, kind, task, speedup, speedup_low, speedup_high, kept, kept_low, kept_high`` (intervals
    may be missing); colour is the model or policy, shape the task. ``anchors``: ``anchor, speedup``, drawn
    as dashed vertical rules with their labels stacked at the top left (the literature's speed-ups; their
    accuracy kept is quoted in the findings table). ``goal_kept`` draws a horizontal rule.
    """
    _check(points, "what", "kind", "task", "speedup", "kept")
    x = alt.X("speedup:Q", scale=alt.Scale(type="log"), title="measured speed-up over the full model (×, log scale)")
    y = alt.Y("kept:Q", scale=alt.Scale(zero=False), title="accuracy kept (% of the full model)")
    colour = alt.Color("what:N", title="model or policy")
    base = alt.Chart(points)
    layers = [base.mark_point(size=90, filled=True, opacity=0.9).encode(
        x=x, y=y, color=colour, shape=alt.Shape("task:N", title="task"),
        tooltip=["what", "kind", "task", alt.Tooltip("speedup:Q", format=".2f"), alt.Tooltip("kept:Q", format=".1f")])]
    yi = points.dropna(subset=["kept_low", "kept_high"])
    if len(yi):
        layers.append(alt.Chart(yi).mark_rule(opacity=0.7).encode(x="speedup:Q", y="kept_low:Q", y2="kept_high:Q",
                                                                   color=colour))
    xi = points.dropna(subset=["speedup_low", "speedup_high"])
    if len(xi):
        layers.append(alt.Chart(xi).mark_rule(opacity=0.7).encode(x="speedup_low:Q", x2="speedup_high:Q", y="kept:Q",
                                                                   color=colour))
    if len(anchors):
        a = anchors.reset_index(drop=True).assign(label_y=lambda d: 12 + 15 * d.index.to_numpy())
        layers.append(alt.Chart(a).mark_rule(strokeDash=[4, 4], color="#555555").encode(x="speedup:Q"))
        layers.append(alt.Chart(a).mark_text(align="left", dx=4, fontSize=10, color="#444444").encode(
            x="speedup:Q", y=alt.Y("label_y:Q", scale=None), text="anchor:N"))
    if goal_kept is not None:
        layers.append(alt.Chart(pd.DataFrame({"kept": [goal_kept]})).mark_rule(color="#999999").encode(y="kept:Q"))
    return alt.layer(*layers).properties(title=title, width=WIDTH + 80, height=HEIGHT + 60)
