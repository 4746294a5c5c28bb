"""One CGC training step end to end (torchvision ResNet-18, batch 32, 224 px, three views, CE
on each, element-wise Grad-CAM at layer4 with create_graph, CGC InfoNCE; forward, backward and
an SGD update), as ``cgc.train.train_step`` does it, for:

- ``reference`` / ``native`` (and other fast backends): every op through that backend;
- ``loop``: the authors' script: reference ops, but the positive heatmaps made per sample in a
  Python loop (upsample, slice the crop box, resize, flip), not by one batched warp.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import cgc
from cgc import transforms
from cgc.losses import HEATMAP_EPS

from .conftest import backends_for, run

BATCH, SIZE = 32, 224


class LoopWarpLoss(cgc.CGCLoss):
    """CGCLoss with the heatmap warp of the authors' script: one crop-resize-flip per sample."""

    def __init__(self, crops: transforms.CropFlip, **kwargs):
        super().__init__(**kwargs)
        self.crops = crops

    def pair(self, cam_orig, cam_aug, theta):
        S = self.heatmap_size
        q = F.interpolate(cam_aug[:, None], (S, S), mode="bilinear", align_corners=False).flatten(1)
        up = F.interpolate(cam_orig[:, None], (S, S), mode="bilinear", align_corners=False)
        rows = []
        for b in range(up.shape[0]):
            i, j, h, w = (int(v) for v in self.crops.boxes[b].tolist())
            crop = F.interpolate(up[b:b + 1, :, i:i + h, j:j + w], (S, S), mode="bilinear", align_corners=False)
            rows.append(crop.flip(-1) if bool(self.crops.flips[b]) else crop)
        p = torch.cat(rows).flatten(1)
        q = q / (q.sum(1, keepdim=True) + HEATMAP_EPS) + HEATMAP_EPS
        p = p / (p.sum(1, keepdim=True) + HEATMAP_EPS) + HEATMAP_EPS
        return q, p


def make_step(device: str, variant: str):
    from torchvision.models import resnet18

    torch.manual_seed(0)
    model = resnet18(num_classes=100).to(device).train()
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    backend = "reference" if variant == "loop" else variant
    cam = cgc.GradCAM(model, "layer4", pool=False, backend=backend)
    x = torch.rand(BATCH, 3, SIZE, SIZE, device=device)
    y = torch.randint(0, 100, (BATCH,), device=device)
    gen = torch.Generator().manual_seed(1)

    def step():
        aug = transforms.random_crop_flip(BATCH, SIZE, SIZE, generator=gen)
        ce_view = transforms.random_crop_flip(BATCH, SIZE, SIZE, scale=(0.08, 1.0), generator=gen)
        theta = aug.theta().to(device)
        x_aug = transforms.apply(x, theta, backend=backend)
        x_ce = transforms.apply(x, ce_view.theta().to(device), backend=backend)
        if variant == "loop":
            loss_fn = LoopWarpLoss(aug, temperature=0.5, heatmap_size=SIZE, backend=backend)
        else:
            loss_fn = cgc.CGCLoss(0.5, SIZE, backend=backend)
        logits, acts = cam.forward(torch.cat([x_ce, x, x_aug]))
        ce = sum(F.cross_entropy(logits[k * BATCH:(k + 1) * BATCH], y) for k in range(3))
        target = logits[BATCH:2 * BATCH].detach().argmax(1)
        cams = cam.heatmaps(logits, acts, target.repeat(2), rows=slice(BATCH, 3 * BATCH), create_graph=True)
        loss = ce + 0.5 * loss_fn(cams[:BATCH], cams[BATCH:], theta)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return step


@pytest.mark.parametrize("variant", ["loop", "reference", "native", "triton"])
def test_train_step_resnet18(benchmark, device, variant):
    if variant != "loop" and variant not in backends_for(device):
        pytest.skip(f"backend {variant} does not run on {device} here")
    step = make_step(device, variant)
    name = "loop-warp" if variant == "loop" else variant
    rounds, warmup = (2, 1) if device == "cpu" else (10, 3)
    run(benchmark, device, f"CGC train step ResNet-18 b{BATCH}", name, step, rounds=rounds, warmup=warmup)
