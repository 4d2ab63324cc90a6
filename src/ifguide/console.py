"""What ifguide shows while it works: progress bars, and its log messages, which the CLI prints (library code
logs through `logging`, one logger per module under `ifguide`, and shows nothing unless the caller configures
it)."""

from __future__ import annotations

import logging
import os
import sys


def progress_bars_off() -> bool:
    """Progress bars are off under CI (CI=true), on otherwise."""
    return os.environ.get("CI") == "true"


class _Console(logging.Handler):
    """Messages to the sys.stdout of the moment, warnings and errors to its sys.stderr, so that redirections
    and captures made after set-up see them."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            stream = sys.stderr if record.levelno >= logging.WARNING else sys.stdout
            prefix = f"{record.levelname.lower()}: " if record.levelno >= logging.WARNING else ""
            stream.write(prefix + record.getMessage() + "\n")
            stream.flush()
        except Exception:  # noqa: BLE001 - logging must never raise into the work
            self.handleError(record)


def show_messages(level: int = logging.INFO) -> None:
    """Print ifguide's messages from `level` up: WARNING (the CLI's --quiet), INFO (progress, the default) or
    DEBUG (--verbose, details too)."""
    logger = logging.getLogger("ifguide")
    logger.setLevel(level)
    logger.propagate = False
    if not any(isinstance(handler, _Console) for handler in logger.handlers):
        logger.addHandler(_Console())
