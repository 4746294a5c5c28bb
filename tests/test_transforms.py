"""Crop/flip boxes and their affine maps: the warp reproduces torchvision's crop+resize+flip, and
``--vflip``'s keyed vertical flips turn exactly the chosen crops upside down."""

from __future__ import annotations

import math

import pytest
import torch
import torchvision.transforms.functional as TF

from cgc import transforms


def test_boxes_follow_random_resized_crop_rules(rng):
    H, W = 40, 56
    boxes = transforms.random_resized_crop_boxes(2000, H, W, scale=(0.08, 1.0), ratio=(0.75, 4 / 3), generator=rng)
    top, left, h, w = boxes.unbind(1)
    assert (top >= 0).all() and (left >= 0).all() and (h >= 1).all() and (w >= 1).all()
    assert (top + h <= H).all() and (left + w <= W).all()
    area = h * w / (H * W)
    # integer rounding of h and w moves area and ratio a little past the drawn values
    assert area.min() > 0.05 and area.max() <= 1.0
    ratio = w / h
    assert ratio.min() > 0.6 and ratio.max() < 1.6
    assert area.std() > 0.1 and len(set(left.tolist())) > 10  # really random


def test_fallback_is_centre_crop():
    # a scale range no box of these ratios can satisfy on a very wide image forces the fallback
    boxes = transforms.random_resized_crop_boxes(4, 10, 100, scale=(1.0, 1.0), ratio=(1.0, 1.0))
    assert torch.equal(boxes, torch.tensor([[0.0, 45.0, 10.0, 10.0]]).expand(4, 4))


def test_theta_reproduces_resized_crop_and_flip(rng):
    x = torch.rand(3, 3, 32, 48, generator=rng, dtype=torch.float64)
    boxes = torch.tensor([[4.0, 6.0, 16.0, 20.0], [0.0, 0.0, 32.0, 48.0], [10.0, 30.0, 8.0, 12.0]])
    flips = torch.tensor([False, True, True])
    theta = transforms.crop_flip_theta(boxes, flips, 32, 48)
    out = transforms.apply(x, theta.double(), (24, 24))
    for b in range(3):
        i, j, h, w = (int(v) for v in boxes[b])
        ref = TF.resized_crop(x[b], i, j, h, w, [24, 24], antialias=False)
        if flips[b]:
            ref = TF.hflip(ref)
        # the warp samples neighbours outside the crop at its very edge, interpolate clamps
        # to the crop: compare the interior
        assert torch.allclose(out[b, :, 2:-2, 2:-2], ref[:, 2:-2, 2:-2], atol=1e-12), b
    # the full-image box without flip is exactly a resize, edges included
    full = transforms.crop_flip_theta(torch.tensor([[0.0, 0.0, 32.0, 48.0]]), torch.tensor([False]), 32, 48)
    ref = torch.nn.functional.interpolate(x[:1], (24, 24), mode="bilinear", align_corners=False)
    assert torch.allclose(transforms.apply(x[:1], full.double(), (24, 24)), ref, atol=1e-12)


def test_identity_theta_and_flip_involution(rng):
    x = torch.rand(2, 1, 9, 9, generator=rng, dtype=torch.float64)
    ident = transforms.identity_theta(2, dtype=torch.float64)
    assert torch.allclose(transforms.apply(x, ident), x, atol=1e-12)
    flip = transforms.crop_flip_theta(torch.tensor([[0.0, 0.0, 9.0, 9.0]] * 2), torch.tensor([True, True]), 9, 9)
    assert torch.allclose(transforms.apply(x, flip.double()), x.flip(-1), atol=1e-12)


def test_random_crop_flip_flip_rate(rng):
    tf = transforms.random_crop_flip(4000, 16, 16, generator=rng)
    assert abs(tf.flips.float().mean().item() - 0.5) < 0.05
    theta = tf.theta()
    assert theta.shape == (4000, 2, 3)
    assert torch.equal(theta[:, 0, 0] < 0, tf.flips)


def test_bad_arguments():
    with pytest.raises(ValueError, match="scale"):
        transforms.random_resized_crop_boxes(2, 8, 8, scale=(0.0, 1.0))
    with pytest.raises(ValueError, match="ratio"):
        transforms.random_resized_crop_boxes(2, 8, 8, ratio=(2.0, 1.0))
    with pytest.raises(ValueError, match=r"\[B,4\]"):
        transforms.crop_flip_theta(torch.zeros(2, 3), torch.zeros(2, dtype=torch.bool), 8, 8)
    with pytest.raises(ValueError, match="flips"):
        transforms.crop_flip_theta(torch.zeros(2, 4), torch.zeros(3, dtype=torch.bool), 8, 8)
    assert math.isclose(transforms.DEFAULT_SCALE[0], 0.08)


def test_keyed_crops_do_not_depend_on_the_batch():
    """A sample's crop and flip come from its key alone: the same in any batch, any order."""
    keys = transforms.sample_keys(7, 3, range(10), "aug")
    whole = transforms.random_crop_flip(10, 40, 56, keys=keys)
    part = transforms.random_crop_flip(4, 40, 56, keys=[keys[i] for i in (9, 2, 5, 0)])
    assert torch.equal(part.boxes, whole.boxes[[9, 2, 5, 0]]) and torch.equal(part.flips, whole.flips[[9, 2, 5, 0]])
    assert len(set(keys)) == 10 and all(0 <= k < 2**63 for k in keys)
    # seed, epoch, index and purpose each change the key
    others = [
        transforms.sample_keys(8, 3, [0], "aug"),
        transforms.sample_keys(7, 4, [0], "aug"),
        transforms.sample_keys(7, 3, [1], "aug"),
        transforms.sample_keys(7, 3, [0], "ce"),
    ]
    assert len({keys[0], *(o[0] for o in others)}) == 5
    many = transforms.random_crop_flip(2000, 40, 56, keys=transforms.sample_keys(0, 0, range(2000), "aug"))
    assert 0.45 < many.flips.float().mean() < 0.55 and many.boxes[:, 2].std() > 5  # still random
    with pytest.raises(ValueError, match="3 keys for a batch of 2"):
        transforms.uniforms(2, 5, keys=[1, 2, 3])


def test_vflip_flips_exactly_the_keyed_images_upside_down(rng):
    """``--vflip``'s maps (``cgc.engine.crop_thetas(..., vflip=True)``): an image is flipped
    vertically exactly when the last of its keyed uniforms is below 0.5 (about half of them),
    its crop and horizontal flip are those it gets without ``vflip``, and its warp is the
    unflipped warp upside down; ``vflip=False`` never flips."""
    from cgc.engine import crop_thetas

    keys = transforms.sample_keys(int(torch.randint(0, 2**31, (1,), generator=rng)), 2, range(2000), "aug")
    # the keyed uniform of each image, drawn by hand: the last of the 3 * TRIES + 3 numbers of its key
    expected = torch.tensor(
        [
            float(
                torch.rand(3 * transforms.TRIES + 3, generator=torch.Generator().manual_seed(k), dtype=torch.float64)[
                    -1
                ]
            )
            < 0.5
            for k in keys
        ]
    )
    flipped = crop_thetas(keys, (24, 20), (0.2, 1.0), "cpu", vflip=True)
    plain = crop_thetas(keys, (24, 20), (0.2, 1.0), "cpu", vflip=False)
    wrong = int(((flipped[:, 1, 1] < 0) != expected).sum())
    assert wrong == 0, f"{wrong} of {len(keys)} images flipped (or not) against their keyed uniform"
    assert 0.45 < expected.float().mean() < 0.55
    assert (plain[:, 1, 1] > 0).all(), "vflip=False flipped an image"
    x = torch.rand(64, 3, 24, 20, generator=rng, dtype=torch.float64)
    out = transforms.apply(x, flipped[:64].double())
    ref = transforms.apply(x, plain[:64].double())
    ref = torch.where(expected[:64, None, None, None], ref.flip(-2), ref)
    assert torch.allclose(out, ref, atol=1e-6), (
        f"not the unflipped crop upside down: differs by {(out - ref).abs().max():.3g}"
    )
    # the same crop and horizontal flip with and without vflip
    assert torch.equal(flipped[:, 0], plain[:, 0]) and torch.equal(flipped[:, 1, 2], plain[:, 1, 2])
    assert torch.equal(flipped[:, 1, 1].abs(), plain[:, 1, 1])
