"""Where gemmakit keeps things: its cache and the files shipped inside the package.

A leaf module (standard library only), so any layer can ask for a path without importing the
layers above it.
"""

from __future__ import annotations

import os
from pathlib import Path

PACKAGE = Path(__file__).parent
# Shipped text, fine-tuning and task samples (`gemmakit/data/`).
DATA = PACKAGE / "data"
# The chat page the server serves.
STATIC = PACKAGE / "static"


def cache_dir() -> Path:
    """`$GEMMAKIT_CACHE`, else `$XDG_CACHE_HOME/gemmakit`, else `~/.cache/gemmakit`."""
    root = os.environ.get("GEMMAKIT_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "gemmakit"
    )
    return Path(root)
