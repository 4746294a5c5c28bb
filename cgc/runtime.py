"""How a command runs on its machine, decided in one place for every command line: mixed
precision, the memory format of CPU models, loader processes, seeding and the RNG states a
checkpoint keeps, deterministic algorithms and SIGTERM."""

from __future__ import annotations

import contextlib
import dataclasses
import os
import random
import signal
from typing import ClassVar

import torch

from .errors import ConfigError
from .settings import Settings, at_least, setting

AMP = ("auto", "off", "bf16")
GROUP = "run"


@dataclasses.dataclass(frozen=True)
class RunConfig(Settings):
    """Where and how a training run runs, and what it writes (see each setting's doc)."""

    GROUPS: ClassVar[tuple[str, ...]] = (GROUP, "CGC")

    seed: int = setting(0, "seed of the data, the crops, the initialization and the subsets", GROUP)
    device: str = setting("auto", "auto (CUDA when visible), cpu, cuda, cuda:1, ...", GROUP)
    amp: str = setting(
        "auto",
        "bf16: bfloat16 autocast (the CGC loss in float32); auto: bf16 where the device has fast bfloat16",
        GROUP,
        choices=AMP,
    )
    backend: str | None = setting(
        None, "ops backend: auto, reference, native, triton (default: $CGC_BACKEND or auto)", "CGC"
    )
    tensorboard: bool = setting(False, "also log to OUT/tensorboard (needs tensorboard)", GROUP)
    deterministic: bool = setting(False, "torch.use_deterministic_algorithms: bit-identical reruns on GPUs", GROUP)
    out: str = setting("runs/cgc", "output folder", GROUP, metavar="DIR")
    resume: str | None = setting(
        None, "checkpoint or run folder to continue from; 'auto': OUT/last.pt if it exists", GROUP, metavar="PATH"
    )
    checkpoint_every: int = setting(
        0,
        "also write OUT/last.pt every N steps, mid-epoch (0: at epoch ends only)",
        GROUP,
        check=at_least(0),
        metavar="N",
    )
    overlays: int = setting(16, "validation images in overlays.png", GROUP, check=at_least(0), metavar="N")
    val_every: int = setting(1, "validate every K epochs and after the last", GROUP, check=at_least(1), metavar="K")


def fast_bfloat16(device: torch.device) -> bool:
    """Whether ``device`` computes bfloat16 matrix products in hardware: CUDA GPUs from Ampere
    (compute capability 8) on, CPUs with AMX or AVX512-BF16 (elsewhere bfloat16 is emulated and
    slower than float32)."""
    if device.type == "cuda":
        return torch.cuda.get_device_capability(device)[0] >= 8
    if device.type == "cpu":
        return any(
            getattr(torch.cpu, probe, lambda: False)()
            for probe in ("_is_amx_tile_supported", "_is_avx512_bf16_supported")
        )
    return False


def resolve_amp(amp: str, device: torch.device) -> str:
    """``--amp``: ``auto`` becomes ``bf16`` where the device has fast bfloat16, else ``off``;
    ``bf16`` on a CUDA device without bfloat16 is an error."""
    if amp == "auto":
        return "bf16" if fast_bfloat16(device) else "off"
    if amp == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise ConfigError(f"--amp bf16 but {torch.cuda.get_device_name(device)} has no bfloat16 support")
    return amp


def autocast(device: torch.device, amp: str):
    """The mixed-precision context of a resolved ``--amp`` (a no-op context for ``off``)."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp == "bf16")


def channels_last(device: torch.device) -> bool:
    """Whether models on ``device`` should store their 4-D weights channels-last: on CPUs,
    oneDNN's native convolution layout (about 1.5x faster forwards)."""
    return device.type == "cpu"


def loader_workers(workers: int | None, in_memory: bool) -> int:
    """``--workers``, or its default: none for in-memory datasets (slices are cheap), 4 for
    files (decoding and resizing)."""
    return workers if workers is not None else (0 if in_memory else 4)


def rng_state() -> dict:
    """Every RNG the training loop draws from: torch CPU, CUDA devices, Python's ``random``."""
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    """Restore what :func:`rng_state` captured."""
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def seed_everything(seed: int) -> None:
    """Seed torch (every device) and Python's ``random``."""
    torch.manual_seed(seed)
    random.seed(seed)


@contextlib.contextmanager
def deterministic(enabled: bool):
    """``torch.use_deterministic_algorithms(True)`` and cuDNN without autotuning while the block
    runs (``--deterministic``), the previous settings restored after it. cuBLAS is reproducible
    only with a fixed workspace, which ``CUBLAS_WORKSPACE_CONFIG`` must set before CUDA starts:
    set here when absent (a process that already used CUDA keeps its own)."""
    if not enabled:
        yield
        return
    before = (
        torch.are_deterministic_algorithms_enabled(),
        torch.is_deterministic_algorithms_warn_only_enabled(),
        torch.backends.cudnn.benchmark,
    )
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True)
    torch.backends.cudnn.benchmark = False
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(before[0], warn_only=before[1])
        torch.backends.cudnn.benchmark = before[2]


@contextlib.contextmanager
def stop_on_sigterm():
    """While the block runs, SIGTERM (how SLURM preempts, and how torchrun stops workers) only
    sets the flag it yields (``flag["stop"]``); the training loop saves a checkpoint and stops
    after the current step. Outside the main thread signals cannot be caught: the flag then
    stays down."""
    flag = {"stop": False}
    try:
        previous = signal.signal(signal.SIGTERM, lambda *_: flag.update(stop=True))
    except ValueError:
        yield flag
        return
    try:
        yield flag
    finally:
        signal.signal(signal.SIGTERM, previous)
