"""Shared fixtures: which (backend, device) pairs the op suite runs, and input makers.

Every backend that can run here is tested against the pure-PyTorch reference: ``native``
when ``cgc._C`` is built, ``triton`` on CUDA or on the CPU under ``TRITON_INTERPRET=1``,
CUDA devices when one is visible. Unavailable pairs are skipped with the reason.
"""

from __future__ import annotations

import os

import torch

# Without a GPU the Triton kernels run in Triton's CPU interpreter, so one `pytest tests`
# covers them too. Triton reads this when a kernel is decorated, so it must be set before
# cgc.kernels is imported (nothing above imports it; tests/test_triton.py checks it worked).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest

from cgc import ops


def _pairs():
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    out = []
    for backend in ops.BACKENDS:
        for device in devices:
            out.append(pytest.param((backend, device), id=f"{backend}-{device}"))
    return out


def _unavailable(backend: str, device: str) -> str | None:
    try:
        mod = ops._module(backend)
    except ops.BackendUnavailable as err:
        return str(err)
    if backend != "reference" and not mod.supports(torch.device(device)):
        return f"backend {backend} does not run on {device} here"
    return None


@pytest.fixture(params=_pairs())
def backend_device(request):
    """``(backend, device)`` of one op implementation under test."""
    backend, device = request.param
    why = _unavailable(backend, device)
    if why:
        pytest.skip(why)
    return backend, device


def interpreted(backend: str, device: str) -> bool:
    """True when Triton kernels run through the (slow) CPU interpreter: keep shapes small."""
    return backend == "triton" and device == "cpu" and os.environ.get("TRITON_INTERPRET") == "1"


@pytest.fixture
def rng():
    """A fresh, randomly seeded generator per test (the seed is printed on failure)."""
    seed = int(torch.randint(0, 2**31 - 1, (1,)))
    print(f"test seed: {seed}")
    return torch.Generator().manual_seed(seed)
