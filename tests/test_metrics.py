"""Explanation metrics on cases whose answer is known by construction."""

from __future__ import annotations

import math

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


def test_center_baseline_points_at_the_center_and_off_center_objects_are_the_far_ones():
    center = metrics.center_heatmaps(3, (8, 10))
    assert center.shape == (3, 8, 10) and torch.equal(center[0], center[2])
    assert divmod(int(center[0].argmax()), 10) == (3, 4)  # the pixel above and left of the center
    boxes = torch.tensor([[[3.0, 2.0, 6.0, 5.0]], [[0.0, 0.0, 3.0, 3.0]], [[6.0, 4.0, 10.0, 8.0]]])
    hits = metrics.pointing_game(center, metrics.box_region(boxes, (8, 10)))
    assert hits.tolist() == [True, False, False]
    # box centers (4.5, 3.5), (1.5, 1.5), (8, 6) against the image's (5, 4): a quarter side is 2.5 x 2
    assert metrics.off_center(boxes, (8, 10)).tolist() == [False, True, True]


def test_class_specificity_is_zero_for_class_blind_heatmaps_and_one_minus_cosine_otherwise():
    """A model whose every class score reads the same evidence has heatmaps that do not depend
    on the class (class-specificity 0); the mask probe's class 0 and 1 read disjoint evidence."""
    mask = torch.zeros(8, 8, dtype=torch.bool)
    mask[2:6, 2:6] = True

    class TwoReaders(nn.Module):
        def __init__(self, same: bool):
            super().__init__()
            self.conv = nn.Conv2d(3, 2, 1, bias=False)
            nn.init.ones_(self.conv.weight)
            self.register_buffer("m0", mask.float())
            self.register_buffer("m1", mask.float() if same else (~mask).float())

        def forward(self, x):
            a = self.conv(x)
            return torch.stack([(a[:, 0] * self.m0).mean((1, 2)), (a[:, 1] * self.m1).mean((1, 2))], 1)

    x = torch.rand(4, 3, 8, 8, generator=torch.Generator().manual_seed(1)) + 0.5
    dataset = torch.utils.data.TensorDataset((x * 255 / 1.5).to(torch.uint8), torch.zeros(4, dtype=torch.long))
    found = {}
    for same in (True, False):
        with GradCAM(TwoReaders(same), "conv", method="hirescam") as cam:  # element-wise: keeps the masks
            chosen = metrics.select(["class_specificity"])
            found[same] = metrics.explanation_metrics(cam, dataset, "cpu", metrics=chosen)["class_specificity"]
    assert found[True] == pytest.approx(0, abs=1e-6) and found[False] == pytest.approx(1, abs=1e-6)


def test_gaussian_blur_matches_2d_kernel():
    x = torch.randn(2, 3, 20, 17, generator=torch.Generator().manual_seed(1))
    t = torch.arange(11.0) - 5
    g = torch.exp(-t * t / 50)
    k2 = torch.outer(g, g) / g.sum() ** 2
    ref = F.conv2d(x, k2.expand(3, 1, 11, 11), padding=5, groups=3)
    assert torch.allclose(metrics.gaussian_blur(x), ref, atol=1e-5)
    with pytest.raises(ValueError, match="odd"):
        metrics.gaussian_blur(x, kernel_size=4)


def test_auc_normalized_trapezoid():
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
            idx = order[: i * step]
            cur[:, idx] = finish.reshape(C, -1)[:, idx]
            scores.append(model(cur.view(1, C, H, W)).softmax(1)[0, c].item())
    return torch.tensor(scores)


@pytest.mark.parametrize("mode", ["insertion", "deletion"])
def test_insertion_deletion_matches_per_image_loop(mode):
    model, images, _mask = probe_case()
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
    _, curves224 = metrics.insertion_deletion(
        MaskProbe(big), torch.randn(1, 3, 224, 224), torch.rand(1, 224, 224), mode=mode, batch_size=64
    )
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
    assert torch.equal(
        metrics.insertion_deletion(model, images, coarse)[1],
        metrics.insertion_deletion(model, images, resize_heatmaps(coarse, (16, 16)))[1],
    )


def test_insertion_deletion_keeps_mode_and_statistics():
    model, images, _mask = probe_case()
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
    assert metrics.topk_iou(
        torch.tensor([[4.0, 3.0, 0.0, 0.0]]), torch.tensor([[3.0, 0.0, 4.0, 0.0]]), fraction=0.5
    ).item() == pytest.approx(1 / 3)


@pytest.mark.slow
def test_explanation_metrics_over_a_dataset(tmp_path):
    bundle = data.build("synthetic", train_size=1, val_size=24, image_size=32, num_classes=4)
    torch.manual_seed(0)
    model = CompactCNN(4)
    model.train()
    model.features[0].eval()  # a mixed state must come back as it was
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with GradCAM(model) as cam:
        settings = metrics.MetricsConfig(sensitivity_samples=2)
        res = metrics.explanation_metrics(cam, bundle.val, "cpu", batch_size=10, limit=20, settings=settings)
        again = metrics.explanation_metrics(cam, bundle.val, "cpu", batch_size=7, limit=20, settings=settings)
    assert model.training and not model.features[0].training and model.features[1].training
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    for key in metrics.METRICS:
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


# ------------------------------------------------------------------ complexity, similarity, sanity checks
def test_sparseness_and_complexity_known_answers():
    n = 16 * 16
    constant = torch.ones(1, 16, 16)
    one_hot = torch.zeros(1, 16, 16)
    one_hot[0, 3, 5] = 2.0
    assert metrics.sparseness(constant).item() == pytest.approx(0.0, abs=1e-6)
    # the largest possible, (N - 1) / N, less what Quantus's 1e-7 on every pixel costs
    assert metrics.sparseness(one_hot).item() == pytest.approx((n - 1) / n, abs=1e-4)
    spread = torch.rand(8, 16, 16, generator=torch.Generator().manual_seed(0))
    assert (metrics.sparseness(spread) < metrics.sparseness(one_hot)).all()
    assert (metrics.sparseness(spread**4) > metrics.sparseness(spread)).all()  # more peaked, sparser
    assert metrics.complexity(one_hot).item() == pytest.approx(0.0, abs=1e-6)
    assert metrics.complexity(constant).item() == pytest.approx(math.log(n), rel=1e-6)  # the largest possible
    assert math.isnan(metrics.complexity(torch.zeros(1, 16, 16)).item())  # no mass to spread


def test_spearman_and_ssim_against_scipy_and_skimage():
    scipy_stats = pytest.importorskip("scipy.stats")
    skimage_metrics = pytest.importorskip("skimage.metrics", reason="scikit-image (a dependency of quantus)")
    gen = torch.Generator().manual_seed(3)
    a = torch.rand(5, 12, 14, generator=gen)
    b = 0.5 * a + 0.5 * torch.rand(5, 12, 14, generator=gen)
    a[0, :6] = 0.0  # ties: scipy gives them their average rank
    b[1] = (b[1] * 4).round()
    for i in range(5):
        rho = scipy_stats.spearmanr(a[i].flatten(), b[i].flatten())[0]
        assert metrics.spearman(a, b)[i].item() == pytest.approx(rho, abs=1e-12)
        rng = float(torch.cat([a[i], b[i]]).max() - torch.cat([a[i], b[i]]).min())
        ref = skimage_metrics.structural_similarity(a[i].double().numpy(), b[i].double().numpy(), data_range=rng)
        assert metrics.ssim(a, b)[i].item() == pytest.approx(ref, abs=1e-10)
    assert math.isnan(metrics.spearman(torch.ones(1, 4, 4), a[:1, :4, :4]).item())
    assert metrics.ssim(a, a).tolist() == pytest.approx([1.0] * 5)
    with pytest.raises(ValueError, match="at least 7"):
        metrics.ssim(a[:, :5, :5], b[:, :5, :5])


def _input_only(model, images, targets):
    """An 'explanation' that ignores the model and the class: what the sanity checks must flag."""
    return images.abs().sum(1)


def _cam_explain(method="gradcam"):
    def explain(model, images, targets):
        with GradCAM(model, "features", method=method) as cam:
            return resize_heatmaps(cam(images, targets).cams, tuple(images.shape[-2:]))

    return explain


def trained_compact():
    """A compact model trained briefly on the built-in shapes: its heatmaps depend on its weights."""
    torch.manual_seed(0)
    bundle = data.build("synthetic", train_size=256, val_size=16, image_size=32, num_classes=3)
    model = CompactCNN(3)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    x, y = data.normalize(bundle.train.images), bundle.train.labels
    for _ in range(40):
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval(), data.normalize(bundle.val.images), bundle.val.labels


@pytest.mark.slow
def test_model_randomization_fails_a_heatmap_that_ignores_the_model():
    model, x, _ = trained_compact()
    targets = model(x).argmax(1)
    steps = metrics.randomization_steps(model, "stage", 32)
    assert [name for name, _ in steps] == ["fc", "features", "stage2", "stem"]  # from the head down
    names, rho, sim = metrics.model_randomization(model, _input_only, x, targets, steps)
    assert names == ["fc", "features", "stage2", "stem"] and rho.shape == sim.shape == (4, 16)
    assert torch.allclose(rho, torch.ones_like(rho)) and torch.allclose(sim, torch.ones_like(sim))  # fails
    _, rho, _ = metrics.model_randomization(model, _cam_explain(), x, targets, steps)
    assert rho[-1].nanmean() < 0.5 and rho.nanmean() < 0.6  # Grad-CAM changes with the weights: passes


@pytest.mark.slow
def test_random_logit_fails_a_class_blind_heatmap():
    model, x, _ = trained_compact()
    targets = model(x).argmax(1)
    keys = list(range(16))
    other = metrics.other_classes(targets, 3, keys)
    assert (other != targets).all() and other.max() < 3
    blind = metrics.random_logit(model, _input_only, x, targets, 3, keys)
    assert torch.allclose(blind, torch.ones_like(blind))
    assert metrics.random_logit(model, _cam_explain(), x, targets, 3, keys).mean() < 0.9


@pytest.mark.slow
def test_max_sensitivity_zero_for_constant_explanations_and_grows_with_noise():
    model, x, _ = trained_compact()
    targets = model(x).argmax(1)
    flat = lambda images, t: torch.ones(images.shape[0], 32, 32)  # noqa: E731
    small = metrics.keyed_noise(1, list(range(16)), (3, 32, 32), 0.01)
    large = metrics.keyed_noise(1, list(range(16)), (3, 32, 32), 0.5)
    assert torch.equal(
        metrics.max_sensitivity(flat, x, targets, small, samples=3), torch.zeros(16, dtype=torch.float64)
    )
    explain = lambda images, t: _cam_explain()(model, images, t)  # noqa: E731
    a = metrics.max_sensitivity(explain, x, targets, small, samples=3, batch_size=20)
    b = metrics.max_sensitivity(explain, x, targets, large, samples=3)
    assert (a.nan_to_num(0) <= b.nan_to_num(0) + 1e-9).float().mean() > 0.8 and b.nanmean() > a.nanmean()
    # the same noise in any batch: the keyed draws belong to the images, not to the call
    assert torch.allclose(
        metrics.keyed_noise(1, [3, 4], (3, 32, 32), 0.5)(2), metrics.keyed_noise(1, [9, 3, 4], (3, 32, 32), 0.5)(2)[1:]
    )


def test_every_metric_leaves_the_model_bit_identical():
    """All registered metrics on a model with BatchNorm (train mode: the statistics would move):
    same values, same Parameter objects, same modes, no hooks left."""
    torch.manual_seed(0)
    bundle = data.build("synthetic", train_size=8, val_size=12, image_size=32, num_classes=3)
    model = CompactCNN(3)
    model.train()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    params = list(model.parameters())
    with GradCAM(model) as cam:
        result = metrics.explanation_metrics(
            cam, bundle.val, "cpu", batch_size=5, settings=metrics.MetricsConfig(sensitivity_samples=2)
        )
    assert set(metrics.METRICS) <= set(result)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())
    assert all(p is q for p, q in zip(params, model.parameters()))
    assert all(m.training for m in model.modules()) and not any(m._forward_hooks for m in model.modules())
    assert len(result["mprt_steps"]) == 4 and result["mprt_step_names"] == ["fc", "features", "stage2", "stem"]


def test_metric_registry_and_selection():
    assert list(metrics.METRICS)[:2] == ["top1", "top5"]
    slow = {m.name for m in metrics.select(skip_slow=False)} - {m.name for m in metrics.select(skip_slow=True)}
    assert slow == {"insertion_auc", "deletion_auc", "max_sensitivity", "mprt"}
    assert "content_heatmap" not in {m.name for m in metrics.select(has_boxes=False)}
    with pytest.raises(ValueError, match="unknown metric 'sparsenes'; did you mean 'sparseness'"):
        metrics.select(["sparsenes"])
    with pytest.raises(ValueError, match="already registered"):
        metrics.register_metric(metrics.METRICS["top1"])

    @metrics.register_metric
    class Peak(metrics.Metric):  # a new metric is one class
        name, label, higher_is_better = "test_peak", "peak", True

        def update(self, batch):
            return self.mean_of(batch.heatmaps.flatten(1).amax(1))

    try:
        bundle = data.build("synthetic", train_size=4, val_size=6, image_size=32, num_classes=3)
        with GradCAM(CompactCNN(3).eval()) as cam:
            out = metrics.explanation_metrics(cam, bundle.val, "cpu", metrics=metrics.select(["test_peak", "top1"]))
        assert set(out) == {"test_peak", "top1"} and out["test_peak"] >= 0
    finally:
        metrics.METRICS.pop("test_peak")
