"""python -m cgc.study --quick: the study that backs README's "Does it work?" runs end to end
(a miniature: every part, every kind of run, >= 2 seeds), writes its record, tables and
figures, and continues an interrupted study without repeating runs."""

from __future__ import annotations

import importlib.util
import json
import re

import pytest
from PIL import Image

from cgc import study
from cgc.errors import ConfigError

HAS_TIMM = importlib.util.find_spec("timm") is not None


@pytest.mark.slow  # the study, end to end: the slow tier
def test_quick_study_runs_and_resumes(tmp_path, capsys):
    """Every part runs (the transformers part where timm is installed, else it is skipped
    saying so), and a second call runs nothing again."""
    out = tmp_path / "study"
    record = study.main(["--quick", "--out", str(out), "--seeds", "0", "1"])
    runs = record["runs"]
    parts = {r["part"] for r in runs.values()}
    assert parts == {"localization", "pretrain", "transfer", "semi"} | ({"transformers"} if HAS_TIMM else set())
    skipped = "the transformers part is skipped: it needs the optional package 'timm'"
    assert (skipped in capsys.readouterr().err) != HAS_TIMM
    assert all(isinstance(r["results"]["val_top1"], float) for r in runs.values())
    summary = record["summary"]
    assert summary["localization"]["cgc"]["consistency"][2] == 2  # two seeds
    assert set(summary["transfer"]) == {"ce, 2/class", "cgc, 2/class", "ce, 4/class", "cgc, 4/class"}
    table = (out / "tables.md").read_text()
    assert re.search(r"\| cgc, T 0.5 +\|", table) and "± " in table
    assert "top-1 by seed" in table
    if HAS_TIMM:
        assert summary["transformers"]["cgc"]["consistency"][2] == 2
    pngs = ["localization.png", "transfer.png", "semi.png", "profiles.png", "coverage.png"]
    for png in pngs + (["transformers.png"] if HAS_TIMM else []):
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
    args = study.StudyConfig.parse(["--seeds", "0", "1", "2", "--transformer-seeds", "5", "6"]).validate()
    runs = study.plan(study.QUICK, args.parts, args.seeds, args.screen_seeds, args.confirm, args.transformer_seeds)
    seeds = {}
    for part, _, seed, _ in runs:
        seeds.setdefault(part, set()).add(seed)
    assert seeds["transformers"] == {5, 6} and seeds["localization"] == seeds["transfer"] == {0, 1, 2}
    with pytest.raises(ConfigError, match="give at least two --transformer-seeds"):
        study.StudyConfig.parse(["--transformer-seeds", "0"]).validate()


def test_without_timm_the_transformers_part_is_skipped_in_one_line(tmp_path, capsys, monkeypatch):
    """Without the optional timm the other parts run as planned and one line says why the
    vision transformer's runs do not."""
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "timm" else find_spec(name, *a))
    parts, skipped = study.runnable_parts(study.PARTS)
    assert parts == ["localization", "transfer", "semi"]
    assert skipped == [
        "cgc.study: the transformers part is skipped: it needs the optional package 'timm' (pip install timm)"
    ]
    record = study.main(["--quick", "--parts", "transformers", "--out", str(tmp_path), "--seeds", "0", "1"])
    assert record["runs"] == {}
    err = capsys.readouterr().err
    assert err.count("is skipped") == 1 and skipped[0] in err
