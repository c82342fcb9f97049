"""Box-aware transforms: boxes follow the pixels through every crop, resize and flip."""
from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from trainer.data.transforms import (Boxes, ImageTransform, center_crop, hflip, resize_short_side,
                                     resized_crop, sample_crop)


def _img(w: int, h: int) -> Image.Image:
    return Image.new("RGB", (w, h), (0, 0, 0))


def test_resized_crop_then_flip_hand_computed():
    # 200x100 image, box (50,20)-(150,80); crop x0=100,y0=0,w=h=100 -> 50x50 (scale 0.5).
    img, boxes = resized_crop(_img(200, 100), Boxes.of([[50, 20, 150, 80]]), (100, 0, 100, 100), 50, 50)
    assert img.size == (50, 50)
    np.testing.assert_allclose(boxes.full, [[-25, 10, 25, 40]])
    np.testing.assert_allclose(boxes.vis, [[0, 10, 25, 40]])
    kept, keep = boxes.finish(min_visibility=0.5, min_size=1)  # exactly half visible: kept
    np.testing.assert_allclose(kept, [[0, 10, 25, 40]])
    assert keep.tolist() == [True]
    assert boxes.finish(min_visibility=0.6, min_size=1)[1].tolist() == [False]
    img, boxes = hflip(img, boxes)
    np.testing.assert_allclose(boxes.vis, [[25, 10, 50, 40]])


def test_resize_then_center_crop_hand_computed():
    # 200x100 -> short side 50 -> 100x50 (scale 0.5) -> center crop 50: left 25, top 0.
    boxes = Boxes.of([[50, 20, 150, 80], [0, 0, 20, 20], [60, 0, 140, 100]])
    img, boxes = resize_short_side(_img(200, 100), boxes, 50)
    assert img.size == (100, 50)
    np.testing.assert_allclose(boxes.vis, [[25, 10, 75, 40], [0, 0, 10, 10], [30, 0, 70, 50]])
    img, boxes = center_crop(img, boxes, 50)
    assert img.size == (50, 50)
    np.testing.assert_allclose(boxes.vis, [[0, 10, 50, 40], [0, 0, 0, 10], [5, 0, 45, 50]])
    kept, keep = boxes.finish(min_visibility=0.5, min_size=2)
    # box 0: 50x30 of 50x30 -> visible fraction 1.0; box 1 left the crop; box 2 fully inside
    assert keep.tolist() == [True, False, True]
    np.testing.assert_allclose(kept, [[0, 10, 50, 40], [5, 0, 45, 50]])


def test_eval_transform_outputs_normalised_boxes():
    t = ImageTransform(size=50, train=False, min_visibility=0.5, min_size=2)
    x, boxes, keep = t(_img(200, 100), np.array([[50, 20, 150, 80], [0, 0, 20, 20]]))
    assert x.shape == (3, 50, 50) and x.dtype == torch.float32
    assert keep.tolist() == [True, False]
    np.testing.assert_allclose(boxes, [[0.0, 0.2, 1.0, 0.8]])


def test_clip_normalisation():
    t = ImageTransform(size=4, train=False)
    x, _, _ = t(Image.new("RGB", (4, 4), (255, 0, 128)), np.zeros((0, 4)))
    expect = [(1 - 0.48145466) / 0.26862954, (0 - 0.4578275) / 0.26130258,
              (128 / 255 - 0.40821073) / 0.27577711]
    for c in range(3):
        assert torch.allclose(x[c], torch.full((4, 4), expect[c]), atol=1e-5)


def test_train_transform_box_matches_hand_computed_crop():
    t = ImageTransform(size=64, train=True, scale=(0.3, 0.6), ratio=(0.5, 2.0), hflip_prob=1.0,
                       min_visibility=0.0, min_size=0.0)
    box = np.array([[40.0, 30.0, 120.0, 90.0]])
    img, kept, keep = t.geometry(_img(160, 120), box, random.Random(7))
    x0, y0, w, h = sample_crop(160, 120, (0.3, 0.6), (0.5, 2.0), random.Random(7))
    sx, sy = 64 / w, 64 / h
    expect = np.array([(box[0, 0] - x0) * sx, (box[0, 1] - y0) * sy,
                       (box[0, 2] - x0) * sx, (box[0, 3] - y0) * sy]).clip(0, 64)
    expect = np.array([64 - expect[2], expect[1], 64 - expect[0], expect[3]])  # flipped
    assert keep.tolist() == [True]
    np.testing.assert_allclose(kept[0], expect, atol=1e-9)


@pytest.mark.parametrize("seed", range(6))
def test_boxes_follow_pixels(seed):
    """A solid rectangle drawn at the box is where the transformed box says, within 1.5 px."""
    rng = random.Random(seed)
    W, H = rng.randint(80, 200), rng.randint(80, 200)
    x0, y0 = rng.randint(5, W // 2), rng.randint(5, H // 2)
    x1, y1 = rng.randint(x0 + 20, W - 1), rng.randint(y0 + 20, H - 1)
    img = _img(W, H)
    ImageDraw.Draw(img).rectangle((x0, y0, x1 - 1, y1 - 1), fill=(255, 255, 255))
    train = seed % 2 == 0
    t = ImageTransform(size=48, train=train, scale=(0.4, 1.0), hflip_prob=0.5,
                       interpolation="bilinear", min_visibility=0.05, min_size=1)
    out, kept, keep = t.geometry(img, np.array([[x0, y0, x1, y1]], dtype=float), random.Random(seed))
    mask = np.asarray(out)[:, :, 0] > 127
    if not keep[0]:
        assert mask.sum() < 0.05 * 48 * 48
        return
    ys, xs = np.nonzero(mask)
    found = np.array([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], dtype=float)
    np.testing.assert_allclose(found, kept[0], atol=1.5)


def test_sample_crop_within_image_and_scale():
    rng = random.Random(0)
    for _ in range(200):
        W, H = rng.randint(10, 300), rng.randint(10, 300)
        x0, y0, w, h = sample_crop(W, H, (0.2, 1.0), (0.75, 4 / 3), rng)
        assert 0 <= x0 and 0 <= y0 and x0 + w <= W and y0 + h <= H and w > 0 and h > 0
