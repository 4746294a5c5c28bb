"""Explanation throughput, on the CPU (and CUDA when present):

- heatmaps per second of Grad-CAM at input resolution for a batch of 32 images at 224 px on
  torchvision's ResNet-18 (``layer4``, predicted classes): ``cgc.GradCAM`` +
  ``resize_heatmaps`` vs pytorch-grad-cam's ``GradCAM`` and Captum's ``LayerGradCam`` +
  ``LayerAttribution.interpolate`` (both optional: skipped with the reason when absent);
- images per second of insertion + deletion AUC (RISE protocol, 28 steps): the batched
  :func:`cgc.metrics.insertion_deletion` vs a per-image, per-step loop as RISE runs it.

At the end of the pytest run a markdown table is printed and, when ``CGC_BENCH_EXPLAIN_TABLE``
names a file, written there. Run: ``pytest benchmarks/bench_explain.py --benchmark-only``.
"""

from __future__ import annotations

import os

import pytest
import torch

from cgc import GradCAM, metrics, resize_heatmaps
from cgc.models import CompactCNN
from cgc.structure import to_channels_last

from .conftest import devices, publish, sync

BATCH, SIZE = 32, 224
ROUNDS = int(os.environ.get("CGC_BENCH_ROUNDS", "3"))
#: (case, device) -> {implementation: (median s, min s, items per call)}
TIMES: dict[tuple[str, str], dict[str, tuple[float, float, int]]] = {}


@pytest.fixture(scope="module", params=devices())
def device(request):
    return request.param


@pytest.fixture
def resnet(device):
    """A fresh ResNet-18 (the same random weights every time, NCHW as torchvision builds it) and
    the image batch: each implementation gets the model as a user has it, so a layout change
    one of them makes (cgc.GradCAM's channels-last on CPU) cannot leak into another's timing."""
    import torchvision

    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=1000).to(device).eval()
    images = torch.randn(BATCH, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(1)).to(device)
    return model, images


def timed(benchmark, case: str, device: str, impl: str, items: int, fn, rounds: int = ROUNDS):
    """Time ``fn`` with pytest-benchmark and record its median and minimum."""

    def call():
        fn()
        sync(device)

    benchmark.group = f"{device} {case}"
    benchmark.extra_info.update(device=device, case=case, impl=impl, items=items)
    benchmark.pedantic(call, rounds=rounds, iterations=1, warmup_rounds=1)
    stats = getattr(benchmark, "stats", None)
    if stats is not None:
        TIMES.setdefault((case, device), {})[impl] = (stats.stats.median, stats.stats.min, items)


# ------------------------------------------------------------------ Grad-CAM at input resolution
CAM_CASE = f"Grad-CAM, ResNet-18, batch {BATCH} at {SIZE} px"


@pytest.mark.parametrize("precision", ["float32", "bfloat16 autocast"])
def test_gradcam_cgc(benchmark, resnet, device, precision):
    """cgc.GradCAM as the command lines call it (channels-last on CPU), in float32 and under
    bfloat16 autocast (AMX / tensor cores; pytorch-grad-cam cannot run under it: its numpy
    conversion rejects bfloat16)."""
    model, images = resnet
    cam = GradCAM(model, "layer4", channels_last=device == "cpu")
    amp = precision != "float32"

    def run():
        with torch.autocast(device, dtype=torch.bfloat16, enabled=amp):
            cams = cam(images).cams
        return resize_heatmaps(cams, (SIZE, SIZE))

    assert run().shape == (BATCH, SIZE, SIZE)
    timed(benchmark, CAM_CASE, device, "cgc.GradCAM" + (f" ({precision})" if amp else ""), BATCH, run)
    cam.close()


@pytest.mark.parametrize("layout", ["as built", "channels-last"])
def test_gradcam_pytorch_grad_cam(benchmark, resnet, device, layout):
    """pytorch-grad-cam on the model as torchvision builds it, and (to show what part of the
    speed-up is layout alone) on the same model and images converted to channels-last."""
    pgc = pytest.importorskip(
        "pytorch_grad_cam",
        reason="pytorch-grad-cam is not installed (pip install grad-cam); it is only a benchmark baseline",
    )
    model, images = resnet
    name = "pytorch-grad-cam"
    if layout == "channels-last":
        to_channels_last(model)
        images = images.contiguous(memory_format=torch.channels_last)
        name += " (channels-last model)"
    cam = pgc.GradCAM(model=model, target_layers=[model.layer4[-1]])

    def run():
        return cam(input_tensor=images, targets=None)

    assert run().shape == (BATCH, SIZE, SIZE)
    timed(benchmark, CAM_CASE, device, name, BATCH, run)
    cam.activations_and_grads.release()


def test_gradcam_captum(benchmark, resnet, device):
    attr = pytest.importorskip(
        "captum.attr", reason="captum is not installed (pip install captum); it is only a benchmark baseline"
    )
    model, images = resnet
    lgc = attr.LayerGradCam(model, model.layer4)
    with torch.no_grad():
        targets = model(images).argmax(1)  # captum needs explicit targets; the others predict them

    def run():
        maps = lgc.attribute(images, target=targets, relu_attributions=True)
        return attr.LayerAttribution.interpolate(maps, (SIZE, SIZE), interpolate_mode="bilinear")

    assert run().shape == (BATCH, 1, SIZE, SIZE)
    timed(benchmark, CAM_CASE, device, "captum LayerGradCam", BATCH, run)


# ------------------------------------------------------------------ insertion + deletion
def loop_insertion_deletion(model, images, saliency, step):
    """RISE's way: for each image and each step, change the next pixels and run the model on
    that one image. Returns the two AUCs per image."""
    B, C, H, W = images.shape
    n = -(-H * W // step)
    out = []
    with metrics.eval_mode(model), torch.no_grad():
        for b in range(B):
            img = images[b : b + 1]
            c = model(img).argmax(1).item()
            order = saliency[b].flatten().argsort(dim=0, descending=True)
            aucs = []
            for start, finish in ((metrics.gaussian_blur(img), img), (img, torch.zeros_like(img))):
                cur, scores = start.clone().view(1, C, -1), []
                for i in range(n + 1):
                    idx = order[: i * step]
                    cur[..., idx] = finish.reshape(1, C, -1)[..., idx]
                    scores.append(model(cur.view(1, C, H, W)).softmax(1)[0, c])
                aucs.append(metrics.auc(torch.stack(scores)[None]))
            out.append(torch.cat(aucs))
    return torch.stack(out)


def batched_insertion_deletion(model, images, saliency, step):
    ins, _ = metrics.insertion_deletion(model, images, saliency, mode="insertion", step=step)
    dele, _ = metrics.insertion_deletion(model, images, saliency, mode="deletion", step=step)
    return torch.stack([ins, dele], 1)


def causal_setup(kind: str, device: str):
    """(case, model, images, saliency, pixels per step) of one insertion/deletion case."""
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(2)
    if kind == "resnet18":
        import torchvision

        model, n, size = torchvision.models.resnet18(num_classes=1000), 4, 224
    else:
        model, n, size = CompactCNN(10), 16, 64
    images = torch.randn(n, 3, size, size, generator=gen).to(device)
    saliency = torch.rand(n, size // 8, size // 8, generator=gen).to(device)
    saliency = resize_heatmaps(saliency, (size, size))
    case = f"insertion + deletion, {kind}, {n} images at {size} px"
    return case, model.to(device).eval(), images, saliency, -(-size * size // 28)


@pytest.mark.parametrize("kind", ["compact", "resnet18"])
@pytest.mark.parametrize("impl", ["batched", "per-image loop"])
def test_insertion_deletion(benchmark, device, kind, impl):
    case, model, images, saliency, step = causal_setup(kind, device)
    fn = batched_insertion_deletion if impl == "batched" else loop_insertion_deletion
    if impl == "batched" and kind == "compact":  # the two agree (random saliency has no ties)
        assert torch.allclose(
            fn(model, images, saliency, step), loop_insertion_deletion(model, images, saliency, step), atol=1e-4
        )
    timed(benchmark, case, device, impl, images.shape[0], lambda: fn(model, images, saliency, step), rounds=2)


# ------------------------------------------------------------------ table
def table() -> str:
    """Markdown: per case and implementation, median (min) time, items per second and the
    speed-up of cgc's implementation over each other one."""
    lines = [
        f"torch {torch.__version__}, {os.cpu_count()} CPUs, torch threads {torch.get_num_threads()}",
        "",
        "| device | case | implementation | median ms (min) | per second | cgc speed-up |",
        "|---|---|---|---:|---:|---:|",
    ]
    for (case, dev), impls in TIMES.items():
        ours = impls.get("cgc.GradCAM") or impls.get("batched")
        for impl, (med, mn, items) in impls.items():
            speed = "—" if ours is None else f"{med / ours[0]:.2f}× ({mn / ours[1]:.2f}×)"
            lines.append(
                f"| {dev} | {case} | {impl} | {med * 1e3:.0f} ({mn * 1e3:.0f}) | {items / med:.1f} | {speed} |"
            )
    lines += [
        "",
        "Per second: heatmaps (Grad-CAM) or images (insertion + deletion AUC) per second, on "
        "medians. Speed-up: time(implementation) / time(cgc) on medians (on minima).",
    ]
    return "\n".join(lines)


@pytest.fixture(scope="module", autouse=True)
def report(request):
    """Print (and with CGC_BENCH_EXPLAIN_TABLE, write) the table after this module's benchmarks."""
    yield
    if TIMES:
        publish(
            request.config.pluginmanager.get_plugin("terminalreporter"),
            "cgc explanation benchmark table",
            table(),
            "CGC_BENCH_EXPLAIN_TABLE",
        )
