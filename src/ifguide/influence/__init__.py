"""Stage 3: influence of training tokens on the model's toxicity.

ekfac.py fits EK-FAC factors (Kronfluence); direction.py turns the signed query set into the preconditioned
query gradient P, once; token_scores.py scores every training position against P; shards.py stores the scores
out of core; task.py is the Kronfluence task; stage.py holds the `ifguide factors` and `ifguide scores`
commands. Imports data, model and queries.
"""

from typing import TYPE_CHECKING

from .._face import face

__all__, __getattr__ = face(__name__, {
    "direction": ["compute_direction", "load_direction"],
    "ekfac": ["FACTORS", "analyzer", "factors_dir", "fit_factors"],
    "shards": ["ScoreReader", "check_finite", "write_shards"],
    "stage": ["factors", "scores", "scores_name"],
    "task": ["QueryRows", "discover_tracked_modules", "head_module", "query_weights"],
    "token_scores": ["TOKEN_SCORES", "LossTermScorer", "score_blocks", "token_scorer"],
})

if TYPE_CHECKING:  # what type checkers and IDEs see of the names above
    from .direction import compute_direction, load_direction
    from .ekfac import FACTORS, analyzer, factors_dir, fit_factors
    from .shards import ScoreReader, check_finite, write_shards
    from .stage import factors, scores, scores_name
    from .task import QueryRows, discover_tracked_modules, head_module, query_weights
    from .token_scores import TOKEN_SCORES, LossTermScorer, score_blocks, token_scorer
