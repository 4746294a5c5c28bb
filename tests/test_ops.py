"""The three ops: the reference against independent formulations, and every backend against
the reference (forward, backward, gradcheck, odd shapes, non-contiguous inputs, dtypes).

Errors are relative to the float64 reference, ``||out - ref|| / ||ref||``, and must stay
under the dtype's tolerance (float64 1e-10, float32 1e-5, float16 5e-3, bfloat16 4e-2: the
bf16 mantissa has 8 bits) or, where the reference evaluated in that same low precision is
itself worse (backward passes whose ReLU mask or reductions round differently), under twice
the reference's own error: a fast path must be at least about as exact as the reference.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from cgc import ops
from cgc.ops import reference

from .conftest import interpreted

TOL = {torch.float64: 1e-10, torch.float32: 1e-5, torch.float16: 5e-3, torch.bfloat16: 4e-2}
LOW_PRECISION = (torch.float16, torch.bfloat16)


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.detach().double().cpu(), ref.detach().double().cpu()
    assert torch.isfinite(out).all(), "output has NaN/inf"
    return float((out - ref).norm() / ref.norm().clamp_min(1e-30))


def assert_close(out, ref64, dtype, ref_lowp=None, what="", scale=1.0):
    """``out`` within the dtype's tolerance of the float64 ``ref64`` (see module docstring);
    ``scale`` is the values' order of magnitude, for the absolute allowance."""
    ref = ref64.detach().double().cpu()
    diff = float((out.detach().double().cpu() - ref).norm())
    assert torch.isfinite(out).all(), f"{what}: output has NaN/inf"
    allowed = TOL[dtype] * float(ref.norm())
    if ref_lowp is not None and dtype in LOW_PRECISION:
        allowed = max(allowed, 2 * float((ref_lowp.detach().double().cpu() - ref).norm()))
    # values that are zero in exact arithmetic (e.g. gradients of normalised 1-D rows) come
    # out as rounding noise: an absolute allowance of TOL per element of size `scale`
    allowed += TOL[dtype] * scale * ref.numel() ** 0.5
    assert diff <= allowed, (f"{what}: error {diff:.3g} > allowed {allowed:.3g} for {dtype} "
                             f"(relative {diff / max(float(ref.norm()), 1e-30):.3g})")


def randn(gen, *shape, dtype=torch.float64, device="cpu", exact_in=None):
    """Standard normal values; with ``exact_in`` they are rounded to that dtype first (kept in
    ``dtype``), so a float64 oracle sees exactly the inputs a low-precision kernel sees and
    e.g. no ReLU mask flips because of input rounding alone."""
    x = torch.randn(tuple(shape), generator=gen, dtype=torch.float64)
    if exact_in is not None:
        x = x.to(exact_in).double()
    return x.to(device=device, dtype=dtype)


def random_theta(gen, b, device="cpu"):
    """Random affine maps: rotation/scale/shear plus translation, some outside the image."""
    return (torch.eye(2, 3, dtype=torch.float64) + 0.6 * torch.randn(b, 2, 3, generator=gen,
                                                                       dtype=torch.float64)).to(device)


# --------------------------------------------------------------- reference vs independent forms
def test_gradcam_reference_by_hand(rng):
    A = randn(rng, 3, 5, 4, 6)
    G = randn(rng, 3, 5, 4, 6)
    pooled = torch.zeros(3, 4, 6, dtype=torch.float64)
    elementwise = torch.zeros(3, 4, 6, dtype=torch.float64)
    for b in range(3):
        for k in range(5):
            alpha = G[b, k].sum() / 24
            pooled[b] += alpha * A[b, k]
            elementwise[b] += G[b, k] * A[b, k]
    assert torch.allclose(reference.gradcam(A, G, True), pooled.clamp_min(0))
    assert torch.allclose(reference.gradcam(A, G, False), elementwise.clamp_min(0))
    W = G.mean((2, 3))
    assert torch.allclose(reference.gradcam(A, W, True), pooled.clamp_min(0))


@pytest.mark.parametrize("padding_mode", ["zeros", "border"])
def test_affine_warp_reference_is_grid_sample(rng, padding_mode):
    for B, C, H, W, h, w in [(3, 2, 7, 9, 11, 5), (1, 1, 1, 1, 4, 3), (2, 3, 16, 16, 16, 16), (2, 1, 5, 3, 1, 1)]:
        x = randn(rng, B, C, H, W)
        theta = random_theta(rng, B)
        ref = F.grid_sample(x, F.affine_grid(theta, (B, C, h, w), align_corners=False), mode="bilinear",
                            padding_mode=padding_mode, align_corners=False)
        assert rel_err(reference.affine_warp(x, theta, (h, w), padding_mode), ref) < 1e-12


def test_affine_warp_identity_is_bilinear_resize(rng):
    for H, W, h, w in [(7, 7, 224, 224), (5, 9, 10, 4), (1, 1, 3, 3), (8, 8, 8, 8)]:
        x = randn(rng, 2, 3, H, W)
        theta = torch.eye(2, 3, dtype=torch.float64).expand(2, 2, 3)
        out = reference.affine_warp(x, theta, (h, w), "border")
        ref = F.interpolate(x, (h, w), mode="bilinear", align_corners=False)
        assert rel_err(out, ref) < 1e-12


def test_info_nce_reference_is_cross_entropy(rng):
    for B, D, T in [(2, 1, 0.5), (7, 13, 0.1), (16, 3136, 1.0)]:
        a, p = randn(rng, B, D), randn(rng, B, D)
        an, pn = F.normalize(a, dim=1), F.normalize(p, dim=1)
        rows = []
        for b in range(B):
            negs = [an[b] @ an[k] for k in range(B) if k != b]
            rows.append(torch.stack([an[b] @ pn[b]] + negs))
        ref = F.cross_entropy(torch.stack(rows) / T, torch.zeros(B, dtype=torch.long), reduction="none")
        assert rel_err(reference.info_nce(a, p, T, "none"), ref) < 1e-12
        assert rel_err(reference.info_nce(a, p, T, "mean"), ref.mean()) < 1e-12
        assert rel_err(reference.info_nce(a, p, T, "sum"), ref.sum()) < 1e-12


# --------------------------------------------------------------- every backend vs the reference
def _gradcam_shapes(small):
    if small:
        return [(2, 3, 4, 5), (1, 1, 1, 1), (3, 7, 3, 3)]
    return [(2, 3, 4, 5), (1, 1, 1, 1), (3, 7, 3, 3), (4, 64, 7, 7), (2, 33, 13, 11), (5, 1, 9, 2)]


def _warp_cases(small):
    cases = [((2, 1, 7, 7), (12, 12)), ((1, 1, 1, 1), (3, 2)), ((3, 2, 5, 9), (4, 11))]
    if not small:
        cases += [((4, 1, 7, 7), (64, 64)), ((2, 3, 32, 24), (17, 31)), ((1, 5, 2, 3), (1, 1))]
    return cases


def _nce_shapes(small):
    if small:
        return [(2, 1), (3, 17), (5, 64)]
    return [(2, 1), (3, 17), (5, 64), (32, 3136), (64, 49), (9, 1000)]


@pytest.mark.parametrize("pool", [True, False])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16])
def test_gradcam_matches_reference(backend_device, rng, pool, dtype):
    backend, device = backend_device
    for shape in _gradcam_shapes(interpreted(backend, device)):
        A64, G64 = randn(rng, *shape, exact_in=dtype), randn(rng, *shape, exact_in=dtype)
        ref = reference.gradcam(A64, G64, pool)
        A = A64.to(device, dtype).requires_grad_()
        G = G64.to(device, dtype).requires_grad_()
        out = ops.gradcam(A, G, pool=pool, backend=backend)
        assert out.dtype == dtype and out.shape == ref.shape and out.device.type == device
        Al = A64.to(dtype).requires_grad_()
        Gl = G64.to(dtype).requires_grad_()
        low = reference.gradcam(Al, Gl, pool)
        assert_close(out, ref, dtype, low, f"forward {shape}")
        gout = randn(rng, *ref.shape, exact_in=dtype)
        A64.requires_grad_()
        G64.requires_grad_()
        want = torch.autograd.grad(reference.gradcam(A64, G64, pool), (A64, G64), gout)
        got = torch.autograd.grad(out, (A, G), gout.to(device, dtype))
        lows = torch.autograd.grad(low, (Al, Gl), gout.to(dtype))
        for g, w, l, name in zip(got, want, lows, ("dA", "dG")):
            assert_close(g, w, dtype, l, f"{name} {shape}")


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16])
def test_gradcam_weights_form(backend_device, rng, dtype):
    backend, device = backend_device
    A64, W64 = randn(rng, 3, 6, 5, 4, exact_in=dtype), randn(rng, 3, 6, exact_in=dtype)
    ref = reference.gradcam(A64, W64, True)
    out = ops.gradcam(A64.to(device, dtype), W64.to(device, dtype), backend=backend)
    assert_close(out, ref, dtype, reference.gradcam(A64.to(dtype), W64.to(dtype), True), "weights")


@pytest.mark.parametrize("padding_mode", ["zeros", "border"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16])
def test_affine_warp_matches_reference(backend_device, rng, padding_mode, dtype):
    backend, device = backend_device
    for shape, size in _warp_cases(interpreted(backend, device)):
        x64 = randn(rng, *shape, exact_in=dtype).requires_grad_()
        theta = random_theta(rng, shape[0])
        ref = reference.affine_warp(x64, theta, size, padding_mode)
        x = x64.detach().to(device, dtype).requires_grad_()
        out = ops.affine_warp(x, theta.to(device, torch.float32), size, padding_mode=padding_mode,
                              backend=backend)
        assert out.dtype == dtype and out.shape == ref.shape
        # theta reaches the backend in float32: compare against the float64 op on that theta
        ref = reference.affine_warp(x64, theta.float().double(), size, padding_mode)
        xl = x64.detach().to(dtype).requires_grad_()
        low = reference.affine_warp(xl, theta.float(), size, padding_mode)
        assert_close(out, ref, dtype, low, f"forward {shape}->{size}")
        gout = randn(rng, *ref.shape, exact_in=dtype)
        (want,) = torch.autograd.grad(ref, x64, gout)
        (got,) = torch.autograd.grad(out, x, gout.to(device, dtype))
        (lgot,) = torch.autograd.grad(low, xl, gout.to(dtype))
        assert_close(got, want, dtype, lgot, f"backward {shape}->{size}")


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16])
def test_info_nce_matches_reference(backend_device, rng, reduction, dtype):
    backend, device = backend_device
    for B, D in _nce_shapes(interpreted(backend, device)):
        a64 = randn(rng, B, D, exact_in=dtype).requires_grad_()
        p64 = randn(rng, B, D, exact_in=dtype).requires_grad_()
        T = float(torch.empty(1).uniform_(0.1, 1.0, generator=rng))
        ref = reference.info_nce(a64, p64, T, reduction)
        a = a64.detach().to(device, dtype).requires_grad_()
        p = p64.detach().to(device, dtype).requires_grad_()
        out = ops.info_nce(a, p, T, reduction=reduction, backend=backend)
        assert out.shape == ref.shape
        al = a64.detach().to(dtype).requires_grad_()
        pl = p64.detach().to(dtype).requires_grad_()
        low = reference.info_nce(al, pl, T, reduction)
        assert_close(out, ref, dtype, low, f"forward {(B, D)}")
        gout = randn(rng, *ref.shape, exact_in=dtype)
        want = torch.autograd.grad(ref, (a64, p64), gout)
        got = torch.autograd.grad(out, (a, p), gout.to(device, out.dtype))
        lows = torch.autograd.grad(low, (al, pl), gout.to(low.dtype))
        for g, w, l, name in zip(got, want, lows, ("d anchors", "d positives")):
            # the gradients are O(1/T): so is their rounding noise where they vanish (D = 1)
            assert_close(g, w, dtype, l, f"{name} {(B, D)}", scale=1 / T)


def test_non_contiguous_inputs(backend_device, rng):
    backend, device = backend_device
    A = randn(rng, 4, 6, 5, 3, device=device).transpose(2, 3)[::2]  # strided, [2,6,3,5]
    G = randn(rng, 2, 5, 6, 3, device=device).permute(0, 2, 3, 1)
    assert not A.is_contiguous() and not G.is_contiguous()
    assert rel_err(ops.gradcam(A, G, pool=False, backend=backend),
                   reference.gradcam(A.cpu(), G.cpu(), False)) < 1e-10
    x = randn(rng, 2, 7, 6, 3, device=device).permute(0, 3, 1, 2)  # channels-last view
    theta = random_theta(rng, 2, device)[:, :, :]
    assert rel_err(ops.affine_warp(x, theta, (5, 4), backend=backend),
                   reference.affine_warp(x.cpu(), theta.cpu(), (5, 4))) < 1e-10
    a = randn(rng, 9, 4, device=device).t()  # [4, 9] non-contiguous
    p = randn(rng, 4, 18, device=device)[:, ::2]
    assert rel_err(ops.info_nce(a, p, 0.3, backend=backend), reference.info_nce(a.cpu(), p.cpu(), 0.3)) < 1e-10


def test_gradcheck_float64(backend_device, rng):
    backend, device = backend_device
    A = randn(rng, 2, 3, 4, 3, device=device).requires_grad_()
    G = randn(rng, 2, 3, 4, 3, device=device).requires_grad_()
    for pool in (True, False):
        assert torch.autograd.gradcheck(lambda a, g: ops.gradcam(a, g, pool=pool, backend=backend), (A, G))
    x = randn(rng, 2, 2, 5, 4, device=device).requires_grad_()
    theta = random_theta(rng, 2, device)
    for mode in ("zeros", "border"):
        assert torch.autograd.gradcheck(
            lambda t: ops.affine_warp(t, theta, (6, 3), padding_mode=mode, backend=backend), (x,))
    a = randn(rng, 4, 6, device=device).requires_grad_()
    p = randn(rng, 4, 6, device=device).requires_grad_()
    assert torch.autograd.gradcheck(lambda u, v: ops.info_nce(u, v, 0.4, backend=backend), (a, p))
    assert torch.autograd.gradcheck(lambda u, v: ops.info_nce(u, v, 0.4, reduction="none", backend=backend),
                                    (a, p))


def test_double_backward_through_gradcam(backend_device, rng):
    """The CGC loss differentiates the heatmap, whose input is itself a gradient."""
    backend, device = backend_device
    A = randn(rng, 2, 3, 4, 4, device=device).requires_grad_()
    G = randn(rng, 2, 3, 4, 4, device=device).requires_grad_()
    assert torch.autograd.gradgradcheck(lambda a, g: ops.gradcam(a, g, pool=False, backend=backend), (A, G))


# --------------------------------------------------------------- bad inputs
def test_errors():
    A = torch.randn(2, 3, 4, 4)
    with pytest.raises(ValueError, match="4-D"):
        ops.gradcam(A[0], A[0])
    with pytest.raises(ValueError, match="does not match"):
        ops.gradcam(A, torch.randn(2, 3, 4, 5))
    with pytest.raises(ValueError, match="does not match"):
        ops.gradcam(A, torch.randn(2, 4))
    with pytest.raises(TypeError, match="dtypes"):
        ops.gradcam(A, A.double())
    with pytest.raises(TypeError, match="floating"):
        ops.gradcam(A.long(), A.long())
    with pytest.raises(ValueError, match="empty"):
        ops.gradcam(torch.randn(0, 3, 4, 4), torch.randn(0, 3, 4, 4))
    x = torch.randn(2, 1, 7, 7)
    with pytest.raises(ValueError, match=r"\[B,2,3\]"):
        ops.affine_warp(x, torch.randn(2, 3, 3), 5)
    with pytest.raises(ValueError, match=r"\[B,2,3\]"):
        ops.affine_warp(x, torch.randn(2, 6), 5)
    with pytest.raises(ValueError, match="rows for a batch"):
        ops.affine_warp(x, torch.randn(3, 2, 3), 5)
    with pytest.raises(ValueError, match="padding_mode"):
        ops.affine_warp(x, torch.randn(2, 2, 3), 5, padding_mode="reflect")
    with pytest.raises(ValueError, match="size"):
        ops.affine_warp(x, torch.randn(2, 2, 3), (0, 4))
    with pytest.raises(ValueError, match="empty"):
        ops.affine_warp(torch.randn(0, 1, 7, 7), torch.randn(0, 2, 3), 5)
    a = torch.randn(4, 10)
    with pytest.raises(ValueError, match="at least 2"):
        ops.info_nce(a[:1], a[:1], 0.5)
    with pytest.raises(ValueError, match="temperature"):
        ops.info_nce(a, a, 0.0)
    with pytest.raises(ValueError, match="temperature"):
        ops.info_nce(a, a, float("nan"))
    with pytest.raises(ValueError, match="same shape"):
        ops.info_nce(a, torch.randn(4, 9), 0.5)
    with pytest.raises(ValueError, match="empty"):
        ops.info_nce(torch.randn(4, 0), torch.randn(4, 0), 0.5)
    with pytest.raises(ValueError, match="reduction"):
        ops.info_nce(a, a, 0.5, reduction="max")
    with pytest.raises(ValueError, match="unknown backend"):
        ops.info_nce(a, a, 0.5, backend="fortran")
    if torch.cuda.is_available():
        with pytest.raises(ValueError, match="different devices"):
            ops.info_nce(a, a.cuda(), 0.5)


def test_backend_env_and_fallback(monkeypatch):
    a = torch.randn(3, 5)
    monkeypatch.setenv("CGC_BACKEND", "reference")
    assert torch.equal(ops.info_nce(a, a, 0.5), reference.info_nce(a, a, 0.5))
    monkeypatch.setenv("CGC_BACKEND", "auto")
    assert "reference" in ops.available_backends()
    assert torch.allclose(ops.info_nce(a, a, 0.5), reference.info_nce(a, a, 0.5), rtol=1e-5, atol=1e-6)
