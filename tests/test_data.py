"""The built-in synthetic dataset: deterministic, varied, with exact ground truth."""
from __future__ import annotations

import pytest
import torch

from cgc import data
from cgc.data.synthetic import CLASS_SHAPES, SyntheticShapes


def test_deterministic_and_prefix_stable():
    a = SyntheticShapes("train", 300, seed=3, image_size=32)
    b = SyntheticShapes("train", 300, seed=3, image_size=32)
    assert torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels)
    c = SyntheticShapes("train", 100, seed=3, image_size=32)
    assert torch.equal(c.images, a.images[:100])  # image i does not depend on the split size
    d = SyntheticShapes("train", 100, seed=4, image_size=32)
    assert not torch.equal(d.images, c.images)
    v = SyntheticShapes("val", 100, seed=3, image_size=32)
    assert not torch.equal(v.images, c.images)


def test_ground_truth_is_consistent():
    ds = SyntheticShapes("val", 400, seed=1, num_classes=12, image_size=48)
    assert ds.images.shape == (400, 3, 48, 48) and ds.images.dtype == torch.uint8
    assert ds.classes == list(CLASS_SHAPES)
    assert set(ds.labels.tolist()) == set(range(12))
    assert ds.masks.flatten(1).sum(1).min() > 20  # every object is visible
    region = data_box_region(ds.boxes, 48)
    assert torch.equal(region | ds.masks, region)  # each box contains its mask
    x0, y0, x1, y1 = ds.boxes[:, 0].unbind(1)
    assert ((x1 - x0) >= 5).all() and ((y1 - y0) >= 5).all()
    # objects appear at many positions and sizes
    assert x0.float().std() > 5 and (x1 - x0).float().std() > 2
    img, label = ds[7]
    assert torch.equal(img, ds.images[7]) and int(label) == int(ds.labels[7])


def data_box_region(boxes, s):
    from cgc.metrics import box_region

    return box_region(boxes, (s, s))


def test_bundle_and_normalisation():
    bundle = data.build("synthetic", train_size=64, val_size=32, image_size=32, num_classes=4)
    assert len(bundle.train) == 64 and len(bundle.val) == 32 and bundle.classes == list(CLASS_SHAPES[:4])
    x = bundle.train.images[:8]
    back = data.denormalize(data.normalize(x))
    assert torch.allclose(back, x.float() / 255, atol=1e-6)
    batches = list(data.annotated_batches(bundle.val, 10))
    assert [b[0].shape[0] for b in batches] == [10, 10, 10, 2]


def test_errors():
    with pytest.raises(ValueError, match="num_classes"):
        SyntheticShapes("train", 10, num_classes=13)
    with pytest.raises(ValueError, match="image_size"):
        SyntheticShapes("train", 10, image_size=8)
    with pytest.raises(ValueError, match="split"):
        SyntheticShapes("holdout", 10)
    with pytest.raises(ValueError, match="at least one image"):
        SyntheticShapes("train", 0)
    with pytest.raises(ValueError, match="unknown dataset"):
        data.build("imagenet-21k")
