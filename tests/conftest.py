"""Shared fixtures: which (backend, device) pairs the op suite runs, input makers, and a clean
random and deterministic-mode state for every test.

Every backend that can run here is tested against the pure-PyTorch reference: ``native``
when ``cgc._C`` is built, ``triton`` on CUDA or on the CPU under ``TRITON_INTERPRET=1``,
CUDA devices when one is visible. Unavailable pairs are skipped with the reason; Triton
pairs that run in the (slow) CPU interpreter are marked ``slow``.

Random inputs: each run draws a fresh base seed (printed in the header; ``CGC_TEST_SEED=N``
replays a run), and each test's seed is a hash of the base seed and the test's id, so a test
sees the same numbers whichever tests ran before it, alone or in the whole suite. A failed test
ends the run with the command that replays it (the terminal summary: CI's log shows it). A
tolerance must hold for every draw: ``--seed-sweep N`` runs every selected test with the base
seeds ``BASE .. BASE+N-1`` (docs/architecture.md: how the suite was swept).
"""

from __future__ import annotations

import hashlib
import os
import random
import re

import torch

# Without a GPU the Triton kernels run in Triton's CPU interpreter, so one `pytest tests`
# covers them too. Triton reads this when a kernel is decorated, so it must be set before
# cgc.kernels is imported (nothing above imports it; tests/test_triton.py checks it worked).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import numpy as np
import pytest

from cgc import ops

#: the run's base seed: ``CGC_TEST_SEED`` when set (to replay a run), else fresh from the OS
BASE_SEED = int(os.environ.get("CGC_TEST_SEED") or int.from_bytes(os.urandom(4), "little"))


SWEEP = "seed_sweep"


def pytest_addoption(parser):
    parser.addoption(
        "--seed-sweep",
        type=int,
        default=0,
        metavar="N",
        help="run every selected test N times, with the base seeds CGC_TEST_SEED .. CGC_TEST_SEED+N-1",
    )


def pytest_report_header(config):
    return f"cgc test seed: CGC_TEST_SEED={BASE_SEED}"


def pytest_generate_tests(metafunc):
    sweep = metafunc.config.getoption("seed_sweep")
    if sweep and SWEEP in metafunc.fixturenames:
        metafunc.parametrize(SWEEP, range(sweep), indirect=True, ids=lambda i: f"base+{i}")


def seed_for(nodeid: str, base: int = BASE_SEED) -> int:
    """The seed of the test ``nodeid`` in a run with base seed ``base`` (63 bits)."""
    digest = hashlib.sha256(f"{base}:{nodeid}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


@pytest.fixture
def seed_sweep(request) -> int:
    """How far past the run's base seed this test's draw is (0 unless ``--seed-sweep``)."""
    return getattr(request, "param", 0)


def replay(nodeid: str, offset: int = 0) -> tuple[int, str]:
    """``(base seed, test id)`` that replay the test ``nodeid``: a swept test is the plain test
    run with its own base seed."""
    return BASE_SEED + offset, unswept(nodeid)


def unswept(nodeid: str) -> str:
    """The plain test's id of a ``--seed-sweep`` test id (``base+N`` may come first or last
    among the parameters, or be the only one)."""
    nodeid = re.sub(r"\[base\+\d+\]$", "", nodeid)
    return re.sub(r"\[base\+\d+-", "[", re.sub(r"-base\+\d+(?=[-\]])", "", nodeid))


@pytest.fixture
def test_seed(request, seed_sweep) -> int:
    """This test's seed, from the run's base seed and the test's id (printed: shown on failure)."""
    base, nodeid = replay(request.node.nodeid, seed_sweep)
    request.node.replay = f"CGC_TEST_SEED={base} python -m pytest '{nodeid}'"
    seed = seed_for(nodeid, base)
    print(f"test seed: {seed} (replay: {request.node.replay})")
    return seed


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):
    report = yield
    if report.failed and getattr(item, "replay", None):
        report.replay = item.replay
    return report


def pytest_terminal_summary(terminalreporter):
    """Every failed test's replay command, last in the log where CI's output ends."""
    failed = terminalreporter.stats.get("failed", []) + terminalreporter.stats.get("error", [])
    lines = sorted({r.replay for r in failed if getattr(r, "replay", None)})
    if lines:
        terminalreporter.section("replay the failures")
        for line in lines:
            terminalreporter.write_line(line)


@pytest.fixture(autouse=True)
def _seed_global_rngs(test_seed):
    """Seed torch's, Python's and NumPy's global generators from the test's seed, so that even a
    test using them does not depend on which tests ran before it."""
    torch.manual_seed(test_seed)
    random.seed(test_seed)
    np.random.seed(test_seed % 2**32)


@pytest.fixture
def rng(test_seed):
    """A generator of this test's own, seeded from the test's seed (not torch's global state)."""
    return torch.Generator().manual_seed(test_seed)


@pytest.fixture(autouse=True)
def _restore_deterministic_mode():
    """Put back ``torch.use_deterministic_algorithms`` (and warn-only) and the cuDNN flags after
    every test, so a test that changes them, or fails halfway, leaves nothing to the next one."""

    def mode():
        return torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()

    before, cudnn = mode(), (torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic)
    yield
    if mode() != before:  # only then: its first call imports torch._inductor, which takes seconds
        torch.use_deterministic_algorithms(before[0], warn_only=before[1])
    torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic = cudnn


def interpreted(backend: str, device: str) -> bool:
    """True when Triton kernels run through the (slow) CPU interpreter: keep shapes small."""
    return backend == "triton" and device == "cpu" and os.environ.get("TRITON_INTERPRET") == "1"


def backend_device_params(keep=lambda backend, device: True, extra=()):
    """``pytest.param((backend, device), *extra)`` for every backend and device where
    ``keep(backend, device)``; interpreted Triton is marked ``slow``. ``extra``: tuples of further
    values to combine with each pair (for a joint parametrization with ``indirect``)."""
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    out = []
    for backend in ops.BACKENDS:
        for device in devices:
            if not keep(backend, device):
                continue
            marks = [pytest.mark.slow] if interpreted(backend, device) else []
            for values in extra or [()]:
                ids = "-".join([backend, device, *(str(v).replace("torch.", "") for v in values)])
                out.append(pytest.param((backend, device), *values, id=ids, marks=marks))
    return out


def _unavailable(backend: str, device: str) -> str | None:
    try:
        mod = ops._module(backend)
    except ops.BackendUnavailable as err:
        return str(err)
    if backend != "reference" and not mod.supports(torch.device(device)):
        return f"backend {backend} does not run on {device} here"
    return None


@pytest.fixture(params=backend_device_params())
def backend_device(request):
    """``(backend, device)`` of one op implementation under test."""
    backend, device = request.param
    why = _unavailable(backend, device)
    if why:
        pytest.skip(why)
    return backend, device


def assert_equals_pytorch_grad_cam(ours, twin, layer: str, x, targets, method: str, reshape_transform=None):
    """The CAM methods' oracle: pytorch-grad-cam's ``method`` on ``twin`` (a model with the same
    weights as ours, left untouched by our hooks) at ``layer``. Our heatmaps ``ours``, scaled as
    it scales its own (per-image min-max, resize to the input, min-max again as its layer
    aggregation does), equal its output to 1e-5. Skipped without pytorch-grad-cam."""
    pgc = pytest.importorskip("pytorch_grad_cam", reason="pytorch-grad-cam (pip install grad-cam) is the oracle")
    from pytorch_grad_cam.utils.image import scale_cam_image
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    peers = {
        "gradcam": pgc.GradCAM,
        "hirescam": pgc.HiResCAM,
        "gradcam++": pgc.GradCAMPlusPlus,
        "xgradcam": pgc.XGradCAM,
        "layercam": pgc.LayerCAM,
    }
    assert ours.abs().sum() > 0
    peer = peers[method](model=twin, target_layers=[twin.get_submodule(layer)], reshape_transform=reshape_transform)
    theirs = peer(input_tensor=x, targets=[ClassifierOutputTarget(int(c)) for c in targets])
    scaled = scale_cam_image(scale_cam_image(ours.detach().numpy(), tuple(x.shape[-2:])))
    assert abs(scaled - theirs).max() < 1e-5
