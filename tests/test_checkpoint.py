"""Checkpoints: atomic, safe to load (weights_only), RNG states round-trip."""
from __future__ import annotations

import random

import pytest
import torch

from cgc import checkpoint


def test_atomic_save_and_safe_load(tmp_path):
    state = {"model": {"w": torch.randn(3)}, "epoch": 2, "args": {"lr": 0.1, "scale": [0.08, 1.0]},
             "rng": checkpoint.rng_state()}
    checkpoint.save_atomic(state, tmp_path / "run" / "last.pt")
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["last.pt"]  # no temp files left
    loaded = checkpoint.load(tmp_path / "run")  # a run folder means its last.pt
    assert torch.equal(loaded["model"]["w"], state["model"]["w"]) and loaded["epoch"] == 2


def test_failed_write_keeps_the_old_checkpoint(tmp_path):
    path = tmp_path / "last.pt"
    checkpoint.save_atomic({"model": {"w": torch.ones(2)}}, path)
    with pytest.raises(Exception):
        checkpoint.save_atomic({"model": {"w": torch.ones(2)}, "bad": lambda: 0}, path)
    assert torch.equal(checkpoint.load(path)["model"]["w"], torch.ones(2))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.pt"]


def test_corrupt_missing_and_foreign_files(tmp_path):
    with pytest.raises(FileNotFoundError):
        checkpoint.load(tmp_path / "nope.pt")
    (tmp_path / "cut.pt").write_bytes(b"PK\x03\x04 truncated")
    with pytest.raises(ValueError, match="corrupt"):
        checkpoint.load(tmp_path / "cut.pt")
    torch.save({"weights": torch.ones(1)}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="not a cgc checkpoint"):
        checkpoint.load(tmp_path / "other.pt")


def test_rng_state_round_trip():
    state = checkpoint.rng_state()
    a = (torch.rand(3), random.random())
    checkpoint.set_rng_state(state)
    b = (torch.rand(3), random.random())
    assert torch.equal(a[0], b[0]) and a[1] == b[1]
