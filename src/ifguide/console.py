"""What ifguide shows while it works: progress bars, and its log messages, which the CLI prints (library code
logs through `logging`, one logger per module under `ifguide`, and shows nothing unless the caller configures
it)."""

from __future__ import annotations

import logging
import os
import sys
import warnings

QUIET = "IFGUIDE_QUIET"  # set by --quiet; demo workers inherit it


def progress_bars_off() -> bool:
    """Progress bars show only on a terminal: off when stdout or stderr is redirected, under CI (CI=true) and
    with --quiet."""
    terminal = sys.stdout.isatty() and sys.stderr.isatty()
    return not terminal or os.environ.get("CI") == "true" or os.environ.get(QUIET) == "1"


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


# the libraries whose deprecation notes (about their own internals) a CLI user cannot act on
LIBRARIES = r"(transformers|trl|datasets|torch|accelerate)(\.|$)"


# notes of a library's logger that say nothing a user can act on: (logger, start of the message)
LIBRARY_NOISE = (("transformers.trainer_utils", "mtime may not be reliable"),)  # checkpoints < 1 s apart


def hide_library_notes() -> None:
    """Silence the FutureWarning and DeprecationWarning notes of LIBRARIES and the LIBRARY_NOISE lines; the
    CLI and the demo's workers do this, a library user keeps them."""
    for category in (FutureWarning, DeprecationWarning):
        warnings.filterwarnings("ignore", category=category, module=LIBRARIES)
    for name, start in LIBRARY_NOISE:
        logger = logging.getLogger(name)
        if not any(getattr(f, "start", None) == start for f in logger.filters):
            logger.addFilter(_Dropping(start))


class _Dropping(logging.Filter):
    """Drops a logger's records whose message starts with `start`."""

    def __init__(self, start: str):
        super().__init__()
        self.start = start

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(self.start)


def show_messages(level: int = logging.INFO) -> None:
    """Print ifguide's messages from `level` up: WARNING (the CLI's --quiet), INFO (progress, the default) or
    DEBUG (--verbose, details too)."""
    logger = logging.getLogger("ifguide")
    logger.setLevel(level)
    if level >= logging.WARNING:
        os.environ[QUIET] = "1"
    else:
        os.environ.pop(QUIET, None)
    logger.propagate = False
    if not any(isinstance(handler, _Console) for handler in logger.handlers):
        logger.addHandler(_Console())
