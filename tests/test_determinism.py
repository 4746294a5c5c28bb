"""Reproducibility under ``torch.use_deterministic_algorithms(True)``: ``auto`` leaves out the
CUDA kernels that sum with floating-point atomics (the warp's backward in native and Triton),
those kernels raise (or warn) when named, and everything ``auto`` picks repeats bit for bit.

CPU cases check the policy; the CUDA cases (skipped without a GPU) run it. Each test sets the
mode it needs itself (``det``, ``mode_off``), and conftest's autouse fixture puts the previous
settings back after every test, so no test depends on what ran before it.
"""

from __future__ import annotations

import pytest
import torch

from cgc import ops, transforms
from cgc.runtime import deterministic

from .test_ops import random_theta

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")


@pytest.fixture
def det():
    """The deterministic mode on (not warn-only) for this test."""
    with deterministic(True):
        yield


@pytest.fixture
def mode_off():
    """The deterministic mode off for this test, whatever an earlier test left behind (the
    settings before the test come back after it: ``_restore_deterministic_mode`` in conftest)."""
    if torch.are_deterministic_algorithms_enabled():
        torch.use_deterministic_algorithms(False)
    yield


def test_context_restores_the_previous_settings():
    """``deterministic(True)`` turns the mode on (not warn-only) and cuDNN autotuning off, then
    puts back what was set before (here: warn-only mode, autotuning on); ``deterministic(False)``
    changes nothing. conftest's fixture undoes these settings after the test."""
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.backends.cudnn.benchmark = True
    with deterministic(True):
        assert torch.are_deterministic_algorithms_enabled()
        assert not torch.is_deterministic_algorithms_warn_only_enabled()
        assert not torch.backends.cudnn.benchmark
    assert torch.are_deterministic_algorithms_enabled() and torch.is_deterministic_algorithms_warn_only_enabled()
    assert torch.backends.cudnn.benchmark
    with deterministic(False):
        assert torch.are_deterministic_algorithms_enabled() and torch.is_deterministic_algorithms_warn_only_enabled()
        assert torch.backends.cudnn.benchmark


def test_auto_order_leaves_out_racy_cuda_kernels(det):
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert ops.auto_order("affine_warp", cuda) == ("reference",)
    # without a backward the warps' forward kernels (gathers) are deterministic
    assert ops.auto_order("affine_warp", cuda, grad=False) == ops.CUDA_ORDER["affine_warp"]
    for op in ("gradcam", "info_nce"):
        assert ops.auto_order(op, cuda) == ops.CUDA_ORDER[op]
    for op in ("gradcam", "affine_warp", "info_nce"):
        assert ops.auto_order(op, cpu) == ("native", "reference")


def test_auto_order_unchanged_without_the_mode(mode_off):
    assert not torch.are_deterministic_algorithms_enabled()
    for op in ("gradcam", "affine_warp", "info_nce"):
        assert ops.auto_order(op, torch.device("cuda")) == ops.CUDA_ORDER[op]


def test_triton_alert(mode_off):
    common = pytest.importorskip("cgc.kernels.common", reason="triton is not installed", exc_type=ImportError)
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    common.alert_nondeterministic("k", cuda)  # the mode is off: nothing to say
    with deterministic(True):
        with pytest.raises(RuntimeError, match=r"k sums with floating-point atomics.*backend='reference'"):
            common.alert_nondeterministic("k", cuda)
        common.alert_nondeterministic("k", cpu)  # interpreted atomics run one at a time
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        with pytest.warns(UserWarning, match="not deterministic"):
            common.alert_nondeterministic("k", cuda)
    finally:
        torch.use_deterministic_algorithms(False)


def _warp_grad(backend, x, theta):
    x = x.detach().requires_grad_()
    out = ops.affine_warp(x, theta, (224, 224), backend=backend)
    out.backward(torch.ones_like(out) * torch.linspace(0, 1, out.numel(), device=x.device).view_as(out))
    return out.detach(), x.grad


@needs_cuda
@pytest.mark.parametrize("backend", [None, "triton"], ids=["auto", "triton"])
@pytest.mark.parametrize("maps", ["affine", "crop-flip"])
def test_cuda_heatmap_warp_repeats_bit_for_bit(det, rng, backend, maps):
    """``auto`` (the reference, under the mode) and Triton's dense backward for heatmap-sized
    inputs (no atomics, so it is allowed) give bit-identical outputs and gradients."""
    if backend is not None and backend not in ops.available_backends():
        pytest.skip(f"backend {backend} unavailable")
    x = torch.randn(64, 1, 7, 7, generator=rng).cuda()
    theta = (
        random_theta(rng, 64) if maps == "affine" else transforms.random_crop_flip(64, 224, 224, generator=rng).theta()
    )
    first, second = (_warp_grad(backend, x, theta.cuda()) for _ in range(2))
    assert all(torch.equal(a, b) for a, b in zip(first, second))


@needs_cuda
@pytest.mark.parametrize("backend", ["native", "triton"])
def test_cuda_racy_warp_backward_raises_when_named(det, rng, backend):
    if backend not in ops.available_backends():
        pytest.skip(f"backend {backend} unavailable")
    x = torch.randn(4, 3, 32, 32, generator=rng).cuda()  # Triton scatters for inputs over 16 pixels a side
    with pytest.raises(RuntimeError, match="deterministic"):
        _warp_grad(backend, x, random_theta(rng, 4).cuda())


@needs_cuda
@pytest.mark.parametrize("backend", ["native", "triton"])
def test_cuda_info_nce_repeats_bit_for_bit(det, rng, backend):
    if backend not in ops.available_backends():
        pytest.skip(f"backend {backend} unavailable")
    a = torch.randn(64, 50176, generator=rng).cuda()
    p = torch.randn(64, 50176, generator=rng).cuda()
    runs = []
    for _ in range(2):
        a_ = a.clone().requires_grad_()
        loss = ops.info_nce(a_, p, 0.5, backend=backend)
        loss.backward()
        runs.append((loss.detach(), a_.grad))
    assert torch.equal(runs[0][0], runs[1][0]) and torch.equal(runs[0][1], runs[1][1])
