"""benchmarks/gpu_check.sh runs only on a GPU machine, in one run of a few minutes: a syntax error
or a renamed test file would waste that run, so CI, which has no GPU, checks both here."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_check.sh"


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_script_parses():
    subprocess.run(["bash", "-n", str(SCRIPT)], check=True)


def test_named_files_exist():
    named = set(re.findall(r"\b(?:tests|benchmarks)/[\w/]+\.py\b", SCRIPT.read_text()))
    assert {"tests/test_ops.py", "tests/test_triton.py", "benchmarks/profile_ops.py"} <= named
    missing = sorted(p for p in named if not (ROOT / p).is_file())
    assert not missing, f"gpu_check.sh names files that do not exist: {missing}"
