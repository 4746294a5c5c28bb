"""python -m study --quick: the study that backs README's "Does it work?" runs end to end
(a miniature: every part, every kind of run, two seeds each), writes its record, tables and
figures, and continues an interrupted study without repeating runs; its paired statistics and
its plan (seeds per part, the tuning split apart) are what the docs say."""

from __future__ import annotations

import importlib.util
import json
import re

import pytest
from PIL import Image

import study
from cgc.errors import ConfigError
from study import report

HAS_TIMM = importlib.util.find_spec("timm") is not None


@pytest.mark.slow  # the study, end to end: the slow tier
def test_quick_study_runs_and_resumes(tmp_path, capsys):
    """Every part runs (the transformers part where timm is installed, else it is skipped
    saying so), and a second call runs nothing again."""
    out = tmp_path / "study"
    record = study.main(["--quick", "--out", str(out)])
    runs = record["runs"]
    parts = {r["part"] for r in runs.values()}
    expected = {"tuning", "tuning-finetune", "localization", "placement", "pretrain", "transfer", "semi"}
    assert parts == expected | ({"transformers"} if HAS_TIMM else set())
    skipped = "the transformers part is skipped: it needs the optional package 'timm'"
    first = capsys.readouterr()
    assert (skipped in first.err) != HAS_TIMM and re.search(r"^\[1/\d+\] ", first.out, re.M)  # one line per run
    assert all(isinstance(r["results"]["val_top1"], float) for r in runs.values())
    assert {r["seed"] for r in runs.values() if r["part"] == "tuning"} == {100, 101}  # the tuning split's seeds
    assert {r["seed"] for r in runs.values() if r["part"] == "localization"} == {0, 1}
    summary = record["summary"]
    cgc = summary["localization"]["cgc"]
    assert list(cgc["top1_by_seed"]) == [0, 1] and cgc["vs_baseline"]["val_top1"]["n"] == 2
    assert set(summary["transfer"]) == {"ce, 2/class", "cgc, 2/class", "ce, 4/class", "cgc, 4/class"}
    table = (out / "tables.md").read_text()
    assert "| cgc, T 0.2 " in table and "stayed at chance" in table and "Δ top-1 vs CE" in table
    assert "Center baseline" in table
    pngs = ["tuning.png", "localization.png", "placement.png", "transfer-top1.png", "semi-top1.png"]
    pngs += ["profiles.png", "coverage.png", "localization-overlays.png"] + (
        ["transformers.png", "transformers-overlays.png"] if HAS_TIMM else []
    )
    for png in pngs:
        with Image.open(out / png) as img:
            assert img.width > 300, png
    if HAS_TIMM:  # CE's ViT fine-tuned with the term starts from CE's final weights
        tuned = runs["transformers/ce--then-cgc-fine-tuning--no-floor/seed0"]["config"]
        assert tuned["weights"].endswith("transformers/ce/seed0/last.pt") and tuned["loss"] == "cgc"
    # the semi-supervised CE runs are the transfer CE runs: run once, recorded twice
    assert runs["semi/ce--labeled-only--2-class/seed0"]["results"] == runs["transfer/ce--2-class/seed0"]["results"]
    capsys.readouterr()
    again = study.main(["--quick", "--out", str(out)])
    assert not re.search(r"^\[\d+/\d+\] ", capsys.readouterr().out, re.M)  # nothing ran again ("[i/n] run: ...")
    assert again["runs"].keys() == runs.keys()
    assert json.loads((out / "study.json").read_text())["summary"] == json.loads(json.dumps(again["summary"]))


def test_each_part_gets_its_seeds_and_the_tuning_split_stays_apart():
    config = study.StudyConfig.parse(["--seeds", "0", "1", "2", "--transformer-seeds", "5", "6"]).validate()
    seeds: dict = {}
    for run in study.planned_runs(study.QUICK, study.PARTS, config):
        seeds.setdefault(run.part, set()).add(run.seed)
    assert seeds["transformers"] == {5, 6} and seeds["localization"] == seeds["placement"] == {0, 1, 2}
    assert seeds["tuning"] == {100, 101, 102, 103, 104} and seeds["transfer"] == {0, 1, 2}
    with pytest.raises(ConfigError, match="give at least two --transformer-seeds"):
        study.StudyConfig.parse(["--transformer-seeds", "0"]).validate()
    with pytest.raises(ConfigError, match="--tuning-seeds and --seeds must differ"):
        study.StudyConfig.parse(["--seeds", "0", "100"]).validate()
    assert study.StudyConfig().miniature().seeds == (0, 1)


def test_configurations_select_runs_and_keep_what_they_start_from():
    config = study.StudyConfig.parse(["--configurations", "cgc", "ce, then cgc fine-tuning, no floor"]).validate()
    runs = study.planned_runs(study.Scale(), study.PARTS, config)
    names = {(r.part, r.name) for r in runs}
    assert ("localization", "cgc") in names and ("localization", "ce") not in names
    assert ("transfer", "cgc, 5/class") in names and ("transfer", "ce, 5/class") not in names
    # the fine-tuning runs start from CE's ViT and from the pretrained model: both are kept
    assert ("transformers", "ce") in names and ("pretrain", "ce on six other shapes") in names
    assert {r.after for r in runs if r.after} <= {r.key for r in runs}
    with pytest.raises(ConfigError, match="no configuration named 'cgc, T 9'"):
        study.StudyConfig.parse(["--configurations", "cgc, T 9"]).validate()


def test_a_setting_added_later_at_its_neutral_value_keeps_recorded_runs_the_same():
    """A study folder recorded before a setting existed is not rerun: at the value that does
    what runs without it did, the setting is not part of a run's identity."""
    from cgc.train_config import TrainConfig
    from study.plan import ADDED_LATER, identity

    config = TrainConfig().replace(seed=3, heatmap_floor=0.0)  # each added setting at its neutral value
    recorded = json.loads(identity(config))
    assert not set(ADDED_LATER) & set(recorded)
    assert identity(config.replace(grad_bound=1.0)) != identity(config)


def fake_run(name: str, seed: int, top1: float, consistency: float) -> dict:
    return {
        "part": "localization",
        "name": name,
        "seed": seed,
        "config": {"num_classes": 10, "classes": None},
        "results": {"val_top1": top1},
        "evaluation": {"consistency": consistency},
    }


def test_paired_summary_counts_chance_apart_and_pairs_the_seeds():
    """A run that never left chance is counted, never averaged into the explanations; the
    difference from CE is paired over the seeds where both learned."""
    runs = [fake_run("ce", s, t, c) for s, t, c in ((0, 97.0, 0.80), (1, 95.0, 0.70), (2, 96.0, 0.75))]
    runs += [fake_run("cgc", s, t, c) for s, t, c in ((0, 96.5, 0.85), (1, 12.0, 0.99), (2, 96.0, 0.81))]
    record = {"runs": {f"{r['name']}/{r['seed']}": r for r in runs}}
    summary = report.summarize(record, record["runs"])["localization"]
    cgc = summary["cgc"]
    assert cgc["at_chance"] == [1] and summary["ce"]["at_chance"] == []
    assert cgc["mean"]["consistency"]["n"] == 2 and cgc["mean"]["consistency"]["mean"] == pytest.approx(0.83)
    assert cgc["vs_baseline"]["consistency"]["n"] == 2  # seeds 0 and 2
    assert cgc["vs_baseline"]["consistency"]["mean"] == pytest.approx((0.05 + 0.06) / 2)
    assert cgc["vs_baseline"]["val_top1"]["n"] == 3 and cgc["worst_top1_difference"] == pytest.approx(-83.0)
    table = report.accuracy_table(summary)
    assert "1 of 3" in table and "97.0 / 95.0 / 96.0" in table and "-83.0" in table


def test_without_timm_the_transformers_part_is_skipped_in_one_line(tmp_path, capsys, monkeypatch):
    """Without the optional timm the other parts run as planned and one line says why the
    vision transformer's runs do not."""
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "timm" else find_spec(name, *a))
    parts, skipped = study.runnable_parts(study.PARTS)
    assert parts == [p for p in study.PARTS if p != "transformers"]
    assert skipped == [
        "study: the transformers part is skipped: it needs the optional package 'timm' (pip install timm)"
    ]
    record = study.main(["--quick", "--parts", "transformers", "--out", str(tmp_path)])
    assert record["runs"] == {}
    err = capsys.readouterr().err
    assert err.count("is skipped") == 1 and skipped[0] in err


def test_the_center_baseline_is_printed_even_when_no_run_learned():
    """The centered Gaussian's pointing game depends on the images only: it is reported over
    every run, those at chance included, and printed even when no explanation table is."""
    runs = {}
    for name in ("ce", "cgc"):
        for seed in (0, 1):
            run = fake_run(name, seed, top1=10.0, consistency=0.5)
            run["evaluation"].update(pointing_game_center=60.0 + seed, pointing_game_center_off_center=0.0)
            runs[f"localization/{name}/seed{seed}"] = run
    summary = study.summarize({"runs": runs}, list(runs))
    assert summary["localization"]["ce"]["mean"]["pointing_game_center"]["mean"] == 60.5
    assert summary["localization"]["ce"]["mean"]["consistency"] is None  # no run learned
    assert "Center baseline" in report.markdown(summary) and "pointing game 60.5" in report.markdown(summary)
