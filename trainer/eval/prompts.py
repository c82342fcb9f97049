"""The token ids of a zero-shot set's class prompts, tokenised once per tokenizer and set.

    tokens = prompt_tokens(tokenizer, names, templates)   # [C*T, L] int32, CPU
    # row c*T + t holds templates[t].format(names[c])

The in-training eval scores the same set every ``eval.every`` steps; ImageNet with OpenAI's 80
templates is 80,000 prompts (more than the tokenizer's row cache holds), about 1.2-1.7 s of BPE
each time on this CPU. The ids are therefore kept, per tokenizer object (dropped with it) and
per ``(class names, templates, context length)``, for the ``PROMPT_SETS_KEPT`` sets used last;
stored as int32 (80,000 x 77 ids: 24.6 MB, half of the tokenizer's int64) and widened per chunk
by the caller.
"""
from __future__ import annotations

import weakref
from collections import OrderedDict

import torch

PROMPT_SETS_KEPT = 8
_INT32 = torch.iinfo(torch.int32)

# tokenizer -> {(names, templates, context length): [C*T, L] int32}, most recently used last
_kept: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def prompt_tokens(tokenizer, names: list[str], templates: list[str],
                  chunk: int = 4096) -> torch.Tensor:
    """``[C*T, L]`` int32 CPU token ids of every prompt, class-major (row ``c*T + t`` is
    ``templates[t].format(names[c])``). Tokenised ``chunk`` prompts at a time on the first
    call for this tokenizer and set; later calls return the same tensor (do not write to it)."""
    if not names or not templates:
        raise ValueError(f"zero-shot prompts need class names and templates, got {len(names)} "
                         f"names and {len(templates)} templates")
    key = (tuple(names), tuple(templates), getattr(tokenizer, "context_length", None))
    try:
        sets = _kept.setdefault(tokenizer, OrderedDict())
    except TypeError:  # a tokenizer that cannot be weakly referenced: tokenise every time
        sets = OrderedDict()
    if key in sets:
        sets.move_to_end(key)
        return sets[key]
    prompts = [t.format(n) for n in names for t in templates]
    tokens = None
    for i in range(0, len(prompts), chunk):
        part = tokenizer(prompts[i:i + chunk])                              # [n, L] int64
        if part.dim() != 2 or len(part) != len(prompts[i:i + chunk]):
            raise ValueError(f"tokenizer returned {tuple(part.shape)} for "
                             f"{len(prompts[i:i + chunk])} prompts")
        if part.numel() and (int(part.min()) < _INT32.min or int(part.max()) > _INT32.max):
            raise ValueError(f"token ids {int(part.min())}..{int(part.max())} do not fit int32")
        if tokens is None:
            tokens = torch.empty(len(prompts), part.shape[1], dtype=torch.int32)
        tokens[i:i + len(part)] = part
    sets[key] = tokens
    while len(sets) > PROMPT_SETS_KEPT:
        sets.popitem(last=False)
    return tokens
