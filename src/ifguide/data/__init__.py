"""Stage 1: the corpus and everything read from it.

Owns reading sources (sources, corpora, documents), the tokenizer, cutting blocks (blocks, memory-mapped;
dataset, the torch view), the lexicon, the prompt sets and fixed RTP query rows (prompts, prompt_sets), and
the `prepare` command (stage). Imports only the shared modules (errors, config, artifacts); every later
package reads data here.
"""

from typing import TYPE_CHECKING

from .._face import face

__all__, __getattr__ = face(__name__, {
    "stage": ["prepare"],
    "tokenizer": ["ALIGNED", "CONTROL_TOKENS", "check_tokenizer_spec", "control_token_ids", "load_tokenizer",
                  "sentence_ends", "sentence_starts"],
    "blocks": ["HELDOUT_SETS", "TRAINING_DATA", "block_array", "load_blocks", "load_documents",
               "training_blocks"],
    "dataset": ["BlockDataset"],
    "prompts": ["load_prompts", "read_jsonl"],
    "prompt_sets": ["query_rows"],
    "lexicon": ["blocklist_pattern", "next_token_words", "token_texts"],
    "corpora": ["corpora", "matched_files", "toxigen_statements"],
})

if TYPE_CHECKING:  # what type checkers and IDEs see of the names above
    from . import corpora
    from .blocks import HELDOUT_SETS, TRAINING_DATA, block_array, load_blocks, load_documents, training_blocks
    from .corpora import matched_files, toxigen_statements
    from .dataset import BlockDataset
    from .lexicon import blocklist_pattern, next_token_words, token_texts
    from .prompt_sets import query_rows
    from .prompts import load_prompts, read_jsonl
    from .stage import prepare
    from .tokenizer import (
        ALIGNED,
        CONTROL_TOKENS,
        check_tokenizer_spec,
        control_token_ids,
        load_tokenizer,
        sentence_ends,
        sentence_starts,
    )
