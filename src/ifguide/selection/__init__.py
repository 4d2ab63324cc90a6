"""Stage 4: which training tokens to suppress, and masks as artifacts.

algorithm1 is the paper's selection over influence scores; stage holds `ifguide select` (Algorithm 1 or the
`blocklist-tokens` lexicon baseline); masks reads `marked.npz`; quality measures a mask against the corpus labels;
inspect writes the HTML view; spans and transfer carry masks to document coordinates and into other runs
(`export-mask`, `import-mask`). Imports data and influence.
"""

from .._face import face

__all__, __getattr__ = face(__name__, {
    "stage": ["select"],
    "masks": ["MaskLoader", "load_mask"],
    "quality": ["load_provenance", "selection_quality"],
    "spans": ["SpanMask", "SuppressionCollator", "document_id"],
    "transfer": ["export_mask", "import_mask"],
})
