"""What ifguide shows while it works: progress bars and log messages."""

from __future__ import annotations

import os


def progress_bars_off() -> bool:
    """Progress bars are off under CI (CI=true), on otherwise."""
    return os.environ.get("CI") == "true"
