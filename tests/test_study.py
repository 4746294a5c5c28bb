"""python -m cgc.study --quick: the study that backs README's "Does it work?" runs end to end
(a miniature: every part, every kind of run, >= 2 seeds), writes its record, tables and
figures, and continues an interrupted study without repeating runs."""

from __future__ import annotations

import json
import re

import pytest
from PIL import Image

from cgc import study

pytestmark = pytest.mark.slow  # the study, end to end: the slow tier


def test_quick_study_runs_and_resumes(tmp_path, capsys):
    out = tmp_path / "study"
    record = study.main(["--quick", "--out", str(out), "--seeds", "0", "1"])
    runs = record["runs"]
    parts = {r["part"] for r in runs.values()}
    assert parts == {"localization", "transformers", "pretrain", "transfer", "semi"}
    assert all(isinstance(r["results"]["val_top1"], float) for r in runs.values())
    summary = record["summary"]
    assert summary["localization"]["cgc"]["consistency"][2] == 2  # two seeds
    assert set(summary["transfer"]) == {"ce, 2/class", "cgc, 2/class", "ce, 4/class", "cgc, 4/class"}
    table = (out / "study.md").read_text()
    assert re.search(r"\| cgc, T 0.5 +\|", table) and "± " in table
    assert "top-1 by seed" in table
    assert summary["transformers"]["cgc"]["consistency"][2] == 2
    for png in ("localization.png", "transfer.png", "semi.png", "profiles.png", "coverage.png", "transformers.png"):
        with Image.open(out / png) as img:
            assert img.width > 300
    # the semi-supervised CE runs are the transfer CE runs: run once, recorded twice
    semi_ce = runs["semi/ce--labeled-only--2-class/seed0"]
    assert semi_ce["results"] == runs["transfer/ce--2-class/seed0"]["results"]
    capsys.readouterr()
    again = study.main(["--quick", "--out", str(out), "--seeds", "0", "1"])
    assert "[" not in capsys.readouterr().out.split("###")[0]  # nothing ran again
    assert again["runs"].keys() == runs.keys()
    assert json.loads((out / "study.json").read_text())["summary"] == again["summary"]
    with pytest.raises(SystemExit):
        study.main(["--quick", "--out", str(out), "--seeds", "0"])  # one seed cannot tell effect from noise


def test_transformer_seeds_are_the_vits_own():
    """--transformer-seeds gives the ViT runs their seeds and leaves every other part's alone."""
    args = study.parse_args(["--seeds", "0", "1", "2", "--transformer-seeds", "5", "6"])
    runs = study.plan(study.QUICK, args.parts, args.seeds, args.screen_seeds, args.confirm, args.transformer_seeds)
    seeds = {}
    for part, _, seed, _ in runs:
        seeds.setdefault(part, set()).add(seed)
    assert seeds["transformers"] == {5, 6} and seeds["localization"] == seeds["transfer"] == {0, 1, 2}
    with pytest.raises(SystemExit):
        study.parse_args(["--transformer-seeds", "0"])
