"""Stage 4: which training tokens to suppress, and masks as artifacts.

algorithm1 is the paper's selection over influence scores, documents marks whole documents; stage holds
`ifguide select` (Algorithm 1, documents, or the lexicon and label baselines) and score_sets the score set it
reads; masks reads `marked.npz`; quality measures a mask against the corpus
labels; inspect writes the HTML view; spans and transfer carry masks to document coordinates and into other
runs (`export-mask`, `import-mask`). Imports data and influence.
"""

from typing import TYPE_CHECKING

from .._face import face

__all__, __getattr__ = face(__name__, {
    "stage": ["select"],
    "score_sets": ["find_scores"],
    "masks": ["load_mask"],
    "transfer": ["export_mask", "import_mask"],
})

if TYPE_CHECKING:  # what type checkers and IDEs see of the names above
    from .masks import load_mask
    from .score_sets import find_scores
    from .stage import select
    from .transfer import export_mask, import_mask
