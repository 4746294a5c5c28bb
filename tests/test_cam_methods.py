"""CAM methods: each equals pytorch-grad-cam's implementation of the same method, is
differentiable twice (float64 gradcheck / gradgradcheck through the fused op on every backend),
and trains: a CGC step with it lowers its loss. A new method is a few lines."""

from __future__ import annotations

import pytest
import torch
import torchvision
from torch import nn

import cgc
from cgc import GradCAM, ops
from cgc.cam_methods import CAM_METHODS, get_cam_method, register_cam_method
from cgc.models import CompactCNN

from .conftest import assert_equals_pytorch_grad_cam

METHODS = ["gradcam", "hirescam", "gradcam++", "xgradcam", "layercam"]


class FlattenHead(nn.Module):
    """conv stages, then flatten + a two-layer MLP (VGG-style): the gradient varies over space,
    so Grad-CAM, HiResCAM and the others all differ."""

    def __init__(self, classes: int = 5):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(8, 12, 3, padding=1), nn.ReLU()
        )
        self.classifier = nn.Sequential(nn.Flatten(), nn.Linear(12 * 8 * 8, 16), nn.ReLU(), nn.Linear(16, classes))

    def forward(self, x):
        return self.classifier(self.features(x))


def test_registry_lists_the_five_methods_and_takes_new_ones():
    assert set(METHODS) <= set(CAM_METHODS)
    with pytest.raises(ValueError, match="already registered"):
        register_cam_method("gradcam")(lambda A, G: (G, True))
    name = "test-absgrad"
    try:

        @register_cam_method(name)
        def absgrad(A, G):
            return G.abs().mean((2, 3)), False

        model = CompactCNN(3).eval()
        with GradCAM(model, method=name) as cam:
            out = cam(torch.randn(2, 3, 24, 24), create_graph=True)
        A = torch.rand(2, 4, 3, 3)
        w, pool = absgrad(A, A - 0.5)
        expected = torch.relu(((A - 0.5).abs().mean((2, 3))[:, :, None, None] * A).sum(1))
        assert torch.allclose(ops.gradcam(A, w, pool=pool), expected)
        assert out.cams.requires_grad and out.cams.shape == (2, 3, 3)
    finally:
        CAM_METHODS.pop(name, None)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("arch", ["resnet18", "flatten-head"])
def test_method_equals_pytorch_grad_cam(method, arch):
    """Same model, input and target classes: our heatmap, scaled as pytorch-grad-cam scales
    its own (per-image min-max and resize to the input with its `scale_cam_image`, then min-max
    again as its layer aggregation does), equals its output to 1e-5 (float32 models; the maps
    span [0, 1])."""
    torch.manual_seed(0)
    make, layer, size = (
        ((lambda: torchvision.models.resnet18(num_classes=5)), "layer4", 64)
        if arch == "resnet18"
        else ((lambda: FlattenHead(5)), "features", 16)
    )
    model, twin = make().eval(), make()
    twin.load_state_dict(model.state_dict())
    twin.eval()
    x = torch.randn(3, 3, size, size)
    targets = torch.tensor([0, 3, 4])
    with GradCAM(model, layer, method=method) as cam:
        ours = cam(x, targets).cams
    assert_equals_pytorch_grad_cam(ours, twin, layer, x, targets, method)


@pytest.mark.parametrize("method", METHODS)
def test_method_gradcheck_and_gradgradcheck(method, backend_device, rng):
    """A heatmap of (A, G) through each method and the fused op, in float64: exact first and
    second derivatives (the CGC loss differentiates heatmaps made from create_graph gradients)."""
    backend, device = backend_device
    fn = get_cam_method(method)
    A = torch.rand(2, 3, 4, 5, generator=rng, dtype=torch.float64).to(device).requires_grad_()
    G = (torch.rand(2, 3, 4, 5, generator=rng, dtype=torch.float64) - 0.3).to(device).requires_grad_()

    def heat(a, g):
        w, pool = fn(a, g)
        return ops.gradcam(a, w, pool=pool, backend=backend)

    assert torch.autograd.gradcheck(heat, (A, G))
    assert torch.autograd.gradgradcheck(heat, (A, G))


@pytest.mark.slow
@pytest.mark.parametrize("method", METHODS)
def test_cgc_steps_with_each_method_lower_its_loss(method):
    """Fifteen Adam steps on the CGC term alone (one fixed batch, crop/flip and target classes):
    the term falls by more than 15 % (measured over seeds 1-3: by 24-51 %)."""
    torch.manual_seed(1)
    model = CompactCNN(4).train()
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    x, y = torch.randn(8, 3, 32, 32), torch.randint(0, 4, (8,))
    theta = cgc.transforms.random_crop_flip(
        8, 32, 32, scale=(0.3, 1.0), generator=torch.Generator().manual_seed(2)
    ).theta()
    losses = []
    with cgc.CGCTerm(model, method=method, temperature=0.5) as term:
        for _ in range(15):
            loss = term(x, theta=theta, targets=y).loss
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(float(loss.detach()))
    assert min(losses[-5:]) < 0.85 * losses[0], losses


def _gradcam_plus_plus_by_hand(A, G):
    """Grad-CAM++'s weights, written out: ``sum_ij relu(G) G^2 / (2 G^2 + sum_ij(A) G^3 + 1e-6)``."""
    g2 = G * G
    alpha = g2 / (2 * g2 + A.sum((2, 3), keepdim=True) * g2 * G + 1e-6)
    return (G.clamp_min(0) * torch.where(G != 0, alpha, torch.zeros_like(alpha))).sum((2, 3))


def _xgradcam_by_hand(A, G):
    """XGrad-CAM's weights, written out: ``sum_ij G A / (sum_ij A + 1e-7)``."""
    return (G * A / (A.sum((2, 3), keepdim=True) + 1e-7)).sum((2, 3))


def _ill_conditioned(method, rng):
    """bfloat16-exact (A, G) in float64 where computing the weights in bfloat16 goes wrong.

    Grad-CAM++: activation sums S < 0 (layers without a final ReLU) and gradients with
    S G = -2 + d, d in [0.01, 0.03], so the denominator G^2 (2 + S G) cancels to a few percent
    of its terms; XGrad-CAM: gradient x activation terms of about 100 that sum to about 1.
    Rounding each intermediate to bfloat16 (8 bits) then costs 10-100 % of the weight.
    """
    shape = (2, 6, 5, 5)
    if method == "gradcam++":
        A = (torch.rand(shape, generator=rng, dtype=torch.float64) * 2 - 1.5).bfloat16().double()
        d = 0.01 + 0.02 * torch.rand(shape, generator=rng, dtype=torch.float64)
        G = (-2 + d) / A.sum((2, 3), keepdim=True)
    else:
        A = (torch.rand(shape, generator=rng, dtype=torch.float64) * 1.5 + 0.5).bfloat16().double()
        sign = torch.where(torch.rand(shape, generator=rng) < 0.5, -1.0, 1.0).double()
        G = sign * (50 + 50 * torch.rand(shape, generator=rng, dtype=torch.float64))
        rest = (G * A).sum((2, 3)) - G[..., -1, -1] * A[..., -1, -1]
        G[..., -1, -1] = (torch.randn(shape[:2], generator=rng, dtype=torch.float64) - rest) / A[..., -1, -1]
    return A, G.bfloat16().double()


@pytest.mark.parametrize("method", ["gradcam++", "xgradcam"])
def test_bfloat16_methods_compute_their_weights_in_float32(method, rng):
    """Grad-CAM++ squares and cubes gradients, XGrad-CAM divides sums: under bfloat16 their
    weights are formed in float32 and rounded once, so they stay within a bfloat16 rounding
    (2^-8) of the exact weights of the same inputs, on inputs where forming them in bfloat16 is
    off by more than 10 % of the largest weight (five times the 2 % a bfloat16 heatmap is
    allowed): the float32 path is what keeps them right."""
    by_hand = {"gradcam++": _gradcam_plus_plus_by_hand, "xgradcam": _xgradcam_by_hand}[method]
    A, G = _ill_conditioned(method, rng)
    exact = by_hand(A, G)
    scale = exact.abs().max()
    in_bf16 = by_hand(A.bfloat16(), G.bfloat16()).double()
    assert (in_bf16 - exact).abs().max() > 0.1 * scale, "the case does not tell bfloat16 from float32 weights"
    w, _ = get_cam_method(method)(A.bfloat16(), G.bfloat16())
    assert w.dtype == torch.bfloat16
    err = (w.double() - exact).abs()
    assert (err <= 2**-8 * exact.abs() + 1e-4 * scale).all(), (
        f"{method} weights in bfloat16 are off by up to {float(err.max() / scale):.1%} of the largest weight "
        f"(computing them in bfloat16: {float((in_bf16 - exact).abs().max() / scale):.1%})"
    )
    w32, _ = get_cam_method(method)(A.float(), G.float())  # float32 inputs: the same weights, unrounded
    assert (w32.double() - exact).abs().max() <= 1e-3 * scale
