"""analysis_kit: the code behind the Layerwise book.

Which layers of a transformer matter for a task, and how much can be cut, healed or skipped?
Modules (one concept each): assets, data, models, layers, train, importance, compress, heal,
quantize, dynamic, stats, plots, report, runner, cli. See docs/api.md for the contracts.
"""

__version__ = "0.1.0"
