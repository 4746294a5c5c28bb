"""Forward + backward of each CGC op at the sizes of ResNet training at 224 px, and of
info_nce with explicit negatives at distributed sizes, for the eager reference,
``torch.compile`` of the reference and every fast backend, on the CPU and (when present) CUDA;
plus the machine's copy bandwidth and matmul rate (the ceilings of the floor column)."""

from __future__ import annotations

import pytest
import torch

from cgc import ops, transforms
from cgc.ops import reference

from .conftest import COST, MACHINE, backends_for, run, sync

GRADCAM_SIZES = [(64, 512, 7, 7), (32, 2048, 7, 7), (32, 1024, 14, 14)]
WARP_SIZES = [((64, 1, 7, 7), (224, 224)), ((64, 3, 224, 224), (224, 224))]
NCE_SIZES = [(64, 224 * 224), (256, 56 * 56)]
# explicit negatives at distributed sizes (b anchors per process, N = the gathered batch)
NCE_NEG_SIZES = [(64, 256, 56 * 56), (32, 128, 224 * 224)]
ALL_BACKENDS = ["reference", "compiled", "native", "triton"]

_COMPILED = {}


def op_fn(op: str, backend: str):
    """The op function of ``backend``; ``compiled`` is torch.compile of the reference."""
    if backend == "compiled":
        if op not in _COMPILED:
            _COMPILED[op] = torch.compile(getattr(reference, op), fullgraph=True, dynamic=False)
        return _COMPILED[op]
    mod = ops._module(backend)
    return getattr(mod, op)


def needs(device: str, backend: str) -> None:
    if backend not in backends_for(device):
        pytest.skip(f"backend {backend} does not run on {device} here")


# ------------------------------------------------------------------------------ machine
def test_machine_ceilings(benchmark, device):
    """A 512 MiB device-to-device copy (bytes read + written) and a 4096^2 fp32 matmul."""
    src = torch.randn(128 * 1024 * 1024, device=device)
    dst = torch.empty_like(src)
    a, b = torch.randn(4096, 4096, device=device), torch.randn(4096, 4096, device=device)
    import time

    def best(fn, n=5):
        fn()
        sync(device)
        times = []
        for _ in range(n):
            t = time.perf_counter()
            fn()
            sync(device)
            times.append(time.perf_counter() - t)
        return min(times)

    t_copy = best(lambda: dst.copy_(src))
    t_mm = best(lambda: torch.mm(a, b))
    MACHINE[device]["copy_GBps"] = 2 * src.numel() * 4 / t_copy / 1e9
    MACHINE[device]["matmul_GFLOPs"] = 2 * 4096**3 / t_mm / 1e9
    benchmark.group = f"{device} machine"
    benchmark.pedantic(lambda: (dst.copy_(src), sync(device)), rounds=3, iterations=1)


# ------------------------------------------------------------------------------ ops
@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("shape", GRADCAM_SIZES, ids=lambda s: "x".join(map(str, s)))
def test_gradcam(benchmark, device, backend, shape):
    """Element-wise Grad-CAM (the CGC recipe, cgc.train's default), forward + backward."""
    needs(device, backend)
    fn = op_fn("gradcam", backend)
    A = torch.randn(shape, device=device, requires_grad=True)
    G = torch.randn(shape, device=device, requires_grad=True)
    go = torch.randn(shape[0], *shape[2:], device=device)

    def step():
        A.grad = G.grad = None
        fn(A, G, False).backward(go)

    case = f"gradcam {'x'.join(map(str, shape))}"
    COST[(device, case)] = (6 * A.numel() * 4, 0.0)  # read A, G twice, write dA, dG
    run(benchmark, device, case, backend, step)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("case", WARP_SIZES, ids=["heatmaps", "images"])
def test_affine_warp(benchmark, device, backend, case):
    """Crop/flip warp (border padding, as CGCLoss and transforms.apply use it)."""
    needs(device, backend)
    (shape, size) = case
    fn = op_fn("affine_warp", backend)
    gen = torch.Generator().manual_seed(0)
    theta = transforms.random_crop_flip(shape[0], 224, 224, generator=gen).theta().to(device)
    x = torch.randn(shape, device=device, requires_grad=True)
    go = torch.randn(shape[0], shape[1], *size, device=device)

    def step():
        x.grad = None
        fn(x, theta, size, "border").backward(go)

    name = f"affine_warp {'x'.join(map(str, shape))}->{size[0]}x{size[1]}"
    COST[(device, name)] = (2 * (x.numel() + go.numel()) * 4, 0.0)
    run(benchmark, device, name, backend, step)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("shape", NCE_SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_info_nce(benchmark, device, backend, shape):
    needs(device, backend)
    fn = op_fn("info_nce", backend)
    a = torch.rand(shape, device=device, requires_grad=True)  # heatmaps are non-negative
    p = torch.rand(shape, device=device, requires_grad=True)

    def step():
        a.grad = p.grad = None
        fn(a, p, 0.5, "mean").backward()

    B, D = shape
    name = f"info_nce {B}x{D}"
    COST[(device, name)] = (6 * a.numel() * 4, 4.0 * B * B * D)  # read a, p twice, write da, dp; 2 Grams
    run(benchmark, device, name, backend, step)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("shape", NCE_NEG_SIZES, ids=lambda s: f"{s[0]}x{s[1]}x{s[2]}")
def test_info_nce_negatives(benchmark, device, backend, shape):
    """info_nce against explicit negatives, as with all-gathered anchors: rank 1's b anchors
    are rows b .. 2b-1 of the N negatives, which get their own gradient."""
    needs(device, backend)
    fn = op_fn("info_nce_neg", backend)
    b, N, D = shape
    a = torch.rand((b, D), device=device, requires_grad=True)  # heatmaps are non-negative
    p = torch.rand((b, D), device=device, requires_grad=True)
    n = torch.rand((N, D), device=device, requires_grad=True)
    index = torch.arange(b, 2 * b, device=device)

    def step():
        a.grad = p.grad = n.grad = None
        fn(a, p, n, index, 0.5, "mean").backward()

    name = f"info_nce_neg {b}x{N}x{D}"
    # read a, p, n in both passes, write da, dp, dn; the Gram a n^T and its two transposes
    COST[(device, name)] = (3 * (2 * b + N) * D * 4, 6.0 * b * N * D)
    run(benchmark, device, name, backend, step)
