"""Shared set-up of the benchmarks: devices, backends, timing records and the ratio table.

Every benchmark runs forward + backward of one op (or one CGC training step) through
``benchmark.pedantic`` with a few rounds, and records its median time here. At the end of the
pytest run a markdown table of medians and speed-ups (native vs eager reference and vs
``torch.compile(reference)``) is printed and, when ``CGC_BENCH_TABLE`` names a file, written
there together with the machine's measured copy bandwidth and matmul rate.
"""

from __future__ import annotations

import os
import platform
import subprocess
from collections import defaultdict

import pytest
import torch

from cgc import ops

#: (median, min) in seconds: RESULTS[(device, case)][backend]
RESULTS: dict[tuple[str, str], dict[str, tuple[float, float]]] = defaultdict(dict)
#: minimal bytes and FLOPs of each case, for the roofline column
COST: dict[tuple[str, str], tuple[float, float]] = {}
#: measured ceilings per device: {"copy_GBps": ..., "matmul_GFLOPs": ...}
MACHINE: dict[str, dict[str, float]] = defaultdict(dict)

ROUNDS = int(os.environ.get("CGC_BENCH_ROUNDS", "5"))


def devices() -> list[str]:
    return ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def backends_for(device: str) -> list[str]:
    """reference (eager), compiled (torch.compile of the reference), then every fast backend
    that runs on ``device`` (native, and triton on GPUs)."""
    names = ["reference", "compiled"]
    for name in ops.available_backends():
        if name != "reference" and ops._module(name).supports(torch.device(device)):
            names.append(name)
    return names


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def run(benchmark, device: str, case: str, backend: str, fn, rounds: int = ROUNDS, warmup: int = 2):
    """Time ``fn`` (which does its own forward + backward) and record its median and minimum
    (on a shared machine the minimum is the least disturbed run)."""

    def timed():
        fn()
        sync(device)

    benchmark.group = f"{device} {case}"
    benchmark.extra_info.update(device=device, case=case, backend=backend)
    benchmark.pedantic(timed, rounds=rounds, iterations=1, warmup_rounds=warmup)
    stats = getattr(benchmark, "stats", None)
    if stats is not None:
        RESULTS[(device, case)][backend] = (stats.stats.median, stats.stats.min)


def _fmt_ms(t: tuple[float, float] | None) -> str:
    return "—" if t is None else f"{t[0] * 1e3:.1f} ({t[1] * 1e3:.1f})"


def _ratio(a: tuple[float, float] | None, b: tuple[float, float] | None) -> str:
    return "—" if a is None or b is None else f"{a[0] / b[0]:.2f}× ({a[1] / b[1]:.2f}×)"


def table() -> str:
    """Markdown: one row per (device, case), medians in ms and speed-ups of native."""
    lines = []
    try:
        commit = (
            subprocess.run(
                ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=os.path.dirname(__file__)
            ).stdout.strip()
            or "unknown"
        )
    except OSError:
        commit = "unknown"
    lines.append(
        f"torch {torch.__version__}, {platform.machine()}, {os.cpu_count()} CPUs, "
        f"torch threads {torch.get_num_threads()}, commit {commit}"
        + (f", GPU {torch.cuda.get_device_name()}" if torch.cuda.is_available() else "")
    )
    for dev, m in MACHINE.items():
        lines.append(
            f"{dev}: copy {m.get('copy_GBps', float('nan')):.1f} GB/s (read + write), "
            f"fp32 matmul {m.get('matmul_GFLOPs', float('nan')):.0f} GFLOP/s"
        )
    lines.append("")
    extra = sorted({b for r in RESULTS.values() for b in r} - {"reference", "compiled", "native"})
    head = (
        ["device", "case", "eager ms", "compiled ms", "native ms"]
        + [f"{b} ms" for b in extra]
        + ["native vs eager", "native vs compiled"]
        + [f"native vs {b}" for b in extra]
        + ["floor ms"]
    )
    lines.append("| " + " | ".join(head) + " |")
    lines.append("|" + "---|" * len(head))
    for (dev, case), r in sorted(RESULTS.items(), key=lambda kv: (kv[0][0], list(RESULTS).index(kv[0]))):
        floor = None
        if (dev, case) in COST and MACHINE[dev]:
            nbytes, flops = COST[(dev, case)]
            floor = max(nbytes / (MACHINE[dev]["copy_GBps"] * 1e9), flops / (MACHINE[dev]["matmul_GFLOPs"] * 1e9))
        row = [dev, case, _fmt_ms(r.get("reference")), _fmt_ms(r.get("compiled")), _fmt_ms(r.get("native"))]
        row += [_fmt_ms(r.get(b)) for b in extra]
        row += [_ratio(r.get("reference"), r.get("native")), _ratio(r.get("compiled"), r.get("native"))]
        row += [_ratio(r.get(b), r.get("native")) for b in extra]
        row += ["—" if floor is None else f"{floor * 1e3:.2f}"]
        lines.append("| " + " | ".join(row) + " |")
    lines.append("")
    lines.append(
        "Times: median (minimum) over the rounds, in ms. Speed-ups: time(other) / "
        "time(native) on medians (on minima); above 1× native is faster. Floor: the op's "
        "minimal bytes at the measured copy bandwidth, or its FLOPs at the measured matmul "
        "rate, whichever is larger (inputs that fit in the caches can beat it)."
    )
    return "\n".join(lines)


def publish(reporter, title: str, text: str, env: str) -> None:
    """Print a results table in pytest's summary and, when ``$env`` names a file, write it."""
    if reporter is not None:
        reporter.write_sep("=", title)
        reporter.write_line(text)
    path = os.environ.get(env)
    if path:
        with open(path, "w") as f:
            f.write(text + "\n")


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    if RESULTS:
        publish(terminalreporter, "cgc benchmark table", table(), "CGC_BENCH_TABLE")


@pytest.fixture(params=devices())
def device(request):
    return request.param
