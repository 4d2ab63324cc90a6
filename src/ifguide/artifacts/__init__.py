"""Artifacts: storage (atomic writes, safe loads), build (the stage protocol: recipe, lock, swap, resume) and
layout (the run directory). Imports config."""

from typing import TYPE_CHECKING

from .._face import face

__all__, __getattr__ = face(__name__, {
    "storage": ["INFO", "damaged", "fingerprint", "load_array", "load_tensors", "read_info",
                "write_json", "write_text"],
    "build": ["COMPUTATION_VERSIONS", "RESUME", "Journal", "Stage", "finished", "refuse_if_building",
              "remove_stale_temporaries", "stage_lock", "wait_for_builder"],
    "layout": ["Run"],
})

if TYPE_CHECKING:  # what type checkers and IDEs see of the names above
    from .build import (
        COMPUTATION_VERSIONS,
        RESUME,
        Journal,
        Stage,
        finished,
        refuse_if_building,
        remove_stale_temporaries,
        stage_lock,
        wait_for_builder,
    )
    from .layout import Run
    from .storage import (
        INFO,
        damaged,
        fingerprint,
        load_array,
        load_tensors,
        read_info,
        write_json,
        write_text,
    )
