"""A Sphinx extension for the book: a visible banner on every chapter whose committed run is stale.

A chapter page is the executed notebook of its last good run. When the notebook, its parameters or the
package code it imports changed after that run (the runner's fingerprint no longer matches), the page still
shows the old numbers; a reader must see that before reading them. :func:`analysis_kit.runner.build_book`
writes which chapters are stale, and why, to a small JSON file named by ``LAYERWISE_BOOK_STATE``; this
extension puts a warning box with that reason under each such page's title. Without the variable (a plain
``jupyter-book build``) it does nothing.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from docutils import nodes

#: CSS class of the banner; the book checks (:mod:`analysis_kit.bookcheck`) read it.
STALE_CLASS = "stale-chapter"


def _state(path: str | None) -> dict[str, Any]:
    if not path or not Path(path).is_file():
        return {}
    return json.loads(Path(path).read_text())


def _banner(app: Any, doctree: nodes.document) -> None:
    """Insert the stale-run warning under the title of a stale chapter's page."""
    path = os.environ.get("LAYERWISE_BOOK_STATE")
    if path and app.env.docname.startswith("book/experiments/"):
        app.env.note_dependency(path)  # a chapter turning stale (or fresh) re-reads its page
    reason = _state(path).get("stale", {}).get(app.env.docname)
    if not reason:
        return
    box = nodes.warning(classes=[STALE_CLASS])
    box += nodes.paragraph(text=reason)
    section = next(iter(doctree.findall(nodes.section)), None)
    if section is not None and len(section) and isinstance(section[0], nodes.title):
        section.insert(1, box)
    else:
        doctree.insert(0, box)


def setup(app: Any) -> dict[str, Any]:
    """Register the banner (Sphinx entry point)."""
    app.connect("doctree-read", _banner)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
