"""The book checks (analysis_kit.bookcheck), the number format and folded footer (analysis_kit.report), and the
stale-chapter banner (analysis_kit.book_ext), on tiny hand-written Markdown, HTML and doctrees."""

from __future__ import annotations

import json
from types import SimpleNamespace

import nbformat
import pandas as pd
import pytest
from docutils import nodes
from docutils.utils import new_document

from analysis_kit import book_ext
from analysis_kit import bookcheck as bc
from analysis_kit.report import Report, fmt_ci

# ---------------------------------------------------------------------------------------------------------
# 1. the hand-typed-number lint


def numbers(markdown: str) -> list[str]:
    return [f.number for f in bc.lint_text(markdown, "here")]


def test_a_typed_result_number_is_flagged_with_where_and_context():
    found = bc.lint_text("The accuracy was 88.9 % on the test split.", "page cell 4")
    assert [f.number for f in found] == ["88.9"]
    assert found[0].where == "page cell 4" and "accuracy was" in found[0].context
    message = str(found[0])
    assert message.startswith("page cell 4: typed number '88.9'") and "{glue:text}" in message


@pytest.mark.parametrize("text", [
    "The accuracy was {glue:text}`acc_minilm` on the test split.",
    "Run `analysis-kit run baselines --profile 3` to refresh it.",
    "Published in 2020 and revised in 1999.",
    "DistilBERT keeps 97 % of GLUE with 40 % fewer parameters {cite}`sanh2019`.",
    "BERT-of-Theseus keeps 98.6 % {cite:p}`xu2020`.",
    "We fix seed 0 and cut block 3, then blocks 0–4 and layer 11.",
    "1. First we train.\n2. Then we cut.\n10) And we heal.",
    "## 2. Method",
    "## 2) Method",
    "Each mean comes with its 95 % interval.",
    "A 95% confidence level throughout.",
    "Prose.\n\n```\nx = 42\n```\n\nMore prose.",
    "Prose.\n\n```python\nfor i in range(12):\n    pass\n```\n",
    "```{glue:md} key_findings\n:format: myst\n```",
    "```{code-cell} ipython3\nn = 7\n```",
    ":::{admonition} Details\n:class: dropdown 7\n:name: box-3\nNo numbers in here.\n:::",
    "See [the table](results/run_2/summary.json) for details.",
])
def test_allowed_numbers_are_not_flagged(text):
    assert numbers(text) == []


def test_a_cite_only_exempts_its_own_sentence():
    text = "DistilBERT keeps 97 % of GLUE {cite}`sanh2019`. Ours keeps 88 % of it."
    assert numbers(text) == ["88"]


def test_numbers_after_a_code_fence_are_linted_again():
    assert numbers("```python\nx = 42\n```\n\nWe saw 17 errors.") == ["17"]
    assert numbers("```{glue:md} key_findings\n```\n\nWe saw 17 errors.") == ["17"]


@pytest.mark.parametrize("text", [
    "```{tip}\nUse 12 workers for the run.\n```",
    ":::{admonition} Note\n:class: tip\nWe saw 42 errors.\n:::",
    "::::{admonition} Outer\n:::{note}\nWe saw 42 errors.\n:::\n::::",
])
def test_prose_inside_directives_is_linted(text):
    assert len(numbers(text)) == 1


def test_text_after_a_closed_prose_directive_is_still_linted():
    assert numbers(":::{admonition} Note\nClean.\n:::\n\nAfter it 5 things.") == ["5"]


def test_a_numbered_subsection_heading_is_not_flagged():
    assert numbers("### 2.1 Setup") == []


# ---------------------------------------------------------------------------------------------------------
# 2. lint_markdown reads only Markdown cells


def test_lint_markdown_lints_only_markdown_cells_and_names_the_cell(tmp_path):
    nb = nbformat.v4.new_notebook()
    nb.cells = [
        nbformat.v4.new_markdown_cell("# Title\n\nAll numbers are {glue:text}`glued`."),
        nbformat.v4.new_code_cell("accuracy = 0.889  # 88.9 % in a code cell is fine"),
        nbformat.v4.new_raw_cell("raw 55 is fine"),
        nbformat.v4.new_markdown_cell("The model keeps 77.5 % of its accuracy."),
    ]
    path = tmp_path / "chapter.ipynb"
    nbformat.write(nb, path)
    found = bc.lint_markdown(path)
    assert [(f.where, f.number) for f in found] == [("chapter.ipynb cell 3", "77.5")]


def test_lint_markdown_accepts_a_source_given_as_a_list(tmp_path):
    path = tmp_path / "listy.ipynb"
    path.write_text(json.dumps({"cells": [{"cell_type": "markdown", "metadata": {},
                                           "source": ["We saw ", "13 errors."]}],
                                "metadata": {}, "nbformat": 4, "nbformat_minor": 5}))
    assert [(f.where, f.number) for f in bc.lint_markdown(path)] == [("listy.ipynb cell 0", "13")]


# ---------------------------------------------------------------------------------------------------------
# 3. check_page on hand-written HTML

FINDINGS = ('<div class="admonition key-findings"><p class="admonition-title">Key findings</p>'
            '<ul>{}</ul></div>')
OUTPUT = '<div class="cell docutils container"><div class="cell_output docutils container">{}</div></div>'
INPUT = '<div class="cell_input docutils container"><div class="highlight"><pre>x = 1</pre></div></div>'
PROVENANCE = ('<div class="cell_output docutils container"><div class="admonition {cls}">'
              '<p class="admonition-title">Parameters and provenance</p><table><tr><td>seed</td></tr></table>'
              '</div></div>')


def bullets(n: int) -> str:
    return "".join(f"<li>finding {i}</li>" for i in range(n))


def page(*blocks: str, before: str = "") -> str:
    return ("<html><head><script>var a = '$x$';</script></head><body><nav>menu</nav><main><article>"
            f"{before}<h1>A chapter</h1>{''.join(blocks)}</article></main></body></html>")


def good_blocks(n_bullets: int = 3, prov: str = "dropdown provenance") -> list[str]:
    return [FINDINGS.format(bullets(n_bullets)), "<p>Why it matters.</p>", INPUT, OUTPUT.format("<p>a table</p>"),
            OUTPUT.format("<p>a chart</p>"), PROVENANCE.format(cls=prov)]


def check(tmp_path, html: str, name: str = "chapter.html") -> bc.PageReport:
    path = tmp_path / name
    path.write_text(html, encoding="utf-8")
    return bc.check_page(path)


def test_a_good_page_passes(tmp_path):
    rep = check(tmp_path, page(*good_blocks()))
    assert rep.page == "chapter.html"
    assert rep.problems == [] and rep.shape == [] and rep.stale is False


def test_nested_bullets_do_not_count(tmp_path):
    nested = '<li>one<ul><li>a</li><li>b</li><li>c</li><li>d</li><li>e</li></ul></li><li>two</li><li>three</li>'
    blocks = good_blocks()
    blocks[0] = FINDINGS.format(nested)
    assert check(tmp_path, page(*blocks)).shape == []


@pytest.mark.parametrize("early, kind", [(INPUT, "code"), (OUTPUT.format("<p>early</p>"), "an output")])
def test_code_or_output_before_the_findings_box_is_a_shape_problem(tmp_path, early, kind):
    rep = check(tmp_path, page(early, *good_blocks()))
    assert len(rep.shape) == 1 and rep.shape[0].startswith(f"{kind} comes before the Key findings box")
    assert rep.problems == []


def test_no_findings_box_is_a_shape_problem(tmp_path):
    rep = check(tmp_path, page(*good_blocks()[1:]))
    assert len(rep.shape) == 1 and "no Key findings box" in rep.shape[0]


@pytest.mark.parametrize("n, ok", [(2, False), (3, True), (6, True), (7, False)])
def test_the_findings_box_holds_three_to_six_bullets(tmp_path, n, ok):
    rep = check(tmp_path, page(*good_blocks(n)))
    if ok:
        assert rep.shape == []
    else:
        assert rep.shape == [f"the Key findings box has {n} bullets; give 3–6"]


def test_provenance_must_be_the_last_block(tmp_path):
    blocks = good_blocks()
    rep = check(tmp_path, page(*blocks, OUTPUT.format("<p>late</p>")))
    assert len(rep.shape) == 1 and "1 cell(s) come after the provenance box" in rep.shape[0]
    rep = check(tmp_path, page(*blocks[:-1], blocks[-1], INPUT, OUTPUT.format("<p>late</p>")))
    assert len(rep.shape) == 1 and "2 cell(s) come after the provenance box" in rep.shape[0]


def test_provenance_must_be_folded(tmp_path):
    rep = check(tmp_path, page(*good_blocks(prov="provenance")))
    assert rep.shape == ["the provenance box is not folded (class `dropdown`)"]


def test_missing_provenance_is_a_shape_problem(tmp_path):
    rep = check(tmp_path, page(*good_blocks()[:-1]))
    assert len(rep.shape) == 1 and "no folded provenance box" in rep.shape[0]


def test_raw_math_in_prose_is_a_problem(tmp_path):
    rep = check(tmp_path, page(*good_blocks(), before="<p>We drop $L/k$ blocks.</p>"))
    assert len(rep.problems) == 1 and "raw math '$L/k$'" in rep.problems[0]


def test_parsed_math_code_and_prices_are_not_raw_math(tmp_path):
    allowed = ('<p>Rendered <span class="math notranslate nohighlight">$x$</span> math.</p>'
               '<pre>echo $x$ and $HOME$</pre><p>Inline <code>$a$</code>.</p>'
               '<p>It costs $5 and $10 per hour.</p>')
    rep = check(tmp_path, page(*good_blocks(), before=allowed))
    assert rep.problems == []


def test_a_printed_library_warning_is_a_problem(tmp_path):
    warned = OUTPUT.format("<pre>/x.py:3: FutureWarning: the default will change</pre>"
                           "<div class='output stderr'>FutureWarning: again</div>")
    blocks = good_blocks()
    rep = check(tmp_path, page(*blocks[:3], warned, *blocks[3:]))
    assert len(rep.problems) == 1 and "a library warning (FutureWarning)" in rep.problems[0]


def test_a_warning_named_in_prose_is_not_a_problem(tmp_path):
    rep = check(tmp_path, page(*good_blocks(), before="<p>We silence the FutureWarning: it is harmless.</p>"))
    assert rep.problems == []


def test_a_stale_banner_marks_the_page_stale(tmp_path):
    banner = f'<div class="admonition warning {book_ext.STALE_CLASS}"><p>Stale page.</p></div>'
    rep = check(tmp_path, page(banner, *good_blocks()))
    assert rep.stale is True and rep.shape == [] and rep.problems == []


# ---------------------------------------------------------------------------------------------------------
# 4. check_book on a small tree

FINDINGS_PAGE_EXTRA = [OUTPUT.format("<table><tr><td>question</td></tr></table>"),
                       OUTPUT.format('<img src="chart.svg" alt="tradeoff"/>')]


def book(tmp_path, pages: dict[str, str], notebooks: dict[str, list] | None = None):
    html = tmp_path / "html"
    exp = html / "book" / "experiments"
    exp.mkdir(parents=True)
    for name, text in pages.items():
        (exp / name).write_text(text, encoding="utf-8")
    nbs = tmp_path / "notebooks"
    nbs.mkdir()
    for name, cells in (notebooks or {"a": [nbformat.v4.new_markdown_cell("Clean {glue:text}`x` prose.")]}).items():
        nb = nbformat.v4.new_notebook()
        nb.cells = cells
        nbformat.write(nb, nbs / f"{name}.ipynb")
    return html, nbs


def findings_page(*extra: str) -> str:
    blocks = good_blocks()
    return page(*blocks[:-1], *extra, blocks[-1])


def test_a_good_book_passes(tmp_path):
    html, nbs = book(tmp_path, {"a.html": page(*good_blocks()), "findings.html": findings_page(*FINDINGS_PAGE_EXTRA)})
    assert bc.check_book(html, nbs) == ([], [])


def test_a_stale_pages_shape_is_a_notice_but_its_raw_math_a_problem(tmp_path):
    banner = f'<div class="admonition warning {book_ext.STALE_CLASS}"><p>Stale page.</p></div>'
    stale = page(banner, OUTPUT.format("<p>old output first</p>"), "<p>No findings box; $L/k$ raw.</p>")
    html, nbs = book(tmp_path, {"a.html": stale, "findings.html": findings_page(*FINDINGS_PAGE_EXTRA)})
    problems, notices = bc.check_book(html, nbs)
    assert len(problems) == 1 and problems[0].startswith("a.html: raw math")
    assert notices and all(n.startswith("a.html (stale run, shape not judged): ") for n in notices)
    assert any("no Key findings box" in n for n in notices)


def test_a_fresh_pages_shape_is_a_problem(tmp_path):
    html, nbs = book(tmp_path, {"a.html": page(*good_blocks(2)), "findings.html": findings_page(*FINDINGS_PAGE_EXTRA)})
    problems, notices = bc.check_book(html, nbs)
    assert problems == ["a.html: the Key findings box has 2 bullets; give 3–6"] and notices == []


PROVENANCE_NO_TABLE = ('<div class="cell_output docutils container"><div class="admonition dropdown provenance">'
                       '<p class="admonition-title">Parameters and provenance</p></div></div>')


@pytest.mark.parametrize("extra, missing", [
    ([FINDINGS_PAGE_EXTRA[1]], "no findings table"),
    ([FINDINGS_PAGE_EXTRA[0]], "no summary figure"),
    (["<table><tr><td>not an output</td></tr></table>", FINDINGS_PAGE_EXTRA[1]], "no findings table"),
])
def test_the_findings_page_needs_its_table_and_figure(tmp_path, extra, missing):
    # a provenance box without tables, so that only the findings table can satisfy the check
    blocks = good_blocks()
    findings = page(*blocks[:-1], *extra, PROVENANCE_NO_TABLE)
    html, nbs = book(tmp_path, {"a.html": page(*good_blocks()), "findings.html": findings})
    problems, _ = bc.check_book(html, nbs)
    assert problems == [f"findings.html: {missing} in the page's outputs"]


def test_the_provenance_tables_do_not_count_as_the_findings_table(tmp_path):
    html, nbs = book(tmp_path, {"a.html": page(*good_blocks()), "findings.html": findings_page(FINDINGS_PAGE_EXTRA[1])})
    problems, _ = bc.check_book(html, nbs)
    assert problems == ["findings.html: no findings table in the page's outputs"]


def test_the_findings_page_svg_counts_as_its_figure(tmp_path):
    html, nbs = book(tmp_path, {"a.html": page(*good_blocks()),
                                "findings.html": findings_page(FINDINGS_PAGE_EXTRA[0], OUTPUT.format("<svg></svg>"))})
    assert bc.check_book(html, nbs) == ([], [])


def test_a_missing_findings_page_is_a_problem(tmp_path):
    html, nbs = book(tmp_path, {"a.html": page(*good_blocks())})
    problems, _ = bc.check_book(html, nbs)
    assert len(problems) == 1 and "the findings page was not built" in problems[0]


def test_no_pages_at_all_is_a_problem(tmp_path):
    (tmp_path / "html").mkdir()
    problems, notices = bc.check_book(tmp_path / "html", tmp_path)
    assert len(problems) == 1 and "build the book first" in problems[0] and notices == []


def test_check_book_lints_the_notebooks(tmp_path):
    html, nbs = book(tmp_path, {"a.html": page(*good_blocks()), "findings.html": findings_page(*FINDINGS_PAGE_EXTRA)},
                     {"a": [nbformat.v4.new_markdown_cell("Clean."), nbformat.v4.new_markdown_cell("It took 42 s.")]})
    problems, _ = bc.check_book(html, nbs)
    assert len(problems) == 1 and problems[0].startswith("a.ipynb cell 1: typed number '42'")


# ---------------------------------------------------------------------------------------------------------
# 5. fmt_ci


def test_fmt_ci_percent():
    assert fmt_ci({"mean": .889, "ci_low": .863, "ci_high": .912}) == "88.9 % [86.3, 91.2]"


def test_fmt_ci_signed_differences_use_a_real_minus():
    assert fmt_ci({"mean": 9.3, "ci_low": 7.4, "ci_high": 11.2}, 1, "", sign=True) == "+9.3 [+7.4, +11.2]"
    assert fmt_ci({"mean": -1.25, "ci_low": -3.0, "ci_high": 0.5}, 1, "", sign=True) == "\u22121.2 [\u22123.0, +0.5]"
    assert "-" not in fmt_ci({"mean": -0.0123, "ci_low": -0.02, "ci_high": -0.01}, sign=True)


def test_fmt_ci_ratio_and_digits():
    assert fmt_ci({"mean": 1.843, "ci_low": 1.71, "ci_high": 1.968}, 1, "×", 2) == "1.84× [1.71, 1.97]"


@pytest.mark.parametrize("rec", [{"mean": .5}, {"mean": .5, "ci_low": None, "ci_high": .6},
                                 {"mean": .5, "ci_low": .4, "ci_high": None}])
def test_fmt_ci_without_an_interval_prints_the_mean_alone(rec):
    assert fmt_ci(rec) == "50.0 %"


# ---------------------------------------------------------------------------------------------------------
# 6. Report.footer


@pytest.fixture()
def demo_report(monkeypatch):
    for var in ("LAYERWISE_RESULTS", "LAYERWISE_RUN_DIR", "LAYERWISE_PUBLISH_AS"):
        monkeypatch.delenv(var, raising=False)
    rep = Report("demo", "smoke", {"a": 1, "b": [1, 2], "_hidden": 3})
    rep.table("acc", pd.DataFrame({"x": [1]}))
    return rep


def test_footer_links_the_downloads_and_folds_the_provenance(demo_report):
    text = demo_report.footer().data
    assert "{download}`summary.json <../../results/demo/smoke/summary.json>`" in text
    assert "{download}`acc.csv <../../results/demo/smoke/acc.csv>`" in text
    assert "{download}`demo.ipynb <demo.ipynb>`" in text
    assert "| `a` | `1` |" in text and "| `b` | `[1, 2]` |" in text and "_hidden" not in text
    assert ":::{admonition}" in text and "\n:class: dropdown provenance\n" in text
    assert text.rstrip().endswith(":::")
    assert "| profile | `smoke` |" in text and "git commit" in text


def test_footer_names_another_notebook(demo_report):
    assert "{download}`other.ipynb <other.ipynb>`" in demo_report.footer("other.ipynb").data


def test_footer_outside_the_repository_names_the_folder_without_links(demo_report, tmp_path, monkeypatch):
    monkeypatch.setenv("LAYERWISE_RESULTS", str(tmp_path / "elsewhere"))
    text = demo_report.footer().data
    assert "{download}" not in text
    assert f"`{(tmp_path / 'elsewhere' / 'demo' / 'smoke').resolve()}`" in text
    assert ":class: dropdown provenance" in text and "| `a` | `1` |" in text


def test_footer_escapes_table_breaking_values(monkeypatch):
    for var in ("LAYERWISE_RESULTS", "LAYERWISE_RUN_DIR", "LAYERWISE_PUBLISH_AS"):
        monkeypatch.delenv(var, raising=False)
    text = Report("demo", "smoke", {"s": "a|b`c\nd"}).footer().data
    assert "| `s` | `a\\|b'c d` |" in text


# ---------------------------------------------------------------------------------------------------------
# 7. the stale-chapter banner


def doctree() -> nodes.document:
    doc = new_document("chapter")
    section = nodes.section()
    section += nodes.title(text="A chapter")
    section += nodes.paragraph(text="First paragraph.")
    doc += section
    return doc


def fake_app(docname: str, noted: list | None = None) -> SimpleNamespace:
    note = noted.append if noted is not None else (lambda p: None)
    return SimpleNamespace(env=SimpleNamespace(docname=docname, note_dependency=note))


@pytest.fixture()
def state(tmp_path, monkeypatch):
    path = tmp_path / "state.json"
    path.write_text(json.dumps({"stale": {"book/experiments/qlora": "Stale page: re-run qlora."}}))
    monkeypatch.setenv("LAYERWISE_BOOK_STATE", str(path))
    return path


def test_the_banner_goes_under_the_title_of_a_stale_chapter(state):
    noted = []
    doc = doctree()
    book_ext._banner(fake_app("book/experiments/qlora", noted), doc)
    section = doc[0]
    assert isinstance(section[0], nodes.title) and isinstance(section[1], nodes.warning)
    assert book_ext.STALE_CLASS in section[1]["classes"]
    assert section[1].astext() == "Stale page: re-run qlora."
    assert isinstance(section[2], nodes.paragraph)
    assert noted == [str(state)]
    assert len(list(doc.findall(nodes.warning))) == 1


def test_no_banner_for_a_listed_doc_without_a_section_goes_first(state):
    doc = new_document("chapter")
    doc += nodes.paragraph(text="No section here.")
    book_ext._banner(fake_app("book/experiments/qlora"), doc)
    assert isinstance(doc[0], nodes.warning) and book_ext.STALE_CLASS in doc[0]["classes"]


def test_no_banner_for_a_doc_that_is_not_listed(state):
    noted = []
    doc = doctree()
    book_ext._banner(fake_app("book/experiments/baselines", noted), doc)
    assert not list(doc.findall(nodes.warning))
    assert noted == [str(state)]  # it still depends on the state: it may turn stale later
    book_ext._banner(fake_app("index", noted), doc)
    assert not list(doc.findall(nodes.warning)) and noted == [str(state)]


def test_no_banner_without_the_variable(monkeypatch):
    monkeypatch.delenv("LAYERWISE_BOOK_STATE", raising=False)
    noted = []
    doc = doctree()
    book_ext._banner(fake_app("book/experiments/qlora", noted), doc)
    assert not list(doc.findall(nodes.warning)) and noted == []


def test_no_banner_when_the_state_file_is_missing(tmp_path, monkeypatch):
    monkeypatch.setenv("LAYERWISE_BOOK_STATE", str(tmp_path / "absent.json"))
    doc = doctree()
    book_ext._banner(fake_app("book/experiments/qlora"), doc)
    assert not list(doc.findall(nodes.warning))


def test_setup_registers_the_banner():
    calls = []
    app = SimpleNamespace(connect=lambda event, fn: calls.append((event, fn)))
    meta = book_ext.setup(app)
    assert calls == [("doctree-read", book_ext._banner)] and meta["parallel_read_safe"] is True
