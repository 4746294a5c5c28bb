"""The two options of the CGC term against what a crop-consistency term may otherwise learn:
crops with uniform coverage (boxes past the borders, the padding left out of the comparison)
and class-contrastive negatives (other classes' heatmaps of the same augmented image)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import cgc
from cgc import CGCLoss, ops, transforms
from cgc.term import other_classes

from .conftest import interpreted


def coverage_of(boxes: torch.Tensor, size: int) -> torch.Tensor:
    """[size, size]: the fraction of ``boxes`` (top, left, h, w) that contain each pixel."""
    r = torch.arange(size)
    rows = (r[None] >= boxes[:, 0:1]) & (r[None] < boxes[:, 0:1] + boxes[:, 2:3])
    cols = (r[None] >= boxes[:, 1:2]) & (r[None] < boxes[:, 1:2] + boxes[:, 3:4])
    return (rows[:, :, None] & cols[:, None, :]).float().mean(0)


def test_uniform_sampler_covers_every_pixel_equally_often(rng):
    n, size = 40000, 32
    maps = {s: coverage_of(transforms.random_crop_flip(n, size, size, sampler=s, generator=rng).boxes, size)
            for s in transforms.SAMPLERS}  # fmt: skip
    flat, peaked = maps["uniform"], maps["rrc"]
    assert flat.std() / flat.mean() < 0.03  # flat up to the draws' noise
    assert peaked.std() / peaked.mean() > 0.3 and peaked[0, 0] < 0.2 * peaked[size // 2, size // 2]


def test_uniform_boxes_have_rrcs_sizes_and_overlap_the_image(rng):
    u = transforms.uniforms(5000, 3 * transforms.TRIES + 1, generator=rng)
    rrc = transforms.boxes_from_uniforms(u, 40, 30, sampler="rrc")
    uni = transforms.boxes_from_uniforms(u, 40, 30, sampler="uniform")
    assert torch.equal(rrc[:, 2:], uni[:, 2:])  # the same sizes from the same numbers
    top, left, h, w = uni.unbind(1)
    assert (top <= 39).all() and (top + h >= 1).all() and (left <= 29).all() and (left + w >= 1).all()
    assert (top < 0).any() and (top + h > 40).any()  # some reach past the borders
    with pytest.raises(ValueError, match="sampler"):
        transforms.boxes_from_uniforms(u, 40, 30, sampler="nosuch")


@pytest.mark.parametrize("padding", ["zeros", "border"])
def test_affine_warp_of_boxes_past_the_borders_equals_the_reference(backend_device, padding, rng):
    """The uniform sampler's crop/flip maps (separable, reaching past the image) are warped alike
    by every backend, forward and backward, at a heatmap size and an image size."""
    backend, device = backend_device
    if backend == "reference":
        pytest.skip("the reference is the oracle here")
    sizes = [(2, 3, 7, 9, (8, 8))] if interpreted(backend, device) else [(3, 3, 7, 9, (8, 8)), (2, 2, 40, 36, (32, 32))]
    for b, c, h, w, out in sizes:
        theta = transforms.random_crop_flip(b, h, w, sampler="uniform", generator=rng).theta().double()
        x = torch.randn(b, c, h, w, generator=rng, dtype=torch.float64)
        xs = [x.clone().to(device).requires_grad_(), x.clone().requires_grad_()]
        outs = [
            ops.affine_warp(xs[0], theta.to(device), out, padding_mode=padding, backend=backend),
            ops.affine_warp(xs[1], theta, out, padding_mode=padding, backend="reference"),
        ]
        torch.testing.assert_close(outs[0].cpu(), outs[1], rtol=1e-10, atol=1e-10)
        g = torch.randn(outs[1].shape, generator=rng, dtype=torch.float64)
        (outs[0] * g.to(device)).sum().backward()
        (outs[1] * g).sum().backward()
        torch.testing.assert_close(xs[0].grad.cpu(), xs[1].grad, rtol=1e-10, atol=1e-10)


def recipe_pair(cam_orig, cam_aug, theta, size, mask: bool):
    """The masked pair written out with torch's own grid ops: resize (identity), warp (border),
    zero where the view's pixel centers fall outside the original, normalize."""
    b = cam_orig.shape[0]
    grid = F.affine_grid(theta, [b, 1, size, size], align_corners=False)
    ident = F.affine_grid(torch.eye(2, 3, dtype=theta.dtype).expand(b, 2, 3), [b, 1, size, size], align_corners=False)
    q = F.grid_sample(cam_aug[:, None], ident, padding_mode="border", align_corners=False).flatten(1)
    p = F.grid_sample(cam_orig[:, None], grid, padding_mode="border", align_corners=False).flatten(1)
    if mask:
        inside = ((grid[..., 0].abs() <= 1) & (grid[..., 1].abs() <= 1)).flatten(1).to(q.dtype)
        q, p = q * inside, p * inside
    q = q / (q.sum(1, keepdim=True) + 1e-8) + 1e-8
    p = p / (p.sum(1, keepdim=True) + 1e-8) + 1e-8
    return q, p


def test_masked_pair_equals_the_recipe_by_hand(rng):
    theta = transforms.random_crop_flip(4, 16, 16, sampler="uniform", generator=rng).theta().double()
    cam_orig, cam_aug = torch.rand(2, 4, 4, 4, generator=rng, dtype=torch.float64)
    for mask in (False, True):
        loss = CGCLoss(0.3, 12, backend="reference", mask_outside=mask)
        got = loss.pair(cam_orig, cam_aug, theta)
        want = recipe_pair(cam_orig, cam_aug, theta, 12, mask)
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-9)


def test_the_padding_does_not_count_when_masked(rng):
    """Masked, the loss does not depend on the heatmap where the view shows the padding;
    unmasked it does."""
    theta = torch.tensor([[[1.2, 0.0, 0.5], [0.0, 1.0, 0.0]]] * 3, dtype=torch.float64)  # right 35 % is padding
    cam_orig, cam_aug = torch.rand(2, 3, 8, 8, generator=rng, dtype=torch.float64)
    painted = cam_aug.clone()
    painted[:, :, 6:] = 5.0  # the view's columns beyond the original's right edge
    masked = CGCLoss(0.3, 8, mask_outside=True)
    plain = CGCLoss(0.3, 8)
    assert masked.coverage(theta, 8)[0].view(8, 8)[:, 6:].sum() == 0
    assert masked(cam_orig, painted, theta) == pytest.approx(float(masked(cam_orig, cam_aug, theta)), rel=1e-12)
    assert abs(float(plain(cam_orig, painted, theta) - plain(cam_orig, cam_aug, theta))) > 1e-3


def test_boxes_inside_the_image_are_not_masked(rng):
    theta = transforms.crop_flip_theta(torch.tensor([[2.0, 3.0, 10.0, 9.0]] * 2), torch.tensor([True, False]), 16, 16)
    cam_orig, cam_aug = torch.rand(2, 2, 4, 4, generator=rng)
    a = CGCLoss(0.3, 16, mask_outside=True)(cam_orig, cam_aug, theta)
    b = CGCLoss(0.3, 16)(cam_orig, cam_aug, theta)
    assert float(a) == pytest.approx(float(b), rel=1e-6)


def infonce_by_hand(q, p, negatives, t):
    """-log softmax of the positive among [q_b.p_b, q_b.n for n in negatives but q_b's own row]."""
    qn, pn, nn_ = F.normalize(q, dim=1), F.normalize(p, dim=1), F.normalize(negatives, dim=1)
    losses = []
    for b in range(q.shape[0]):
        others = torch.cat([nn_[:b], nn_[b + 1 :]])
        logits = torch.cat([(qn[b] * pn[b]).sum()[None], others @ qn[b]]) / t
        losses.append(-torch.log_softmax(logits, 0)[0])
    return torch.stack(losses).mean()


def test_class_negatives_join_the_negatives(rng):
    theta = transforms.random_crop_flip(3, 16, 16, generator=rng).theta().double()
    cam_orig, cam_aug = torch.rand(2, 3, 4, 4, generator=rng, dtype=torch.float64)
    extra = torch.rand(3, 2, 4, 4, generator=rng, dtype=torch.float64)
    loss = CGCLoss(0.4, 8)
    q, p = loss.pair(cam_orig, cam_aug, theta)
    n = loss._prepare(extra.flatten(0, 1), 8, None)
    got = loss(cam_orig, cam_aug, theta, class_negatives=extra)
    torch.testing.assert_close(got, infonce_by_hand(q, p, torch.cat([q, n]), 0.4), rtol=1e-9, atol=1e-12)
    assert got > loss(cam_orig, cam_aug, theta)  # more negatives, larger loss
    same = cam_aug[:, None].expand(3, 2, 4, 4)  # every class's heatmap equal to the anchor's
    assert loss(cam_orig, cam_aug, theta, class_negatives=same) > got
    with pytest.raises(ValueError, match="kind='mse' has none"):
        CGCLoss(0.4, 8, kind="mse")(cam_orig, cam_aug, theta, class_negatives=extra)
    with pytest.raises(ValueError, match=r"class_negatives must be \[B,K,h,w\]"):
        loss(cam_orig, cam_aug, theta, class_negatives=extra[:2])


def test_other_classes_are_the_most_probable_others():
    logits = torch.tensor([[0.1, 3.0, 2.0, -1.0], [5.0, 4.0, 0.0, 1.0]])
    assert other_classes(logits, torch.tensor([1, 2]), 2).tolist() == [[2, 0], [0, 1]]
    with pytest.raises(ValueError, match="needs more than 4 classes"):
        other_classes(logits, torch.tensor([1, 2]), 4)


class TinyCNN(nn.Module):
    def __init__(self, classes: int = 5):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.ReLU())
        self.fc = nn.Linear(6, classes)

    def forward(self, x):
        return self.fc(self.features(x).mean((2, 3)))


def test_term_with_both_options(rng):
    """The term draws uniform crops, pads x_aug with zeros, takes K more heatmaps of the
    augmented view, and its loss is the loss of those pieces."""
    model = TinyCNN()
    x = torch.randn(4, 3, 12, 12, generator=rng)
    with cgc.CGCTerm(model, temperature=0.3, crop_sampler="uniform", class_negatives=2) as term:
        out = term(x, generator=torch.Generator().manual_seed(3))
    assert out.cams_other.shape == (4, 2, 12, 12) and out.loss.requires_grad
    box = transforms.random_crop_flip(4, 12, 12, sampler="uniform", generator=torch.Generator().manual_seed(3))
    assert torch.equal(out.theta, box.theta())
    torch.testing.assert_close(out.x_aug, ops.affine_warp(x, out.theta, (12, 12), padding_mode="zeros"))
    with cgc.GradCAM(model) as cam:
        picked = other_classes(out.logits, out.targets, 2)
        for k in range(2):
            torch.testing.assert_close(out.cams_other[:, k], cam(out.x_aug, picked[:, k]).cams, rtol=1e-5, atol=1e-6)
    expected = CGCLoss(0.3, None, mask_outside=True, floor=term.loss.floor)(
        out.cams, out.cams_aug, out.theta, (12, 12), out.cams_other
    )
    torch.testing.assert_close(out.loss, expected)


@pytest.mark.slow
def test_term_with_class_negatives_gradcheck(rng):
    """float64 gradcheck of the whole term (second order through the head) with both options.
    Without the floor: its unit, the batch's mean heatmap, is a stop-gradient by design, so the
    term's gradient is not the numerical one (the loss with the unit held: tests/test_losses.py)."""
    model = TinyCNN(4).double()
    x = torch.randn(3, 3, 6, 6, generator=rng, dtype=torch.float64).requires_grad_()
    theta = transforms.random_crop_flip(3, 6, 6, sampler="uniform", generator=rng).theta().double()
    targets = torch.tensor([0, 1, 2])

    def term(inp):
        return cgc.cgc_term(
            model, inp, theta=theta, targets=targets, temperature=0.5, crop_sampler="uniform", class_negatives=2,
            backend="reference", heatmap_floor=0.0,
        ).loss  # fmt: skip

    assert torch.autograd.gradcheck(term, (x,), eps=1e-6, atol=1e-5)


@pytest.mark.slow
def test_steps_with_class_negatives_move_other_classes_heatmaps_away(rng):
    """A few Adam steps on the term with class negatives move the other classes' heatmaps away
    from the explained class's: their mean cosine to the anchor falls. Without the floor: with its
    stop-gradient unit this toy's steps need not (docs/training.md)."""
    torch.manual_seed(0)
    model = TinyCNN(4)
    x = torch.randn(8, 3, 12, 12, generator=rng)
    opt = torch.optim.Adam(model.parameters(), lr=0.02)

    def similarity(out):
        a = F.normalize(out.cams_aug.detach().flatten(1), dim=1)
        o = F.normalize(out.cams_other.detach()[:, 0].flatten(1), dim=1)
        return float((a * o).sum(1).mean())

    with cgc.CGCTerm(model, temperature=0.2, class_negatives=1, heatmap_floor=0.0) as term:
        theta = transforms.random_crop_flip(8, 12, 12, generator=rng).theta()
        before = similarity(term(x, theta=theta))
        for _ in range(30):
            out = term(x, theta=theta)
            opt.zero_grad()
            out.loss.backward()
            opt.step()
        after = similarity(term(x, theta=theta))
    assert after < before - 0.05, (before, after)
