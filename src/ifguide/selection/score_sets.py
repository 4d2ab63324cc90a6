"""Which score set `select` reads: by MODEL/NAME, by NAME, by the name without the LM head's suffix, or the
run's only one. Light (no torch, no datasets), so that the CLI checks the name before any heavy import."""

from __future__ import annotations

import logging
from pathlib import Path

from ..artifacts import Run
from ..errors import IfguideError
from ..influence import ScoreReader
from ..names import HEAD_SUFFIX

log = logging.getLogger(__name__)


def score_sets(run: Run) -> dict[str, Path]:
    """MODEL/NAME -> folder of every score set of the run that holds finished scores."""
    found = {}
    for folder in sorted((run.root / "influence").glob("*/scores/*")):
        try:
            ScoreReader(folder)
        except IfguideError:
            continue
        found[f"{folder.parent.parent.name}/{folder.name}"] = folder
    return found


def headless(name: str) -> str:
    """A score-set name without the LM head's suffix."""
    return name.replace(f"-{HEAD_SUFFIX}", "")


def find_scores(run: Run, scores_name: str | None) -> Path:
    """The score set `scores_name` names (MODEL/NAME, or NAME when one model has it), the only one when no
    name is given; otherwise a one-line error listing the sets that exist."""
    if scores_name is not None:
        # finished or not: ScoreReader says what's wrong
        folders = sorted((run.root / "influence").glob("*/scores/*"))
        matches = [f for f in folders if scores_name in (f"{f.parent.parent.name}/{f.name}", f.name)]
        if len(matches) == 1:
            return matches[0]
        # the name without the LM head's suffix, as a preset that tracks the head names it
        loose = [f for f in folders if not matches and headless(scores_name) in
                 (headless(f"{f.parent.parent.name}/{f.name}"), headless(f.name))]
        if len(loose) == 1:
            log.info(f"select: scores {loose[0].parent.parent.name}/{loose[0].name} (the run's only set "
                     f"named {scores_name} but for the LM head)")
            return loose[0]
    sets = score_sets(run)
    if scores_name is None and len(sets) == 1:
        (only, path), = sets.items()
        log.info(f"select: scores {only} (the run's only score set)")
        return path
    listing = ", ".join(sets) or "none yet (run `ifguide scores` first)"
    problem = ("select --method paper needs --scores MODEL/NAME" if scores_name is None
               else f"scores '{scores_name}' {'is ambiguous (pass MODEL/NAME)' if matches else 'not found'}")
    raise IfguideError(f"{problem}; this run's score sets: {listing}")
