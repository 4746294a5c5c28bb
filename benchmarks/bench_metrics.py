"""The explanation metrics batched on the device against Quantus on the same inputs (CPU here,
and CUDA when present; Quantus is optional: skipped with the reason when absent).

- on precomputed heatmaps (batch 64 at 224 px): pointing game, relevance mass (content
  heatmap), sparseness, complexity;
- with the model (the compact CNN at 64 px, batch 64, Grad-CAM): max-sensitivity (10 noise
  samples) and MPRT (Quantus's granularity: every module with reset_parameters, top down).

Quantus computes on numpy arrays (and calls the explanation once per noise sample or
randomized layer); cgc on torch tensors, every noise sample of a batch in one CAM pass. Writes
its table to ``CGC_BENCH_METRICS_TABLE`` when set.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

import cgc
from cgc import metrics
from cgc.models import CompactCNN

from .conftest import devices, publish, sync

ROUNDS = int(os.environ.get("CGC_BENCH_ROUNDS", "3"))
#: (case, device) -> {implementation: (median s, min s)}
TIMES: dict[tuple[str, str], dict[str, tuple[float, float]]] = {}


@pytest.fixture(scope="module", params=devices())
def device(request):
    return request.param


def timed(benchmark, case, device, impl, fn, rounds=ROUNDS):
    def call():
        fn()
        sync(device)

    benchmark.group = f"{device} {case}"
    benchmark.pedantic(call, rounds=rounds, iterations=1, warmup_rounds=1)
    stats = getattr(benchmark, "stats", None)
    if stats is not None:
        TIMES.setdefault((case, device), {})[impl] = (stats.stats.median, stats.stats.min)


def quantus_or_skip():
    return pytest.importorskip("quantus", reason="Quantus (pip install quantus) is only a benchmark baseline")


@pytest.fixture(scope="module")
def heatmaps(device):
    gen = torch.Generator().manual_seed(0)
    a = torch.rand(64, 224, 224, generator=gen) ** 3
    region = torch.zeros(64, 224, 224, dtype=torch.bool)
    region[:, 40:150, 60:170] = True
    return a.to(device), region.to(device)


ON_MAPS = {
    "pointing game": ("pointing_game", "PointingGame", True),
    "relevance mass": ("content_heatmap", "RelevanceMassAccuracy", True),
    "sparseness": ("sparseness", "Sparseness", False),
    "complexity": ("complexity", "Complexity", False),
}


@pytest.mark.parametrize("impl", ["cgc", "quantus"])
@pytest.mark.parametrize("case", list(ON_MAPS))
def test_metrics_on_heatmaps(benchmark, device, heatmaps, case, impl):
    a, region = heatmaps
    ours, theirs, needs_region = ON_MAPS[case]
    name = f"{case}, 64 heatmaps at 224 px"
    if impl == "cgc":
        fn = getattr(metrics, ours)
        timed(benchmark, name, device, "cgc", lambda: fn(a, region) if needs_region else fn(a))
        return
    quantus = quantus_or_skip()
    metric = getattr(quantus, theirs)(disable_warnings=True)
    kw = dict(model=None, x_batch=np.zeros((64, 3, 224, 224), np.float32), y_batch=np.zeros(64, int))
    a_np = a[:, None].cpu().numpy()
    if needs_region:
        kw["s_batch"] = region[:, None].float().cpu().numpy()
    timed(benchmark, name, device, "quantus", lambda: metric(a_batch=a_np.copy(), **kw))


@pytest.fixture(scope="module")
def model_case(device):
    torch.manual_seed(0)
    model = CompactCNN(10).to(device).eval()
    x = torch.randn(64, 3, 64, 64, generator=torch.Generator().manual_seed(1)).to(device)
    with torch.no_grad():
        y = model(x).argmax(1)
    return model, x, y


def cam_explain(model, images, targets):
    with cgc.GradCAM(model, "features") as cam:
        return cgc.resize_heatmaps(cam(images, targets).cams, tuple(images.shape[-2:]))


def for_quantus(device):
    def explain(model, inputs, targets, **_):
        x = torch.as_tensor(inputs, device=device).float()
        return cam_explain(model, x, torch.as_tensor(targets, device=device).long()).detach().cpu().numpy()[:, None]

    return explain


@pytest.mark.parametrize("impl", ["cgc", "quantus"])
def test_max_sensitivity(benchmark, device, model_case, impl):
    model, x, y = model_case
    name = "max-sensitivity, compact CNN, 64 images at 64 px, 10 samples"
    noise = metrics.keyed_noise(7, list(range(64)), (3, 64, 64), 0.2)
    if impl == "cgc":
        explain = lambda images, t: cam_explain(model, images, t)  # noqa: E731
        timed(benchmark, name, device, "cgc", lambda: metrics.max_sensitivity(explain, x, y, noise, samples=10))
        return
    quantus = quantus_or_skip()
    fixed = [noise(s).cpu().numpy() for s in range(10)]
    a = for_quantus(device)(model, x.cpu().numpy(), y.cpu().numpy())

    def run():
        draws = iter(fixed)
        metric = quantus.MaxSensitivity(
            nr_samples=10,
            disable_warnings=True,
            perturb_func=lambda arr, indices, **_: arr + next(draws).reshape(arr.shape),
        )
        metric(
            model=model,
            x_batch=x.cpu().numpy(),
            y_batch=y.cpu().numpy(),
            a_batch=a.copy(),
            explain_func=for_quantus(device),
            device=device,
        )

    timed(benchmark, name, device, "quantus", run)


@pytest.mark.parametrize("impl", ["cgc", "quantus"])
def test_mprt(benchmark, device, model_case, impl):
    model, x, y = model_case
    name = "MPRT (every module), compact CNN, 64 images at 64 px"
    if impl == "cgc":
        steps = metrics.randomization_steps(model, "module", 64)
        timed(
            benchmark,
            name,
            device,
            "cgc",
            lambda: metrics.model_randomization(model, cam_explain, x, y, steps, seed=42),
        )
        return
    quantus = quantus_or_skip()
    timed(
        benchmark,
        name,
        device,
        "quantus",
        lambda: quantus.MPRT(seed=42, disable_warnings=True)(
            model=model,
            x_batch=x.cpu().numpy(),
            y_batch=y.cpu().numpy(),
            a_batch=None,
            explain_func=for_quantus(device),
            device=device,
        ),
    )


def table() -> str:
    lines = [
        f"torch {torch.__version__}, {os.cpu_count()} CPUs, torch threads {torch.get_num_threads()}",
        "",
        "| device | case | cgc ms (min) | Quantus ms (min) | cgc speed-up |",
        "|---|---|---:|---:|---:|",
    ]
    for (case, dev), impls in TIMES.items():
        ours, theirs = impls.get("cgc"), impls.get("quantus")
        fmt = lambda t: "—" if t is None else f"{t[0] * 1e3:.1f} ({t[1] * 1e3:.1f})"  # noqa: E731
        speed = "—" if not (ours and theirs) else f"{theirs[0] / ours[0]:.1f}× ({theirs[1] / ours[1]:.1f}×)"
        lines.append(f"| {dev} | {case} | {fmt(ours)} | {fmt(theirs)} | {speed} |")
    lines += ["", "Speed-up: time(Quantus) / time(cgc) on medians (on minima)."]
    return "\n".join(lines)


@pytest.fixture(scope="module", autouse=True)
def report(request):
    yield
    if TIMES:
        publish(
            request.config.pluginmanager.get_plugin("terminalreporter"),
            "cgc metrics vs Quantus",
            table(),
            "CGC_BENCH_METRICS_TABLE",
        )
