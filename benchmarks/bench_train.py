"""The CGC training step end to end (torchvision ResNet-18, batch 32, 224 px): ``cgc.train``'s own
``train_step`` (three views, CE on each, the :class:`cgc.CGCTerm` with the CAM at layer4 under
``create_graph``, InfoNCE) plus backward and an SGD update, for

- ``reference`` / ``native`` (and other fast backends): every op through that backend;
- ``loop-warp``: the authors' script: reference ops, but the positive heatmaps made per sample
  in a Python loop (upsample, slice the crop box, resize, flip), not by one batched warp
  (a :class:`cgc.CGCLoss` subclass handed to the term);

then the cost of each CAM method inside that step (native backend), and the memory the step
keeps for its backward against a CE-only step on the same three views: bytes of the tensors
autograd saves (CPU; an allocator-independent count) and ``max_memory_allocated`` (CUDA), so a
user can size a GPU batch for CGC; and the cost of the term's options (uniform crops,
class-contrastive negatives) on cgc's compact model and on the ResNet-18. Tables: the shared ratio table (steps) and, with
``CGC_BENCH_TRAIN_TABLE=path``, the method and memory table.
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F

import cgc
from cgc.engine import StepInputs, StepOptions, train_step
from cgc.losses import HEATMAP_EPS
from cgc.structure import to_channels_last

from .conftest import backends_for, publish, run, sync

BATCH, SIZE = 32, 224
METHOD_ROUNDS = int(os.environ.get("CGC_BENCH_ROUNDS", "3"))
#: (device, what) -> {variant: value}; what is "ms" (median step time) or "MiB"
EXTRA: dict[tuple[str, str], dict[str, float]] = {}


class LoopWarpLoss(cgc.CGCLoss):
    """CGCLoss with the heatmap warp of the authors' script: one crop-resize-flip per sample,
    on integer pixel boxes (read back from ``theta``, which :func:`cgc.transforms.crop_flip_theta`
    built from the crop boxes and flips)."""

    def pair(self, cam_orig, cam_aug, theta, size=None, cell_floor=None):
        S = self.heatmap_size
        q = F.interpolate(cam_aug[:, None], (S, S), mode="bilinear", align_corners=False).flatten(1)
        up = F.interpolate(cam_orig[:, None], (S, S), mode="bilinear", align_corners=False)
        rows = []
        for b, ((sx, _, tx), (_, sy, ty)) in enumerate(theta.tolist()):
            w, h = abs(sx) * S, sy * S
            i, j, h, w = int(((ty + 1) * S - h) / 2), int(((tx + 1) * S - w) / 2), int(h), int(w)
            crop = F.interpolate(up[b : b + 1, :, i : i + h, j : j + w], (S, S), mode="bilinear", align_corners=False)
            rows.append(crop.flip(-1) if sx < 0 else crop)
        p = torch.cat(rows).flatten(1)
        q = q / (q.sum(1, keepdim=True) + HEATMAP_EPS) + HEATMAP_EPS
        p = p / (p.sum(1, keepdim=True) + HEATMAP_EPS) + HEATMAP_EPS
        return q, p


def make_step(
    device: str,
    backend: str,
    *,
    loop_warp: bool = False,
    batch: int = BATCH,
    size: int = SIZE,
    arch: str = "resnet18",
    **settings,
):
    """One training step as ``cgc.train`` runs it (channels-last on CPU) with fixed inputs:
    a torchvision ResNet-18 (100 classes, CAM at layer4) or cgc's compact model (10 classes, the
    built-in dataset's recipe), with the term's ``settings`` (a :class:`cgc.TermConfig`'s, by
    name; default HiResCAM of the predicted class at T 0.5, the term at full weight)."""
    from torchvision.models import resnet18

    from cgc.models import CompactCNN, build_model

    torch.manual_seed(0)
    classes = 100 if arch == "resnet18" else 10
    if arch == "resnet18":
        model, layer = resnet18(num_classes=classes), "layer4"
    elif arch == "compact":
        model, layer = CompactCNN(classes), "features"
    else:  # a transformer built for the image size, its CAM layer found
        model, layer = build_model(arch, classes, image_size=size), None
    model = model.to(device).train()
    channels_last = device == "cpu"
    if channels_last:
        to_channels_last(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    config = cgc.TermConfig(cam="hirescam", cam_target="predicted", term_gate=0.0, heatmap_size=size).replace(
        target_layer=layer, **settings
    )
    term = None
    if config.enabled:
        loss_fn = LoopWarpLoss(0.5, size, backend=backend) if loop_warp else None
        term = cgc.CGCTerm.from_config(model, config, loss=loss_fn, backend=backend, channels_last=channels_last)
    gen = torch.Generator().manual_seed(1)
    x = torch.rand(batch, 3, size, size, generator=gen).to(device)
    y = torch.randint(0, classes, (batch,), generator=gen).to(device)
    theta = cgc.transforms.random_crop_flip(
        batch, size, size, generator=gen, device=device, sampler=config.crop_sampler
    ).theta()
    ce_theta = cgc.transforms.random_crop_flip(
        batch, size, size, scale=(0.08, 1.0), generator=gen, device=device
    ).theta()
    inputs = StepInputs(x, y, theta, None, ce_theta)
    guard = cgc.Safeguards(config)
    options = StepOptions(backend=backend, channels_last=channels_last)

    def step():
        losses = train_step(model, term, inputs, 0.5, guard=guard, options=options)
        opt.zero_grad(set_to_none=True)
        losses["loss"].backward()
        opt.step()

    return step


@pytest.mark.parametrize("variant", ["loop", "reference", "native", "triton"])
def test_train_step_resnet18(benchmark, device, variant):
    if variant != "loop" and variant not in backends_for(device):
        pytest.skip(f"backend {variant} does not run on {device} here")
    step = make_step(device, "reference" if variant == "loop" else variant, loop_warp=variant == "loop")
    name = "loop-warp" if variant == "loop" else variant
    rounds, warmup = (2, 1) if device == "cpu" else (10, 3)
    run(benchmark, device, f"CGC train step ResNet-18 b{BATCH}", name, step, rounds=rounds, warmup=warmup)


METHOD_BATCH, METHOD_SIZE = 16, 160


@pytest.mark.parametrize("method", ["ce only", "gradcam", "hirescam", "gradcam++", "xgradcam", "layercam"])
def test_step_cost_of_each_cam_method(benchmark, device, method):
    """The step with each CAM method as the CGC target (ResNet-18, batch 16 at 160 px, native
    backend where built), next to the CE-only step on the same three views."""
    backend = "native" if "native" in backends_for(device) else "reference"
    step = make_step(
        device,
        backend,
        cam="hirescam" if method == "ce only" else method,
        loss="ce" if method == "ce only" else "cgc",
        batch=METHOD_BATCH,
        size=METHOD_SIZE,
    )

    def timed():
        step()
        sync(device)

    benchmark.group = f"{device} CGC step per CAM method"
    benchmark.pedantic(timed, rounds=METHOD_ROUNDS if device == "cpu" else 10, iterations=1, warmup_rounds=2)
    stats = getattr(benchmark, "stats", None)
    if stats is not None:
        case = f"ResNet-18 b{METHOD_BATCH} {METHOD_SIZE}px ({backend})"
        EXTRA.setdefault((device, f"step ms, median, {case}"), {})[method] = stats.stats.median * 1e3
        EXTRA.setdefault((device, f"step ms, minimum, {case}"), {})[method] = stats.stats.min * 1e3


#: the term's options against today's CGC step: (name, options of make_step)
OPTIONS = {
    "ce only": dict(loss="ce"),
    "cgc": {},
    "uniform crops": dict(crop_sampler="uniform"),
    "class negatives K=1": dict(class_negatives=1),
    "class negatives K=3": dict(class_negatives=3),
    "uniform crops + K=3": dict(crop_sampler="uniform", class_negatives=3),
    "label's CAM": dict(cam_target="label"),
    "detached target": dict(detach_target=True),
    "label's CAM + detached target": dict(cam_target="label", detach_target=True),
    "gradient bound 1": dict(grad_bound=1.0),
    "no floor": dict(heatmap_floor=0.0),
}


#: the models of the options' table: cgc's compact model and two timm ViTs at the built-in
#: dataset's recipe (batch 32 at 64 px; the ViTs with 8 px patches), a ResNet-18 at 160 px
ARCHS = ("compact", "timm:test_vit", "timm:vit_tiny_patch16_224", "resnet18")


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("option", list(OPTIONS))
def test_step_cost_of_the_term_options(benchmark, device, arch, option):
    """The step with the term's options (uniform crops, class-contrastive negatives) next to
    today's CGC step and the CE-only step: time and saved-for-backward memory, for the built-in
    dataset's recipe (compact model and ViTs, batch 32 at 64 px) and a ResNet-18 (batch 16 at
    160 px)."""
    if arch.startswith("timm:"):
        pytest.importorskip("timm", reason="timm is optional (pip install timm)")
    backend = "native" if "native" in backends_for(device) else "reference"
    batch, size = (METHOD_BATCH, METHOD_SIZE) if arch == "resnet18" else (32, 64)
    step = make_step(device, backend, cam="gradcam", batch=batch, size=size, arch=arch, **OPTIONS[option])

    def timed():
        step()
        sync(device)

    benchmark.group = f"{device} CGC step per term option, {arch}"
    benchmark.pedantic(timed, rounds=METHOD_ROUNDS if device == "cpu" else 10, iterations=1, warmup_rounds=2)
    case = f"{arch} b{batch} {size}px ({backend})"
    stats = getattr(benchmark, "stats", None)
    if stats is not None:
        EXTRA.setdefault((device, f"step ms, median, {case}"), {})[option] = stats.stats.median * 1e3
    EXTRA.setdefault((device, f"saved for backward, MiB, {case}"), {})[option] = saved_bytes(step) / 2**20


def saved_bytes(step) -> int:
    """Bytes of the distinct storages autograd saves for the backward during one ``step``:
    what a training step holds at its peak besides weights and optimizer state."""
    seen: dict[int, int] = {}

    def pack(t):
        if t.device.type != "meta":
            st = t.untyped_storage()
            seen[st.data_ptr()] = st.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        step()
    return sum(seen.values())


@pytest.mark.parametrize("loss", ["ce", "cgc"])
def test_step_memory(benchmark, device, loss):
    """Memory of the step for its backward, CGC vs CE only on the same three views (batch 32 at
    224 px): saved-tensor bytes, and on CUDA the allocator's peak. (Timed once, through
    pytest-benchmark so that ``--benchmark-only`` runs it.)"""
    backend = "native" if "native" in backends_for(device) else "reference"
    step = make_step(device, backend, loss=loss)
    step()  # optimizer state and lazy allocations exist before the measurement
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    benchmark.group = f"{device} CGC step memory"
    mib = benchmark.pedantic(lambda: saved_bytes(step), rounds=1, iterations=1) / 2**20
    EXTRA.setdefault((device, f"saved for backward, MiB, ResNet-18 b{BATCH} {SIZE}px"), {})[loss] = mib
    if device == "cuda":
        torch.cuda.synchronize()
        peak = (torch.cuda.max_memory_allocated() - base) / 2**20
        EXTRA.setdefault((device, f"CUDA peak above weights+optimizer, MiB, b{BATCH} {SIZE}px"), {})[loss] = peak
    assert mib > 0


def table() -> str:
    lines = ["| device | measure | " + " | ".join(["variant", "value", "vs first"]) + " |", "|---|---|---|---:|---:|"]
    for (dev, what), values in EXTRA.items():
        first = next(iter(values.values()))
        for name, v in values.items():
            lines.append(f"| {dev} | {what} | {name} | {v:.1f} | {v / first:.2f}× |")
    lines += ["", "vs first: the value over the first row of its measure (the CE-only step)."]
    return "\n".join(lines)


@pytest.fixture(scope="module", autouse=True)
def report(request):
    yield
    if EXTRA:
        publish(
            request.config.pluginmanager.get_plugin("terminalreporter"),
            "cgc training step: CAM methods and memory",
            table(),
            "CGC_BENCH_TRAIN_TABLE",
        )
