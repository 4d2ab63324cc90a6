"""Stage 3: influence of training tokens on the model's toxicity.

factors.py fits EK-FAC factors (Kronfluence); direction.py turns the signed query set into the preconditioned
query gradient P, once; token_scores.py scores every training position against P; shards.py stores the scores
out of core; stage.py holds the `ifguide factors` and `ifguide scores` commands.
"""

from .direction import compute_direction, load_direction, precondition, query_gradient
from .factors import FACTORS, analyzer, factors_dir, fit_factors
from .shards import ScoreReader, check_finite, write_shards
from .stage import direction_name, factors, query_direction, scores
from .task import QUERY_KINDS, LanguageModelTask, QueryRows, discover_tracked_modules, head_module, query_weights
from .token_scores import TOKEN_SCORES, KronfluenceScorer, LossTermScorer, score_blocks, token_scorer

__all__ = [
    "FACTORS", "KronfluenceScorer", "LanguageModelTask", "LossTermScorer", "QUERY_KINDS", "QueryRows",
    "ScoreReader", "TOKEN_SCORES", "analyzer", "check_finite", "compute_direction", "direction_name",
    "discover_tracked_modules", "factors", "factors_dir", "fit_factors", "head_module", "load_direction",
    "precondition", "query_direction", "query_gradient", "query_weights", "score_blocks", "scores", "token_scorer",
    "write_shards",
]
