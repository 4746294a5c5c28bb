"""The three ops: the reference against independent formulations, and every backend against
the reference (forward, backward, gradcheck, odd shapes, non-contiguous inputs, dtypes).

Errors are relative to the float64 reference, ``||out - ref|| / ||ref||``, and must stay
under the dtype's tolerance (float64 1e-10, float32 1e-5, float16 5e-3, bfloat16 4e-2: the
bf16 mantissa has 8 bits) or, where the reference evaluated in that same low precision is
itself worse (backward passes whose ReLU mask or reductions round differently), under twice
the reference's own error: a fast path must be at least about as exact as the reference.

No case compares the reference with itself: it is checked against independent formulations
(``F.grid_sample``, ``F.cross_entropy``, loops by hand), in float32 against its float64 self,
and by gradcheck; the backend comparisons run every other implementation in every dtype.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from cgc import ops
from cgc.ops import reference

from .conftest import backend_device_params, interpreted

ALL_DTYPES = (torch.float64, torch.float32, torch.float16, torch.bfloat16)


def against_reference(*dtypes):
    """Parametrize ``backend_device`` and ``dtype`` for a comparison with the float64 reference:
    every (backend, device) in every dtype, but the reference itself only in float32. In
    float64 the reference would be compared with itself, and in float16 / bfloat16 with an
    allowance made of its own error in that dtype: neither can fail."""
    params = [
        p
        for p in backend_device_params(extra=[(d,) for d in dtypes])
        if p.values[0][0] != "reference" or p.values[1] == torch.float32
    ]
    return pytest.mark.parametrize("backend_device,dtype", params, indirect=["backend_device"])


#: every implementation but the reference (for checks whose expectation is the reference)
not_reference = pytest.mark.parametrize(
    "backend_device", backend_device_params(keep=lambda backend, device: backend != "reference"), indirect=True
)

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
    # values that are zero in exact arithmetic (e.g. gradients of normalized 1-D rows) come
    # out as rounding noise: an absolute allowance of TOL per element of size `scale`
    allowed += TOL[dtype] * scale * ref.numel() ** 0.5
    assert diff <= allowed, (
        f"{what}: error {diff:.3g} > allowed {allowed:.3g} for {dtype} "
        f"(relative {diff / max(float(ref.norm()), 1e-30):.3g})"
    )


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
    return (torch.eye(2, 3, dtype=torch.float64) + 0.6 * torch.randn(b, 2, 3, generator=gen, dtype=torch.float64)).to(
        device
    )


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
        ref = F.grid_sample(
            x,
            F.affine_grid(theta, (B, C, h, w), align_corners=False),
            mode="bilinear",
            padding_mode=padding_mode,
            align_corners=False,
        )
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


def index_tensor(index, b: int, n: int) -> torch.Tensor:
    """The int64 [b] form of a public ``anchor_index`` (None, an offset, or a tensor), on the CPU."""
    if index is None:
        return torch.full((b,), -1, dtype=torch.long)
    if isinstance(index, int):
        return torch.arange(index, index + b)
    return index.cpu()


def test_info_nce_negatives_reference_is_cross_entropy(rng):
    """Identity (3): the explicit-negatives reference is the cross-entropy of the logits
    ``[a_b.p_b, a_b.n_k (k != anchor_index[b])] / T`` with target 0, written row by row."""
    for b, N, D, T, index in [
        (1, 2, 1, 0.5, None),
        (4, 9, 13, 0.1, 2),
        (5, 7, 30, 1.0, torch.tensor([6, -1, 0, 0, 3])),
        (3, 1, 8, 0.3, None),
    ]:
        a, p, n = randn(rng, b, D), randn(rng, b, D), randn(rng, N, D)
        idx = index_tensor(index, b, N)
        an, pn, nn = F.normalize(a, dim=1), F.normalize(p, dim=1), F.normalize(n, dim=1)
        rows = [torch.stack([an[i] @ pn[i]] + [an[i] @ nn[k] for k in range(N) if k != idx[i]]) / T for i in range(b)]
        ref = torch.stack([F.cross_entropy(r[None], torch.zeros(1, dtype=torch.long))[()] for r in rows])
        for reduction, want in (("none", ref), ("mean", ref.mean()), ("sum", ref.sum())):
            assert rel_err(reference.info_nce_neg(a, p, n, idx, T, reduction), want) < 1e-12


def test_info_nce_negatives_reference_twice_differentiable(rng):
    """The oracle is plain PyTorch: second derivatives in all three inputs exist and check."""
    a, p, n = (randn(rng, r, 4).requires_grad_() for r in (3, 3, 5))
    idx = torch.tensor([4, -1, 4])
    assert torch.autograd.gradgradcheck(lambda u, v, w: reference.info_nce_neg(u, v, w, idx, 0.4, "mean"), (a, p, n))


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
@against_reference(*ALL_DTYPES)
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
        for g, w, lo, name in zip(got, want, lows, ("dA", "dG")):
            assert_close(g, w, dtype, lo, f"{name} {shape}")


@against_reference(*ALL_DTYPES)
def test_gradcam_weights_form(backend_device, rng, dtype):
    backend, device = backend_device
    A64, W64 = randn(rng, 3, 6, 5, 4, exact_in=dtype), randn(rng, 3, 6, exact_in=dtype)
    ref = reference.gradcam(A64, W64, True)
    out = ops.gradcam(A64.to(device, dtype), W64.to(device, dtype), backend=backend)
    assert_close(out, ref, dtype, reference.gradcam(A64.to(dtype), W64.to(dtype), True), "weights")


@pytest.mark.parametrize("padding_mode", ["zeros", "border"])
@against_reference(*ALL_DTYPES)
def test_affine_warp_matches_reference(backend_device, rng, padding_mode, dtype):
    backend, device = backend_device
    for shape, size in _warp_cases(interpreted(backend, device)):
        x64 = randn(rng, *shape, exact_in=dtype).requires_grad_()
        theta = random_theta(rng, shape[0])
        ref = reference.affine_warp(x64, theta, size, padding_mode)
        x = x64.detach().to(device, dtype).requires_grad_()
        out = ops.affine_warp(x, theta.to(device, torch.float32), size, padding_mode=padding_mode, backend=backend)
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
@against_reference(*ALL_DTYPES)
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
        for g, w, lo, name in zip(got, want, lows, ("d anchors", "d positives")):
            # the gradients are O(1/T): so is their rounding noise where they vanish (D = 1)
            assert_close(g, w, dtype, lo, f"{name} {(B, D)}", scale=1 / T)


@not_reference
def test_non_contiguous_inputs(backend_device, rng):
    backend, device = backend_device
    A = randn(rng, 4, 6, 5, 3, device=device).transpose(2, 3)[::2]  # strided, [2,6,3,5]
    G = randn(rng, 2, 5, 6, 3, device=device).permute(0, 2, 3, 1)
    assert not A.is_contiguous() and not G.is_contiguous()
    assert rel_err(ops.gradcam(A, G, pool=False, backend=backend), reference.gradcam(A.cpu(), G.cpu(), False)) < 1e-10
    x = randn(rng, 2, 7, 6, 3, device=device).permute(0, 3, 1, 2)  # channels-last view
    theta = random_theta(rng, 2, device)[:, :, :]
    assert (
        rel_err(ops.affine_warp(x, theta, (5, 4), backend=backend), reference.affine_warp(x.cpu(), theta.cpu(), (5, 4)))
        < 1e-10
    )
    a = randn(rng, 9, 4, device=device).t()  # [4, 9] non-contiguous
    p = randn(rng, 4, 18, device=device)[:, ::2]
    assert rel_err(ops.info_nce(a, p, 0.3, backend=backend), reference.info_nce(a.cpu(), p.cpu(), 0.3)) < 1e-10


def test_gradcheck_float64(backend_device, rng):
    backend, device = backend_device
    A = randn(rng, 2, 3, 4, 3, device=device).requires_grad_()
    G = randn(rng, 2, 3, 4, 3, device=device).requires_grad_()
    for pool in (True, False):
        assert torch.autograd.gradcheck(lambda a, g, pool=pool: ops.gradcam(a, g, pool=pool, backend=backend), (A, G))
    x = randn(rng, 2, 2, 5, 4, device=device).requires_grad_()
    theta = random_theta(rng, 2, device)
    for mode in ("zeros", "border"):
        assert torch.autograd.gradcheck(
            lambda t, mode=mode: ops.affine_warp(t, theta, (6, 3), padding_mode=mode, backend=backend), (x,)
        )
    a = randn(rng, 4, 6, device=device).requires_grad_()
    p = randn(rng, 4, 6, device=device).requires_grad_()
    assert torch.autograd.gradcheck(lambda u, v: ops.info_nce(u, v, 0.4, backend=backend), (a, p))
    assert torch.autograd.gradcheck(lambda u, v: ops.info_nce(u, v, 0.4, reduction="none", backend=backend), (a, p))


def test_double_backward_through_gradcam(backend_device, rng):
    """The CGC loss differentiates the heatmap, whose input is itself a gradient."""
    backend, device = backend_device
    A = randn(rng, 2, 3, 4, 4, device=device).requires_grad_()
    G = randn(rng, 2, 3, 4, 4, device=device).requires_grad_()
    assert torch.autograd.gradgradcheck(lambda a, g: ops.gradcam(a, g, pool=False, backend=backend), (A, G))


# --------------------------------------------------------------- explicit negatives
def _neg_cases(small):
    """(b, N, D, index kind): the distributed layout (an int offset), anchors among none of the
    negatives (None), tensor indices with -1 and repeats; b = 1, N = 1 and D = 1 among them."""
    cases = [(1, 3, 5, "offset"), (3, 1, 4, "none"), (4, 9, 1, "mixed"), (5, 12, 17, "offset")]
    if not small:
        cases += [(32, 128, 3136, "offset"), (16, 64, 49, "mixed"), (9, 40, 1000, "none"), (1, 70, 130, "mixed")]
    return cases


def _neg_index(gen, kind: str, b: int, n: int, device="cpu"):
    """A public ``anchor_index`` of ``kind``: an offset in [0, n - b], None, or an int64 tensor
    of values in [-1, n) with a -1 and a repeated index whenever b allows."""
    if kind == "offset":
        return int(torch.randint(0, n - b + 1, (1,), generator=gen))
    if kind == "none":
        return None
    idx = torch.randint(-1, n, (b,), generator=gen)
    if b >= 3:
        idx[0], idx[2] = -1, idx[1].clamp_min(0)
    return idx.to(device)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@against_reference(*ALL_DTYPES)
def test_info_nce_negatives_matches_reference(backend_device, rng, reduction, dtype):
    """Forward and gradients against the float64 reference, on inputs exact in ``dtype``.

    The rows are L2-normalized, and the gradient through ``x / |x|`` is ``(g - (g.u) u) / |x|``:
    exactly zero for 1-D rows (D = 1), where it comes out as rounding noise of size
    ``eps * |g| / |x|``. So the absolute allowance scales with ``1 / (T * |x|)`` of the shortest
    row (when it is shorter than 1). With ``1 / T`` alone, a base-seed sweep failed one draw in
    30 (a 1-D row of norm 0.0008 in float32: noise 6e-5 against an allowance of 4e-5)."""
    backend, device = backend_device
    for b, N, D, kind in _neg_cases(interpreted(backend, device)):
        a64, p64, n64 = (randn(rng, r, D, exact_in=dtype).requires_grad_() for r in (b, b, N))
        index = _neg_index(rng, kind, b, N, device)
        idx = index_tensor(index, b, N)
        T = float(torch.empty(1).uniform_(0.1, 1.0, generator=rng))
        ref = reference.info_nce_neg(a64, p64, n64, idx, T, reduction)
        a, p, n = (x.detach().to(device, dtype).requires_grad_() for x in (a64, p64, n64))
        out = ops.info_nce(a, p, T, negatives=n, anchor_index=index, reduction=reduction, backend=backend)
        assert out.shape == ref.shape and out.dtype == dtype
        al, pl, nl = (x.detach().to(dtype).requires_grad_() for x in (a64, p64, n64))
        low = reference.info_nce_neg(al, pl, nl, idx, T, reduction)
        case = f"{(b, N, D)} {kind}"
        assert_close(out, ref, dtype, low, f"forward {case}")
        gout = randn(rng, *ref.shape, exact_in=dtype)
        want = torch.autograd.grad(ref, (a64, p64, n64), gout)
        got = torch.autograd.grad(out, (a, p, n), gout.to(device, dtype))
        lows = torch.autograd.grad(low, (al, pl, nl), gout.to(dtype))
        shortest = min(float(x.detach().norm(dim=1).min()) for x in (a64, p64, n64))
        for g, w, lo, name in zip(got, want, lows, ("d anchors", "d positives", "d negatives")):
            assert g.shape == w.shape and g.dtype == dtype
            assert_close(g, w, dtype, lo, f"{name} {case}", scale=1 / (T * min(1.0, shortest)))


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_info_nce_negatives_identities(backend_device, rng, reduction):
    """(1) The negatives a copy of the anchors at offset 0: the square op's value, and the
    gradients of anchors and negatives add up to the square op's anchor gradient (also when the
    very same tensor is passed twice). (2) Rows split into chunks as over processes, each chunk
    a separate leaf against all anchors as negatives: the summed losses and the recombined
    gradients are the square op's."""
    backend, device = backend_device
    B, D = 7, 11
    a = randn(rng, B, D, device=device).requires_grad_()
    p = randn(rng, B, D, device=device).requires_grad_()
    T = float(torch.empty(1).uniform_(0.1, 1.0, generator=rng))
    sq = ops.info_nce(a, p, T, reduction=reduction, backend=backend)
    gout = randn(rng, *sq.shape, device=device)
    want_a, want_p = torch.autograd.grad(sq, (a, p), gout)

    n = a.detach().clone().requires_grad_()
    rect = ops.info_nce(a, p, T, negatives=n, anchor_index=0, reduction=reduction, backend=backend)
    assert_close(rect, sq, torch.float64, what="identity 1 value")
    got_a, got_p, got_n = torch.autograd.grad(rect, (a, p, n), gout)
    assert_close(got_a + got_n, want_a, torch.float64, what="identity 1: d anchors + d negatives", scale=1 / T)
    assert_close(got_p, want_p, torch.float64, what="identity 1: d positives", scale=1 / T)
    same = ops.info_nce(a, p, T, negatives=a, anchor_index=0, reduction=reduction, backend=backend)
    (got,) = torch.autograd.grad(same, a, gout)
    assert_close(got, want_a, torch.float64, what="identity 1, one tensor", scale=1 / T)

    if reduction == "mean":
        return  # a chunk's mean is over its own rows: the split identity is the sum's
    cuts = sorted(torch.randperm(B - 1, generator=rng)[:2].add(1).tolist())
    bounds = list(zip([0] + cuts, cuts + [B]))
    n = a.detach().clone().requires_grad_()
    chunks = [
        (a.detach()[r0:r1].clone().requires_grad_(), p.detach()[r0:r1].clone().requires_grad_()) for r0, r1 in bounds
    ]
    parts = [
        ops.info_nce(ca, cp, T, negatives=n, anchor_index=r0, reduction=reduction, backend=backend)
        for (ca, cp), (r0, _) in zip(chunks, bounds)
    ]
    total = torch.cat(parts) if reduction == "none" else torch.stack(parts).sum()
    assert_close(total, sq, torch.float64, what=f"identity 2 value, chunks {bounds}")
    leaves = [x for c in chunks for x in c] + [n]
    grads = torch.autograd.grad(total, leaves, gout)
    got_a = torch.cat(grads[0:-1:2]) + grads[-1]
    got_p = torch.cat(grads[1:-1:2])
    assert_close(got_a, want_a, torch.float64, what="identity 2: d anchors", scale=1 / T)
    assert_close(got_p, want_p, torch.float64, what="identity 2: d positives", scale=1 / T)


@against_reference(torch.float64, torch.float32)
def test_info_nce_negatives_zero_rows(backend_device, rng, dtype):
    """All-zero rows in anchors, positives and negatives (norms clamped like F.normalize) stay
    finite and match the reference; None and an explicit all -1 index are the same."""
    backend, device = backend_device
    b, N, D, T = 4, 6, 9, 0.5
    a64, p64, n64 = (randn(rng, r, D, exact_in=dtype) for r in (b, b, N))
    a64[1], p64[2], n64[3] = 0.0, 0.0, 0.0
    for x in (a64, p64, n64):
        x.requires_grad_()
    idx = torch.tensor([3, 0, -1, 3])
    ref = reference.info_nce_neg(a64, p64, n64, idx, T, "none")
    want = torch.autograd.grad(ref.sum(), (a64, p64, n64))
    a, p, n = (x.detach().to(device, dtype).requires_grad_() for x in (a64, p64, n64))
    out = ops.info_nce(a, p, T, negatives=n, anchor_index=idx.to(device), reduction="none", backend=backend)
    got = torch.autograd.grad(out.sum(), (a, p, n))
    assert_close(out, ref, dtype, what="forward")
    for g, w, name in zip(got, want, ("d anchors", "d positives", "d negatives")):
        assert_close(g, w, dtype, what=name, scale=1 / T)
    none = ops.info_nce(a, p, T, negatives=n, reduction="none", backend=backend)
    minus = ops.info_nce(
        a, p, T, negatives=n, anchor_index=torch.full((b,), -1, device=device), reduction="none", backend=backend
    )
    assert_close(minus, none, dtype, what="anchor_index None vs all -1")


@not_reference
def test_info_nce_negatives_non_contiguous(backend_device, rng):
    """Transposed and strided views of all three inputs and of the index."""
    backend, device = backend_device
    a0 = randn(rng, 9, 4, device=device).requires_grad_()
    p0 = randn(rng, 4, 18, device=device).requires_grad_()
    n0 = randn(rng, 12, 9, device=device).requires_grad_()
    idx = torch.tensor([5, 0, -1, 5, 1, 2, 3, 4], device=device)[::2]  # [5, -1, 1, 3]

    def views():
        return a0.t(), p0[:, ::2], n0[::2]  # [4,9], [4,9], [6,9]

    a, p, n = views()
    assert not (a.is_contiguous() or p.is_contiguous() or n.is_contiguous() or idx.is_contiguous())
    out = ops.info_nce(a, p, 0.3, negatives=n, anchor_index=idx, backend=backend)
    got = torch.autograd.grad(out, (a0, p0, n0))
    ref = reference.info_nce_neg(*views(), idx, 0.3, "mean")
    want = torch.autograd.grad(ref, (a0, p0, n0))
    assert rel_err(out, ref) < 1e-10
    for g, w in zip(got, want):
        assert rel_err(g, w) < 1e-10


def test_info_nce_negatives_gradcheck(backend_device, rng):
    backend, device = backend_device
    a, p, n = (randn(rng, r, 5, device=device).requires_grad_() for r in (3, 3, 6))
    for index in (torch.tensor([2, -1, 2], device=device), 3, None):
        for reduction in ("mean", "none"):
            assert torch.autograd.gradcheck(
                lambda u, v, w, index=index, reduction=reduction: ops.info_nce(
                    u, v, 0.4, negatives=w, anchor_index=index, reduction=reduction, backend=backend
                ),
                (a, p, n),
            )


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


def test_info_nce_negatives_errors():
    a, n = torch.randn(3, 10), torch.randn(8, 10)

    def nce(**kw):
        return ops.info_nce(kw.pop("a", a), kw.pop("p", a), 0.5, **{"negatives": n, **kw})

    with pytest.raises(ValueError, match="2-D"):
        nce(negatives=n[0])
    with pytest.raises(ValueError, match="D=9"):
        nce(negatives=torch.randn(8, 9))
    with pytest.raises(TypeError, match="dtypes"):
        nce(negatives=n.double())
    with pytest.raises(TypeError, match="floating"):
        nce(negatives=n.long())
    with pytest.raises(ValueError, match="negatives is empty"):
        nce(negatives=torch.randn(0, 10))
    with pytest.raises(ValueError, match="anchors is empty"):
        nce(a=torch.randn(0, 10), p=torch.randn(0, 10))
    with pytest.raises(ValueError, match="same shape"):
        nce(p=torch.randn(4, 10))
    with pytest.raises(ValueError, match="without negatives"):
        ops.info_nce(a, a, 0.5, anchor_index=0)
    with pytest.raises(TypeError, match="int64"):
        nce(anchor_index=torch.tensor([0, 1, 2], dtype=torch.int32))
    with pytest.raises(ValueError, match=r"shape \(3,\)"):
        nce(anchor_index=torch.tensor([0, 1]))
    with pytest.raises(ValueError, match=r"shape \(3,\)"):
        nce(anchor_index=torch.tensor([[0, 1, 2]]))
    with pytest.raises(ValueError, match=r"in \[0, 8\) or -1.*\[-1, 8\]"):
        nce(anchor_index=torch.tensor([0, 8, -1]))
    with pytest.raises(ValueError, match=r"\[-2, 1\]"):
        nce(anchor_index=torch.tensor([0, -2, 1]))
    with pytest.raises(ValueError, match=r"rows 6\.\.8, outside the 8 negatives"):
        nce(anchor_index=6)
    with pytest.raises(ValueError, match="outside"):
        nce(anchor_index=-1)
    with pytest.raises(TypeError, match="None, an int or an int64 tensor"):
        nce(anchor_index=True)
    with pytest.raises(TypeError, match="None, an int or an int64 tensor"):
        nce(anchor_index=[0, 1, 2])
    with pytest.raises(ValueError, match="no negative left"):
        ops.info_nce(a[:1], a[:1], 0.5, negatives=n[:1], anchor_index=0)
    with pytest.raises(ValueError, match="no negative left"):
        ops.info_nce(a[:2], a[:2], 0.5, negatives=n[:1], anchor_index=torch.tensor([-1, 0]))
    with pytest.raises(ValueError, match="temperature"):
        ops.info_nce(a, a, -1.0, negatives=n)
    with pytest.raises(ValueError, match="reduction"):
        nce(reduction="max")
    assert ops.info_nce(a[:1], a[:1], 0.5, negatives=n[:1]).shape == ()  # b = 1, N = 1, excluding nothing
    if torch.cuda.is_available():
        with pytest.raises(ValueError, match="different devices"):
            nce(negatives=n.cuda())
        with pytest.raises(ValueError, match="anchor_index is on"):
            nce(anchor_index=torch.tensor([0, 1, 2], device="cuda"))


def test_backend_env_and_fallback(monkeypatch):
    a = torch.randn(3, 5)
    monkeypatch.setenv("CGC_BACKEND", "reference")
    assert torch.equal(ops.info_nce(a, a, 0.5), reference.info_nce(a, a, 0.5))
    monkeypatch.setenv("CGC_BACKEND", "auto")
    assert "reference" in ops.available_backends()
    assert torch.allclose(ops.info_nce(a, a, 0.5), reference.info_nce(a, a, 0.5), rtol=1e-5, atol=1e-6)
    n = torch.randn(6, 5)
    assert torch.allclose(
        ops.info_nce(a, a, 0.5, negatives=n, anchor_index=1),
        reference.info_nce_neg(a, a, n, torch.arange(1, 4), 0.5),
        rtol=1e-5,
        atol=1e-6,
    )
