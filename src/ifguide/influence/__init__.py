"""Stage 3: influence of training tokens on the model's toxicity.

factors.py fits EK-FAC factors (Kronfluence); direction.py turns the signed query set into the preconditioned
query gradient P, once; token_scores.py scores every training position against P; shards.py stores the scores
out of core; stage.py holds the `ifguide factors` and `ifguide scores` commands.
"""

from .direction import compute_direction, load_direction, precondition, query_gradient
from .factors import FACTORS, analyzer, factors_dir, fit_factors
from .shards import ScoreReader, check_finite, write_shards
from .stage import factors, query_direction, scores
from .task import QUERY_KINDS, LanguageModelTask, QueryRows, discover_tracked_modules, query_weights
from .token_scores import TOKEN_SCORES, KronfluenceScorer, LossTermScorer, score_blocks, token_scorer

__all__ = [
    "FACTORS", "QUERY_KINDS", "TOKEN_SCORES", "KronfluenceScorer", "LanguageModelTask", "LossTermScorer",
    "QueryRows", "ScoreReader", "analyzer", "check_finite", "compute_direction", "discover_tracked_modules",
    "factors", "factors_dir", "fit_factors", "load_direction", "precondition", "query_direction",
    "query_gradient", "query_weights", "score_blocks", "scores", "token_scorer", "write_shards",
]
