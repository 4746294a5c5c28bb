"""Triton-specific checks on top of the shared op suite (tests/test_ops.py): ragged block
edges with poisoned outputs (info_nce in both forms), far-away samples, guarded row norms,
64-bit offsets, second derivatives, ``torch.library.opcheck``, ``torch.compile`` (GPU only)
and the error paths.

On a CPU-only machine ``tests/conftest.py`` turns on the Triton interpreter; the shapes here
are chosen to straddle the interpreter's block sizes (the first autotune config of each
kernel), so every mask is exercised while the interpreted suite stays fast.

The float64 oracle here runs on the inputs already rounded to the tested dtype (``exact``):
what the kernel is asked to compute. Otherwise a ReLU mask whose sign flips only because a
bfloat16 input was rounded counts as the kernel's error.
"""

from __future__ import annotations

import importlib.util
import os

import pytest
import torch

import cgc
from cgc import ops, transforms
from cgc.ops import reference

from .test_ops import assert_close, randn, random_theta


def exact(gen, dtype, *shape):
    """Random float64 values that ``dtype`` represents exactly."""
    return randn(gen, *shape).to(dtype).double()


triton_mod = pytest.importorskip(
    "cgc.ops.triton", reason="the Triton backend does not import here", exc_type=ImportError
)
import triton  # noqa: E402
import triton.language as tl  # noqa: E402

from cgc.kernels import common  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
_backend_skip = pytest.mark.skipif(
    triton_mod.unavailable_reason() is not None, reason=f"Triton backend unavailable: {triton_mod.unavailable_reason()}"
)


def needs_backend(test):
    """Skipped without the backend; marked ``slow`` where its kernels run in the CPU
    interpreter (seconds per case)."""
    test = _backend_skip(test)
    return pytest.mark.slow(test) if common.INTERPRETED else test


gpu_only = pytest.mark.skipif(
    not torch.cuda.is_available() or common.INTERPRETED,
    reason="needs compiled Triton on a CUDA GPU (the interpreter has no compiled kernels to trace or fake-run)",
)
DTYPES = [torch.float64, torch.float32, torch.float16, torch.bfloat16]


@pytest.fixture
def poisoned(monkeypatch):
    """Every floating ``torch.empty`` returns NaNs while a test runs, so an output element a
    kernel failed to write (a mask too strict at a ragged edge) shows up as NaN."""
    empty = torch.empty

    def nan_empty(*args, **kwargs):
        out = empty(*args, **kwargs)
        if out.is_floating_point():
            out.fill_(float("nan"))
        return out

    monkeypatch.setattr(torch, "empty", nan_empty)


def test_interpreter_is_on_without_a_gpu():
    """conftest.py sets TRITON_INTERPRET=1 early enough that the kernels are interpreted and
    the backend joins the CPU suite."""
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is visible: the kernels are compiled")
    assert os.environ.get("TRITON_INTERPRET") == "1"
    assert common.INTERPRETED
    assert triton_mod.unavailable_reason() is None
    assert "triton" in ops.available_backends()


# ------------------------------------------------------------------------ ragged block edges
@needs_backend
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("form", ["pool", "elementwise", "weights"])
def test_gradcam_ragged_blocks(poisoned, rng, dtype, form):
    """K = 33 and H*W = 65 straddle 32-channel and 64-pixel blocks; gradients of all forms,
    incl. the [B,K] weights, and an expanded (stride-0) upstream gradient."""
    B, K, H, W = 2, 33, 5, 13
    A64 = exact(rng, dtype, B, K, H, W)
    G64 = exact(rng, dtype, B, K) if form == "weights" else exact(rng, dtype, B, K, H, W)
    pool = form != "elementwise"
    A64.requires_grad_()
    G64.requires_grad_()
    ref = reference.gradcam(A64, G64, pool)
    A = A64.detach().to(DEVICE, dtype).requires_grad_()
    G = G64.detach().to(DEVICE, dtype).requires_grad_()
    out = ops.gradcam(A, G, pool=pool, backend="triton")
    Al = A64.detach().to(dtype).requires_grad_()
    Gl = G64.detach().to(dtype).requires_grad_()
    low = reference.gradcam(Al, Gl, pool)
    assert_close(out, ref, dtype, low, f"{form} forward")
    gout = torch.ones(1, dtype=torch.float64).expand(B, H, W)  # the gradient of .sum()
    want = torch.autograd.grad(ref, (A64, G64), gout)
    got = torch.autograd.grad(out, (A, G), torch.ones(1, dtype=dtype, device=DEVICE).expand(B, H, W))
    lows = torch.autograd.grad(low, (Al, Gl), gout.to(dtype))
    for g, w, lo, name in zip(got, want, lows, ("dA", "dG")):
        assert g.shape == w.shape
        assert_close(g, w, dtype, lo, f"{form} {name}")


@needs_backend
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("padding_mode", ["zeros", "border"])
@pytest.mark.parametrize("in_hw", [(6, 5), (18, 5)], ids=["small-input", "general"])
@pytest.mark.parametrize("maps", ["affine", "crop-flip"])
def test_affine_warp_ragged_and_far_samples(poisoned, rng, dtype, padding_mode, in_hw, maps):
    """17x19 outputs straddle the pixel blocks; one map samples 1e9 pixels away (clamped
    before the integer cast: zeros, or the nearest edge with border padding). Inputs up to
    16 pixels a side take the small-input kernels (float64: the general ones), taller ones the
    general kernels; crop/flip maps take the small-input kernels' separable branch."""
    (H, W), B, C, size = in_hw, 3, 3, (17, 19)
    x64 = exact(rng, dtype, B, C, H, W).requires_grad_()
    if maps == "affine":
        theta = random_theta(rng, B)
    else:
        theta = transforms.random_crop_flip(B, 40, 30, generator=rng).theta().double()
        assert (theta[:, 0, 1] == 0).all() and (theta[:, 1, 0] == 0).all()
    theta[1, :, 2] = torch.tensor([1e9, -1e9], dtype=torch.float64)
    theta = theta.float()
    ref = reference.affine_warp(x64, theta.double(), size, padding_mode)
    x = x64.detach().to(DEVICE, dtype).requires_grad_()
    out = ops.affine_warp(x, theta.to(DEVICE), size, padding_mode=padding_mode, backend="triton")
    xl = x64.detach().to(dtype).requires_grad_()
    low = reference.affine_warp(xl, theta, size, padding_mode)
    assert_close(out, ref, dtype, low, "forward")
    gout = randn(rng, *ref.shape)
    (want,) = torch.autograd.grad(ref, x64, gout)
    (got,) = torch.autograd.grad(out, x, gout.to(DEVICE, dtype))
    (lgot,) = torch.autograd.grad(low, xl, gout.to(dtype))
    assert_close(got, want, dtype, lgot, "backward")


@needs_backend
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.filterwarnings("ignore:overflow encountered in cast:RuntimeWarning")  # float16, guarded rows
def test_info_nce_ragged_blocks_and_guarded_norms(poisoned, rng, dtype):
    """B = 33 and D = 130 straddle the row and D blocks; a zero anchor row and a positive
    row under the norm guard take the reference's clamped path (no NaN, same gradients)."""
    B, D, T = 33, 130, 0.3
    a64, p64 = exact(rng, dtype, B, D), exact(rng, dtype, B, D)
    a64[4] = 0.0
    p64[7] = (p64[7] * 1e-14).to(dtype).double()
    a64.requires_grad_()
    p64.requires_grad_()
    ref = reference.info_nce(a64, p64, T, "none")
    a = a64.detach().to(DEVICE, dtype).requires_grad_()
    p = p64.detach().to(DEVICE, dtype).requires_grad_()
    out = ops.info_nce(a, p, T, reduction="none", backend="triton")
    al = a64.detach().to(dtype).requires_grad_()
    pl = p64.detach().to(dtype).requires_grad_()
    low = reference.info_nce(al, pl, T, "none")
    assert_close(out, ref, dtype, low, "forward")
    gout = randn(rng, B)
    want = torch.autograd.grad(ref, (a64, p64), gout)
    got = torch.autograd.grad(out, (a, p), gout.to(DEVICE, out.dtype))
    lows = torch.autograd.grad(low, (al, pl), gout.to(low.dtype))
    guarded = torch.zeros(B, dtype=torch.bool)
    guarded[[4, 7]] = True
    for g, w, lo, name in zip(got, want, lows, ("d anchors", "d positives")):
        g = g.cpu()
        assert_close(g[~guarded], w[~guarded], dtype, lo[~guarded], name)
        if dtype in (torch.float64, torch.float32):
            # scaled by 1/EPS_NORM = 1e12: past float16's range, too coarse in bfloat16
            assert_close(g[guarded], w[guarded], dtype, lo[guarded], f"{name}, guarded rows")


@needs_backend
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.filterwarnings("ignore:overflow encountered in cast:RuntimeWarning")  # float16, guarded rows
def test_info_nce_negatives_ragged_blocks_and_guarded_norms(poisoned, rng, dtype):
    """b = 33, N = 70 and D = 130 straddle the row, column and D blocks of every kernel of the
    explicit-negatives form; a zero anchor, a positive and a negative under the norm guard take
    the clamped path, and the index mixes -1, repeats and the last column."""
    b, N, D, T = 33, 70, 130, 0.3
    a64, p64, n64 = exact(rng, dtype, b, D), exact(rng, dtype, b, D), exact(rng, dtype, N, D)
    a64[4] = 0.0
    p64[7] = (p64[7] * 1e-14).to(dtype).double()
    n64[65] = 0.0
    idx = torch.randint(-1, N, (b,), generator=rng)
    idx[:4] = torch.tensor([-1, N - 1, N - 1, 65])
    for x in (a64, p64, n64):
        x.requires_grad_()
    ref = reference.info_nce_neg(a64, p64, n64, idx, T, "none")
    a, p, n = (x.detach().to(DEVICE, dtype).requires_grad_() for x in (a64, p64, n64))
    out = ops.info_nce(a, p, T, negatives=n, anchor_index=idx.to(DEVICE), reduction="none", backend="triton")
    al, pl, nl = (x.detach().to(dtype).requires_grad_() for x in (a64, p64, n64))
    low = reference.info_nce_neg(al, pl, nl, idx, T, "none")
    assert_close(out, ref, dtype, low, "forward")
    gout = randn(rng, b)
    want = torch.autograd.grad(ref, (a64, p64, n64), gout)
    got = torch.autograd.grad(out, (a, p, n), gout.to(DEVICE, out.dtype))
    lows = torch.autograd.grad(low, (al, pl, nl), gout.to(low.dtype))
    guarded = [torch.zeros(r, dtype=torch.bool) for r in (b, b, N)]
    guarded[0][4] = guarded[1][7] = guarded[2][65] = True
    for g, w, lo, gd, name in zip(got, want, lows, guarded, ("d anchors", "d positives", "d negatives")):
        g = g.cpu()
        assert_close(g[~gd], w[~gd], dtype, lo[~gd], name)
        if dtype in (torch.float64, torch.float32):
            # scaled by 1/EPS_NORM = 1e12: past float16's range, too coarse in bfloat16
            assert_close(g[gd], w[gd], dtype, lo[gd], f"{name}, guarded rows")


# --------------------------------------------------------------------------- 64-bit offsets
@triton.jit
def _offsets_kernel(out_ptr, b0, y0, sb, sy, sx, BLOCK: tl.constexpr):
    i = tl.arange(0, BLOCK)
    tl.store(out_ptr + i, common.plane_offset(b0 + i, y0 + i, i, sb, sy, sx))


@needs_backend
def test_plane_offset_is_64_bit():
    """The shared offset helper multiplies int32 indices by int32 strides without wrapping at
    2**31 (every product below exceeds it)."""
    b0, y0, sb, sy, sx = 40_000, 3_000, 1 << 20, 1 << 20, 3
    out = torch.empty(16, dtype=torch.int64, device=DEVICE)
    _offsets_kernel[(1,)](out, b0, y0, sb, sy, sx, BLOCK=16)
    i = torch.arange(16, dtype=torch.int64)
    want = (b0 + i) * sb + (y0 + i) * sy + i * sx
    assert int(want.min()) > 2**31
    assert torch.equal(out.cpu(), want)


# ----------------------------------------------------------------------- second derivatives
@needs_backend
@pytest.mark.parametrize("form", ["pool", "weights"])
def test_double_backward_of_weighted_gradcam(rng, form):
    """The shared suite checks the elementwise form; the channel-weight forms too."""
    A = randn(rng, 2, 2, 2, 3, device=DEVICE).requires_grad_()
    G = randn(rng, 2, 2, device=DEVICE) if form == "weights" else randn(rng, 2, 2, 2, 3, device=DEVICE)
    G.requires_grad_()
    assert torch.autograd.gradgradcheck(lambda a, g: ops.gradcam(a, g, pool=True, backend="triton"), (A, G))


@needs_backend
def test_double_backward_of_affine_warp(rng):
    x = randn(rng, 2, 1, 3, 4, device=DEVICE).requires_grad_()
    theta = random_theta(rng, 2, DEVICE)
    assert torch.autograd.gradgradcheck(
        lambda t: ops.affine_warp(t, theta, (4, 3), padding_mode="border", backend="triton"), (x,)
    )


# ------------------------------------------------------------------------------ opcheck
def _opcheck_cases(gen):
    A = randn(gen, 2, 3, 4, 5, device=DEVICE).requires_grad_()
    G = randn(gen, 2, 3, 4, 5, device=DEVICE).requires_grad_()
    x = randn(gen, 2, 2, 5, 4, device=DEVICE).requires_grad_()
    theta = random_theta(gen, 2, DEVICE)
    a = randn(gen, 5, 9, device=DEVICE).requires_grad_()
    p = randn(gen, 5, 9, device=DEVICE).requires_grad_()
    n = randn(gen, 7, 9, device=DEVICE).requires_grad_()
    index = torch.tensor([6, -1, 0, 6, 2], device=DEVICE)
    ops_ = torch.ops.cgc_triton
    return [
        (ops_.gradcam.default, (A, G, True)),
        (ops_.gradcam.default, (A, G, False)),
        (ops_.gradcam_backward.default, (randn(gen, 2, 4, 5, device=DEVICE), A, G, True)),
        (ops_.affine_warp.default, (x, theta, 3, 7, False)),  # float64: the general kernels
        (ops_.affine_warp.default, (x.detach().float().requires_grad_(), theta.float(), 3, 7, True)),
        (
            ops_.affine_warp_backward.default,
            (randn(gen, 2, 2, 3, 7, device=DEVICE), theta, 5, 4, True, torch.float64),
        ),  # the general kernels
        (
            ops_.affine_warp_backward.default,
            (randn(gen, 2, 2, 3, 7, device=DEVICE).float(), theta.float(), 5, 4, False, torch.float32),
        ),  # the small-input kernels
        (ops_.info_nce.default, (a, p, 0.5)),
        (ops_.info_nce_neg.default, (a, p, n, index, 0.5)),
        (
            ops_.info_nce_neg.default,
            (
                a.detach().float().requires_grad_(),
                p.detach().float().requires_grad_(),
                n.detach().float().requires_grad_(),
                index,
                0.5,
            ),
        ),
    ]


@needs_backend
def test_opcheck(rng):
    """Schema and autograd registration everywhere; fake tensors and AOT dispatch only with
    compiled kernels (interpreted kernels cannot run on fake tensors)."""
    utils = ("test_schema", "test_autograd_registration")
    if not common.INTERPRETED:
        utils += ("test_faketensor", "test_aot_dispatch_dynamic")
    for op, args in _opcheck_cases(rng):
        torch.library.opcheck(op, args, test_utils=utils)


@gpu_only
def test_torch_compile_fullgraph_cgc_step(rng):
    """The heatmap half of a CGC step (the element-wise CAM, then cgc.CGCLoss: both warps and
    InfoNCE), forward and backward, compiled with fullgraph=True: it traces through the Triton
    ops and matches eager."""
    loss = cgc.CGCLoss(0.5, 32, backend="triton")

    def step(acts, grads, theta):
        cam = ops.gradcam(acts, grads, pool=False, backend="triton")
        return loss(cam[:4], cam[4:], theta[:4])

    acts = randn(rng, 8, 64, 7, 7, dtype=torch.float32, device="cuda").requires_grad_()
    grads = randn(rng, 8, 64, 7, 7, dtype=torch.float32, device="cuda").requires_grad_()
    theta = random_theta(rng, 8, "cuda").float()
    eager = step(acts, grads, theta)
    d_eager = torch.autograd.grad(eager, (acts, grads))
    compiled = torch.compile(step, fullgraph=True)(acts, grads, theta)
    d_compiled = torch.autograd.grad(compiled, (acts, grads))
    assert torch.allclose(compiled, eager, rtol=1e-5, atol=1e-6)
    for c, e in zip(d_compiled, d_eager):
        assert torch.allclose(c, e, rtol=1e-4, atol=1e-6)


@gpu_only
def test_torch_compile_fullgraph_info_nce_negatives(rng):
    """The explicit-negatives op compiles with fullgraph=True and matches eager."""

    def step(a, p, n, idx):
        return ops.info_nce(a, p, 0.5, negatives=n, anchor_index=idx, backend="triton")

    a, p, n = (randn(rng, r, 200, dtype=torch.float32, device="cuda").requires_grad_() for r in (16, 16, 64))
    idx = torch.arange(16, 32, device="cuda")
    eager = step(a, p, n, idx)
    d_eager = torch.autograd.grad(eager, (a, p, n))
    compiled = torch.compile(step, fullgraph=True)(a, p, n, idx)
    d_compiled = torch.autograd.grad(compiled, (a, p, n))
    assert torch.allclose(compiled, eager, rtol=1e-5, atol=1e-6)
    for c, e in zip(d_compiled, d_eager):
        assert torch.allclose(c, e, rtol=1e-4, atol=1e-6)


@gpu_only
def test_info_nce_negatives_deterministic(rng):
    """Under torch.use_deterministic_algorithms the Gram is not split over D (its atomics then
    add onto zero once per element), so forward and backward repeat bit for bit at a size that
    splits otherwise."""
    a, p, n = (torch.rand(r, 3136, generator=rng).cuda().requires_grad_() for r in (64, 64, 256))
    torch.use_deterministic_algorithms(True)
    try:
        runs = []
        for _ in range(3):
            loss = ops.info_nce(a, p, 0.5, negatives=n, anchor_index=64, backend="triton")
            runs.append((loss, *torch.autograd.grad(loss, (a, p, n))))
    finally:
        torch.use_deterministic_algorithms(False)
    for run in runs[1:]:
        for x, y in zip(run, runs[0]):
            assert torch.equal(x, y)


# ------------------------------------------------------------------------------ error paths
def test_unavailable_without_gpu_or_interpreter(monkeypatch):
    """Compiled kernels and no GPU: the backend says why, ``backend="triton"`` raises it and
    ``auto`` falls back."""
    monkeypatch.setattr(common, "INTERPRETED", False)
    monkeypatch.setattr(ops, "_LOADED", {"reference": ops.reference})  # forget loaded backends
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert "no CUDA device is visible" in triton_mod.unavailable_reason()
    assert not triton_mod.supports(torch.device("cpu"))
    a = torch.randn(3, 4)
    with pytest.raises(ops.BackendUnavailable, match="no CUDA device is visible"):
        ops.info_nce(a, a, 0.5, backend="triton")
    assert "triton" not in ops.available_backends()
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert "set it before cgc.ops.triton is first imported" in triton_mod.unavailable_reason()


def test_old_torch_is_reported(monkeypatch):
    """Without ``torch.library.triton_op`` (torch < 2.6) the module refuses to import with a
    reason that ``cgc.ops`` passes on."""
    monkeypatch.delattr(torch.library, "triton_op")
    spec = importlib.util.spec_from_file_location("cgc_triton_old_torch", triton_mod.__file__)
    with pytest.raises(ImportError, match=r"needs torch >= 2\.6"):
        spec.loader.exec_module(importlib.util.module_from_spec(spec))


def test_auto_order_tables():
    """On CUDA ``auto`` ranks every backend per op (measured on an H100: the eager reference
    wins gradcam, native the other two); on the CPU it never picks Triton (interpreted
    kernels are for tests only)."""
    for op in ("gradcam", "affine_warp", "info_nce"):
        assert "triton" not in ops.auto_order(op, torch.device("cpu"))
        order = ops.auto_order(op, torch.device("cuda"))
        assert sorted(order) == sorted(ops.BACKENDS)
        assert order[0] == ("reference" if op == "gradcam" else "native")
