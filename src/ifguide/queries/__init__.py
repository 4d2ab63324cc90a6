"""Stage 2b: the query sets whose gradients define the toxicity direction.

`rtp` is the paper's fixed set, built by `prepare`; `ifguide queries` (stage) samples continuations from the
scoring model on set-aside prompts and labels them with a scorer. Imports data, model and toxicity.
"""

from typing import TYPE_CHECKING

from .._face import face

__all__, __getattr__ = face(__name__, {
    "stage": ["BUILTIN", "JOINED", "REWARD_LABELLER", "SAMPLING_FIELDS", "SET_ASIDE", "SET_COLUMN",
              "build_queries", "query_artifacts", "query_prompts", "query_set"],
})

if TYPE_CHECKING:  # what type checkers and IDEs see of the names above
    from .stage import (
        BUILTIN,
        JOINED,
        REWARD_LABELLER,
        SAMPLING_FIELDS,
        SET_ASIDE,
        SET_COLUMN,
        build_queries,
        query_artifacts,
        query_prompts,
        query_set,
    )
