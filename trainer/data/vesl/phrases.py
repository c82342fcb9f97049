"""Candidate region phrases from a caption: noun-phrase chunks (VESL's first step).

The chunker is TextBlob's English parser (Pattern's Brill-style lexicon tagger and its
rule-based chunker), whose tagger data ships inside the PyPI wheel. spaCy's English models and
NLTK's tagger data are published outside PyPI (GitHub releases, nltk.download), so a training
cluster that installs from PyPI alone would not have them.

A chunk becomes a phrase after three rules (ours):
  - leading determiners, possessives and pronouns are dropped ("the black cat" -> "black cat"),
    and so is anything after the last noun;
  - a chunk without a noun is no phrase ("it", "two");
  - a chunk whose last noun names the picture rather than a thing in it ("photo", "image",
    "background", ...; `PICTURE_WORDS`) is no phrase: a detector would box the whole image.
Phrases keep the caption's order and case; repeats (case-insensitive) are dropped.
"""
from __future__ import annotations

import threading

# Penn tags dropped at the start of a chunk: determiners, predeterminers, pronouns, possessives
LEADING_TAGS = frozenset({"DT", "PDT", "PRP", "PRP$", "WDT", "WP", "WP$", "POS", "EX"})
# Nouns that describe the picture itself, not something a box could hold
PICTURE_WORDS = frozenset({
    "image", "images", "photo", "photos", "photograph", "photographs", "picture", "pictures",
    "pic", "shot", "snapshot", "view", "scene", "background", "foreground", "illustration",
    "drawing", "painting", "rendering", "render", "closeup", "close-up", "stock", "vector",
    "clipart", "wallpaper", "thumbnail", "screenshot", "frame", "side", "front", "top",
    "bottom", "left", "right", "middle", "center", "centre", "corner", "edge", "part", "kind",
    "type", "lot", "couple", "pair", "group", "bunch", "number", "variety", "set",
    "day", "daytime", "night", "morning", "evening", "sunset", "sunrise", "time", "way",
})

_parser = None
_lock = threading.Lock()


def _parse(text: str) -> list[list[list[str]]]:
    """Sentences of [word, penn tag, chunk tag, pnp tag] tokens."""
    global _parser
    with _lock:
        if _parser is None:
            from textblob.en import parse  # loads the 1 MB lexicon once (~2 s)
            _parser = parse
    return _parser(text, tokenize=True, tags=True, chunks=True, relations=False,
                   lemmata=False).split()


def _chunks(sentence: list[list[str]]) -> list[list[tuple[str, str]]]:
    """The NP chunks of a parsed sentence as (word, tag) lists, in order."""
    out: list[list[tuple[str, str]]] = []
    current: list[tuple[str, str]] | None = None
    for word, tag, chunk, *_ in sentence:
        if chunk == "B-NP" or (chunk == "I-NP" and current is None):
            current = [(word, tag)]
            out.append(current)
        elif chunk == "I-NP":
            current.append((word, tag))
        else:
            current = None
    return out


def chunk_phrase(chunk: list[tuple[str, str]]) -> str | None:
    """The phrase a chunk yields under the rules of the module docstring, or None."""
    start = 0
    while start < len(chunk) and chunk[start][1] in LEADING_TAGS:
        start += 1
    nouns = [i for i in range(start, len(chunk)) if chunk[i][1].startswith("NN")]
    if not nouns:
        return None
    words = [w for w, _ in chunk[start:nouns[-1] + 1]]
    if words[-1].lower() in PICTURE_WORDS or not any(c.isalpha() for c in words[-1]):
        return None
    return " ".join(words)


def noun_phrases(caption: str, max_phrases: int = 0) -> list[str]:
    """Candidate region phrases of `caption`, at most `max_phrases` (0: all)."""
    out: list[str] = []
    seen: set[str] = set()
    for sentence in _parse(caption):
        for chunk in _chunks(sentence):
            phrase = chunk_phrase(chunk)
            if phrase is None or phrase.lower() in seen:
                continue
            seen.add(phrase.lower())
            out.append(phrase)
            if max_phrases and len(out) >= max_phrases:
                return out
    return out
