"""Evaluation metrics (trainer/eval/) against direct computations.

- retrieval on hand-made 2-D sets: perfect pairs give R@K = 1; a hand-ranked set gives the
  ranks worked out on paper; a second caption of an image counts as a hit; ties count against
  the model (exact);
- shuffled pairs average to the chance level ``1 - C(G-P, K)/C(G, K)`` (Monte Carlo over 300
  permutations, tolerance 5 binomial standard errors); the chance formula equals
  math.comb (1e-12);
- random sets with repeated images (several captions per image) and shared captions equal a
  plain-Python implementation of the documented definition (exact counts, float64);
- region retrieval, grounding accuracy (IoU >= 0.5, the boundary case included) and zero-shot
  top-k equal hand computations; zero-shot top-k on random sets equals the former per-class
  loop and sklearn's balanced accuracy exactly;
- CSV eval sets: several rows of one image become one gallery image; missing file / column
  give one EvalSetError line naming the setting;
- the collective pass through megatron's schedule (evaluate) equals the single-process path
  (embed_plain + compute_metrics) on real Fashion-MNIST shards with CLOC regions and the
  grounding head, for the tiny CLIP at world 1 (embeddings and located boxes to 1e-5, metrics
  exactly);
- tools/evaluate.py: bad input ends with exit 2 and one ``error:`` line; ``--exported`` on a
  CLOC export with the grounding head reports grounding_acc50 equal to the IoU >= 0.5 count
  ratio of boxes located by calling the model directly (exact).
"""
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import peers

ROOT = Path(__file__).resolve().parents[2]
KS = (1, 2, 3)


def unit(*xy):
    return F.normalize(torch.tensor(xy, dtype=torch.float64), dim=-1)


def test_perfect_retrieval_gives_recall_one():
    from trainer.eval.retrieval import image_text_retrieval

    n = 12
    emb = torch.linalg.qr(torch.randn(16, 16, dtype=torch.float64))[0][:n]  # orthonormal rows
    ids = torch.arange(n)
    m = image_text_retrieval(emb, emb.clone(), ids, ids + 100)
    for d in ("image_to_text", "text_to_image"):
        assert [m[f"{d}_r{k}"] for k in (1, 5, 10)] == [1.0, 1.0, 1.0]
        assert m[f"{d}_r1_chance"] == pytest.approx(1 / n, abs=1e-12)
        assert m[f"{d}_r5_chance"] == pytest.approx(5 / n, abs=1e-12)
    assert m["retrieval_images"] == m["retrieval_texts"] == n


def test_hand_ranked_set():
    """Images A=(1,0), B=(0,1), C=(1,1)/sqrt2; captions a=(.8,.6) of A, b=(.6,.8) of B,
    c=(1,0) of C. image->text: A ranks c (1.0) above a (.8): rank 1; B: b first (.8 > .6 > 0):
    rank 0; C: a, b (.99) above c (.71): rank 2. text->image: a: C (.99) > A (.8): rank 1;
    b: C > B: rank 1; c: A (1.0) > C (.71): rank 1."""
    from trainer.eval.retrieval import image_text_retrieval

    image = unit((1, 0), (0, 1), (1, 1))
    text = unit((0.8, 0.6), (0.6, 0.8), (1, 0))
    ids = torch.arange(3)
    m = image_text_retrieval(image, text, ids, ids, ks=KS)
    assert [m[f"image_to_text_r{k}"] for k in KS] == pytest.approx([1 / 3, 2 / 3, 1.0])
    assert [m[f"text_to_image_r{k}"] for k in KS] == [0.0, 1.0, 1.0]
    # a second caption of C, (1,1)/sqrt2: C's best caption now ranks first, and it retrieves C
    image2 = torch.cat([image, image[2:]])
    text2 = torch.cat([text, unit((1, 1))])
    m = image_text_retrieval(image2, text2, torch.tensor([0, 1, 2, 2]), torch.arange(4), ks=KS)
    assert m["retrieval_images"] == 3 and m["retrieval_texts"] == 4
    assert [m[f"image_to_text_r{k}"] for k in KS] == pytest.approx([2 / 3, 1.0, 1.0])
    assert m["text_to_image_r1"] == 0.25  # only the new caption ranks its image first
    # chance with 4 captions, C owning 2: image->text R@1 = mean(1/4, 1/4, 2/4)
    assert m["image_to_text_r1_chance"] == pytest.approx((0.25 + 0.25 + 0.5) / 3, abs=1e-12)


def test_ties_count_against_the_model():
    from trainer.eval.retrieval import image_text_retrieval

    same = torch.ones(5, 4, dtype=torch.float64) / 2
    m = image_text_retrieval(same, same, torch.arange(5), torch.arange(5))
    assert m["image_to_text_r1"] == m["text_to_image_r1"] == 0.0
    assert m["image_to_text_r5"] == 1.0  # all 5 tie: rank 4 < 5


def test_chance_formula_matches_combinatorics():
    from trainer.eval.retrieval import chance_recall

    for g, p, k in [(10, 1, 1), (10, 1, 5), (20, 5, 1), (20, 5, 5), (20, 5, 16), (7, 7, 1)]:
        want = 1 - math.comb(g - p, k) / math.comb(g, k)
        assert chance_recall(torch.tensor([p]), g, k) == pytest.approx(want, abs=1e-12)
    assert chance_recall(torch.tensor([1, 3]), 6, 2) == pytest.approx(
        (1 - math.comb(5, 2) / 15 + 1 - math.comb(3, 2) / 15) / 2, abs=1e-12)


def test_shuffled_pairs_average_to_chance():
    """The pairing of a perfect set shuffled: every positive lands at a uniformly random rank,
    so the mean recall over permutations is the chance level. Groups: 20 images, 4 captions
    shared by 5 images each (as Fashion-MNIST's class captions)."""
    from trainer.eval.retrieval import image_text_retrieval

    g = torch.Generator().manual_seed(0)
    n, trials = 20, 300
    image = F.normalize(torch.randn(n, 32, generator=g, dtype=torch.float64), dim=-1)
    caption_of = torch.arange(n) % 4
    text = F.normalize(torch.randn(4, 32, generator=g, dtype=torch.float64), dim=-1)[caption_of]
    keys = [f"{d}_r{k}" for d in ("image_to_text", "text_to_image") for k in (1, 2)]
    total = dict.fromkeys(keys, 0.0)
    queries = {"image_to_text": n, "text_to_image": 4}
    for _ in range(trials):
        perm = torch.randperm(n, generator=g)
        m = image_text_retrieval(image[perm], text, torch.arange(n), caption_of, ks=(1, 2))
        for k in keys:
            total[k] += m[k] / trials
    for k in keys:
        chance = m[f"{k}_chance"]
        se = math.sqrt(chance * (1 - chance) / (trials * queries[k.rsplit("_", 1)[0]]))
        assert abs(total[k] - chance) < 5 * se, (k, total[k], chance, se)
    assert m["image_to_text_r1_chance"] == pytest.approx(0.25)           # 1 of 4 captions
    assert m["text_to_image_r1_chance"] == pytest.approx(0.25)           # 5 of 20 images
    assert m["text_to_image_r2_chance"] == pytest.approx(1 - math.comb(15, 2) / math.comb(20, 2))


def _direct(image, text, image_ids, text_ids, ks):
    """The definition in plain Python: distinct images / captions, rank = non-positives
    scoring >= the best positive."""
    imgs, txts, pairs = {}, {}, set()
    for i in range(len(image_ids)):
        imgs.setdefault(int(image_ids[i]), image[i].tolist())
        txts.setdefault(int(text_ids[i]), text[i].tolist())
        pairs.add((int(image_ids[i]), int(text_ids[i])))
    dot = lambda a, b: sum(x * y for x, y in zip(a, b))  # noqa: E731
    out = {}
    for name, qs, gs, pos in (("image_to_text", imgs, txts, pairs),
                              ("text_to_image", txts, imgs, {(t, i) for i, t in pairs})):
        hits = dict.fromkeys(ks, 0)
        for q, qe in qs.items():
            scores = {gid: dot(qe, ge) for gid, ge in gs.items()}
            best = max(s for gid, s in scores.items() if (q, gid) in pos)
            rank = sum(1 for gid, s in scores.items() if (q, gid) not in pos and s >= best)
            for k in ks:
                hits[k] += rank < k
        out.update({f"{name}_r{k}": hits[k] / len(qs) for k in ks})
    return out


def test_matches_direct_computation_with_shared_images_and_captions():
    from trainer.eval.retrieval import image_text_retrieval

    g = torch.Generator().manual_seed(1)
    for trial in range(5):
        n_img, n_cap = 15, 25
        base_img = F.normalize(torch.randn(n_img, 8, generator=g, dtype=torch.float64), dim=-1)
        base_txt = F.normalize(base_img[torch.randint(0, n_img, (n_cap,), generator=g)]
                               + 0.8 * torch.randn(n_cap, 8, generator=g, dtype=torch.float64),
                               dim=-1)
        # 40 samples: every image at least once (several captions per image), captions reused
        image_ids = torch.cat([torch.arange(n_img), torch.randint(0, n_img, (25,), generator=g)])
        text_ids = torch.randint(0, n_cap, (40,), generator=g)
        got = image_text_retrieval(base_img[image_ids], base_txt[text_ids], image_ids + 7,
                                   text_ids * 3)
        want = _direct(base_img[image_ids], base_txt[text_ids], image_ids, text_ids, (1, 5, 10))
        for k, v in want.items():
            assert got[k] == pytest.approx(v, abs=1e-12), (trial, k)
        assert got["retrieval_images"] == n_img
        assert got["retrieval_texts"] == len(torch.unique(text_ids))


def test_region_retrieval_by_hand():
    """Regions r0=(1,0), r1=(0,1), r2=(1,1)/sqrt2; r0 and r2 share caption x=(1,0.2), r1 has
    y=(0,1). region->text: r0 x (.98) > y: hit; r1 y: hit; r2: x (.83) > y (.71): hit.
    text->region: x: r0 (.98) first: hit; y: r1 (.98) first: hit."""
    from trainer.eval.regions import region_retrieval

    region = unit((1, 0), (0, 1), (1, 1))
    text = unit((1, 0.2), (0, 1), (1, 0.2))
    m = region_retrieval(region, text, torch.tensor([5, 6, 5]), ks=(1,))
    assert m["region_to_text_r1"] == 1.0 and m["text_to_region_r1"] == 1.0
    assert m["regions"] == 3 and m["region_texts"] == 2
    assert m["region_to_text_r1_chance"] == pytest.approx(0.5)
    assert m["text_to_region_r1_chance"] == pytest.approx((2 / 3 + 1 / 3) / 2)
    # r1's caption becomes (1,0): r0 scores it (1.0) above its own x (.98), r1 scores it 0
    # below x (.20); only r2 still hits
    m = region_retrieval(region, unit((1, 0.2), (1, 0), (1, 0.2)), torch.tensor([5, 6, 5]),
                         ks=(1,))
    assert m["region_to_text_r1"] == pytest.approx(1 / 3)


def test_grounding_accuracy_by_hand():
    """Boxes as fractions: p0 = t0 (IoU 1, hit); p1 is t1's left half (IoU 0.5 exactly: a hit,
    the threshold is >=); p2 overlaps t2 by 1/3 of the union (IoU 1/3: miss); p3 is disjoint
    from t3 (IoU 0: miss). 2 hits of 4; mean IoU (1 + .5 + 1/3 + 0) / 4."""
    from trainer.eval.regions import grounding_accuracy

    target = torch.tensor([[0.1, 0.1, 0.5, 0.5], [0.0, 0.0, 0.5, 0.5],
                           [0.0, 0.0, 0.5, 0.5], [0.0, 0.0, 0.2, 0.2]])
    pred = torch.tensor([[0.1, 0.1, 0.5, 0.5], [0.0, 0.0, 0.25, 0.5],
                         [0.25, 0.0, 0.75, 0.5], [0.5, 0.5, 0.9, 0.9]])
    m = grounding_accuracy(pred, target)
    assert m["grounding_acc50"] == 0.5 and m["grounding_regions"] == 4
    assert m["grounding_miou"] == pytest.approx((1 + 0.5 + 1 / 3 + 0) / 4, abs=1e-12)
    assert grounding_accuracy(pred, target, threshold=0.3)["grounding_acc50"] == 0.75
    with pytest.raises(ValueError, match=r"\[M, 4\]"):
        grounding_accuracy(pred[:, :3], target[:, :3])


def test_zero_shot_topk_by_hand():
    from trainer.eval.zeroshot import zero_shot_topk

    w = torch.eye(6, dtype=torch.float64)[:, :6]                   # class c = axis c
    image = torch.zeros(4, 6, dtype=torch.float64)
    image[0, 2] = 1                                                # class 2: top-1 hit
    image[1] = torch.tensor([0.9, 0.8, 0.7, 0.6, 0.5, 0.1])        # label 4: 5th -> top-5 hit
    image[2] = torch.tensor([0.9, 0.8, 0.7, 0.6, 0.5, 0.1])        # label 5: 6th -> miss
    image[3, 0] = 1                                                # label -1: not counted
    m = zero_shot_topk(image, torch.tensor([2, 4, 5, -1]), w)
    assert m == {"zero_shot_top1": pytest.approx(1 / 3), "zero_shot_top5": pytest.approx(2 / 3),
                 "zero_shot_mean_per_class_recall": pytest.approx(1 / 3),
                 "zero_shot_classes": 6, "zero_shot_images": 3}
    # mean per-class recall weighs classes, not images: class 2 twice (both hits), class 5 once
    image2 = torch.cat([image[:1], image[:1], image[2:3]])
    m2 = zero_shot_topk(image2, torch.tensor([2, 2, 5]), w)
    assert m2["zero_shot_top1"] == pytest.approx(2 / 3)
    assert m2["zero_shot_mean_per_class_recall"] == pytest.approx(0.5)
    with pytest.raises(ValueError, match="label 7 but only 6 class names"):
        zero_shot_topk(image, torch.tensor([7, 0, 0, 0]), w)


def _zero_shot_loop(image, labels, weights) -> dict:
    """zero_shot_topk as it was before vectorising (commit 6d8cc3c): a loop over the
    classes present for the per-class recall."""
    import numpy as np

    keep = labels >= 0
    logits = image[keep].float() @ weights.float()
    top = logits.topk(min(5, logits.shape[1]), dim=1).indices
    target = labels[keep]
    hit = top == target[:, None]
    n = int(keep.sum())
    per_class = np.array([int(hit[target == c, 0].sum()) / int((target == c).sum())
                          for c in torch.unique(target).tolist()], dtype=np.float64)
    return {"zero_shot_top1": float(hit[:, 0].sum()) / max(n, 1),
            "zero_shot_top5": float(hit.any(1).sum()) / max(n, 1),
            "zero_shot_mean_per_class_recall": float(per_class.mean()) if n else 0.0,
            "zero_shot_classes": int(weights.shape[1]), "zero_shot_images": n}


@pytest.mark.parametrize("seed", range(4))
def test_zero_shot_topk_equals_the_class_loop_and_sklearn(seed):
    """Random sets (3-40 classes, some never a label, ~10% unlabelled, 1-300 images) give
    exactly (==, floats included) the pre-vectorisation loop's numbers, and the mean
    per-class recall equals sklearn's balanced_accuracy_score of the top-1 predictions
    (clip_benchmark's mean_per_class_recall) exactly."""
    import warnings

    from sklearn.metrics import balanced_accuracy_score

    from trainer.eval.zeroshot import zero_shot_topk

    g = torch.Generator().manual_seed(seed)
    C = int(torch.randint(3, 41, (1,), generator=g))
    N = int(torch.randint(1, 301, (1,), generator=g))
    weights = F.normalize(torch.randn(16, C, generator=g), dim=0)
    image = F.normalize(torch.randn(N, 16, generator=g), dim=-1)
    used = torch.randperm(C, generator=g)[:max(1, C * 2 // 3)]   # a third never labelled
    labels = used[torch.randint(0, len(used), (N,), generator=g)]
    labels[torch.rand(N, generator=g) < 0.1] = -1
    got = zero_shot_topk(image, labels, weights)
    assert got == _zero_shot_loop(image, labels, weights)
    keep = labels >= 0
    if keep.any():
        pred = (image[keep] @ weights).argmax(1)
        with warnings.catch_warnings():  # "y_pred contains classes not in y_true"
            warnings.simplefilter("ignore")
            want = balanced_accuracy_score(labels[keep].numpy(), pred.numpy())
        assert got["zero_shot_mean_per_class_recall"] == want


def test_bad_shapes_name_the_shapes():
    from trainer.eval.retrieval import image_text_retrieval, ranks

    with pytest.raises(ValueError, match=r"image \(3, 4\), text \(2, 4\)"):
        image_text_retrieval(torch.zeros(3, 4), torch.zeros(2, 4), torch.arange(3),
                             torch.arange(3))
    with pytest.raises(ValueError, match="1 of 2 queries have no positive"):
        ranks(torch.zeros(2, 4), torch.zeros(3, 4), torch.tensor([0]), torch.tensor([1]))


# ----------------------------------------------------------------------------- eval sets

def cfg_of(*overrides):
    from trainer.config import load_config
    return load_config(None, [f"model.text.vocab_size={peers.VOCAB}", *overrides])


def _csv_set(tmp_path, header="filepath,title,label"):
    from PIL import Image

    for i, color in enumerate(("red", "green", "blue")):
        Image.new("RGB", (40, 30), color).save(tmp_path / f"im{i}.png")
    rows = ["im0.png,a red square,0", "im0.png,something red,0", "im1.png,a green square,1",
            "im2.png,a blue square,2", "im1.png,the green one,1", "missing.png,nothing,0"]
    (tmp_path / "val.csv").write_text(header + "\n" + "\n".join(rows) + "\n")
    return tmp_path / "val.csv"


def test_csv_eval_set_groups_captions_of_one_image(tmp_path):
    from trainer.data import build_tokenizer
    from trainer.eval.embed import batch_ids, eval_batches

    path = _csv_set(tmp_path)
    cfg = cfg_of(f"eval.csv={path}", "eval.csv_label_key=label", "data.image_size=32",
                 "data.workers=0", "data.batch_size=4", "data.tokenizer.context_length=16")
    tok = build_tokenizer(cfg.data.tokenizer)
    batches = list(eval_batches(cfg, 0, 1, tok))
    assert [b["images"].shape[0] for b in batches] == [4, 1]  # the missing image skipped
    ids = [batch_ids(b, regions=False) for b in batches]
    image_ids = torch.cat([i["image_ids"] for i in ids])
    assert image_ids[0] == image_ids[1] and image_ids[2] == image_ids[4]   # same file
    assert len(torch.unique(image_ids)) == 3
    assert len(torch.unique(torch.cat([i["text_ids"] for i in ids]))) == 5
    assert torch.cat([i["labels"] for i in ids]).tolist() == [0, 0, 1, 2, 1]
    # data-parallel split: rank 1 of 2 gets rows 1, 3, 5 (5 is the missing image)
    assert sum(b["images"].shape[0] for b in eval_batches(cfg, 1, 2, tok)) == 2


def test_bad_eval_sets_raise_one_line(tmp_path):
    from trainer.eval.embed import EvalSetError, check_eval_set

    cases = [(("data.eval_urls=",), "no eval set"),
             ((f"data.eval_urls={tmp_path}/nope-{{000..001}}.tar",), "does not exist"),
             ((f"eval.csv={tmp_path}/nope.csv",), "does not exist"),
             ((f"eval.csv={_csv_set(tmp_path, 'image,caption,label')}",),
              r"no column eval.csv_image_key='filepath', eval.csv_caption_key='title'"),
             ((f"eval.csv={tmp_path / 'val.csv'}", "eval.csv_image_key=image",
               "eval.csv_caption_key=caption", "eval.csv_label_key=cls"), "eval.csv_label_key")]
    for overrides, match in cases:
        with pytest.raises(EvalSetError, match=match) as e:
            check_eval_set(cfg_of(*overrides))
        assert "\n" not in str(e.value)


def test_evaluate_cli_bad_input_exit_2(tmp_path):
    env = {"PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"}
    proc = subprocess.run([sys.executable, str(ROOT / "tools/evaluate.py"), "--checkpoint",
                           str(tmp_path / "none")], capture_output=True, text=True, env=env,
                          timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and proc.stderr.startswith("error: ")
    assert "not a checkpoint" in proc.stderr


# ----------------------------------------------------------------------------- the model pass

class _PlainCLIP:
    """This repo's CLIP (world 1) seen through the plain-model protocol of embed_plain."""

    def __init__(self, model):
        self.model = model

    def encode_image(self, images):
        return self.model.encode_image(images)

    def encode_text(self, tokens):
        return self.model.encode_text(tokens)

    def encode_regions(self, images, boxes):
        return self.model.prompter(self.model.visual(images, return_tokens=True)[1], boxes)

    def locate_regions(self, images, region_text):
        return self.model.prompter.ground(self.model.visual(images, return_tokens=True)[1],
                                          region_text)


def test_schedule_pass_equals_plain_pass_with_regions(dist1, tmp_path):
    from trainer.data import build_tokenizer, sources
    from trainer.data.writer import write_shards
    from trainer.eval import compute_metrics, evaluate
    from trainer.eval.embed import embed_distributed, embed_plain, eval_batches
    from trainer.models.build import build_for_training
    from trainer.distributed.grads import wrap_ddp

    write_shards(sources.fashion_mnist("test", count=40, regions="box"), tmp_path, "fm", 20,
                 info={"classnames": list(sources.FASHION_MNIST_CLASSES)})
    cfg = cfg_of("model.text.vocab_size=49408", f"data.eval_urls={tmp_path}",
                 "data.batch_size=16", "data.image_size=32", "data.workers=0",
                 "data.max_regions=2", "model.prompter.layers=1",
                 "model.prompter.grounding=true", "data.tokenizer.context_length=16")
    tok = build_tokenizer(cfg.data.tokenizer)
    torch.manual_seed(0)
    model = build_for_training(cfg, dist1)
    ddp = wrap_ddp(model)
    got = evaluate(ddp, cfg, dist1, tok)
    assert got["eval_images"] == 40 and got["regions"] == 40 and got["retrieval_texts"] <= 10
    assert model.training  # mode restored
    model.eval()
    with torch.no_grad():
        plain = embed_plain(_PlainCLIP(model), eval_batches(cfg, 0, 1, tok), regions=True,
                            ground=True)
        want = compute_metrics(plain, cfg, model.encode_text, tok)
        emb = embed_distributed(ddp, cfg, dist1, tok, regions=True)
    for field in ("image", "text", "region", "region_text", "region_box_pred"):
        assert torch.allclose(getattr(emb, field), getattr(plain, field), atol=1e-5), field
    assert torch.equal(emb.region_box, plain.region_box) and emb.region_box.shape == (40, 4)
    assert got["grounding_regions"] == 40 and 0 <= got["grounding_acc50"] <= 1
    for field in ("image_ids", "text_ids", "labels", "captioned", "region_text_ids"):
        assert torch.equal(getattr(emb, field), getattr(plain, field)), field
    assert got == want
    # tasks: zero-shot only skips the text pass; an unlabelled set skips zero-shot
    only = evaluate(ddp, cfg, dist1, tok, tasks=("zero_shot",))
    assert set(only) == {"eval_images", "zero_shot_top1", "zero_shot_top5", "zero_shot_images",
                         "zero_shot_mean_per_class_recall", "zero_shot_classes", "acc1", "acc5",
                         "mean_per_class_recall"}
    assert only["zero_shot_top1"] == got["zero_shot_top1"]


def _iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """IoU of xyxy boxes ``[M, 4]`` row by row, float64, written out here."""
    a, b = a.double(), b.double()
    w = (torch.minimum(a[:, 2], b[:, 2]) - torch.maximum(a[:, 0], b[:, 0])).clamp(min=0)
    h = (torch.minimum(a[:, 3], b[:, 3]) - torch.maximum(a[:, 1], b[:, 1])).clamp(min=0)
    inter = w * h
    area = ((a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1]) + (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1]))
    return inter / (area - inter)


def test_evaluate_cli_grounding_accuracy_of_an_export(tmp_path):
    """tools/evaluate.py --exported on a CLOC export with the grounding head (tiny preset,
    random weights) and a region shard written here: grounding_acc50 equals the fraction of
    regions whose box, located by calling the model directly (open_clip's eval transform,
    locate_regions on each region caption's normalised text embedding), has IoU >= 0.5 with
    the region's box (exact: a ratio of counts); grounding_miou within 1e-6. The regions' boxes
    are made from those direct predictions: every other one the predicted box clipped to the
    image (the boxes reach past the edges: IoU 0.46-1, 8 of 9 hits), the rest that box shrunk
    to 0.6 of its sides (IoU <= 0.36: a miss), so the expected accuracy is neither 0 nor 1
    (8/18); no IoU lies within 1e-3 of 0.5. The shrunk boxes are 1.5-4 px wide:
    ``data.augment.min_box_size=0.5`` keeps them all."""
    import io
    import json

    import numpy as np
    import open_clip
    from PIL import Image

    from eval_data import tiny_export, write_tar
    from trainer import hub

    sys.path.insert(0, str(ROOT / "tools"))
    import evaluate as cli

    S, n_images, per_image = 32, 6, 3
    tiny_export(tmp_path / "export", seed=4, size=S, prompter_layers=1, grounding=True)
    model, tok = hub.load(tmp_path / "export"), hub.load_tokenizer(tmp_path / "export")
    rng = np.random.default_rng(0)
    pngs, pixels, captions = [], [], []
    pre = open_clip.image_transform(S, is_train=False)
    for i in range(n_images):
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (S, S, 3), dtype=np.uint8)).save(buf, "PNG")
        pngs.append(buf.getvalue())
        pixels.append(pre(Image.open(io.BytesIO(pngs[-1]))))
        captions.append([f"the {w} thing number {i}" for w in ("red", "round", "left")[:per_image]])
    images = torch.stack(pixels)                                              # [6, 3, S, S]
    with torch.no_grad():
        text = F.normalize(model.encode_text(tok(sum(captions, []))), dim=-1)
        pred = model.locate_regions(images, text.view(n_images, per_image, -1))  # [6, 3, 4]
    pred = pred.reshape(-1, 4)                                                # [M, 4]
    target = pred.clamp(0, 1)
    centre, half = (target[:, :2] + target[:, 2:]) / 2, (target[:, 2:] - target[:, :2]) / 2
    shrunk = torch.cat([centre - 0.6 * half, centre + 0.6 * half], dim=1)
    miss = torch.arange(len(target)) % 2 == 1
    target[miss] = shrunk[miss]
    iou = _iou(pred, target)
    want_acc = int((iou >= 0.5).sum()) / len(iou)
    assert 0 < want_acc < 1 and bool((iou[miss] < 0.37).all())
    assert bool(((iou - 0.5).abs() > 1e-3).all())  # no IoU that 1e-6 of box noise could flip

    boxes = (target * S).tolist()  # stored-image pixels: the eval transform keeps S x S as is
    write_tar(tmp_path / "regions-000.tar", [
        {"__key__": f"s{i}", "png": pngs[i], "txt": f"picture {i}".encode(),
         "json": json.dumps({"caption": f"picture {i}", "regions": [
             {"bbox": boxes[i * per_image + j], "caption": captions[i][j]}
             for j in range(per_image)]}).encode()} for i in range(n_images)])
    out = tmp_path / "eval.json"
    assert cli.main(["--exported", str(tmp_path / "export"), "--eval-urls",
                     str(tmp_path / "regions-000.tar"), "--out", str(out), "data.workers=0",
                     "data.eval_batch_size=4", "data.augment.min_box_size=0.5"]) == 0
    got = json.loads(out.read_text())["metrics"]
    assert got["grounding_regions"] == len(iou) == n_images * per_image
    assert got["grounding_acc50"] == want_acc
    assert got["grounding_miou"] == pytest.approx(float(iou.mean()), abs=1e-6)
