"""analysis_kit.plots: every chart builds, validates against the Vega-Lite schema and renders to SVG offline."""

from __future__ import annotations

import altair as alt
import nbformat
import numpy as np
import pandas as pd
import pytest
import vl_convert as vlc
from nbclient import NotebookClient

from analysis_kit import plots as P
from analysis_kit import stats
from analysis_kit.errors import LayerwiseError


@pytest.fixture(scope="module", autouse=True)
def house_style():
    before_theme, before_renderer = alt.theme.active, alt.renderers.active
    P.theme()
    yield
    alt.theme.enable(before_theme)
    alt.renderers.enable(before_renderer)


@pytest.fixture
def seeds() -> pd.DataFrame:
    rng = np.random.default_rng(0)
    rows = [{"setting": s, "model": m, "layers": k, "seed": seed, "accuracy": 0.7 + 0.03 * k + rng.normal(0, 0.01)}
            for k, s in enumerate(["full", "drop 2", "drop 4"]) for m in ("minilm", "scratch") for seed in range(3)]
    return pd.DataFrame(rows)


def _render(chart: alt.TopLevelMixin) -> tuple[dict, str]:
    spec = chart.to_dict(validate=True)  # raises on an invalid Vega-Lite spec
    svg = vlc.vegalite_to_svg(spec)
    assert svg.lstrip().startswith("<svg") and "</svg>" in svg
    return spec, svg


def _layer_data(spec: dict, mark: str) -> list[dict]:
    """Inline rows of the first layer with ``mark`` (altair puts data in top-level datasets)."""
    for layer in spec["layer"]:
        m = layer["mark"]["type"] if isinstance(layer["mark"], dict) else layer["mark"]
        if m == mark:
            return spec["datasets"][layer["data"]["name"]]
    raise AssertionError(f"no {mark} layer")


def test_theme_is_active_and_svg_mimebundle(seeds):
    assert alt.theme.active == P.THEME and alt.renderers.active == "svg"
    bundle = P.points_with_ci(seeds, "setting", "accuracy")._repr_mimebundle_()
    bundle = bundle[0] if isinstance(bundle, tuple) else bundle
    assert set(bundle) == {"image/svg+xml"} and "<svg" in bundle["image/svg+xml"]
    spec = P.points_with_ci(seeds, "setting", "accuracy").to_dict()
    assert spec["config"]["range"]["category"] == list(P.PALETTE)
    assert spec["config"]["axis"]["labelFontSize"] >= 11


def test_points_with_ci_computes_summary_intervals(seeds):
    spec, svg = _render(P.points_with_ci(seeds, "setting", "accuracy", color="model", title="Accuracy"))
    assert "Accuracy" in svg
    bars = pd.DataFrame(_layer_data(spec, "errorbar"))
    assert len(bars) == 6 and len(_layer_data(spec, "point")) == 18  # 6 groups, every seed drawn
    g = seeds[(seeds.setting == "drop 2") & (seeds.model == "scratch")]["accuracy"]
    rec = stats.summarize(g.to_numpy())
    row = bars[(bars.setting == "drop 2") & (bars.model == "scratch")].iloc[0]
    assert (row.accuracy, row.ci_low, row.ci_high) == pytest.approx((rec["mean"], rec["ci_low"], rec["ci_high"]))


def test_points_with_ci_uses_given_columns(seeds):
    df = seeds.assign(lo=seeds.accuracy - 0.5, hi=seeds.accuracy + 0.5)
    spec, _ = _render(P.points_with_ci(df, "setting", "accuracy", ci=("lo", "hi")))
    bars = pd.DataFrame(_layer_data(spec, "errorbar"))
    first = df[df.setting == "full"].iloc[0]
    assert bars.iloc[0].lo == pytest.approx(first.lo) and bars.iloc[0].hi == pytest.approx(first.hi)


def test_line_ci_from_seeds_and_from_summary(seeds):
    spec, _ = _render(P.line_ci(seeds, "layers", "accuracy", color="model"))
    assert len(_layer_data(spec, "area")) == 6
    summ = pd.DataFrame({"k": [0, 2, 4], "acc": [0.8, 0.78, 0.7], "ci_low": [0.79, 0.76, 0.66],
                         "ci_high": [0.81, 0.8, 0.74]})
    _render(P.line_ci(summ, "k", "acc", lo="ci_low", hi="ci_high", title="Retention"))
    with pytest.raises(LayerwiseError, match="both lo and hi"):
        P.line_ci(summ, "k", "acc", lo="ci_low")


def test_heatmap_text_and_domain():
    df = pd.DataFrame([{"start": i, "end": j, "acc": 0.5 + 0.04 * (i + j)} for i in range(6) for j in range(6)])
    spec, svg = _render(P.heatmap(df, "start", "end", "acc", domain=(0.5, 1.0)))
    assert spec["layer"][0]["encoding"]["color"]["scale"]["domain"] == [0.5, 1.0]
    assert "0.90" in svg  # cell labels rendered with fmt=".2f"
    diverging = P.heatmap(df.assign(acc=df.acc - 0.75), "start", "end", "acc", domain=(-0.3, 0.3), text=False)
    spec, _ = _render(diverging)
    assert len(spec["layer"]) == 1 and spec["layer"][0]["encoding"]["color"]["scale"]["scheme"] == "blueorange"


def test_bar_ci():
    df = pd.DataFrame({"method": ["a", "b", "a", "b"], "model": ["x", "x", "y", "y"], "acc": [0.8, 0.9, 0.7, 0.85],
                       "ci_low": [0.75, 0.85, 0.6, 0.8], "ci_high": [0.85, 0.95, 0.8, 0.9]})
    _render(P.bar_ci(df, "method", "acc", color="model"))


def test_pareto_front_and_chart():
    df = pd.DataFrame({"params": [1, 2, 3, 4, 5, 4], "acc": [0.5, 0.7, 0.6, 0.9, 0.85, 0.9],
                       "name": ["a", "b", "c", "d", "e", "d2"]})
    assert P.pareto_front(df, "params", "acc").tolist() == [True, True, False, True, False, True]
    # higher x and lower y better: a has the lowest y, e the highest x, c beats b on both; d, d2 lose to e
    assert P.pareto_front(df, "params", "acc", maximize_x=True, maximize_y=False).tolist() == [
        True, False, True, False, True, False]
    spec, svg = _render(P.pareto(df, "params", "acc", label="name"))
    assert [r["name"] for r in _layer_data(spec, "line")] == ["a", "b", "d", "d2"]
    assert ">d<" in svg or "d</text>" in svg


@pytest.mark.parametrize("call, match", [
    (lambda df: P.points_with_ci(df, "setting", "nope"), "nope"),
    (lambda df: P.heatmap(df.iloc[:0], "setting", "model", "accuracy"), "empty"),
    (lambda df: P.points_with_ci(pd.concat([df] * 300), "setting", "accuracy"), "aggregate first"),
])
def test_bad_input(seeds, call, match):
    with pytest.raises(LayerwiseError, match=match):
        call(seeds)


def test_executed_notebook_holds_svg_output(tmp_path):
    """What the book relies on: a notebook executed offline stores the chart as image/svg+xml."""
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell(
        "import pandas as pd\nfrom analysis_kit import plots\nplots.theme()\n"
        "df = pd.DataFrame({'setting': ['a'] * 3 + ['b'] * 3, 'acc': [0.80, 0.82, 0.81, 0.70, 0.72, 0.75]})\n"
        "plots.points_with_ci(df, 'setting', 'acc')")]
    NotebookClient(nb, timeout=120, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()
    outputs = nb.cells[0].outputs
    data = [o["data"] for o in outputs if o["output_type"] == "execute_result"]
    assert data and "image/svg+xml" in data[0] and "<svg" in data[0]["image/svg+xml"]
    assert "application/javascript" not in data[0] and "text/html" not in data[0]
