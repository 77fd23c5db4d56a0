"""analysis_kit: the code behind the Layerwise book.

Which layers of a transformer matter for a task, and how much can be cut, healed or skipped?
The modules, by layer (CONTRIBUTING.md has the map with one line each, the book's API page the contracts):

- core: ``paths``, ``errors``, ``device``, ``cache``, ``assets``, ``data``, ``models``, ``layers``;
- engine: ``train``, ``measure``;
- families: ``importance`` (importance methods), ``strategies`` (block-selection strategies),
  ``dynamic`` (exit policies), ``heal``, ``quantize``, ``compress``;
- statistics and charts: ``stats``, ``plots``;
- chapters and tools: ``depth``, ``sensitivity``, ``report``, ``runner``, ``cli``, ``analyze``.
"""

__version__ = "0.1.0"
