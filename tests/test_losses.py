"""CGCLoss: consistent heatmaps score better than inconsistent ones; zero heatmaps stay finite."""

from __future__ import annotations

import pytest
import torch

from cgc import CGCLoss, ops, transforms


def _consistent_pair(rng, b=6, s=16):
    """``cam_aug`` made by warping ``cam_orig`` with ``theta`` at the same resolution."""
    cam_orig = torch.rand(b, s, s, generator=rng, dtype=torch.float64)
    theta = transforms.random_crop_flip(b, s, s, generator=rng, scale=(0.3, 1.0)).theta().double()
    cam_aug = ops.affine_warp(cam_orig[:, None], theta, s, padding_mode="border")[:, 0]
    return cam_orig, cam_aug, theta


@pytest.mark.parametrize("kind", ["infonce", "mse"])
def test_consistent_heatmaps_have_lower_loss(rng, kind):
    cam_orig, cam_aug, theta = _consistent_pair(rng)
    loss = CGCLoss(0.5, 16, kind)
    good = loss(cam_orig, cam_aug, theta)
    shuffled = loss(cam_orig, cam_aug.roll(1, 0), theta)
    assert good < shuffled
    if kind == "mse":
        assert good.abs() < 1e-12


def test_infonce_loss_equals_the_op_on_the_pair(rng):
    cam_orig, cam_aug, theta = _consistent_pair(rng)
    loss = CGCLoss(0.3, 24)
    q, p = loss.pair(cam_orig, cam_aug, theta)
    assert q.shape == (6, 24 * 24)
    assert torch.allclose(loss(cam_orig, cam_aug, theta), ops.info_nce(q, p, 0.3))
    # sum-normalized (+eps) heatmaps, as in the recipe
    assert torch.allclose(q.sum(1), torch.ones(6, dtype=torch.float64), atol=1e-4)


def test_zero_heatmaps_give_finite_loss_and_gradient():
    z = torch.zeros(4, 7, 7, requires_grad=True)
    theta = transforms.identity_theta(4)
    for kind in ("infonce", "mse"):
        loss = CGCLoss(0.5, 14, kind)(z, z, theta)
        (g,) = torch.autograd.grad(loss, z)
        assert torch.isfinite(loss) and torch.isfinite(g).all()


def test_errors():
    with pytest.raises(ValueError, match="kind"):
        CGCLoss(kind="l1")
    with pytest.raises(ValueError, match="temperature"):
        CGCLoss(temperature=0)
    loss = CGCLoss(heatmap_size=8)
    with pytest.raises(ValueError, match=r"\[B,h,w\]"):
        loss(torch.rand(2, 7, 7), torch.rand(2, 6, 7), transforms.identity_theta(2))
    with pytest.raises(ValueError, match="at least 2"):
        loss(torch.rand(1, 7, 7), torch.rand(1, 7, 7), transforms.identity_theta(1))
