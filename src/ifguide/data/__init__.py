"""Stage 1: the corpus and everything read from it.

Owns reading sources (sources, corpora, documents), the tokenizer, cutting blocks (blocks, memory-mapped; dataset,
the torch view), the lexicon, the prompt sets and fixed RTP query rows (prompts, prompt_sets), and the `prepare`
command (stage). Imports only the shared modules (errors, config, artifacts); every later package reads data here.
"""

from .._face import face

__all__, __getattr__ = face(__name__, {
    "stage": ["prepare", "print_summary"],
    "tokenizer": ["ALIGNED", "CONTROL_TOKENS", "EOS", "check_tokenizer_spec", "control_token_ids", "load_tokenizer",
                  "sentence_ends", "sentence_starts"],
    "blocks": ["HELDOUT_SETS", "TRAINING_DATA", "block_array", "blocks_fingerprint", "load_block_ids", "load_blocks",
               "load_documents", "training_blocks"],
    "dataset": ["BlockDataset"],
    "prompts": ["BUILTIN_PROMPTS", "load_prompts", "read_jsonl"],
    "prompt_sets": ["query_rows"],
    "lexicon": ["blocklist_words", "locate_words", "next_token_words", "token_texts"],
    "corpora": ["corpora", "matched_files", "toxigen_statements"],
    "sources": ["registry", "source_path"],
})
