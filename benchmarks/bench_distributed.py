"""Scaling of distributed CGC training on this machine's CPUs (gloo): images per second of
``cgc.train``'s epoch on one process (1 and all threads) and on two processes of one thread
each, the scaling efficiency, and the time the negatives' gather takes per step
(``benchmarks/dist_step.py`` does the timing; on a GPU machine with two or more GPUs the same
runs use NCCL). Writes its table to ``CGC_BENCH_DIST_TABLE`` when set.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from .conftest import publish

SCRIPT = Path(__file__).with_name("dist_step.py")
ROWS: list[dict] = []


def launch(processes: int, threads: int) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    if processes == 1:
        cmd = [sys.executable, str(SCRIPT)]
    else:
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node",
            str(processes),
            str(SCRIPT),
        ]
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads([line for line in out.stdout.splitlines() if line.startswith("{")][-1])


@pytest.mark.parametrize("processes,threads", [(1, 1), (1, os.cpu_count() or 1), (2, 1)])
def test_scaling(benchmark, processes, threads):
    if processes > (os.cpu_count() or 1):
        pytest.skip(f"{processes} processes need {processes} cores")
    benchmark.group = "distributed CGC epoch (compact, 64 px, global batch 64)"
    row = benchmark.pedantic(lambda: launch(processes, threads), rounds=1, iterations=1)
    ROWS.append(row)


def table() -> str:
    base = next((r for r in ROWS if r["processes"] == 1 and r["threads"] == 1), None)
    lines = [
        f"torch {torch.__version__}, {os.cpu_count()} CPUs, gloo",
        "",
        "| processes x threads | step ms | images/s | scaling efficiency | gather ms (share of step) |",
        "|---|---:|---:|---:|---:|",
    ]
    for r in ROWS:
        eff = (
            "—" if base is None else f"{r['images_per_s'] / (base['images_per_s'] * r['processes'] * r['threads']):.0%}"
        )
        gather = "—" if r["processes"] == 1 else f"{r['gather_ms']:.2f} ({r['gather_ms'] / r['step_ms']:.1%})"
        lines.append(
            f"| {r['processes']} x {r['threads']} | {r['step_ms']:.1f} | {r['images_per_s']:.0f} | {eff} | {gather} |"
        )
    lines += [
        "",
        "Scaling efficiency: images/s over (1 process x 1 thread's images/s x the cores used). Gather: "
        "forward + backward of the differentiable all-gather of one process's heatmap rows.",
    ]
    return "\n".join(lines)


@pytest.fixture(scope="module", autouse=True)
def report(request):
    yield
    if ROWS:
        publish(
            request.config.pluginmanager.get_plugin("terminalreporter"),
            "cgc distributed scaling",
            table(),
            "CGC_BENCH_DIST_TABLE",
        )
