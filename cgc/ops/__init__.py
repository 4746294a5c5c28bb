"""The three differentiable primitives of CGC and the choice of backend that computes them.

``gradcam``, ``affine_warp`` and ``info_nce`` validate their inputs here, once, and hand them
to a backend (their contracts: ``docs/backends.md``):

- ``reference``: pure PyTorch (:mod:`cgc.ops.reference`), always available, the test oracle;
- ``native``: the compiled extension ``cgc._C`` (:mod:`cgc.ops.native`), when it is built;
- ``triton``: Triton kernels (:mod:`cgc.ops.triton`), on CUDA tensors or under
  ``TRITON_INTERPRET=1``.

``backend=None`` reads ``CGC_BACKEND`` (default ``auto``). ``auto`` picks the fastest
available backend for the op and device (see :func:`auto_order`) and falls back to the
reference, so a package without its extension still works. Under
``torch.use_deterministic_algorithms(True)`` it avoids the CUDA kernels that are not
deterministic, and those kernels raise (or warn, with ``warn_only=True``) when named.
"""

from __future__ import annotations

import importlib
import math
import os
from collections.abc import Sequence
from types import ModuleType

import torch

from . import reference

BACKENDS = ("reference", "native", "triton")
PADDING_MODES = ("zeros", "border")
REDUCTIONS = ("mean", "sum", "none")


class BackendUnavailable(RuntimeError):
    """A backend was asked for by name but cannot run here (not built, no device, ...)."""


_LOADED: dict[str, ModuleType | BackendUnavailable] = {"reference": reference}


def _module(name: str) -> ModuleType:
    """The backend module ``name``, imported once; raises :class:`BackendUnavailable` with the
    reason when it cannot run here. The cache keeps imports out of ``torch.compile`` traces."""
    if name not in _LOADED:
        try:
            mod = importlib.import_module(f"cgc.ops.{name}")
            why = mod.unavailable_reason()
            _LOADED[name] = BackendUnavailable(f"backend {name!r} is not available: {why}") if why else mod
        except ImportError as err:
            _LOADED[name] = BackendUnavailable(f"backend {name!r} is not available: {err}")
    found = _LOADED[name]
    if isinstance(found, BackendUnavailable):
        raise found
    return found


def available_backends() -> list[str]:
    """Names of the backends that can run in this process."""
    names = []
    for name in BACKENDS:
        try:
            _module(name)
        except BackendUnavailable:
            continue
        names.append(name)
    return names


def unavailable(name: str, device_type: str | None = None) -> str | None:
    """Why backend ``name`` cannot run here (on ``device_type`` devices, when given), or None."""
    try:
        mod = _module(name)
    except BackendUnavailable as err:
        return str(err)
    if device_type is not None and mod is not reference and not mod.supports(torch.device(device_type)):
        return f"backend {name!r} does not run on {device_type} tensors here"
    return None


# ``auto``'s order on CUDA tensors, per op, fastest first, from the H100 forward+backward timings
# in benchmarks/RESULTS.md (torch 2.11): native beats Triton on every op and beats the eager
# reference for affine_warp (6x) and info_nce (2.2x); for gradcam at the benchmark sizes the
# eager reference wins (0.2 ms vs native 0.3-0.5 ms, Triton 0.7-1.0 ms) because the op is bound
# by host overhead. Those timings predate the native ops' C++ autograd (csrc/autograd.cpp), which
# halved their host cost on CPU: re-measure with benchmarks/gpu_check.sh before reordering. The
# "info_nce" entry also orders its explicit-negatives form, not yet timed on a GPU (the same
# kernels on a b x N Gram; benchmarks/bench_ops.py::test_info_nce_negatives measures it).
CUDA_ORDER = {
    "gradcam": ("reference", "native", "triton"),
    "affine_warp": ("native", "triton", "reference"),
    "info_nce": ("native", "triton", "reference"),
}


# The CUDA kernels that sum with floating-point atomics in an order that varies from run to run,
# and the pass they run in: the warp's backward (a scatter-add) in native, and in Triton for
# inputs over 16 pixels a side (``auto`` does not look at sizes and skips Triton's too). Every CPU
# kernel is deterministic; so is the reference (under torch.use_deterministic_algorithms PyTorch
# gives gather a deterministic backward), and Triton's info_nce stops splitting its Gram over D.
NONDETERMINISTIC_ON_CUDA = {
    "gradcam": {},
    "affine_warp": {"native": "backward", "triton": "backward"},
    "info_nce": {},
}


def auto_order(op: str, device: torch.device, *, grad: bool = True) -> Sequence[str]:
    """Preference of ``auto`` for one op on one device, fastest first (measured in
    ``benchmarks/``). Triton runs on CPU tensors only in its interpreter, which is for tests,
    so the CPU order omits it; on CPU native is faster than the reference for every op.

    Under ``torch.use_deterministic_algorithms(True)`` the CUDA order leaves out the backends
    whose kernels for this op are not deterministic (:data:`NONDETERMINISTIC_ON_CUDA`) in a
    pass that will run: ``grad`` says whether a backward may follow the forward.
    """
    if device.type != "cuda":
        return ("native", "reference")
    order = CUDA_ORDER[op]
    if torch.are_deterministic_algorithms_enabled():
        passes = ("forward", "backward") if grad else ("forward",)
        order = tuple(n for n in order if NONDETERMINISTIC_ON_CUDA[op].get(n) not in passes)
    return order


def _resolve(backend: str | None, op: str, device: torch.device, grad: bool = True) -> ModuleType:
    name = backend if backend is not None else os.environ.get("CGC_BACKEND", "auto")
    if name == "auto":
        for candidate in auto_order(op, device, grad=grad):
            try:
                mod = _module(candidate)
            except BackendUnavailable:
                continue
            if mod is reference or mod.supports(device):
                return mod
        return reference
    if name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}; choose one of {('auto',) + BACKENDS}")
    mod = _module(name)
    if mod is not reference and not mod.supports(device):
        raise BackendUnavailable(f"backend {name!r} cannot run {op} on device {device}")
    return mod


# ----------------------------------------------------------------------------- validation
def _tensor(x, name: str, dims: int, op: str) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != dims:
        raise ValueError(f"{op}: {name} must be {dims}-D, got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise TypeError(f"{op}: {name} must be a floating-point tensor, got {x.dtype}")
    if x.numel() == 0:
        raise ValueError(f"{op}: {name} is empty (shape {tuple(x.shape)}); an empty batch has nothing to compute")
    return x


def _same(a: torch.Tensor, b: torch.Tensor, names: str, op: str, dtype: bool = True) -> None:
    if a.device != b.device:
        raise ValueError(f"{op}: {names} are on different devices ({a.device} vs {b.device})")
    if dtype and a.dtype != b.dtype:
        raise TypeError(f"{op}: {names} have different dtypes ({a.dtype} vs {b.dtype})")


def _size(size, op: str) -> tuple[int, int]:
    if isinstance(size, int):
        size = (size, size)
    try:
        h, w = (int(s) for s in size)
    except (TypeError, ValueError):
        raise ValueError(f"{op}: size must be an int or a pair (h, w), got {size!r}") from None
    if h <= 0 or w <= 0:
        raise ValueError(f"{op}: size must be positive, got {(h, w)}")
    return h, w


# ----------------------------------------------------------------------------- public ops
def gradcam(
    activations: torch.Tensor, gradients: torch.Tensor, *, pool: bool = True, backend: str | None = None
) -> torch.Tensor:
    """Grad-CAM map ``relu(sum_k w_k * A_k)`` of activations ``A`` [B,K,H,W] -> [B,H,W].

    ``gradients`` is either ``d score / d A`` [B,K,H,W] (weights ``w`` = its spatial mean when
    ``pool``, classic Grad-CAM; the gradients themselves when not, the element-wise variant
    of the CGC recipe) or ready channel weights [B,K]. Differentiable in both inputs.
    """
    op = "gradcam"
    _tensor(activations, "activations", 4, op)
    if not isinstance(gradients, torch.Tensor) or gradients.dim() not in (2, 4):
        raise ValueError(
            f"{op}: gradients must be a [B,K,H,W] or [B,K] tensor, got "
            f"{getattr(gradients, 'shape', type(gradients).__name__)}"
        )
    _tensor(gradients, "gradients", gradients.dim(), op)
    expect = activations.shape if gradients.dim() == 4 else activations.shape[:2]
    if gradients.shape != expect:
        raise ValueError(
            f"{op}: gradients shape {tuple(gradients.shape)} does not match "
            f"activations {tuple(activations.shape)} (expected {tuple(expect)})"
        )
    _same(activations, gradients, "activations and gradients", op)
    return _resolve(backend, op, activations.device).gradcam(activations, gradients, bool(pool))


def affine_warp(
    input: torch.Tensor, theta: torch.Tensor, size, *, padding_mode: str = "zeros", backend: str | None = None
) -> torch.Tensor:
    """Bilinearly resample ``input`` [B,C,H,W] on the affine grid ``theta`` [B,2,3] of an
    output of ``size`` (int or (h, w)); equals ``F.grid_sample(input, F.affine_grid(theta,
    (B,C,h,w), align_corners=False), align_corners=False, padding_mode=padding_mode)``.

    ``theta`` maps output to input coordinates, both normalized to [-1, 1]; it is data
    (not differentiated). Identity theta with ``padding_mode="border"`` is bilinear resizing.
    """
    op = "affine_warp"
    _tensor(input, "input", 4, op)
    if not isinstance(theta, torch.Tensor) or theta.dim() != 3 or theta.shape[1:] != (2, 3):
        raise ValueError(
            f"{op}: theta must be a [B,2,3] tensor, got "
            f"{tuple(theta.shape) if isinstance(theta, torch.Tensor) else type(theta).__name__}"
        )
    _tensor(theta, "theta", 3, op)
    if theta.shape[0] != input.shape[0]:
        raise ValueError(f"{op}: theta has {theta.shape[0]} rows for a batch of {input.shape[0]}")
    _same(input, theta, "input and theta", op, dtype=False)
    if padding_mode not in PADDING_MODES:
        raise ValueError(f"{op}: padding_mode must be one of {PADDING_MODES}, got {padding_mode!r}")
    h, w = _size(size, op)
    grad = input.requires_grad and torch.is_grad_enabled()
    return _resolve(backend, op, input.device, grad).affine_warp(input, theta.detach(), (h, w), padding_mode)


def info_nce(
    anchors: torch.Tensor,
    positives: torch.Tensor,
    temperature: float = 0.5,
    *,
    negatives: torch.Tensor | None = None,
    anchor_index: torch.Tensor | int | None = None,
    reduction: str = "mean",
    backend: str | None = None,
) -> torch.Tensor:
    """InfoNCE of anchors [B,D] against their positives [B,D]; rows are L2-normalized first.

    Without ``negatives`` the other anchors are the negatives (needs B >= 2). With
    ``negatives`` [N,D] (e.g. the anchors of the whole batch, all-gathered across processes)
    anchor b is contrasted with every ``negatives[k]`` except ``k = anchor_index[b]``, its own
    row there: ``anchor_index`` is an int64 tensor [B] of values in [0, N) or -1 (none), an
    int ``o`` for rows ``o .. o+B-1``, or None (-1 for every anchor). The loss is then
    differentiable in the negatives too, separately from the anchors.
    """
    op = "info_nce"
    _tensor(anchors, "anchors", 2, op)
    _tensor(positives, "positives", 2, op)
    if anchors.shape != positives.shape:
        raise ValueError(
            f"{op}: anchors {tuple(anchors.shape)} and positives {tuple(positives.shape)} must have the same shape"
        )
    _same(anchors, positives, "anchors and positives", op)
    t = float(temperature)
    if not (t > 0 and math.isfinite(t)):
        raise ValueError(f"{op}: temperature must be a finite number > 0, got {temperature!r}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"{op}: reduction must be one of {REDUCTIONS}, got {reduction!r}")
    if negatives is None:
        if anchor_index is not None:
            raise ValueError(
                f"{op}: anchor_index is given without negatives; it says where each "
                "anchor sits among explicit negatives"
            )
        if anchors.shape[0] < 2:
            raise ValueError(
                f"{op}: needs a batch of at least 2 (the other rows are the negatives), got B={anchors.shape[0]}"
            )
        return _resolve(backend, op, anchors.device).info_nce(anchors, positives, t, reduction)
    _tensor(negatives, "negatives", 2, op)
    if negatives.shape[1] != anchors.shape[1]:
        raise ValueError(
            f"{op}: negatives {tuple(negatives.shape)} have D={negatives.shape[1]}, the anchors D={anchors.shape[1]}"
        )
    _same(anchors, negatives, "anchors and negatives", op)
    index = _anchor_index(anchor_index, anchors.shape[0], negatives.shape[0], anchors.device, op)
    return _resolve(backend, op, anchors.device).info_nce_neg(anchors, positives, negatives, index, t, reduction)


def _anchor_index(index, b: int, n: int, device: torch.device, op: str) -> torch.Tensor:
    """``anchor_index`` as the int64 tensor [b] the backends take, checked: values in [-1, n)
    and no row left without a negative (n = 1 and the anchor is that one row). A tensor's
    values are checked with one device synchronization."""
    if index is None:
        return torch.full((b,), -1, dtype=torch.int64, device=device)
    if isinstance(index, torch.Tensor):
        if index.dtype != torch.int64:
            raise TypeError(f"{op}: anchor_index must be an int64 tensor, got {index.dtype}")
        if index.shape != (b,):
            raise ValueError(
                f"{op}: anchor_index must have shape ({b},), one entry per anchor, got {tuple(index.shape)}"
            )
        if index.device != device:
            raise ValueError(f"{op}: anchor_index is on {index.device}, the anchors on {device}")
        lo, hi = (int(v) for v in torch.stack(torch.aminmax(index)).tolist())
        if lo < -1 or hi >= n:
            raise ValueError(
                f"{op}: anchor_index values must be in [0, {n}) or -1 (not among the "
                f"negatives), got values in [{lo}, {hi}]"
            )
    elif isinstance(index, int) and not isinstance(index, bool):
        lo, hi = index, index + b - 1
        if lo < 0 or hi >= n:
            raise ValueError(
                f"{op}: anchor_index={index} puts the {b} anchors at rows {lo}..{hi}, "
                f"outside the {n} negatives (use None for anchors not among them)"
            )
        index = torch.arange(lo, hi + 1, dtype=torch.int64, device=device)
    else:
        raise TypeError(f"{op}: anchor_index must be None, an int or an int64 tensor, got {type(index).__name__}")
    if n == 1 and hi >= 0:
        raise ValueError(
            f"{op}: with a single negative, an anchor that is that negative (anchor_index 0) has no negative left"
        )
    return index


__all__ = [
    "BACKENDS",
    "BackendUnavailable",
    "affine_warp",
    "auto_order",
    "available_backends",
    "gradcam",
    "info_nce",
]
