"""Checks that the book reads answer-first and that its prose cannot drift from its results.

Four checks, run by ``make test`` (``scripts/check_book.py``) on the built HTML and the notebook sources:

1. **Shape** (:func:`check_page`): on every chapter page a *Key findings* box (an admonition with class
   ``key-findings`` holding 3–6 bullets) comes before any code and before any other output, and the
   parameters and provenance come last, folded (class ``provenance`` with ``dropdown``). A chapter whose
   shown run is stale carries the runner's warning (:mod:`analysis_kit.book_ext`); its shape is reported,
   not failed, because its page is an old run that only re-executing can reshape.
2. **Math** (:func:`check_page`): no ``$…$`` left as raw text: math must have been parsed (``dollarmath``)
   so MathJax can render it; the offline browser check then sees it rendered.
3. **Warnings** (:func:`check_page`): no library warning (``FutureWarning: …``) printed into the HTML.
4. **Hand-typed numbers** (:func:`lint_markdown`): a number in a notebook's Markdown cell must come from a
   result or a parameter through a glue role (``{glue:text}`name```); typed digits are allowed only for
   years, literature values in a sentence that cites its source (``{cite}```), numbered sections and list
   items, inline code and commands, names such as "seed 0" or "block 3", and the protocol's ``95 %``
   interval level and ``p < 0.05``. The findings page is a
   notebook too, so its numbers pass the same lint; :func:`check_findings_page` checks its table and figure.

Each check returns a list of problems (strings naming the page or cell and the fix); empty means pass.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

from .book_ext import STALE_CLASS

#: The findings box's CSS class (``:class: key-findings`` on an admonition).
FINDINGS_CLASS = "key-findings"
#: The folded provenance box's CSS class (:meth:`analysis_kit.report.Report.footer`).
PROVENANCE_CLASS = "provenance"
MIN_BULLETS, MAX_BULLETS = 3, 6

_FENCE = re.compile(r"^(`{3,}|:{3,})\s*(\{[\w:-]+\})?\s*([^\n]*)$")
_CODE_FENCES = {"", "{code-cell}", "{code}", "{glue:md}", "{glue:figure}", "{glue}", "{math}"}
_ROLE = re.compile(r"\{[\w:-]+\}`[^`]*`")
_INLINE_CODE = re.compile(r"`[^`]*`")
_LINK_TARGET = re.compile(r"\]\([^)]*\)")
_HTML = re.compile(r"<[^>]+>")
_NUMBER = re.compile(r"(?<![\w.\-/^_])[+\-−±]?\d+(?:[.,]\d+)*(?![\w\-/])")
_YEAR = re.compile(r"^(1[89]|20)\d\d$")
_LEVEL = re.compile(r"95\s?%\s*(?:[\w-]+\s+){0,2}(?:confidence|CI|[\w-]*intervals?|hierarchical|bootstrap|paired)"
                    r"|\bp\s*[<≤]\s*0\.05\b", re.I)
#: a name, not a quantity: "seed 0", "batch 1", "block 3", "blocks 0–4", "epoch 2", "exit 5"
_LABEL = re.compile(r"\b(?:seeds?|batch|blocks?|layers?|depths?|epochs?|exits?|cell|step)\s+\d+(?:\s*[–-]\s*\d+)?", re.I)
_SENTENCE = re.compile(r"(?<=[.!?;])\s+(?=[A-Z*(\[])")
_LIST_OR_HEADING = re.compile(r"^\s*(?:#+\s*\d+(?:\.\d+)*[.)]?\s+|\d+(?:\.\d+)*[.)]\s+)")


@dataclass
class Finding:
    """One lint problem: where, which number, and the sentence around it."""

    where: str
    number: str
    context: str

    def __str__(self) -> str:
        return (f"{self.where}: typed number {self.number!r} in \u201c{self.context.strip()[:120]}\u201d; glue it "
                f"from the results or parameters ({{glue:text}}`name`), or cite its source in the sentence")


def _prose_lines(markdown: str) -> list[str]:
    """The lines of ``markdown`` that are prose: code fences, glue blocks and directive options removed.

    A directive fence that holds prose (an admonition, a tip) is opened and closed but its body is kept.
    """
    out: list[str] = []
    stack: list[tuple[str, bool]] = []  # open fences: (marker, holds code)
    for line in markdown.splitlines():
        s = line.strip()
        m = _FENCE.match(s)
        bare = bool(m) and not m.group(2) and not m.group(3).strip()
        if stack and stack[-1][1]:  # inside code: only its closing fence matters
            if bare and s[0] == stack[-1][0][0] and len(s) >= len(stack[-1][0]):
                stack.pop()
            continue
        if m:
            marker, directive = m.group(1), m.group(2)
            if bare and stack and marker[0] == stack[-1][0][0] and len(marker) >= len(stack[-1][0]):
                stack.pop()  # closes a prose directive
            elif directive:
                stack.append((marker, directive in _CODE_FENCES))
            else:  # ``` or ```python: a code block
                stack.append((marker, marker.startswith("`")))
            continue
        if re.match(r"^\s*:[\w-]+:", line):  # a directive option such as ":class: dropdown"
            continue
        out.append(line)
    return out


def lint_text(markdown: str, where: str) -> list[Finding]:
    """Typed numbers in one Markdown text (see the module docstring for what is allowed)."""
    problems = []
    text = "\n".join(_prose_lines(markdown))
    # a paragraph, and each list item in it, is a unit of its own: a citation in one bullet does not cover
    # the numbers of the next
    units = re.split(r"\n\s*\n|\n(?=\s*(?:[-*+]|\d+[.)])\s)", text)
    for paragraph in units:
        # list markers and section numbers go first, so "1. Method" is not split into a sentence "1."
        paragraph = "\n".join(_LIST_OR_HEADING.sub(" ", line, count=1) for line in paragraph.splitlines())
        for sentence in _SENTENCE.split(paragraph):
            if "{cite}" in sentence or "{cite:" in sentence:
                continue  # a literature value with its source in the same sentence
            clean = _ROLE.sub(" ", sentence)
            clean = _INLINE_CODE.sub(" ", clean)
            clean = _LINK_TARGET.sub("]", clean)
            clean = _HTML.sub(" ", clean)
            clean = _LEVEL.sub(" ", clean)
            clean = _LABEL.sub(" ", clean)
            for m in _NUMBER.finditer(clean):
                digits = m.group().lstrip("+-−±")
                if _YEAR.match(digits):
                    continue
                problems.append(Finding(where, m.group(), sentence))
    return problems


def lint_markdown(notebook: Path) -> list[Finding]:
    """Typed numbers in every Markdown cell of ``notebook`` (an ``.ipynb``)."""
    nb = json.loads(Path(notebook).read_text())
    problems = []
    for i, cell in enumerate(nb.get("cells", [])):
        if cell.get("cell_type") == "markdown":
            src = "".join(cell["source"]) if isinstance(cell["source"], list) else cell["source"]
            problems += lint_text(src, f"{Path(notebook).name} cell {i}")
    return problems


@dataclass
class PageReport:
    """What :func:`check_page` found on one page."""

    page: str
    stale: bool = False
    problems: list[str] = field(default_factory=list)
    shape: list[str] = field(default_factory=list)  # shape problems (failures unless the page is stale)


def _soup(path: Path):
    from bs4 import BeautifulSoup

    soup = BeautifulSoup(Path(path).read_text(encoding="utf-8"), "html.parser")
    return soup.select_one("article") or soup.select_one("main") or soup


def _has_class(el, name: str) -> bool:
    return name in (el.get("class") or [])


def _shape(article) -> list[str]:
    problems = []
    order = {id(el): i for i, el in enumerate(article.find_all(True))}
    box = article.select_one(f".{FINDINGS_CLASS}")
    if box is None:
        return [f"no Key findings box (an admonition with `:class: {FINDINGS_CLASS}`) on the page"]
    top = [li for li in box.select("li") if li.find_parent("li") is None]
    if not MIN_BULLETS <= len(top) <= MAX_BULLETS:
        problems.append(f"the Key findings box has {len(top)} bullets; give {MIN_BULLETS}–{MAX_BULLETS}")
    for el in article.select(".cell_output, .cell_input, div.highlight, pre"):
        if order[id(el)] < order[id(box)] and box not in el.parents:
            kind = "an output" if _has_class(el, "cell_output") else "code"
            problems.append(f"{kind} comes before the Key findings box: put the question and the findings first")
            break
    prov = article.select_one(f".{PROVENANCE_CLASS}")
    if prov is None:
        problems.append(f"no folded provenance box (class `{PROVENANCE_CLASS}`, from Report.footer()) at the end")
        return problems
    if not _has_class(prov, "dropdown"):
        problems.append("the provenance box is not folded (class `dropdown`)")
    own = prov.find_parent(class_="cell_output") or prov
    later = [el for el in article.select(".cell_output, .cell_input")
             if order[id(el)] > order[id(own)] and own not in el.parents]
    if later:
        problems.append(f"{len(later)} cell(s) come after the provenance box; it must be the page's last block")
    return problems


_RAW_MATH = re.compile(r"(?<![\\$])\$(?!\s)[^$\n]{1,200}?(?<!\s)\$(?!\d)")
_WARNING = re.compile(r"\b(?:[A-Z]\w*Warning|warnings\.warn)\b")


def check_page(path: Path) -> PageReport:
    """Shape, raw math and printed warnings on one built chapter page."""
    article = _soup(path)
    rep = PageReport(page=Path(path).name, stale=article.select_one(f".{STALE_CLASS}") is not None)
    rep.shape = _shape(article)
    for el in article.select("script, style, pre, code, .math, .MathJax, mjx-container"):
        el.decompose()
    text = article.get_text(" ")
    for m in _RAW_MATH.finditer(text):
        rep.problems.append(f"raw math {m.group()!r}: it was not parsed as math (enable dollarmath, or escape a "
                            f"literal dollar as \\$)")
    for out in article.select(".cell_output"):
        if m := _WARNING.search(out.get_text(" ")):
            rep.problems.append(f"a library warning ({m.group()}) is printed in an output; silence it where it "
                                f"is raised or keep stderr out of the HTML")
            break
    return rep


def check_findings_page(path: Path) -> list[str]:
    """The findings page exists, has its cross-chapter table and its summary figure."""
    if not Path(path).is_file():
        return [f"{path}: the findings page was not built (book/experiments/findings in _toc.yml)"]
    article = _soup(path)
    problems = []
    if not [t for t in article.select(".cell_output table") if t.find_parent(class_=PROVENANCE_CLASS) is None]:
        problems.append(f"{Path(path).name}: no findings table in the page's outputs")
    if not article.select(".cell_output img, .cell_output svg"):
        problems.append(f"{Path(path).name}: no summary figure in the page's outputs")
    return problems


def check_book(html_dir: Path, notebooks: Path) -> tuple[list[str], list[str]]:
    """Run every check on a built book and the notebook sources; return ``(problems, notices)``.

    Notices list stale pages whose shape could not be judged; problems fail the check.
    """
    html_dir, problems, notices = Path(html_dir), [], []
    pages = sorted((html_dir / "book" / "experiments").glob("*.html"))
    if not pages:
        return [f"{html_dir}: no chapter pages under book/experiments/; build the book first"], []
    for page in pages:
        rep = check_page(page)
        problems += [f"{rep.page}: {p}" for p in rep.problems]
        if rep.stale:
            notices += [f"{rep.page} (stale run, shape not judged): {p}" for p in rep.shape]
        else:
            problems += [f"{rep.page}: {p}" for p in rep.shape]
    problems += check_findings_page(html_dir / "book" / "experiments" / "findings.html")
    for nb in sorted(Path(notebooks).glob("*.ipynb")):
        problems += [str(f) for f in lint_markdown(nb)]
    return problems, notices
