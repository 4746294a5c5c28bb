"""The built-in synthetic dataset: deterministic, varied, with exact ground truth."""

from __future__ import annotations

import functools
import operator

import pytest
import torch

from cgc import data
from cgc.data.synthetic import CLASS_SHAPES, SyntheticShapes


@pytest.mark.slow
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


def test_chunks_made_in_threads_are_the_chunks_made_one_by_one(monkeypatch):
    """The dataset makes its chunks in threads (each has its own generator): the same images,
    labels, boxes and masks as made one at a time, in order."""
    from cgc.data import synthetic

    threaded = SyntheticShapes("train", 600, seed=5, image_size=24)
    alone = [synthetic.generate_chunk(5, "train", c, image_size=24) for c in range(3)]
    for got, parts in zip((threaded.images, threaded.labels, threaded.boxes[:, 0], threaded.masks), zip(*alone)):
        assert torch.equal(got, torch.cat(parts)[:600])
    monkeypatch.setattr(torch, "get_num_threads", lambda: 1)  # one worker: the same again
    assert torch.equal(SyntheticShapes("train", 600, seed=5, image_size=24).images, threaded.images)


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


def test_bundle_and_normalization():
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


def test_global_batches_hold_the_same_images_for_any_number_of_processes():
    from cgc.distributed import GlobalBatchSampler

    one = list(GlobalBatchSampler(50, 12, seed=3, epoch=1))
    assert len(one) == 4 and all(len(b) == 12 for b in one)  # the partial last batch is dropped
    for world in (2, 3, 4):
        shares = [list(GlobalBatchSampler(50, 12, rank=r, world_size=world, seed=3, epoch=1)) for r in range(world)]
        assert all(len(s) == 4 for s in shares)
        assert [functools.reduce(operator.iadd, (s[k] for s in shares), []) for k in range(4)] == one
    resumed = list(GlobalBatchSampler(50, 12, seed=3, epoch=1, start=2))
    assert resumed == one[2:] and len(GlobalBatchSampler(50, 12, seed=3, epoch=1, start=2)) == 2
    assert list(GlobalBatchSampler(50, 12, seed=3, epoch=2)) != one  # reshuffled every epoch
    val = [list(GlobalBatchSampler(10, 6, rank=r, world_size=3, shuffle=False, drop_last=False)) for r in range(3)]
    assert sorted(i for s in val for b in s for i in b) == list(range(10))  # every val image, once
    with pytest.raises(ValueError, match="divide evenly"):
        GlobalBatchSampler(50, 10, world_size=4)


def test_unlabeled_global_batches_split_over_processes():
    from cgc.data import CyclingBatchSampler

    one = iter(CyclingBatchSampler(7, seed=1, batch_size=4))
    first = [next(one) for _ in range(5)]
    halves = [iter(CyclingBatchSampler(7, seed=1, batch_size=4, rank=r, world_size=2)) for r in (0, 1)]
    assert [next(halves[0]) + next(halves[1]) for _ in range(5)] == first
    later = iter(CyclingBatchSampler(7, seed=1, batch_size=4, start=3))
    assert [next(later) for _ in range(2)] == first[3:]
