"""One CGC training step end to end (torchvision ResNet-18, batch 32, 224 px): ``cgc.train``'s
own ``train_step`` (three views, CE on each, element-wise Grad-CAM at layer4 with create_graph,
CGC InfoNCE) plus backward and an SGD update, for:

- ``reference`` / ``native`` (and other fast backends): every op through that backend;
- ``loop``: the authors' script: reference ops, but the positive heatmaps made per sample in a
  Python loop (upsample, slice the crop box, resize, flip), not by one batched warp.
"""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

import cgc
from cgc.losses import HEATMAP_EPS
from cgc.train import train_step

from .conftest import backends_for, run

BATCH, SIZE = 32, 224


class LoopWarpLoss(cgc.CGCLoss):
    """CGCLoss with the heatmap warp of the authors' script: one crop-resize-flip per sample,
    on integer pixel boxes (read back from ``theta``, which :func:`cgc.transforms.crop_flip_theta`
    built from the crop boxes and flips)."""

    def pair(self, cam_orig, cam_aug, theta):
        S = self.heatmap_size
        q = F.interpolate(cam_aug[:, None], (S, S), mode="bilinear", align_corners=False).flatten(1)
        up = F.interpolate(cam_orig[:, None], (S, S), mode="bilinear", align_corners=False)
        rows = []
        for b, ((sx, _, tx), (_, sy, ty)) in enumerate(theta.tolist()):
            w, h = abs(sx) * S, sy * S
            i, j, h, w = int(((ty + 1) * S - h) / 2), int(((tx + 1) * S - w) / 2), int(h), int(w)
            crop = F.interpolate(up[b:b + 1, :, i:i + h, j:j + w], (S, S), mode="bilinear", align_corners=False)
            rows.append(crop.flip(-1) if sx < 0 else crop)
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
    loss_fn = (LoopWarpLoss if variant == "loop" else cgc.CGCLoss)(0.5, SIZE, backend=backend)
    args = SimpleNamespace(crop_scale=(0.08, 1.0), ce_crop_scale=(0.08, 1.0), backend=backend)
    x = torch.rand(BATCH, 3, SIZE, SIZE, device=device)
    y = torch.randint(0, 100, (BATCH,), device=device)

    def step():
        loss = train_step(model, cam, loss_fn, x, y, args, lam=0.5)["loss"]
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
