"""The zero-shot classifier (trainer/eval/zeroshot.py) built chunk by chunk, and its prompt
tokens kept between evals (trainer/eval/prompts.py), against the former all-at-once code.

- ``classifier`` equals (==, bit for bit) the former implementation (copied below as
  ``classifier_all_at_once``) on the tiny text tower with CLIP BPE, for chunks smaller than,
  not a multiple of, and larger than the templates per class, fp32 and bf16 text outputs; the
  text tower sees the same batches (sizes and token rows) as before;
- it never holds the embeddings of all prompts: the float rows ``[*, e]`` alive at each
  ``encode_text`` call (counted over every live tensor) stay under ``C + chunk + 2T`` rows,
  where the former code reached ``C*T``;
- a second eval of the same set with the same tokenizer does not call the tokenizer and gives
  the same weights and metrics (==); other templates, class names or context length do call
  it; the kept ids are int32 and equal the tokenizer's; at most ``PROMPT_SETS_KEPT`` sets are
  kept (least recently used dropped).
"""
from __future__ import annotations

import gc

import pytest
import torch
import torch.nn.functional as F

from eval_data import tiny_export
from trainer.config import load_config

C, T = 40, 7


@torch.no_grad()
def classifier_all_at_once(encode_text, tokenizer, names, templates, device=None, chunk=256):
    """The former ``trainer.eval.zeroshot.classifier`` (main at a7523b2), verbatim: every
    prompt's embedding held before the per-class mean."""
    prompts = [t.format(n) for n in names for t in templates]
    tokens = tokenizer(prompts).to(device)                                   # [C*T, L]
    emb = torch.cat([encode_text(tokens[i:i + chunk]) for i in range(0, len(tokens), chunk)])
    emb = F.normalize(emb.float(), dim=-1).view(len(names), len(templates), -1).mean(1)
    return F.normalize(emb, dim=-1).t()                                      # [e, C]


@pytest.fixture(scope="module")
def tower(tmp_path_factory):
    """The tiny preset's CLIP with random weights (tests/eval_data.py), loaded as an export."""
    from trainer import hub
    from trainer.eval.names import builtin_classnames, builtin_templates

    export = tmp_path_factory.mktemp("zs") / "export"
    tiny_export(export)
    model = hub.load(export).eval()
    return (model, builtin_classnames("imagenet")[:C], builtin_templates("simple_imagenet")[:T])


class Counting:
    """A tokenizer that counts its calls and the prompts it was given."""

    def __init__(self, inner):
        self.inner, self.calls, self.prompts = inner, 0, 0
        self.context_length = inner.context_length

    def __call__(self, texts):
        self.calls += 1
        self.prompts += len(texts)
        return self.inner(texts)


def bpe(context_length=16):
    from trainer.data.tokenizer import ClipBPETokenizer

    return ClipBPETokenizer(context_length=context_length)


@pytest.mark.parametrize("chunk", [3, 7, 16, 256])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_chunked_classifier_equals_the_all_at_once_code(tower, chunk, dtype):
    from trainer.eval.zeroshot import classifier

    model, names, templates = tower
    seen = {"new": [], "old": []}

    def encoder(which):
        def encode_text(tokens):
            seen[which].append(tokens.clone())
            return model.encode_text(tokens).to(dtype)
        return encode_text

    want = classifier_all_at_once(encoder("old"), bpe(), names, templates, chunk=chunk)
    got = classifier(encoder("new"), bpe(), names, templates, chunk=chunk)
    assert got.shape == (model.encode_text(bpe()(["x"])).shape[1], C)
    assert got.dtype == want.dtype == torch.float32
    # a real classifier: unit columns, no two classes alike
    assert torch.allclose(got.norm(dim=0), torch.ones(C), atol=1e-5)
    assert (got.t() @ got - torch.eye(C)).max() < 0.999
    assert torch.equal(got, want), (got - want).abs().max()
    assert len(seen["new"]) == len(seen["old"]) == -(-C * T // chunk)
    for a, b in zip(seen["new"], seen["old"]):
        assert a.dtype == b.dtype == torch.int64 and torch.equal(a, b)


def live_rows(width: int) -> int:
    """Rows of every live float tensor ``[*, width]`` (parameters aside; the tensors here are
    freed by reference counting, none sits in a cycle)."""
    return sum(t.shape[0] for t in gc.get_objects()
               if type(t) is torch.Tensor and t.is_floating_point() and t.dim() == 2
               and t.shape[1] == width)


@pytest.mark.parametrize("build", ["chunked", "all_at_once"])
def test_classifier_holds_one_chunk_not_all_prompts(tower, build):
    from trainer.eval.zeroshot import classifier

    model, names, templates = tower
    chunk = 16
    width = model.encode_text(bpe()(["x"])).shape[1]
    base = live_rows(width)
    peak = [0]

    def encode_text(tokens):
        peak[0] = max(peak[0], live_rows(width) - base)
        return model.encode_text(tokens)

    fn = classifier if build == "chunked" else classifier_all_at_once
    fn(encode_text, bpe(), names, templates, chunk=chunk)
    if build == "chunked":
        assert 0 < peak[0] <= C + chunk + 2 * T, peak[0]
    else:  # the former code: the measure sees it hold (almost) every prompt's row
        assert peak[0] >= C * T - chunk, peak[0]


def test_second_eval_does_not_tokenise_again(tower):
    from trainer.eval import compute_metrics
    from trainer.eval.embed import Embeddings
    from trainer.eval.names import templates as resolve
    from trainer.eval.prompts import prompt_tokens
    from trainer.eval.zeroshot import classifier

    model, names, _ = tower
    cfg = load_config(None, ["eval.templates=simple_imagenet", "eval.tasks=[zero_shot]"])
    templates = resolve(cfg)
    tok = Counting(bpe())
    g = torch.Generator().manual_seed(0)
    n = 300
    width = model.encode_text(tok.inner(["x"])).shape[1]
    emb = Embeddings(image=F.normalize(torch.randn(n, width, generator=g), dim=-1),
                     image_ids=torch.arange(n), labels=torch.randint(-1, C, (n,), generator=g))
    first = compute_metrics(emb, cfg, model.encode_text, tok, names=names)
    calls = tok.calls
    assert calls >= 1 and tok.prompts == C * len(templates)
    second = compute_metrics(emb, cfg, model.encode_text, tok, names=names)
    assert tok.calls == calls, "the second eval tokenised again"
    assert second == first and 0 < first["zero_shot_images"] < n
    # same weights as tokenising afresh; the kept ids are int32 and the tokenizer's
    w = classifier(model.encode_text, tok, names, templates)
    assert tok.calls == calls
    assert torch.equal(w, classifier_all_at_once(model.encode_text, bpe(), names, templates))
    ids = prompt_tokens(tok, names, templates)
    assert ids.dtype == torch.int32
    assert torch.equal(ids.long(), tok.inner([t.format(c) for c in names for t in templates]))
    # another set, other templates or another context length: tokenised
    for other in ((names[:5], templates), (names, templates[:2])):
        before = tok.calls
        prompt_tokens(tok, *other)
        assert tok.calls > before, other
    tok.context_length = 12
    before = tok.calls
    prompt_tokens(tok, names, templates)
    assert tok.calls > before


def test_least_recently_used_sets_are_dropped():
    from trainer.eval.prompts import PROMPT_SETS_KEPT, prompt_tokens

    tok = Counting(bpe())
    sets = [([f"thing{i}", f"other{i}"], ["a photo of a {}"]) for i in range(PROMPT_SETS_KEPT + 1)]
    for s in sets[:PROMPT_SETS_KEPT]:
        prompt_tokens(tok, *s)
    prompt_tokens(tok, *sets[0])          # used again: now the most recent
    calls = tok.calls
    prompt_tokens(tok, *sets[-1])         # one too many: drops sets[1]
    assert tok.calls == calls + 1
    prompt_tokens(tok, *sets[0])
    assert tok.calls == calls + 1         # kept
    prompt_tokens(tok, *sets[1])
    assert tok.calls == calls + 2         # dropped, tokenised again


def test_empty_sets_name_the_counts():
    from trainer.eval.prompts import prompt_tokens

    with pytest.raises(ValueError, match="got 0 names and 3 templates"):
        prompt_tokens(bpe(), [], ["{}", "a {}", "the {}"])
