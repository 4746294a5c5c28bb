"""What the three kernel modules share: interpreter detection, launch wrapping, autotuning,
dtype choices and 64-bit offsets.

Triton decides at decoration time whether ``@triton.jit`` compiles for the GPU or runs in the
CPU interpreter (``TRITON_INTERPRET=1``), so :data:`INTERPRETED` is read off a decorated probe
rather than off the environment, which may have changed since these modules were imported.
"""

from __future__ import annotations

import functools
import warnings

import torch
import triton
import triton.language as tl

try:  # torch >= 2.6; cgc.ops.triton reports the backend unavailable without it
    from torch.library import wrap_triton
except ImportError:  # pragma: no cover - exercised only on old torch
    wrap_triton = None


@triton.jit
def _probe():
    pass


INTERPRETED: bool = type(_probe).__name__ == "InterpretedFunction"
"""True when the kernels of this process run in the Triton CPU interpreter."""

EPS_NORM = 1e-12  # the reference's row-norm guard (cgc.ops.reference.EPS_NORM)


def launch(kernel):
    """``wrap_triton(kernel)`` so that ``torch.compile`` / ``make_fx`` can trace the launch.

    Interpreted kernels are launched as they are: they carry no compiled metadata to trace,
    and some torch versions' ``wrap_triton`` rejects them.
    """
    return kernel if INTERPRETED else wrap_triton(kernel)


def alert_nondeterministic(caller: str, device: torch.device) -> None:
    """Raise (or warn, under ``warn_only=True``) if ``caller``, a kernel that sums with
    floating-point atomics, is about to run on a GPU under ``torch.use_deterministic_algorithms``,
    as PyTorch's own atomic kernels do. Interpreted runs apply atomics one at a time and are
    deterministic, so CPU tensors pass."""
    if device.type != "cuda" or not torch.are_deterministic_algorithms_enabled():
        return
    msg = (
        f"{caller} sums with floating-point atomics on CUDA, so its result is not "
        "deterministic, but torch.use_deterministic_algorithms(True) is set; backend='auto' "
        "leaves it out, and backend='reference' is deterministic"
    )
    if torch.is_deterministic_algorithms_warn_only_enabled():
        warnings.warn(msg, stacklevel=3)
    else:
        raise RuntimeError(msg)


@functools.cache
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device (the current one when it has no index)."""
    return _sm_count(device.index if device.index is not None else torch.cuda.current_device())


def autotune(configs: list, key: list[str], **kwargs):
    """``triton.autotune`` over ``configs``; the first config only under the interpreter,
    where benchmarking every config would only cost time (interpreted timings mean nothing)."""
    return triton.autotune(configs[:1] if INTERPRETED else configs, key=key, **kwargs)


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation dtype: float64 for float64 inputs, float32 for everything narrower."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def tl_dtype(dtype: torch.dtype):
    """The ``tl`` dtype matching a torch floating dtype."""
    return {
        torch.float64: tl.float64,
        torch.float32: tl.float32,
        torch.float16: tl.float16,
        torch.bfloat16: tl.bfloat16,
    }[dtype]


def dot_dtype(dtype: torch.dtype):
    """Operand dtype of ``tl.dot`` for inputs of ``dtype``: 16-bit inputs stay 16-bit on the
    GPU (tensor cores, exact products, float32 accumulation); bfloat16 is upcast under the
    interpreter, which stores it as raw uint16 and would compute on the bit patterns."""
    if dtype == torch.bfloat16 and INTERPRETED:
        return tl.float32
    return tl_dtype(dtype)


@triton.jit
def plane_offset(b, y, x, sb, sy, sx):
    """Element offset of (batch ``b``, row ``y``, column ``x``) for strides (sb, sy, sx), in
    int64 so that tensors of more than 2**31 elements are addressed correctly. Kernels take
    it once per program and add the channel term ``k * sk`` (also int64) inside their loops."""
    return b.to(tl.int64) * sb + y.to(tl.int64) * sy + x.to(tl.int64) * sx
