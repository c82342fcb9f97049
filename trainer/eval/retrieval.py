"""Image-text retrieval Recall@K as pure functions of embedding tensors (any model can feed them).

    m = image_text_retrieval(image, text, image_ids, text_ids)   # {"image_to_text_r1": ...}

Ground truth is a set of (image, caption) pairs: sample i says "caption ``text_ids[i]``
describes image ``image_ids[i]``". Samples that share an image id are ONE gallery image (that
is how several captions per image arrive: WebDataset shards repeat the image once per caption,
CSV files have one row per caption; trainer/eval/embed.py makes the ids from the image's pixels
and the caption's tokens). Samples that share a caption id are ONE caption, which then
describes every image it was paired with (Fashion-MNIST's "a photo of a coat" describes 100
images). So:

- image -> text: each distinct image queries the distinct captions; a hit at K when any of its
  captions ranks in the top K (Flickr30k/COCO's protocol with 5 captions per image);
- text -> image: each distinct caption queries the distinct images; a hit at K when any image
  it describes ranks in the top K.

Rank of a query = the number of gallery items that are NOT positives and score at least as high
as its best positive (ties count against the model: an all-equal score matrix gives R@1 = 0,
never 1). Recall@K = mean over queries of [rank < K].

Chance level: a uniformly random ranking of G gallery items, P of them positive, puts a
positive in the top K with probability ``1 - C(G-P, K) / C(G, K)``; ``chance_recall`` averages
that over the queries (1/G for R@1 with one positive each). It is reported beside every recall
as ``*_chance``.
"""
from __future__ import annotations

import torch

DEFAULT_KS = (1, 5, 10)


def _check_pairs(queries: torch.Tensor, gallery: torch.Tensor, pos_q: torch.Tensor,
                 pos_g: torch.Tensor) -> None:
    if queries.dim() != 2 or gallery.dim() != 2 or queries.shape[1] != gallery.shape[1]:
        raise ValueError(f"retrieval needs [Q, e] queries and [G, e] gallery embeddings, got "
                         f"{tuple(queries.shape)} and {tuple(gallery.shape)}")
    if pos_q.shape != pos_g.shape or pos_q.dim() != 1:
        raise ValueError(f"positive pairs need two equal 1-D index tensors, got "
                         f"{tuple(pos_q.shape)} and {tuple(pos_g.shape)}")
    Q, G = queries.shape[0], gallery.shape[0]
    if len(pos_q) and (int(pos_q.min()) < 0 or int(pos_q.max()) >= Q
                       or int(pos_g.min()) < 0 or int(pos_g.max()) >= G):
        raise ValueError(f"positive pair indices out of range for {Q} queries and {G} gallery "
                         "items")
    have = torch.zeros(Q, dtype=torch.bool)
    have[pos_q.cpu()] = True
    if not bool(have.all()):
        raise ValueError(f"{int((~have).sum())} of {Q} queries have no positive gallery item")


@torch.no_grad()
def ranks(queries: torch.Tensor, gallery: torch.Tensor, pos_q: torch.Tensor,
          pos_g: torch.Tensor, chunk: int = 1024) -> torch.Tensor:
    """``[Q]`` int64: per query, how many non-positive gallery items score >= its best positive
    (scores are dot products: pass L2-normalised embeddings for cosine similarity). Positives
    are the pairs ``(pos_q[j], pos_g[j])``; every query needs at least one."""
    _check_pairs(queries, gallery, pos_q, pos_g)
    order = torch.argsort(pos_q, stable=True)
    pos_q, pos_g = pos_q[order].to(queries.device), pos_g[order].to(queries.device)
    out = torch.empty(queries.shape[0], dtype=torch.long)
    gallery_t = gallery.t()
    for start in range(0, queries.shape[0], chunk):
        end = min(start + chunk, queries.shape[0])
        scores = queries[start:end] @ gallery_t                              # [q, G]
        lo, hi = torch.searchsorted(pos_q, torch.tensor([start, end], device=pos_q.device))
        pos = torch.zeros_like(scores, dtype=torch.bool)
        pos[pos_q[lo:hi] - start, pos_g[lo:hi]] = True                      # [q, G]
        best = scores.masked_fill(~pos, float("-inf")).amax(dim=1)          # [q]
        out[start:end] = ((scores >= best[:, None]) & ~pos).sum(dim=1).cpu()
    return out


def recall_at(rank: torch.Tensor, ks: tuple[int, ...] = DEFAULT_KS) -> dict[int, float]:
    """``{K: fraction of queries with rank < K}``."""
    n = max(rank.numel(), 1)
    return {k: float((rank < k).sum()) / n for k in ks}


def chance_recall(num_positives: torch.Tensor, gallery_size: int, k: int) -> float:
    """Expected Recall@K of a uniformly random ranking: the mean over queries of
    ``1 - C(G-P, K) / C(G, K)`` (P = that query's positives, G = ``gallery_size``)."""
    p = num_positives.double()
    miss = torch.ones_like(p)
    for j in range(min(k, gallery_size)):  # C(G-P, K) / C(G, K) = prod_j (G-P-j) / (G-j)
        miss = miss * ((gallery_size - p - j).clamp_min(0) / (gallery_size - j))
    return float((1 - miss).mean()) if p.numel() else 0.0


def dedup(ids: torch.Tensor, emb: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows sharing an id merged: ``(inverse [N] -> unique index, [U, e] embeddings)``, each
    the renormalised mean of its rows (identical rows unless routing depended on the batch)."""
    uniq, inverse = torch.unique(ids.cpu(), return_inverse=True)
    summed = torch.zeros(len(uniq), emb.shape[1], dtype=torch.float64)
    summed.index_add_(0, inverse, emb.detach().cpu().double())
    merged = torch.nn.functional.normalize(summed, dim=-1)
    return inverse, merged.to(device=emb.device, dtype=emb.dtype)


def _directional(q_emb: torch.Tensor, g_emb: torch.Tensor, pos_q: torch.Tensor,
                 pos_g: torch.Tensor, name: str, ks: tuple[int, ...]) -> dict[str, float]:
    rank = ranks(q_emb, g_emb, pos_q, pos_g)
    npos = torch.bincount(pos_q, minlength=q_emb.shape[0])
    out = {}
    for k, r in recall_at(rank, ks).items():
        out[f"{name}_r{k}"] = r
        out[f"{name}_r{k}_chance"] = chance_recall(npos, g_emb.shape[0], k)
    return out


def paired_retrieval(a: torch.Tensor, b: torch.Tensor, pairs: torch.Tensor,
                     names: tuple[str, str], ks: tuple[int, ...] = DEFAULT_KS) -> dict[str, float]:
    """Both directions between ``a [A, e]`` and ``b [B, e]`` given the positive ``pairs [P, 2]``
    (index into a, index into b; duplicates allowed): ``{f"{names[0]}_r{k}", ..._chance,
    f"{names[1]}_r{k}", ...}``."""
    pairs = torch.unique(pairs.long().cpu(), dim=0)
    out = _directional(a, b, pairs[:, 0], pairs[:, 1], names[0], ks)
    out.update(_directional(b, a, pairs[:, 1], pairs[:, 0], names[1], ks))
    return out


def image_text_retrieval(image: torch.Tensor, text: torch.Tensor, image_ids: torch.Tensor,
                         text_ids: torch.Tensor, ks: tuple[int, ...] = DEFAULT_KS) -> dict:
    """Recall@K both ways over the distinct images and captions of N (image, caption) samples
    (see the module docstring). ``image``/``text`` ``[N, e]`` L2-normalised, ids ``[N]`` int64.
    Returns ``image_to_text_r{K}``, ``text_to_image_r{K}`` (+ ``_chance``),
    ``retrieval_images`` and ``retrieval_texts`` (distinct counts)."""
    if image.shape != text.shape or image_ids.shape != text_ids.shape \
            or image_ids.shape[0] != image.shape[0]:
        raise ValueError(f"image {tuple(image.shape)}, text {tuple(text.shape)}, image_ids "
                         f"{tuple(image_ids.shape)} and text_ids {tuple(text_ids.shape)} must "
                         "describe the same N samples")
    img_inv, img = dedup(image_ids, image)
    txt_inv, txt = dedup(text_ids, text)
    out = paired_retrieval(img, txt, torch.stack([img_inv, txt_inv], 1),
                           ("image_to_text", "text_to_image"), ks)
    out.update(retrieval_images=len(img), retrieval_texts=len(txt))
    return out
