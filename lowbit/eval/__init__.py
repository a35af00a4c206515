"""Accuracy evaluation on real, offline assets: text corpora, SmolLM2 and perplexity, MiniLM
embedding similarity."""

from lowbit.eval.corpora import (
    CORPORA,
    SPLITS,
    byte_tokens,
    cache_dir,
    load_documents,
    load_text,
    random_windows,
)
from lowbit.eval.embeddings import embed, embedding_similarity, load_minilm
from lowbit.eval.perplexity import (
    PerplexityResult,
    heldout_ids,
    heldout_perplexity,
    perplexity,
)
from lowbit.eval.smollm import load_smollm2

__all__ = [
    "CORPORA",
    "SPLITS",
    "PerplexityResult",
    "byte_tokens",
    "cache_dir",
    "embed",
    "embedding_similarity",
    "heldout_ids",
    "heldout_perplexity",
    "load_documents",
    "load_minilm",
    "load_smollm2",
    "load_text",
    "perplexity",
    "random_windows",
]
