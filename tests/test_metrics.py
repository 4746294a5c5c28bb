"""Explanation metrics on cases whose answer is known by construction."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from cgc import GradCAM, data, metrics, resize_heatmaps, transforms, viz
from cgc.models import CompactCNN


class MaskProbe(nn.Module):
    """Two-class model whose class-0 logit is the mean input inside a fixed mask: the pixels
    inside the mask are exactly the evidence. A BatchNorm (identity at init in eval mode)
    shows whether the metrics run it in eval mode and leave its statistics alone."""

    def __init__(self, mask: torch.Tensor, gain: float = 4.0):
        super().__init__()
        self.bn = nn.BatchNorm2d(3)
        self.register_buffer("mask", mask.float())
        self.gain = gain

    def forward(self, x):
        x = self.bn(x)
        s = (x * self.mask).sum((1, 2, 3)) / (3 * self.mask.sum())
        return torch.stack([self.gain * s, torch.zeros_like(s)], 1)


def probe_case(B=3, S=16):
    mask = torch.zeros(S, S, dtype=torch.bool)
    mask[4:10, 3:9] = True
    images = torch.where(mask, 2.0, -0.5).expand(B, 3, S, S).clone()
    images += 0.05 * torch.randn(B, 3, S, S, generator=torch.Generator().manual_seed(0))
    return MaskProbe(mask), images, mask


def test_topk_correct():
    logits = torch.tensor([[0.1, 0.9, 0.0], [0.8, 0.1, 0.05], [0.2, 0.3, 0.5]])
    labels = torch.tensor([1, 1, 0])
    assert metrics.topk_correct(logits, labels, ks=(1, 2, 5)) == {1: 1, 2: 2, 5: 3}


def test_content_heatmap_known_fractions():
    boxes = torch.tensor([[[2.0, 2.0, 6.0, 6.0]], [[0.0, 0.0, 8.0, 4.0]]])
    region = metrics.box_region(boxes, (8, 8))
    inside = torch.zeros(2, 8, 8)
    inside[0, 3, 3], inside[1, 1, :] = 5.0, 1.0
    assert torch.allclose(metrics.content_heatmap(inside, region), torch.tensor([100.0, 100.0], dtype=torch.float64))
    half = torch.zeros(2, 8, 8)
    half[:, 2, 2] = half[:, 7, 7] = 1.0  # one unit in the box, one outside
    assert torch.allclose(metrics.content_heatmap(half, region), torch.tensor([50.0, 50.0], dtype=torch.float64))
    # an all-zero heatmap counts as uniform: the region's area fraction
    assert metrics.content_heatmap(torch.zeros(1, 8, 8), region[:1]).item() == pytest.approx(100 * 16 / 64)


def test_pointing_game_hit_miss_tolerance():
    region = metrics.box_region(torch.tensor([[[10.0, 10.0, 20.0, 20.0]]]).expand(4, 1, 4), (32, 32))
    heat = torch.zeros(4, 32, 32)
    heat[0, 15, 15] = 1.0  # in the box
    heat[1, 2, 2] = 1.0  # far outside
    heat[2, 15, 24] = 1.0  # 5 px right of the box's last column (x = 19)
    # heat[3] constant: points nowhere
    assert metrics.pointing_game(heat, region).tolist() == [True, False, False, False]
    assert metrics.pointing_game(heat, region, tolerance=5).tolist() == [True, False, True, False]
    assert metrics.pointing_game(heat, region, tolerance=4.9).tolist() == [True, False, False, False]
    with pytest.raises(ValueError, match="same shape"):
        metrics.pointing_game(heat, region[:2])


def test_gaussian_blur_matches_2d_kernel():
    x = torch.randn(2, 3, 20, 17, generator=torch.Generator().manual_seed(1))
    t = torch.arange(11.0) - 5
    g = torch.exp(-t * t / 50)
    k2 = torch.outer(g, g) / g.sum() ** 2
    ref = F.conv2d(x, k2.expand(3, 1, 11, 11), padding=5, groups=3)
    assert torch.allclose(metrics.gaussian_blur(x), ref, atol=1e-5)
    with pytest.raises(ValueError, match="odd"):
        metrics.gaussian_blur(x, kernel_size=4)


def test_auc_normalised_trapezoid():
    assert metrics.auc(torch.full((1, 29), 0.7)).item() == pytest.approx(0.7)
    assert metrics.auc(torch.linspace(0, 1, 11)[None]).item() == pytest.approx(0.5)


def loop_curve(model, image, saliency, mode, step):
    """Straightforward one-image, one-step-at-a-time version of RISE's protocol (the oracle)."""
    C, H, W = image.shape
    order = saliency.flatten().argsort(dim=0, descending=True, stable=True)
    start = metrics.gaussian_blur(image[None])[0] if mode == "insertion" else image.clone()
    finish = image if mode == "insertion" else torch.zeros_like(image)
    with torch.no_grad():
        c = model(image[None]).argmax(1).item()
        cur, scores = start.clone().view(C, -1), []
        for i in range(-(-H * W // step) + 1):
            idx = order[:i * step]
            cur[:, idx] = finish.reshape(C, -1)[:, idx]
            scores.append(model(cur.view(1, C, H, W)).softmax(1)[0, c].item())
    return torch.tensor(scores)


@pytest.mark.parametrize("mode", ["insertion", "deletion"])
def test_insertion_deletion_matches_per_image_loop(mode):
    model, images, mask = probe_case()
    model.eval()
    sal = torch.rand(3, 16, 16, generator=torch.Generator().manual_seed(2))
    area, curves = metrics.insertion_deletion(model, images, sal, mode=mode, step=10, batch_size=7)
    assert curves.shape == (3, -(-256 // 10) + 1)
    for b in range(3):
        assert torch.allclose(curves[b], loop_curve(model, images[b], sal[b], mode, 10), atol=1e-5)
    assert torch.allclose(area, metrics.auc(curves))
    # default step: ceil(H*W / 28) pixels, i.e. RISE's 224 * 8 at 224 px (28 steps + the start)
    _, default = metrics.insertion_deletion(model, images, sal, mode=mode)
    assert default.shape == (3, 27)  # 16 x 16: 10 pixels per step
    big = torch.zeros(224, 224, dtype=torch.bool)
    big[50:120, 60:150] = True
    _, curves224 = metrics.insertion_deletion(MaskProbe(big), torch.randn(1, 3, 224, 224), torch.rand(1, 224, 224),
                                              mode=mode, batch_size=64)
    assert curves224.shape == (1, 29)


def test_perfect_saliency_beats_reversed_on_both_aucs():
    model, images, mask = probe_case()
    perfect = mask.float().expand(3, -1, -1) + 0.01 * torch.rand(3, 16, 16)
    reversed_ = -perfect
    ins_good, _ = metrics.insertion_deletion(model, images, perfect, mode="insertion")
    ins_bad, _ = metrics.insertion_deletion(model, images, reversed_, mode="insertion")
    del_good, _ = metrics.insertion_deletion(model, images, perfect, mode="deletion")
    del_bad, _ = metrics.insertion_deletion(model, images, reversed_, mode="deletion")
    assert (ins_good > ins_bad + 0.1).all(), (ins_good, ins_bad)
    assert (del_good < del_bad - 0.1).all(), (del_good, del_bad)
    # a low-resolution map is resized to the image first: same order, same result
    coarse = F.avg_pool2d(mask.float()[None, None], 2)[0].expand(3, -1, -1)
    assert torch.equal(metrics.insertion_deletion(model, images, coarse)[1],
                       metrics.insertion_deletion(model, images, resize_heatmaps(coarse, (16, 16)))[1])


def test_insertion_deletion_keeps_mode_and_statistics():
    model, images, mask = probe_case()
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    metrics.insertion_deletion(model, images, torch.rand(3, 16, 16), mode="insertion")
    assert model.training and model.bn.training
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    with pytest.raises(ValueError, match="mode"):
        metrics.insertion_deletion(model, images, torch.rand(3, 16, 16), mode="both")
    with pytest.raises(ValueError, match="saliency"):
        metrics.insertion_deletion(model, images, torch.rand(2, 16, 16))


def test_identity_transform_gives_consistency_one():
    torch.manual_seed(0)
    model = CompactCNN(4).eval()
    x = torch.randn(3, 3, 32, 32)
    with GradCAM(model) as cam:
        cos, iou = metrics.consistency(cam, x, transforms.identity_theta(3))
    assert torch.allclose(cos, torch.ones(3, dtype=torch.float64), atol=1e-5)
    assert torch.allclose(iou, torch.ones(3, dtype=torch.float64))


def test_cosine_and_topk_iou_known_values():
    a = torch.tensor([[1.0, 0.0, 0.0, 0.0]])
    b = torch.tensor([[0.0, 1.0, 0.0, 0.0]])
    assert metrics.cosine(a, a).item() == pytest.approx(1.0) and metrics.cosine(a, b).item() == 0.0
    assert metrics.topk_iou(a, b, fraction=0.25).item() == 0.0
    assert metrics.topk_iou(torch.tensor([[4.0, 3.0, 0.0, 0.0]]), torch.tensor([[3.0, 0.0, 4.0, 0.0]]),
                            fraction=0.5).item() == pytest.approx(1 / 3)


def test_explanation_metrics_over_a_dataset(tmp_path):
    bundle = data.build("synthetic", train_size=1, val_size=24, image_size=32, num_classes=4)
    torch.manual_seed(0)
    model = CompactCNN(4)
    model.train()
    model.features[0].eval()  # a mixed state must come back as it was
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with GradCAM(model) as cam:
        res = metrics.explanation_metrics(cam, bundle.val, "cpu", batch_size=10, limit=20, causal=True)
        again = metrics.explanation_metrics(cam, bundle.val, "cpu", batch_size=7, limit=20, causal=True)
    assert model.training and not model.features[0].training and model.features[1].training
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    for key in ("top1", "top5", "content_heatmap", "pointing_game", "insertion_auc", "deletion_auc"):
        assert res[key] == pytest.approx(again[key]), key  # batching does not change the result
    assert 0 <= res["content_heatmap"] <= 100 and 0 <= res["pointing_game"] <= 100
    assert 0 <= res["insertion_auc"] <= 1 and 0 <= res["deletion_auc"] <= 1
    assert len(res["insertion_curve"]) == 29 and -1 <= res["consistency"] <= 1 + 1e-9

    # a dataset without boxes still gives accuracy, AUCs and consistency
    plain = torch.utils.data.TensorDataset(bundle.val.images[:6], bundle.val.labels[:6])
    with GradCAM(model) as cam:
        res = metrics.explanation_metrics(cam, plain, "cpu", batch_size=4)
        png = viz.save_overlays(tmp_path / "o.png", [cam], ["m"], plain, "cpu", 3, bundle.classes)
    assert res["content_heatmap"] is None and res["pointing_game"] is None and 0 <= res["top1"] <= 100
    assert png.is_file()
