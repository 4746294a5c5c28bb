"""CGCLoss: equals the recipe written out in plain torch (both kinds, values and gradients);
consistent heatmaps score better than inconsistent ones; zero heatmaps stay finite."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

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


def _by_hand(cam_orig, cam_aug, theta, size, padding_mode="border"):
    """The recipe's anchors and positives in plain torch: the augmented view's heatmap resized
    (bilinear, align_corners=False), the original's cropped/flipped by ``theta`` to the same
    size (affine_grid + grid_sample), each divided by its sum (+1e-8) plus 1e-8, flattened."""
    b = cam_orig.shape[0]
    q = F.interpolate(cam_aug[:, None], size, mode="bilinear", align_corners=False)
    grid = F.affine_grid(theta, (b, 1, *size), align_corners=False)
    p = F.grid_sample(cam_orig[:, None], grid, mode="bilinear", padding_mode=padding_mode, align_corners=False)
    q, p = q.flatten(1), p.flatten(1)
    return q / (q.sum(1, keepdim=True) + 1e-8) + 1e-8, p / (p.sum(1, keepdim=True) + 1e-8) + 1e-8


def _info_nce_by_hand(q, p, temperature):
    """Cross-entropy with target 0 of ``[q_b.p_b, q_b.q_k for k != b] / T`` over unit rows."""
    q, p = q / q.norm(dim=1, keepdim=True), p / p.norm(dim=1, keepdim=True)
    b = q.shape[0]
    rows = [torch.stack([q[i] @ p[i]] + [q[i] @ q[k] for k in range(b) if k != i]) for i in range(b)]
    return F.cross_entropy(torch.stack(rows) / temperature, torch.zeros(b, dtype=torch.long))


def _mse_by_hand(q, p):
    """Mean over the batch of the squared distance of the unit rows (2 - 2 cos)."""
    q, p = q / q.norm(dim=1, keepdim=True), p / p.norm(dim=1, keepdim=True)
    return torch.stack([((q[i] - p[i]) ** 2).sum() for i in range(q.shape[0])]).mean()


def _unrelated_pair(rng, b=5, h=7, w=9):
    """Heatmaps of another resolution than the loss's, not consistent with each other, and
    crops/flips of both kinds (so a wrong, missing or swapped warp changes the value)."""
    cam_orig = torch.rand(b, h, w, generator=rng, dtype=torch.float64)
    cam_aug = torch.rand(b, h, w, generator=rng, dtype=torch.float64)
    tf = transforms.random_crop_flip(b, 40, 40, generator=rng, scale=(0.1, 0.6))
    tf.flips[:2] = torch.tensor([True, False])
    return cam_orig, cam_aug, tf.theta().double()


@pytest.mark.parametrize("size", [24, (20, 28)], ids=["square", "non-square"])
@pytest.mark.parametrize("padding_mode", ["border", "zeros"])
def test_loss_equals_the_recipe_by_hand(rng, size, padding_mode):
    """Both kinds of CGCLoss equal the recipe written out in plain torch (resize, warp,
    sum-normalization, InfoNCE as a cross-entropy over the batch, or the MSE of unit rows)."""
    cam_orig, cam_aug, theta = _unrelated_pair(rng)
    hw = (size, size) if isinstance(size, int) else size
    q, p = _by_hand(cam_orig, cam_aug, theta, hw, padding_mode)
    for kind, want in (("infonce", _info_nce_by_hand(q, p, 0.3)), ("mse", _mse_by_hand(q, p))):
        loss = CGCLoss(0.3, size, kind, padding_mode=padding_mode)
        got_q, got_p = loss.pair(cam_orig, cam_aug, theta)
        assert got_q.shape == got_p.shape == (5, hw[0] * hw[1])
        assert torch.allclose(got_q, q, rtol=1e-10, atol=1e-14), f"anchors differ by {(got_q - q).abs().max():.3g}"
        assert torch.allclose(got_p, p, rtol=1e-10, atol=1e-14), f"positives differ by {(got_p - p).abs().max():.3g}"
        got = loss(cam_orig, cam_aug, theta)
        assert torch.allclose(got, want, rtol=1e-10, atol=0), (kind, float(got), float(want))
    # heatmap_size=None compares at the size passed with the heatmaps
    want = _info_nce_by_hand(*_by_hand(cam_orig, cam_aug, theta, hw, "border"), 0.5)
    assert torch.allclose(CGCLoss(0.5, None)(cam_orig, cam_aug, theta, size=hw), want, rtol=1e-10, atol=0)


def test_loss_gradient_equals_the_recipe_by_hand(rng):
    """The gradients in both heatmaps are those of the hand-written recipe (the CGC term trains
    through them)."""
    cam_orig, cam_aug, theta = _unrelated_pair(rng)
    for kind, by_hand in (("infonce", lambda q, p: _info_nce_by_hand(q, p, 0.4)), ("mse", _mse_by_hand)):
        a, b = cam_orig.clone().requires_grad_(), cam_aug.clone().requires_grad_()
        got = torch.autograd.grad(CGCLoss(0.4, 16, kind)(a, b, theta), (a, b))
        want = torch.autograd.grad(by_hand(*_by_hand(a, b, theta, (16, 16))), (a, b))
        for g, w, name in zip(got, want, ("d cam_orig", "d cam_aug")):
            assert torch.allclose(g, w, rtol=1e-8, atol=1e-12), f"{kind} {name} differs by {(g - w).abs().max():.3g}"


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


# ----------------------------------------------------------------------------- the floor
def _floored_by_hand(rows, value):
    """The rows compared with a floor: ``value`` added to every cell, then sum-normalized
    (+1e-8 each, as the recipe)."""
    rows = rows + value
    return rows / (rows.sum(1, keepdim=True) + 1e-8) + 1e-8


def test_floor_equals_its_formula_by_hand(rng):
    """With a floor, anchors and positives are the recipe's rows with ``floor`` times the batch's
    mean heatmap value (both views, detached) added to every cell before the sum-normalization;
    value and gradients equal the formula by hand."""
    cam_orig, cam_aug, theta = _unrelated_pair(rng)
    a, b = cam_orig.clone().requires_grad_(), cam_aug.clone().requires_grad_()
    loss = CGCLoss(0.4, 16, floor=0.3)
    value = 0.3 * (cam_orig.mean() + cam_aug.mean()) / 2
    assert torch.allclose(loss.floor_value(a, b), value, rtol=1e-12) and not loss.floor_value(a, b).requires_grad
    got_q, got_p = loss.pair(a, b, theta)
    size = (16, 16)
    q = F.interpolate(b[:, None], size, mode="bilinear", align_corners=False).flatten(1)
    grid = F.affine_grid(theta, (5, 1, *size), align_corners=False)
    p = F.grid_sample(a[:, None], grid, mode="bilinear", padding_mode="border", align_corners=False).flatten(1)
    q, p = _floored_by_hand(q, value), _floored_by_hand(p, value)
    assert torch.allclose(got_q, q, rtol=1e-10, atol=1e-14) and torch.allclose(got_p, p, rtol=1e-10, atol=1e-14)
    got = loss(a, b, theta)
    want = _info_nce_by_hand(q, p, 0.4)
    assert torch.allclose(got, want, rtol=1e-10, atol=0)
    g_got = torch.autograd.grad(got, (a, b), retain_graph=True)
    g_want = torch.autograd.grad(want, (a, b))
    for g, w in zip(g_got, g_want):
        assert torch.allclose(g, w, rtol=1e-8, atol=1e-12)
    assert CGCLoss(0.4, 16).floor_value(a, b) is None


def test_floor_gradcheck(rng):
    """float64 gradcheck of both kinds with a floor (its unit, the batch's mean, is detached:
    a constant of the comparison, so the check holds it fixed as the loss does)."""
    cam_orig, cam_aug, theta = _unrelated_pair(rng, b=3, h=4, w=5)
    unit = 0.2 * torch.stack([cam_orig, cam_aug]).mean()
    for kind in ("infonce", "mse"):
        loss = CGCLoss(0.5, 6, kind, floor=0.2)
        a, b = cam_orig.clone().requires_grad_(), cam_aug.clone().requires_grad_()
        assert torch.autograd.gradcheck(lambda x, y, loss=loss: loss(x, y, theta, cell_floor=unit), (a, b))


def test_floor_bounds_the_gradient_of_a_nearly_empty_heatmap(rng):
    """Heatmaps are compared as directions, so a heatmap of mass t gets a gradient of order 1/t:
    the term is ill-conditioned where a CAM is nearly empty (the label's CAM of an image the
    classifier does not recognize yet). With a floor the gradient stays within about 1/floor of
    a typical heatmap's, however small t gets."""
    b, h = 6, 8
    cams = torch.rand(2, b, h, h, generator=rng, dtype=torch.float64)
    theta = transforms.random_crop_flip(b, h, h, generator=rng).theta().double()

    def grad_of_row0(floor, t):
        orig, aug = cams[0].clone(), cams[1].clone()
        orig[0] *= t
        aug[0] *= t
        orig.requires_grad_()
        loss = CGCLoss(0.5, h, floor=floor)(orig, aug, theta)
        return torch.autograd.grad(loss, orig)[0][0].norm().item()

    typical = grad_of_row0(0.0, 1.0)
    for t in (1e-3, 1e-6):
        assert grad_of_row0(0.0, t) > 100 * typical  # ~1/t without a floor
        assert grad_of_row0(0.3, t) < typical / 0.3  # bounded with one


def test_the_floor_is_the_global_batchs_under_gather(rng):
    """With gathered negatives the floor's unit is the mean over every process's heatmaps, so
    each process compares its rows as one process with the whole batch would."""
    cam_orig, cam_aug, _ = _unrelated_pair(rng, b=6)
    whole = CGCLoss(0.5, 10, floor=0.3).floor_value(cam_orig, cam_aug)
    others = torch.stack([cam_orig[3:], cam_aug[3:]], 1).flatten(1).mean(1, keepdim=True)

    def gather(rows):  # this process holds images 0-2, the other one 3-5
        return torch.cat([rows, others]), 0

    mine = CGCLoss(0.5, 10, floor=0.3, gather=gather).floor_value(cam_orig[:3], cam_aug[:3])
    assert torch.allclose(mine, whole, rtol=1e-12)


def test_floor_errors():
    with pytest.raises(ValueError, match="floor"):
        CGCLoss(floor=-0.1)
