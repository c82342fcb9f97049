"""Text tokenizers: CLIP byte-level BPE (ids identical to open_clip) and SentencePiece.

Both return a LongTensor [n, context_length] in which every row holds exactly one eot token
(the text tower pools at the first eot position), even when the text was truncated.

Rows are cached per text (an LRU of `ROW_CACHE_SIZE` texts per tokenizer and process): region
captions and class prompts repeat; unique web captions still profit from the per-word BPE cache.
"""
from __future__ import annotations

import gzip
import html
import importlib.util
import os
from functools import lru_cache

import numpy as np
import torch

from trainer.data.config import TokenizerConfig  # noqa: F401  (re-exported)

try:  # the `regex` module is needed for \p{L} / \p{N}; it is a dependency of open-clip-torch
    import regex as _re
except ImportError as exc:  # pragma: no cover - regex ships with open-clip-torch and transformers
    raise ImportError("trainer.data.tokenizer needs the `regex` package: pip install regex") from exc

try:  # open_clip runs ftfy.fix_text on every caption; we do the same when ftfy is importable
    import ftfy as _ftfy
except ImportError:  # pragma: no cover - exercised only where ftfy is absent
    _ftfy = None

CLIP_VOCAB_FILE = "bpe_simple_vocab_16e6.txt.gz"
_NUM_MERGES = 49152 - 256 - 2  # the CLIP vocab uses the first 48894 merges of the file
ROW_CACHE_SIZE = 1 << 14


class Tokenizer:
    """Common interface of the tokenizers; see `build_tokenizer`."""

    vocab_size: int
    sot_token_id: int
    eot_token_id: int
    pad_token_id: int
    context_length: int

    _NOT_PICKLED: tuple[str, ...] = ("_rows",)

    def encode(self, text: str) -> list[int]:  # pragma: no cover - interface
        raise NotImplementedError

    def row_ids(self, text: str) -> tuple[int, ...]:
        """The ids of one row before padding: framed (sot ... eot), truncated to the context
        length with the eot kept last. Cached per text."""
        rows = self.__dict__.get("_rows")
        if rows is None:
            rows = self._rows = lru_cache(maxsize=ROW_CACHE_SIZE)(self._row_ids_uncached)
        return rows(text)

    def _row_ids_uncached(self, text: str) -> tuple[int, ...]:
        ids = self._frame(self.encode(text))
        if len(ids) > self.context_length:  # truncate, keeping the eot as the last token
            ids = ids[: self.context_length - 1] + [self.eot_token_id]
        return tuple(ids)

    def rows(self, texts: list[str]) -> np.ndarray:
        """int64 [n, L] padded rows."""
        out = np.full((len(texts), self.context_length), self.pad_token_id, dtype=np.int64)
        for row, text in enumerate(texts):
            ids = self.row_ids(text)
            out[row, : len(ids)] = ids
        return out

    def __call__(self, texts: list[str] | str) -> torch.Tensor:
        if isinstance(texts, str):
            texts = [texts]
        return torch.from_numpy(self.rows(texts))  # [n, L]

    def _frame(self, ids: list[int]) -> list[int]:
        return [self.sot_token_id, *ids, self.eot_token_id]

    def __getstate__(self):  # caches (lru_cache objects) do not pickle: rebuilt on use
        state = self.__dict__.copy()
        for name in self._NOT_PICKLED:
            state.pop(name, None)
        return state


# ---------------------------------------------------------------------------------------------
# CLIP byte-level BPE
# ---------------------------------------------------------------------------------------------

def clip_vocab_path() -> str:
    """Path of the CLIP BPE merges file shipped inside the open-clip-torch wheel (no import)."""
    spec = importlib.util.find_spec("open_clip")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"{CLIP_VOCAB_FILE} ships inside the open-clip-torch wheel, which is not installed "
            "(pip install open-clip-torch)")
    for folder in spec.submodule_search_locations:
        path = os.path.join(folder, CLIP_VOCAB_FILE)
        if os.path.isfile(path):
            return path
    raise FileNotFoundError(f"{CLIP_VOCAB_FILE} not found in {list(spec.submodule_search_locations)}")


def _byte_alphabet() -> tuple[list[str], list[int]]:
    """One printable symbol per byte value, in CLIP's vocabulary order.

    Returns (symbols, byte_values): printable Latin-1 bytes map to themselves and come first; the
    remaining 68 bytes follow in increasing order, mapped to code points 256, 257, ...
    """
    printable = [*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    taken = set(printable)
    others = [b for b in range(256) if b not in taken]
    symbols = [chr(b) for b in printable] + [chr(256 + i) for i in range(len(others))]
    return symbols, printable + others


def _clean(text: str) -> str:
    """open_clip's "lower" cleaning: ftfy fix, double html unescape, collapse whitespace, lower.

    Printable ASCII without "&" skips ftfy and unescaping: both leave such text unchanged
    (ftfy only repairs non-ASCII text, control characters, line breaks and HTML entities).
    """
    if not (text.isascii() and text.isprintable() and "&" not in text):
        if _ftfy is not None:
            text = _ftfy.fix_text(text)
        text = html.unescape(html.unescape(text))
    return " ".join(text.split()).lower()


class ClipBPETokenizer(Tokenizer):
    """CLIP's byte-level BPE; ids equal open_clip's `tokenize` / `SimpleTokenizer`."""

    _SPLIT = _re.compile(
        r"<start_of_text>|<end_of_text>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+",
        _re.IGNORECASE)

    def __init__(self, context_length: int = 77, vocab_path: str | None = None, cache_size: int = 1 << 16):
        if context_length < 2:
            raise ValueError(f"data.tokenizer.context_length must be >= 2 (sot + eot), got {context_length}")
        self.context_length = context_length
        symbols, byte_order = _byte_alphabet()
        self._byte_sym = [""] * 256
        for byte, sym in zip(byte_order, symbols):
            self._byte_sym[byte] = sym

        path = vocab_path or clip_vocab_path()
        with gzip.open(path, "rt", encoding="utf-8") as f:
            lines = f.read().split("\n")
        merges = [tuple(line.split()) for line in lines[1: 1 + _NUM_MERGES]]
        vocab = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges]
        vocab += ["<start_of_text>", "<end_of_text>"]
        self.encoder = {tok: i for i, tok in enumerate(vocab)}
        self.decoder = vocab
        self._rank = {pair: r for r, pair in enumerate(merges)}
        self.vocab_size = len(vocab)                      # 49408
        self.sot_token_id = self.encoder["<start_of_text>"]  # 49406
        self.eot_token_id = self.encoder["<end_of_text>"]    # 49407
        self.pad_token_id = 0
        self._cache_size = cache_size
        self._word_ids = lru_cache(maxsize=cache_size)(self._word_ids_uncached)

    def _merge(self, word: str) -> list[str]:
        """Apply the BPE merges to one pre-token (already mapped to byte symbols)."""
        parts = list(word[:-1]) + [word[-1] + "</w>"]
        while len(parts) > 1:
            best, best_rank = -1, None
            for i in range(len(parts) - 1):
                r = self._rank.get((parts[i], parts[i + 1]))
                if r is not None and (best_rank is None or r < best_rank):
                    best, best_rank = i, r
            if best_rank is None:
                break
            first, second = parts[best], parts[best + 1]
            merged: list[str] = []
            i = 0
            while i < len(parts):  # merge every occurrence of the best pair, left to right
                if i + 1 < len(parts) and parts[i] == first and parts[i + 1] == second:
                    merged.append(first + second)
                    i += 2
                else:
                    merged.append(parts[i])
                    i += 1
            parts = merged
        return parts

    def _word_ids_uncached(self, word: str) -> tuple[int, ...]:
        if word.lower() in ("<start_of_text>", "<end_of_text>"):
            return (self.encoder[word.lower()],)
        symbols = "".join(self._byte_sym[b] for b in word.encode("utf-8"))
        return tuple(self.encoder[p] for p in self._merge(symbols))

    def encode(self, text: str) -> list[int]:
        """Content ids, without sot/eot. Literal "<start_of_text>"/"<end_of_text>" in a caption
        are dropped (open_clip would emit the special ids and break the one-eot-per-row rule)."""
        ids: list[int] = []
        for word in self._SPLIT.findall(_clean(text)):
            ids.extend(self._word_ids(word))
        return [i for i in ids if i < self.sot_token_id]

    _NOT_PICKLED = ("_rows", "_word_ids")

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._word_ids = lru_cache(maxsize=self._cache_size)(self._word_ids_uncached)

    def decode(self, ids: list[int]) -> str:
        """Text of one row (stops at the first eot, skips sot)."""
        if self.eot_token_id in ids:
            ids = ids[: ids.index(self.eot_token_id)]
        text = "".join(self.decoder[i] for i in ids if i < self.sot_token_id)
        byte_of = {sym: b for b, sym in enumerate(self._byte_sym)}
        data = bytearray()
        for ch in text.replace("</w>", " "):
            data.append(byte_of[ch] if ch in byte_of else 0x20)
        return data.decode("utf-8", errors="replace").strip()


# ---------------------------------------------------------------------------------------------
# SentencePiece
# ---------------------------------------------------------------------------------------------

class SentencePieceTokenizer(Tokenizer):
    """A SentencePiece model: [bos] pieces eos, padded with the model's pad id.

    sot = the model's bos id (if add_bos), eot = its eos id, pad = its pad id (falls back to 0
    when the model has none; 0 is <unk> in default models and never follows the eot).
    """

    def __init__(self, model_path: str, context_length: int = 77, add_bos: bool = True,
                 lowercase: bool = False):
        if not model_path or not os.path.isfile(model_path):
            raise FileNotFoundError(
                f"sentencepiece model file not found: {model_path!r} "
                "(set data.tokenizer.model_path to an existing .model file)")
        if context_length < 2:
            raise ValueError(f"data.tokenizer.context_length must be >= 2, got {context_length}")
        import sentencepiece as spm

        self.model_path = model_path
        self.sp = spm.SentencePieceProcessor(model_file=model_path)
        self.context_length = context_length
        self.add_bos = add_bos
        self.lowercase = lowercase
        self.vocab_size = self.sp.get_piece_size()
        eos = self.sp.eos_id()
        if eos < 0:
            raise ValueError(f"sentencepiece model {model_path} has no eos piece; the text tower "
                             "pools at the eot token (train it with eos_id >= 0)")
        self.eot_token_id = eos
        self.sot_token_id = self.sp.bos_id() if add_bos else -1
        if add_bos and self.sot_token_id < 0:
            raise ValueError(f"sentencepiece model {model_path} has no bos piece but "
                             "data.tokenizer.add_bos is true")
        self.pad_token_id = self.sp.pad_id() if self.sp.pad_id() >= 0 else 0
        if self.pad_token_id == self.eot_token_id:
            raise ValueError(f"sentencepiece model {model_path}: pad id equals eos id "
                             f"({self.eot_token_id}); every row must hold exactly one eot")

    def encode(self, text: str) -> list[int]:
        text = " ".join(text.split())
        if self.lowercase:
            text = text.lower()
        ids = self.sp.encode(text, out_type=int)
        return [i for i in ids if i != self.eot_token_id]  # the only eot is the one we add

    def _frame(self, ids: list[int]) -> list[int]:
        return ([self.sot_token_id] if self.add_bos else []) + ids + [self.eot_token_id]

    def decode(self, ids: list[int]) -> str:
        """Text of one row (stops at the first eot, skips bos)."""
        if self.eot_token_id in ids:
            ids = ids[: ids.index(self.eot_token_id)]
        return self.sp.decode([i for i in ids if i != self.sot_token_id])

    _NOT_PICKLED = ("_rows", "sp")  # SentencePieceProcessor pickles poorly across versions: reload

    def __setstate__(self, state):
        import sentencepiece as spm

        self.__dict__.update(state)
        self.sp = spm.SentencePieceProcessor(model_file=self.model_path)


def build_tokenizer(cfg: TokenizerConfig) -> Tokenizer:
    if cfg.kind == "clip_bpe":
        return ClipBPETokenizer(context_length=cfg.context_length)
    if cfg.kind == "sentencepiece":
        return SentencePieceTokenizer(cfg.model_path, cfg.context_length, cfg.add_bos, cfg.lowercase)
    raise ValueError(f"data.tokenizer.kind must be 'clip_bpe' or 'sentencepiece', got {cfg.kind!r}")
