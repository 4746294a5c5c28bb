"""Native-backend specifics (``cgc._C``, ``cgc.ops.native``): operator registration checked by
``torch.library.opcheck``, ``torch.compile(fullgraph=True)`` of a CGC step and of info_nce with
explicit negatives, the separable fast path of the CPU warp, higher-order gradients, large rows,
direct-call errors, and ``import cgc`` without the extension. The numerical comparison against
the reference for every backend lives in ``test_ops.py``. CUDA cases skip without a GPU.
"""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

import cgc
from cgc import ops, transforms
from cgc.ops import reference

native = pytest.importorskip("cgc.ops.native")
pytestmark = pytest.mark.skipif(native.unavailable_reason() is not None, reason=str(native.unavailable_reason()))

DEVICES = [
    pytest.param("cpu"),
    pytest.param(
        "cuda",
        marks=pytest.mark.skipif(
            not native.supports(torch.device("cuda")) if torch.cuda.is_available() else True,
            reason="no GPU or no CUDA kernels",
        ),
    ),
]
C = torch.ops.cgc


def rel_err(out, ref):
    out, ref = out.detach().double().cpu(), ref.detach().double().cpu()
    return float((out - ref).norm() / ref.norm().clamp_min(1e-30))


def randn(gen, *shape, device="cpu", dtype=torch.float64, grad=False):
    """Standard normal values from the test's generator ``gen`` (drawn on the CPU)."""
    return torch.randn(shape, generator=gen, dtype=dtype).to(device).requires_grad_(grad)


def crop_thetas(b, generator, device="cpu"):
    """The CGC crop/flip maps (axis-aligned: the CPU warp's separable path)."""
    return transforms.random_crop_flip(b, 224, 224, generator=generator, device=device).theta()


# ------------------------------------------------------------------------------- opcheck
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_opcheck_gradcam(device, dtype, rng):
    for pool, gshape in ((True, (3, 5, 4, 6)), (False, (3, 5, 4, 6)), (True, (3, 5))):
        A = randn(rng, 3, 5, 4, 6, device=device, dtype=dtype, grad=True)
        G = randn(rng, *gshape, device=device, dtype=dtype, grad=True)
        torch.library.opcheck(C.gradcam_fwd, (A, G, pool))
        out = C.gradcam_fwd(A.detach(), G.detach(), pool)
        go = randn(rng, 3, 4, 6, device=device, dtype=dtype, grad=True)
        torch.library.opcheck(C.gradcam_bwd, (go, out, A, G, pool))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_opcheck_affine_warp(device, dtype, rng):
    theta = torch.cat([crop_thetas(2, rng, device), torch.eye(2, 3, device=device)[None] + 0.3])
    for mode in (0, 1):
        x = randn(rng, 3, 2, 7, 5, device=device, dtype=dtype, grad=True)
        torch.library.opcheck(C.affine_warp_fwd, (x, theta, 9, 11, mode))
        go = randn(rng, 3, 2, 9, 11, device=device, dtype=dtype, grad=True)
        torch.library.opcheck(C.affine_warp_bwd, (go, theta, 7, 5, mode))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_opcheck_info_nce(device, dtype, rng):
    for reduction in (0, 1, 2):
        a = randn(rng, 5, 33, device=device, dtype=dtype, grad=True)
        p = randn(rng, 5, 33, device=device, dtype=dtype, grad=True)
        torch.library.opcheck(C.info_nce_fwd, (a, p, 0.3, reduction))
        _, logits, stats = C.info_nce_fwd(a.detach(), p.detach(), 0.3, reduction)
        gl = randn(rng, *((5,) if reduction == 0 else ()), device=device, dtype=dtype)
        # differentiable once: its backward op is checked without inputs that need grad
        torch.library.opcheck(C.info_nce_bwd, (gl, a.detach(), p.detach(), logits, stats, 0.3, reduction))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_opcheck_info_nce_negatives(device, dtype, rng):
    index = torch.tensor([6, -1, 0, 6], device=device)
    for reduction in (0, 1, 2):
        a, p = (
            randn(rng, 4, 33, device=device, dtype=dtype, grad=True),
            randn(rng, 4, 33, device=device, dtype=dtype, grad=True),
        )
        n = randn(rng, 7, 33, device=device, dtype=dtype, grad=True)
        torch.library.opcheck(C.info_nce_neg_fwd, (a, p, n, index, 0.3, reduction))
        _, logits, stats, norms = C.info_nce_neg_fwd(a.detach(), p.detach(), n.detach(), index, 0.3, reduction)
        assert torch.isinf(logits[[0, 2, 3], [7, 1, 7]]).all() and torch.isfinite(logits[1]).all()
        gl = randn(rng, *((4,) if reduction == 0 else ()), device=device, dtype=dtype)
        torch.library.opcheck(
            C.info_nce_neg_bwd, (gl, a.detach(), p.detach(), n.detach(), logits, stats, norms, 0.3, reduction)
        )


# ------------------------------------------------------------------------------- torch.compile
def cgc_step(A, G, theta, backend):
    """The heatmap half of a CGC step through the public API: the element-wise CAM of
    activations and gradients (as CGCTerm makes them), then cgc.CGCLoss (both warps, InfoNCE)."""
    b = A.shape[0] // 2
    cams = ops.gradcam(A, G, pool=False, backend=backend)
    return cgc.CGCLoss(0.5, 16, backend=backend)(cams[:b], cams[b:], theta)


@pytest.mark.slow
@pytest.mark.parametrize("device", DEVICES)
def test_compile_fullgraph_cgc_step(device, rng):
    torch._dynamo.reset()
    A0 = randn(rng, 8, 6, 7, 7, dtype=torch.float32, device=device)
    G0 = randn(rng, 8, 6, 7, 7, dtype=torch.float32, device=device)
    theta = crop_thetas(4, rng, device)
    results = []
    for fn in (cgc_step, torch.compile(cgc_step, fullgraph=True)):
        A, G = A0.clone().requires_grad_(), G0.clone().requires_grad_()
        loss = fn(A, G, theta, "native")
        loss.backward()
        results.append((loss.detach(), A.grad, G.grad))
    for eager, compiled in zip(*results):
        assert rel_err(compiled, eager) < 1e-5
    A, G = A0.double().cpu().requires_grad_(), G0.double().cpu().requires_grad_()
    ref = cgc_step(A, G, theta.cpu(), "reference")
    ref.backward()
    for got, want in zip(results[0], (ref, A.grad, G.grad)):
        assert rel_err(got, want) < 1e-5


@pytest.mark.slow
@pytest.mark.parametrize("device", DEVICES)
def test_compile_fullgraph_info_nce_negatives(device, rng):
    """The explicit-negatives op traces into one graph (fake implementations) and matches eager."""
    torch._dynamo.reset()

    def step(a, p, n, idx):
        return native.info_nce_neg(a, p, n, idx, 0.5, "sum")

    a0, p0, n0 = randn(rng, 4, 20, device=device), randn(rng, 4, 20, device=device), randn(rng, 8, 20, device=device)
    idx = torch.arange(2, 6, device=device)
    results = []
    for fn in (step, torch.compile(step, fullgraph=True)):
        a, p, n = (x.clone().requires_grad_() for x in (a0, p0, n0))
        loss = fn(a, p, n, idx)
        results.append((loss.detach(), *torch.autograd.grad(loss, (a, p, n))))
    for eager, compiled in zip(*results):
        assert rel_err(compiled, eager) < 1e-12


# ------------------------------------------------------------------------------- warp paths
@pytest.mark.parametrize("mode", ["zeros", "border"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_cpu_separable_warp(mode, dtype, rng):
    """Crop/flip/resize maps take the CPU's two-pass path; a batch mixes it with the general
    path, and crops reach outside the image.

    The float64 oracle sees the inputs and output gradients rounded to ``dtype``, as the kernel
    does, so the tolerance measures the kernel's arithmetic only. Compared with unrounded
    inputs, bfloat16's input rounding (0.4 % per value) left one draw in 30 of a base-seed sweep
    1.5 % off in the gradient, whose terms can nearly cancel."""
    tol = {torch.float64: 1e-12, torch.float32: 1e-5, torch.bfloat16: 1e-2}[dtype]
    for (B, Cc, H, W), size in [
        ((6, 1, 7, 7), (224, 224)),
        ((4, 3, 40, 30), (17, 23)),
        ((3, 2, 50, 60), (7, 5)),
        ((2, 1, 1, 1), (3, 4)),
    ]:
        theta = crop_thetas(B, rng)
        theta[0] = torch.tensor([[-1.3, 0.0, 0.4], [0.0, 1.5, -0.5]])  # flipped, partly outside
        theta[-1, 0, 1] = 0.2  # sheared: general path in the same batch
        x64 = randn(rng, B, Cc, H, W).to(dtype).double().requires_grad_()
        ref = reference.affine_warp(x64, theta.double(), size, mode)
        x = x64.detach().to(dtype).requires_grad_()
        out = ops.affine_warp(x, theta, size, padding_mode=mode, backend="native")
        assert rel_err(out, ref) < tol
        go = torch.randn(ref.shape, generator=rng, dtype=ref.dtype).to(dtype).double()
        (want,) = torch.autograd.grad(ref, x64, go)
        (got,) = torch.autograd.grad(out, x, go.to(dtype))
        assert rel_err(got, want) < tol


@pytest.mark.parametrize("device", DEVICES)
def test_higher_order_gradients(device, rng):
    """gradcam and affine_warp are differentiable twice (the CGC loss differentiates gradients)."""
    A, G = randn(rng, 2, 3, 3, 4, device=device, grad=True), randn(rng, 2, 3, 3, 4, device=device, grad=True)
    W = randn(rng, 2, 3, device=device, grad=True)
    for pool in (True, False):
        assert torch.autograd.gradgradcheck(
            lambda a, g, pool=pool: ops.gradcam(a, g, pool=pool, backend="native"), (A, G)
        )
    assert torch.autograd.gradgradcheck(lambda a, w: ops.gradcam(a, w, backend="native"), (A, W))
    x = randn(rng, 2, 2, 5, 4, device=device, grad=True)
    theta = torch.cat([crop_thetas(1, rng, device), torch.eye(2, 3, device=device)[None] + 0.2])
    assert torch.autograd.gradgradcheck(lambda t: ops.affine_warp(t, theta, (6, 3), backend="native"), (x,))


def test_info_nce_double_backward_raises(rng):
    a, p = randn(rng, 3, 4, grad=True), randn(rng, 3, 4, grad=True)
    (ga,) = torch.autograd.grad(ops.info_nce(a, p, 0.5, backend="native"), a, create_graph=True)
    with pytest.raises(RuntimeError, match="differentiable once"):
        ga.sum().backward()


def test_info_nce_negatives_double_backward_raises(rng):
    a, p, n = randn(rng, 3, 4, grad=True), randn(rng, 3, 4, grad=True), randn(rng, 5, 4, grad=True)
    (gn,) = torch.autograd.grad(
        ops.info_nce(a, p, 0.5, negatives=n, anchor_index=1, backend="native"), n, create_graph=True
    )
    with pytest.raises(RuntimeError, match="differentiable once"):
        gn.sum().backward()


@pytest.mark.parametrize("device", DEVICES)
def test_info_nce_negatives_large_d(device, rng):
    """Explicit negatives with rows of 2^21 elements (the row passes' chunks on CUDA)."""
    a64, p64, n64 = (
        randn(rng, 2, 1 << 21, grad=True),
        randn(rng, 2, 1 << 21, grad=True),
        randn(rng, 3, 1 << 21, grad=True),
    )
    p64.data[1] = 0.5 * a64.data[1] + 0.1 * p64.data[1]  # one strong positive
    n64.data[2] = 0.3 * a64.data[0] + n64.data[2]  # and a hard negative
    idx = torch.tensor([-1, 1])
    ref = reference.info_nce_neg(a64, p64, n64, idx, 0.2, "none")
    a, p, n = (x.detach().float().to(device).requires_grad_() for x in (a64, p64, n64))
    out = ops.info_nce(a, p, 0.2, negatives=n, anchor_index=idx.to(device), reduction="none", backend="native")
    assert rel_err(out, ref) < 1e-5
    go = torch.randn(2, generator=rng, dtype=torch.float64)
    want = torch.autograd.grad(ref, (a64, p64, n64), go)
    got = torch.autograd.grad(out, (a, p, n), go.float().to(device))
    for g, w in zip(got, want):
        assert rel_err(g, w) < 1e-5


@pytest.mark.parametrize("device", DEVICES)
def test_info_nce_large_d(device, rng):
    """Rows of 2^21 elements (float32 sums over long rows stay exact in double)."""
    a64, p64 = randn(rng, 3, 1 << 21, grad=True), randn(rng, 3, 1 << 21, grad=True)
    p64.data[1] = 0.5 * a64.data[1] + 0.1 * p64.data[1]  # one strong positive
    ref = reference.info_nce(a64, p64, 0.2, "none")
    a = a64.detach().float().to(device).requires_grad_()
    p = p64.detach().float().to(device).requires_grad_()
    out = ops.info_nce(a, p, 0.2, reduction="none", backend="native")
    assert rel_err(out, ref) < 1e-5
    go = torch.randn(3, generator=rng, dtype=torch.float64)
    want = torch.autograd.grad(ref, (a64, p64), go)
    got = torch.autograd.grad(out, (a, p), go.float().to(device))
    for g, w in zip(got, want):
        assert rel_err(g, w) < 1e-5


def test_zero_rows_stay_finite(rng):
    """An all-zero heatmap row (norm clamped) gives finite values, like the reference."""
    a64, p64 = randn(rng, 4, 9, grad=True), randn(rng, 4, 9, grad=True)
    a64.data[2] = 0
    p64.data[0] = 0
    ref = reference.info_nce(a64, p64, 0.5)
    want = torch.autograd.grad(ref, (a64, p64))
    a, p = a64.detach().requires_grad_(), p64.detach().requires_grad_()
    out = ops.info_nce(a, p, 0.5, backend="native")
    got = torch.autograd.grad(out, (a, p))
    assert rel_err(out, ref) < 1e-12
    for g, w in zip(got, want):
        assert torch.isfinite(g).all() and rel_err(g, w) < 1e-10


# ------------------------------------------------------------------------------- errors
def test_direct_call_errors():
    """The ops check their arguments themselves when called through torch.ops.cgc."""
    A = torch.randn(2, 3, 4, 4)
    with pytest.raises(RuntimeError, match=r"activations must be \[B,K,H,W\]"):
        C.gradcam_fwd(A[0], A[0], True)
    with pytest.raises(RuntimeError, match="do not match"):
        C.gradcam_fwd(A, torch.randn(2, 3, 4, 5), False)
    with pytest.raises(RuntimeError, match="different dtypes"):
        C.gradcam_fwd(A, A.double(), False)
    with pytest.raises(RuntimeError, match="grad_out must be"):
        C.gradcam_bwd(torch.randn(2, 4, 5), torch.randn(2, 4, 4), A, A, True)
    x = torch.randn(2, 1, 7, 7)
    with pytest.raises(RuntimeError, match="padding_mode"):
        C.affine_warp_fwd(x, torch.randn(2, 2, 3), 5, 5, 2)
    with pytest.raises(RuntimeError, match="theta must be"):
        C.affine_warp_fwd(x, torch.randn(3, 2, 3), 5, 5, 0)
    with pytest.raises(RuntimeError, match="sizes must be positive"):
        C.affine_warp_fwd(x, torch.randn(2, 2, 3), 0, 5, 0)
    with pytest.raises(RuntimeError, match="non-empty"):
        C.affine_warp_fwd(torch.randn(0, 1, 7, 7), torch.randn(0, 2, 3), 5, 5, 0)
    a = torch.randn(4, 10)
    with pytest.raises(RuntimeError, match="at least 2"):
        C.info_nce_fwd(a[:1], a[:1], 0.5, 1)
    with pytest.raises(RuntimeError, match="temperature"):
        C.info_nce_fwd(a, a, -1.0, 1)
    with pytest.raises(RuntimeError, match="reduction"):
        C.info_nce_fwd(a, a, 0.5, 7)
    _, logits, stats = C.info_nce_fwd(a, a, 0.5, 1)
    with pytest.raises(RuntimeError, match="float64 tensors of info_nce_fwd"):
        C.info_nce_bwd(torch.tensor(1.0), a, a, logits.float(), stats, 0.5, 1)
    with pytest.raises(RuntimeError, match="grad_loss has"):
        C.info_nce_bwd(torch.ones(4), a, a, logits, stats, 0.5, 1)
    n, idx = torch.randn(6, 10), torch.tensor([0, 1, -1, 5])
    with pytest.raises(RuntimeError, match="anchors' D = 10"):
        C.info_nce_neg_fwd(a, a, n[:, :9], idx, 0.5, 1)
    with pytest.raises(RuntimeError, match="different dtypes"):
        C.info_nce_neg_fwd(a, a, n.double(), idx, 0.5, 1)
    with pytest.raises(RuntimeError, match="anchor_index must be an int64 tensor"):
        C.info_nce_neg_fwd(a, a, n, idx.int(), 0.5, 1)
    with pytest.raises(RuntimeError, match="anchor_index must be an int64 tensor"):
        C.info_nce_neg_fwd(a, a, n, idx[:3], 0.5, 1)
    with pytest.raises(RuntimeError, match=r"anchor_index\[3\] = 6 is outside"):
        C.info_nce_neg_fwd(a, a, n, torch.tensor([0, 1, -1, 6]), 0.5, 1)
    with pytest.raises(RuntimeError, match="no negative is left"):
        C.info_nce_neg_fwd(a[:1], a[:1], n[:1], idx[:1], 0.5, 1)
    _, logits, stats, norms = C.info_nce_neg_fwd(a, a, n, idx, 0.5, 1)
    with pytest.raises(RuntimeError, match="float64 tensors of info_nce_neg_fwd"):
        C.info_nce_neg_bwd(torch.tensor(1.0), a, a, n, logits[:, :6], stats, norms, 0.5, 1)
    with pytest.raises(RuntimeError, match="grad_loss has"):
        C.info_nce_neg_bwd(torch.ones(4), a, a, n, logits, stats, norms, 0.5, 1)


# ------------------------------------------------------------------------------- without _C
def test_backend_unavailable_without_extension(monkeypatch):
    """With cgc._C missing, naming the native backend fails clearly and auto falls back."""
    import cgc.ops as ops_pkg

    monkeypatch.setitem(sys.modules, "cgc._C", None)  # makes `from cgc import _C` fail
    monkeypatch.delattr(cgc, "_C", raising=False)
    monkeypatch.delitem(sys.modules, "cgc.ops.native")
    monkeypatch.setattr(ops_pkg, "native", native, raising=False)  # restored after the test
    monkeypatch.setattr(ops_pkg, "_LOADED", {"reference": reference})  # forget loaded backends
    with pytest.raises(ops.BackendUnavailable, match=r"cgc\._C is not built.*pip install"):
        ops._module("native")
    assert "native" not in ops.available_backends()
    a = torch.randn(3, 5)
    assert torch.equal(ops.info_nce(a, a, 0.5), reference.info_nce(a, a, 0.5))
    with pytest.raises(ops.BackendUnavailable):
        ops.info_nce(a, a, 0.5, backend="native")


@pytest.mark.slow
def test_import_cgc_without_extension():
    """A fresh interpreter where cgc._C cannot be imported still runs the package."""
    code = (
        "import sys; sys.modules['cgc._C'] = None\n"
        "import torch, cgc\n"
        "from cgc import ops\n"
        "assert 'native' not in ops.available_backends(), ops.available_backends()\n"
        "a = torch.randn(3, 4)\n"
        "print(float(ops.info_nce(a, a, 0.5)))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr


# ------------------------------------------------------------------------------- training
@pytest.mark.parametrize("device", DEVICES)
def test_cgc_term_matches_reference_backend(device, rng):
    """The CGC term of a small CNN: loss and parameter gradients agree across backends."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3, padding=1),
        torch.nn.ReLU(),
        torch.nn.Conv2d(8, 16, 3, stride=2, padding=1),
        torch.nn.ReLU(),
        torch.nn.AdaptiveAvgPool2d(1),
        torch.nn.Flatten(),
        torch.nn.Linear(16, 5),
    )
    net = net.double().to(device)
    x = torch.randn(6, 3, 32, 32, generator=rng, dtype=torch.float64).to(device)
    theta = transforms.random_crop_flip(6, 32, 32, generator=rng, device=device).theta()
    grads = {}
    for backend in ("reference", "native"):
        net.zero_grad()
        loss = cgc.cgc_term(
            net, x, theta=theta, target_layer="2", method="hirescam", heatmap_size=24, backend=backend
        ).loss
        loss.backward()
        # the CGC term does not depend on the head's bias: no gradient there
        grads[backend] = (loss.detach(), [p.grad for p in net.parameters() if p.grad is not None])
    assert rel_err(grads["native"][0], grads["reference"][0]) < 1e-10
    assert len(grads["native"][1]) == len(grads["reference"][1]) == 5
    for g, w in zip(grads["native"][1], grads["reference"][1]):
        assert rel_err(g, w) < 1e-8
