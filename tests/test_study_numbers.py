"""The study's numbers in the docs are recomputed from the per-seed records the repository keeps
(docs/study/*.json, written by ``python -m study`` as OUT/record.json): a number copied by hand,
or left behind when the runs changed, fails here."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from study import report
from study.stats import Interval

ROOT = Path(__file__).resolve().parents[1]
STUDY = (ROOT / "docs" / "study.md").read_text()


def summary_of(record: str) -> dict:
    runs = json.loads((ROOT / "docs" / "study" / record).read_text())["runs"]
    return report.summarize({"runs": runs}, list(runs))


def cell(iv: dict | None, digits: int, sign: bool = True) -> str:
    """A table cell as the docs write it: mean [low, high], with the true minus sign."""
    return Interval(iv["mean"], iv["low"], iv["high"], iv["n"]).show(digits=digits, sign=sign).replace("-", "−")


def worst(s: dict) -> str:
    return f"{s['worst_top1_difference']:+.1f}".replace("-", "−")


def by_seed(s: dict) -> str:
    return " / ".join(f"{v:.1f}" for v in s["top1_by_seed"].values())


def rows_of(text: str, heading: str, first_column: str) -> dict[str, list[str]]:
    """``{row label: cells}`` of the Markdown table under ``heading`` in ``text`` whose header
    starts with ``first_column``."""
    text = text[text.index(heading) :]
    text = text[text.index(f"| {first_column} |") :]
    rows = {}
    for line in text.splitlines()[2:]:
        if not line.startswith("|"):
            break
        cells = [c.strip() for c in line.strip("|").split("|")]
        rows[cells[0]] = cells[1:]
    return rows


def table_rows(heading: str, first_column: str) -> dict[str, list[str]]:
    return rows_of(STUDY, heading, first_column)


#: (row label in docs/study.md, configuration in the record)
FLOOR_SCRATCH = {
    "no floor (the default before)": "cgc, gate 0.5 + label's CAM, T 0.5",
    "floor 0.3": "cgc, gate 0.5 + label's CAM, T 0.5, floor 0.3",
    "floor 1 (the default)": "cgc, gate 0.5 + label's CAM, T 0.5, floor 1",
}
FLOOR_FINETUNING = {"no floor": "cgc, no floor", "floor 0.3": "cgc, floor 0.3", "floor 1": "cgc, floor 1"}
FLOOR_FINETUNING["floor 0.3, gate 0.5"] = "cgc, floor 0.3, gate 0.5"


def test_the_floors_tables_on_the_tuning_seeds_are_the_record():
    summary = summary_of("floor.json")
    tuning, finetune = summary["tuning"], summary["tuning-finetune"]
    rows = table_rows("**On the tuning seeds, from scratch**", "configuration")
    assert rows["ce"][0] == by_seed(tuning["ce"])
    for label, name in FLOOR_SCRATCH.items():
        s, got = tuning[name], rows[label]
        d = s["vs_baseline"]
        want = [
            by_seed(s),
            f"{cell(d['val_top1'], 1)} ({worst(s)})",
            cell(d["consistency"], 3),
            cell(d["consistency_iou"], 3),
            cell(d["content_heatmap"], 1),
            cell(d["pointing_game"], 1),
            cell(d["class_specificity"], 3),
            cell(d["random_logit"], 3),
        ]
        assert got == want, label
    rows = table_rows("**On the tuning seeds, fine-tuning**", "configuration")
    assert rows["ce"][0] == by_seed(finetune["ce, 10/class"])
    assert rows["ce"][2] == f"— ({finetune['ce, 50/class']['mean']['val_top1']['mean']:.1f} %)"
    for label, name in FLOOR_FINETUNING.items():
        ten, fifty, got = finetune[f"{name}, 10/class"], finetune[f"{name}, 50/class"], rows[label]
        d = ten["vs_baseline"]
        want = [
            by_seed(ten),
            f"{cell(d['val_top1'], 1)} ({worst(ten)})",
            f"{cell(fifty['vs_baseline']['val_top1'], 1)} ({worst(fifty)})",
            cell(d["consistency"], 3),
            cell(d["consistency_iou"], 3),
            cell(d["pointing_game"], 1),
        ]
        assert got == want, label


@pytest.mark.parametrize("record", sorted(p.name for p in (ROOT / "docs" / "study").glob("*.json")))
def test_every_record_is_small_text_with_every_measure(record):
    path = ROOT / "docs" / "study" / record
    assert path.stat().st_size < 400_000
    runs = json.loads(path.read_text())["runs"]
    assert runs and all({"part", "name", "seed", "config", "results", "evaluation"} <= set(r) for r in runs.values())
    assert all("val_top1" in r["results"] for r in runs.values())


README = (ROOT / "README.md").read_text()
#: each measure's digits, as the study's own tables print it
DIGITS = {"val_top1": 1, **{key: digits for key, _, digits in report.EXPLANATION_COLUMNS}}
#: (row label in README's "Does it work?" table, measure)
README_ROWS = (
    ("val top-1 (%)", "val_top1"),
    ("consistency under crops/flips (top-20 % IoU) ↑", "consistency_iou"),
    ("consistency (cosine) ↑", "consistency"),
    ("content heatmap, energy in the box (%) ↑", "content_heatmap"),
    ("pointing game (%) ↑", "pointing_game"),
    ("pointing game, objects away from the center (%) ↑", "pointing_game_off_center"),
    ("class-specificity (1 − cos, label vs runner-up) ↑", "class_specificity"),
    ("random logit (SSIM) ↓", "random_logit"),
)
#: (row label in docs/study.md section 3's table, measure)
STUDY_ROWS = (
    ("top-1 (%) ↑", "val_top1"),
    ("consistency (cosine) ↑", "consistency"),
    ("consistency (top-20 % IoU) ↑", "consistency_iou"),
    ("content heatmap (%) ↑", "content_heatmap"),
    ("pointing game (%) ↑", "pointing_game"),
    ("pointing game, off-center objects (%) ↑", "pointing_game_off_center"),
    ("class-specificity (1 − cos) ↑", "class_specificity"),
    ("random logit (SSIM) ↓", "random_logit"),
    ("MPRT (Spearman) ↓", "mprt"),
    ("sparseness (Gini) ↑", "sparseness"),
)


def test_readme_does_it_work_is_the_record():
    """README's table of the default against CE, every cell recomputed from seeds 0-9's runs."""
    s = summary_of("report.json")["localization"]
    ce, cgc = s["ce"], s["cgc"]
    rows = rows_of(README, "## Does it work?", "measure")
    assert len(rows) == len(README_ROWS)
    for label, key in README_ROWS:
        digits = DIGITS[key]
        mean, difference = rows[label][0], rows[label][1].replace("**", "")
        assert mean == f"{ce['mean'][key]['mean']:.{digits}f}", label
        want = cell(cgc["vs_baseline"][key], digits)
        if key == "val_top1":
            want += f"; worst seed {worst(cgc)}"
        assert difference == want, label
    assert not ce["at_chance"] and not cgc["at_chance"]  # README: no run stays at chance


def test_study_section_3_is_the_record():
    s = summary_of("report.json")["localization"]
    ce, cgc = s["ce"], s["cgc"]
    rows = rows_of(STUDY, "## 3. Explanations", "measure")
    for label, key in STUDY_ROWS:
        d = DIGITS[key]
        assert rows[label] == [cell(ce["mean"][key], d, sign=False), cell(cgc["vs_baseline"][key], d)], label
    assert f"CE: top-1 by seed (0, 1, 2, 3, 4, 5, 6, 7, 8, 9): {by_seed(ce)}" in STUDY
    assert f"default CGC: top-1 by seed (0, 1, 2, 3, 4, 5, 6, 7, 8, 9): {by_seed(cgc)}" in STUDY
