"""Artifacts: storage (atomic writes, safe loads), build (the stage protocol: recipe, lock, swap, resume) and layout
(the run directory). Imports config."""

from .._face import face

__all__, __getattr__ = face(__name__, {
    "storage": ["INFO", "artifact_file", "damaged", "fingerprint", "load_array", "load_tensors", "read_info",
                "write_json", "write_text"],
    "build": ["COMPUTATION_VERSIONS", "RESUME", "Journal", "Stage", "finished", "refuse_if_building",
              "remove_stale_temporaries", "stage_lock", "wait_for_builder"],
    "layout": ["Run", "artifact_name"],
})
