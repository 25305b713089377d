"""Where the tool keeps its local caches (model conversions, index mirrors, the JVM's class
archive)."""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["cache_root"]


def cache_root() -> Path:
    """Where the tool keeps its local caches (``FRUITS_CACHE``, else
    ``$XDG_CACHE_HOME/fruits-pipeline`` or ``~/.cache/fruits-pipeline``)."""
    base = os.environ.get("FRUITS_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "fruits-pipeline"
    )
    return Path(base)
