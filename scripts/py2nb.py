"""Author a chapter notebook from a percent-format script (an authoring aid; notebooks/ is the source).

Cells start with ``# %%`` (code), ``# %% [markdown]`` (markdown, each line prefixed by ``# ``) or
``# %% tags=["parameters"]`` (the papermill parameters cell). Usage: python scripts/py2nb.py SRC.py OUT.ipynb
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import nbformat


def convert(text: str) -> nbformat.NotebookNode:
    """Split ``text`` at ``# %%`` markers into notebook cells."""
    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nb.metadata["language_info"] = {"name": "python"}
    chunks = re.split(r"^# %%(.*)$", text, flags=re.M)
    for header, body in zip(chunks[1::2], chunks[2::2], strict=True):
        body = body.strip("\n")
        if "[markdown]" in header:
            lines = [ln[2:] if ln.startswith("# ") else ln.lstrip("#") for ln in body.splitlines()]
            nb.cells.append(nbformat.v4.new_markdown_cell("\n".join(lines)))
            continue
        cell = nbformat.v4.new_code_cell(body)
        if m := re.search(r"tags=(\[.*\])", header):
            cell.metadata["tags"] = json.loads(m.group(1))
        nb.cells.append(cell)
    for i, cell in enumerate(nb.cells):  # stable ids keep diffs and fingerprints reproducible
        cell["id"] = f"cell-{i:02d}"
    return nb


if __name__ == "__main__":
    src, out = map(Path, sys.argv[1:3])
    nbformat.write(convert(src.read_text()), out)
    print(f"wrote {out}")
