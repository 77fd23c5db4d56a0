"""One exception family for every user-facing error, so notebooks and the CLI can show it cleanly."""


class LayerwiseError(ValueError):
    """Bad input or a missing prerequisite. The message names the problem and how to fix it."""
