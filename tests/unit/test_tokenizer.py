"""Tokenizers: CLIP BPE ids equal open_clip's; SentencePiece framing, padding, errors."""
from __future__ import annotations

import pickle
import random

import pytest
import torch

from trainer.data.config import TokenizerConfig
from trainer.data.tokenizer import ClipBPETokenizer, SentencePieceTokenizer, build_tokenizer

VARIED = [
    "a photo of a cat",
    "A Photo Of A DOG.",
    "Hello, World!!! 123 4567 3.14159 $100 50% #hashtag @user",
    "  lots   of\twhitespace\n here  ",
    "it's they're we've I'm you'll he'd",
    "&amp; &lt;b&gt; html &amp;amp; entities",
    "\u201ccurly quotes\u201d and \u2014 dashes\u2026",
    "caf\u00e9 na\u00efve r\u00e9sum\u00e9 \u00dcber \u00df",
    "\uff26\uff35\uff2c\uff2c\uff37\uff29\uff24\uff34\uff28 text",  # full-width
    "\ufb01ne ligature",
    "\u65e5\u672c\u8a9e\u306e\u30c6\u30ad\u30b9\u30c8",
    "\u041f\u0440\u0438\u0432\u0435\u0442 \u043c\u0438\u0440 and \u0645\u0631\u062d\u0628\u0627",
    "emoji \U0001f431\U0001f680 test",
    "",
    "   ",
    "tab\tnewline\r\ncarriage",
    "x" * 300,
    " ".join(["word"] * 100),
    "\U0001f600" * 50,
    "2024-01-01T12:00:00Z e=mc^2 a_b_c ~tilde~ [brackets] {braces} <angle>",
]


def _random_texts(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    alphabet = ("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789 .,;:!?'\"-()[]"
                "\u00e9\u00e0\u00fc\u00df\u00e7\u00f1\u6f22\u5b57\U0001f642\t\n&")
    return ["".join(rng.choice(alphabet) for _ in range(rng.randint(0, 120))) for _ in range(n)]


@pytest.fixture(scope="module")
def clip_tok() -> ClipBPETokenizer:
    return ClipBPETokenizer(context_length=77)


def test_clip_bpe_matches_open_clip(clip_tok):
    open_clip = pytest.importorskip("open_clip")
    texts = VARIED + _random_texts(200)
    ours = clip_tok(texts)
    ref = open_clip.tokenize(texts)
    assert ours.dtype == torch.long and ours.shape == (len(texts), 77)
    bad = [t for t, a, b in zip(texts, ours, ref) if not torch.equal(a, b)]
    assert not bad, f"{len(bad)} texts differ from open_clip, e.g. {bad[:2]!r}"


@pytest.mark.parametrize("context_length", [5, 16, 77])
def test_clip_bpe_short_context_matches_open_clip(clip_tok, context_length):
    open_clip = pytest.importorskip("open_clip")
    tok = ClipBPETokenizer(context_length=context_length)
    texts = VARIED[:8] + ["a very long caption " * 20]
    assert torch.equal(tok(texts), open_clip.tokenize(texts, context_length=context_length))


def test_clip_bpe_ids_and_interface(clip_tok):
    assert (clip_tok.vocab_size, clip_tok.sot_token_id, clip_tok.eot_token_id, clip_tok.pad_token_id) \
        == (49408, 49406, 49407, 0)
    row = clip_tok(["a photo of a cat"])[0]
    assert row[:7].tolist() == [49406, 320, 1125, 539, 320, 2368, 49407]
    assert row[7:].eq(0).all()
    assert clip_tok.decode(row.tolist()) == "a photo of a cat"
    assert torch.equal(clip_tok("a cat"), clip_tok(["a cat"]))  # a bare string is one row


def test_exactly_one_eot_per_row_even_truncated(clip_tok):
    texts = VARIED + ["word " * 500, "<start_of_text> literal specials <end_of_text> inside"]
    for L in (2, 3, 16, 77):
        tok = ClipBPETokenizer(context_length=L)
        ids = tok(texts)
        assert (ids == tok.eot_token_id).sum(1).eq(1).all(), L
        assert (ids[:, 0] == tok.sot_token_id).all()
        long_row = ids[len(VARIED)]
        assert long_row[-1] == tok.eot_token_id


def test_clip_tokenizer_pickles(clip_tok):
    clone = pickle.loads(pickle.dumps(clip_tok))
    assert torch.equal(clone(VARIED), clip_tok(VARIED))


# ---------------------------------------------------------------------------- sentencepiece

def _captions(n: int) -> list[str]:
    rng = random.Random(1)
    colors = ["red", "green", "blue", "yellow", "purple", "orange", "white"]
    shapes = ["circle", "square", "triangle", "diamond"]
    return [f"a {rng.choice(colors)} {rng.choice(shapes)} next to a {rng.choice(colors)} "
            f"{rng.choice(shapes)}" for _ in range(n)]


@pytest.fixture(scope="module")
def sp_models(tmp_path_factory) -> dict[str, str]:
    spm = pytest.importorskip("sentencepiece")
    d = tmp_path_factory.mktemp("spm")
    out = {}
    for name, pad in (("with_pad", 3), ("no_pad", -1)):
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(_captions(2000)), model_prefix=str(d / name), vocab_size=60,
            model_type="bpe", pad_id=pad, unk_id=0, bos_id=1, eos_id=2, minloglevel=2)
        out[name] = str(d / f"{name}.model")
    return out


def test_sentencepiece_round_trip_eot_and_padding(sp_models):
    tok = build_tokenizer(TokenizerConfig(kind="sentencepiece", model_path=sp_models["with_pad"],
                                          context_length=24))
    assert (tok.sot_token_id, tok.eot_token_id, tok.pad_token_id) == (1, 2, 3)
    texts = ["a red circle next to a blue square", "a green diamond", ""]
    ids = tok(texts)
    assert ids.shape == (3, 24) and ids.dtype == torch.long
    for row, text in zip(ids, texts):
        n = int((row != tok.pad_token_id).sum())
        assert row[0] == tok.sot_token_id and row[n - 1] == tok.eot_token_id
        assert row[n:].eq(tok.pad_token_id).all()
        assert tok.decode(row.tolist()) == text
    assert (ids == tok.eot_token_id).sum(1).eq(1).all()


def test_sentencepiece_truncation_keeps_one_eot(sp_models):
    tok = SentencePieceTokenizer(sp_models["with_pad"], context_length=6)
    ids = tok(["a red circle next to a blue square next to a green diamond"])
    assert ids.shape == (1, 6)
    assert ids[0, 0] == tok.sot_token_id and ids[0, -1] == tok.eot_token_id
    assert (ids == tok.eot_token_id).sum() == 1


def test_sentencepiece_without_pad_or_bos(sp_models):
    tok = SentencePieceTokenizer(sp_models["no_pad"], context_length=12, add_bos=False)
    ids = tok(["a red circle"])
    assert tok.pad_token_id == 0 and ids[0, 0] != 1
    assert (ids == tok.eot_token_id).sum() == 1
    clone = pickle.loads(pickle.dumps(tok))
    assert torch.equal(clone(["a red circle"]), ids)


def test_sentencepiece_missing_model_names_path_and_key(tmp_path):
    missing = tmp_path / "nope.model"
    with pytest.raises(FileNotFoundError) as e:
        build_tokenizer(TokenizerConfig(kind="sentencepiece", model_path=str(missing)))
    assert str(missing) in str(e.value) and "data.tokenizer.model_path" in str(e.value)


def test_unknown_kind_names_key():
    with pytest.raises(ValueError, match="data.tokenizer.kind"):
        build_tokenizer(TokenizerConfig(kind="wordpiece"))
