"""cgc.GradCAM: exact on a hand-checkable net, Grad-CAM == HiResCAM where theory says so, every
CAM method equal to pytorch-grad-cam's and differentiable for training, and harmless to the
model it explains."""

from __future__ import annotations

import gc

import pytest
import torch
import torchvision
from torch import nn

import cgc
from cgc import GradCAM, find_target_layer, resize_heatmaps
from cgc.models import CompactCNN


class TinyNet(nn.Module):
    """conv -> ReLU -> conv (target) -> ReLU -> spatial sum weighted by a fixed map -> linear.

    The weighted spatial sum makes d logit / d A vary over space, so pooled and element-wise
    Grad-CAM differ here (unlike after global average pooling).
    """

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(2, 3, 3, padding=1)
        self.conv2 = nn.Conv2d(3, 4, 3, padding=1)
        self.spatial = nn.Parameter(torch.randn(5, 6))
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        a = torch.relu(self.conv2(torch.relu(self.conv1(x))))
        return self.fc((a * self.spatial).sum((2, 3)))


def hand_gradcam(net: TinyNet, x, target, pool):
    """Grad-CAM of A = relu(conv2(...)) by the chain rule written out:
    d logit_c / d A[k,h,w] = W_c[k] * S[h,w]."""
    with torch.no_grad():
        A = torch.relu(net.conv2(torch.relu(net.conv1(x))))
        grad = net.fc.weight[target][:, :, None, None] * net.spatial
        w = grad.mean((2, 3), keepdim=True) if pool else grad
        return torch.relu((w * A).sum(1))


@pytest.mark.parametrize("pool", [True, False])
def test_gradcam_equals_hand_computation(pool):
    net = TinyNet().double()
    x = torch.randn(3, 2, 5, 6, dtype=torch.float64)
    target = torch.tensor([0, 2, 1])
    method = "gradcam" if pool else "hirescam"
    with GradCAM(net, "conv2", method=method) as cam:
        out = cam(x, target)
    # hook is on conv2 (pre-ReLU output z): Grad-CAM of z, with d logit/dz = relu'(z) W S
    with torch.no_grad():
        z = net.conv2(torch.relu(net.conv1(x)))
        grad = (z > 0).double() * net.fc.weight[target][:, :, None, None] * net.spatial
        w = grad.mean((2, 3), keepdim=True) if pool else grad
        expected = torch.relu((w * z).sum(1))
    assert torch.allclose(out.cams, expected, atol=1e-12)
    assert torch.equal(out.targets, target)
    # the same net with the ReLU'd activations as target: compare to the written-out chain rule
    net2 = nn.Sequential()
    net2.add_module("body", nn.Sequential(net.conv1, nn.ReLU(), net.conv2, nn.ReLU()))
    head = _Head(net)
    net2.add_module("head", head)
    with GradCAM(net2, "body", method=method) as cam:
        out2 = cam(x, target)
    assert torch.allclose(out2.cams, hand_gradcam(net, x, target, pool), atol=1e-12)


class _Head(nn.Module):
    def __init__(self, net):
        super().__init__()
        self.net = net

    def forward(self, a):
        return self.net.fc((a * self.net.spatial).sum((2, 3)))


def test_gradcam_equals_hirescam_at_resnet_last_stage():
    model = torchvision.models.resnet18(num_classes=7).double().eval()
    x = torch.randn(2, 3, 64, 64, dtype=torch.float64)
    with GradCAM(model, method="gradcam") as pooled, GradCAM(model, method="hirescam") as elementwise:
        assert pooled.target_layer == "layer4"
        a, b = pooled(x), elementwise(x)
    assert torch.equal(a.targets, b.targets)
    assert torch.allclose(a.cams, b.cams, rtol=1e-10, atol=1e-12)
    assert a.cams.abs().sum() > 0


def test_default_target_targets_and_shapes():
    model = CompactCNN(5).eval()
    x = torch.randn(4, 3, 32, 32)
    with GradCAM(model) as cam:
        out = cam(x)
        assert cam.target_layer == "features"
        assert out.cams.shape == (4, 4, 4) and out.logits.shape == (4, 5)
        assert torch.equal(out.targets, out.logits.argmax(1))
        assert not out.cams.requires_grad
        single = cam(x, 3)
        assert torch.equal(single.targets, torch.full((4,), 3))
        with pytest.raises(ValueError, match="class ids"):
            cam(x, torch.tensor([0, 1, 2, 9]))
        with pytest.raises(ValueError, match="targets must be"):
            cam(x, torch.tensor([0, 1]))
        with pytest.raises(ValueError, match="non-empty image batch"):
            cam(torch.randn(0, 3, 32, 32))


@pytest.mark.slow
@pytest.mark.parametrize(
    "arch,layer",
    [
        ("resnet18", "layer4"),
        ("vgg11", "features"),
        ("densenet121", "features"),
        ("mobilenet_v3_small", "features"),
        ("efficientnet_b0", "features"),
        ("convnext_tiny", "features"),
    ],
)
def test_find_target_layer_for_torchvision_families(arch, layer):
    model = torchvision.models.get_model(arch)
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items() if "running" in k}
    assert find_target_layer(model) == layer
    assert model.training  # untouched: the search runs on a meta-device copy
    after = model.state_dict()
    assert all(torch.equal(v, after[k]) for k, v in before.items())


def test_unknown_layer_and_method_errors():
    with pytest.raises(ValueError, match="unknown target layer 'layer9'; did you mean 'layer4'"):
        GradCAM(torchvision.models.resnet18(), "layer9")
    with pytest.raises(ValueError, match=r"unknown CAM method 'gradcam\+'; did you mean 'gradcam\+\+'"):
        GradCAM(torchvision.models.resnet18(), method="gradcam+")
    with pytest.raises(ValueError, match="could not find a convolutional layer"):
        find_target_layer(nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 4)), input_size=8)


@pytest.mark.slow
def test_mode_hooks_and_memory_are_left_alone():
    model = CompactCNN(4)
    model.train()
    layer = model.features
    x = torch.randn(3, 3, 32, 32)
    cam = GradCAM(model)
    assert len(layer._forward_hooks) == 1
    cam(x)  # warm-up: lazy allocations of the first call are not growth
    gc.collect()
    live = sum(type(o) in (torch.Tensor, nn.Parameter) for o in gc.get_objects())
    for _ in range(5):
        out = cam(x, create_graph=False)
        del out
        out = cam(x, create_graph=True)
        out.cams.sum().backward()
        del out
    gc.collect()
    assert sum(type(o) in (torch.Tensor, nn.Parameter) for o in gc.get_objects()) <= live + 2
    assert model.training and all(m.training for m in model.modules())
    model.eval()
    cam(x)
    assert not any(m.training for m in model.modules())
    cam.close()
    assert len(layer._forward_hooks) == 0
    with pytest.raises(RuntimeError, match="closed"):
        cam(x)
    with GradCAM(model):
        assert len(layer._forward_hooks) == 1
    assert len(layer._forward_hooks) == 0


def test_cgc_term_alone_trains_the_classifier_head():
    """Second order: the heatmap depends on the head's weights through d logit / d A."""
    torch.manual_seed(0)
    model = CompactCNN(6)
    loss = cgc.cgc_term(model, torch.randn(4, 3, 32, 32), method="hirescam").loss
    model.zero_grad()
    loss.backward()
    assert model.fc.weight.grad is not None and model.fc.weight.grad.abs().sum() > 0
    assert model.stem[0][0].weight.grad.abs().sum() > 0


def test_resize_heatmaps_is_bilinear():
    h = torch.rand(2, 7, 7, dtype=torch.float64)
    ref = torch.nn.functional.interpolate(h[:, None], (224, 224), mode="bilinear", align_corners=False)[:, 0]
    assert torch.allclose(resize_heatmaps(h, 224), ref, atol=1e-12)


@pytest.mark.slow
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-10), (torch.float32, 1e-4)])
def test_channels_last_changes_layout_only(dtype, tol):
    """channels_last=True stores 4-D weights channels-last: same Parameter objects, same values,
    same heatmaps (to summation order) as the default, which leaves strides alone."""
    model = torchvision.models.resnet18(num_classes=5).to(dtype).eval()
    twin = torchvision.models.resnet18(num_classes=5).to(dtype).eval()
    twin.load_state_dict(model.state_dict())
    params = {n: (p, p.detach().clone()) for n, p in model.named_parameters()}
    x = torch.randn(3, 3, 48, 40, dtype=dtype)
    with GradCAM(twin) as plain:
        assert not plain.channels_last
        assert all(p.is_contiguous() for p in twin.parameters())
        expected = plain(x)
    with GradCAM(model, channels_last=True) as cam:
        assert cam.channels_last
        for n, p in model.named_parameters():
            assert p is params[n][0] and torch.equal(p, params[n][1])
            if p.dim() == 4:
                assert p.is_contiguous(memory_format=torch.channels_last)
        out = cam(x)
    assert torch.equal(out.targets, expected.targets)
    scale = expected.cams.abs().max()
    assert scale > 0
    assert (out.cams - expected.cams).abs().max() <= tol * scale


def test_bfloat16_autocast_matches_float32(rng):
    """Under CPU bfloat16 autocast (AMX where present) the heatmaps are bfloat16 and agree with
    float32 ones to bfloat16 precision, the same targets given to both. A heatmap is a sum of
    signed terms (weight x activation per channel), so its rounding error scales with the sum
    of the terms' sizes, not with the heatmap (which cancellation can make small): within 1 %
    of each image's largest sum of |terms| (bfloat16 keeps 8 bits, 0.4 %; measured at most
    0.2 % over 260 seeds, where 3 % of seeds exceeded a bound of 5 % of the heatmap's maximum)."""
    torch.manual_seed(int(torch.randint(0, 2**62, (1,), generator=rng)))  # the model's initial weights
    model = torchvision.models.resnet18(num_classes=6).eval()
    x = torch.randn(4, 3, 64, 64, generator=rng)
    target = torch.randint(0, 6, (4,), generator=rng)
    with GradCAM(model) as cam:
        ref = cam(x, target).cams
        logits, acts = cam.forward(x)
        (grads,) = torch.autograd.grad(logits.gather(1, target[:, None]).sum(), acts)
        terms = (grads.mean((2, 3)).abs()[:, :, None, None] * acts.detach().abs()).sum(1)  # Grad-CAM's terms
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = cam(x, target).cams
    assert out.dtype == torch.bfloat16 and ref.dtype == torch.float32
    big = resize_heatmaps(out, (64, 64))
    assert big.dtype == torch.bfloat16 and torch.isfinite(big).all()
    assert (terms.flatten(1).amax(1) > 0).all()  # a scale to compare with (a heatmap itself may be all 0)
    assert ((out.float() - ref).abs() <= 0.01 * terms.amax((1, 2), keepdim=True)).all()
