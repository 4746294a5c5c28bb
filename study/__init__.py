"""``python -m study`` (from the repository's root): the runs behind docs/study.md ("Does it
work?"), with seeds, paired statistics and figures. The study lives beside the library, not in
it: ``pip install`` installs ``cgc``, and the study uses it as any user would.

The paper's claims, tested on the built-in dataset with ``python -m cgc.train`` itself, each
configuration compared with CE on the same seeds (:mod:`study.plan`):

1. **tuning** and **tuning-finetune**: the term's safeguards and its floor, screened against CE
   on the tuning seeds (data no reported run uses), from scratch and when fine-tuning opens the
   term at the first step: the default term was chosen here;
2. **localization**: CE, the default term, the term without safeguards, its temperature and
   weight, and its options (uniform crops, class negatives), on the report seeds;
3. **placement**: CE vs CGC with the objects near the image center, as in photographs;
4. **transfer** and **semi**: a compact model pretrained on six shapes, fine-tuned on six others
   from N labeled images per class, CE vs CGC, and the term on unlabeled images;
5. **transformers**: timm's small test ViT on four shapes: CE, CGC, and CE fine-tuned with the term.

Every run is recorded in ``OUT/study.json`` as it finishes (an interrupted study continues where
it stopped); at the end ``OUT/record.json`` (every number of every run of this command, small:
what ``docs/study/*.json`` keep), ``OUT/tables.md`` (:mod:`study.report`) and the figures
(:mod:`study.figures`). ``--quick`` runs a miniature of every part (CI checks that the study
runs).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from cgc import cli, files

from .figures import coverage_figure, differences_figure, overlay_figure, profile_figure, shots_figure
from .plan import (
    LOCALIZATION,
    PARTS,
    QUICK,
    SEMI,
    TUNING,
    PlannedRun,
    Scale,
    StudyConfig,
    planned_runs,
    run_key,
    runnable_parts,
)
from .report import TITLES, markdown, summarize
from .runs import box_geometry, compact, evaluate_run, execute, open_run

__all__ = [
    "LOCALIZATION",
    "PARTS",
    "QUICK",
    "TUNING",
    "PlannedRun",
    "Scale",
    "StudyConfig",
    "box_geometry",
    "evaluate_run",
    "main",
    "open_run",
    "planned_runs",
    "run_key",
    "runnable_parts",
    "summarize",
]
#: the configurations whose mean heatmap in the objects' box frame is drawn (profiles.png)
PROFILED = (
    "ce",
    "cgc",
    "cgc, no floor",
    "cgc, T 0.2",
    "cgc, no floor, uniform crops",
    "cgc, no floor, class negatives K=3",
)


def figures(out: Path, summary: dict, study: StudyConfig, scale: Scale) -> list[Path]:
    """Every figure the summary has the runs for."""
    written = []
    for part in ("tuning", "localization", "placement", "transformers"):
        if part in summary and len(summary[part]) > 1:
            title = f"{TITLES[part]}: paired difference from CE, mean and 95 % interval over the seeds"
            written.append(differences_figure(out / f"{part}.png", summary[part], title))
    for part, labels in (("transfer", ("ce", "cgc")), ("semi", tuple(SEMI))):
        if part in summary:
            written.append(shots_figure(out / f"{part}-top1.png", summary[part], TITLES[part], labels))
    if "localization" in summary:
        seed = study.seeds[0]
        shown = {
            f"{name}\n(seed {seed}, top-1 {summary['localization'][name]['top1_by_seed'][seed]:.0f} %)": folder
            for name in PROFILED
            if name in summary["localization"]
            and (folder := out / "runs" / run_key("localization", name, seed)).is_dir()
        }
        written += [profile_figure(out, shown), coverage_figure(out, size=scale.image_size)]
        pair = [out / "runs" / run_key("localization", name, seed) for name in ("ce", "cgc")]
        if all(folder.is_dir() for folder in pair):
            written.append(
                overlay_figure(out / "localization-overlays.png", pair, [f"CE, seed {seed}", f"CGC, seed {seed}"])
            )
    seed = study.transformer_seeds[0]
    vits = {
        name: out / "runs" / run_key("transformers", name, seed)
        for name in ("ce", "cgc, no floor", "ce, then cgc fine-tuning, no floor")
    }
    if "transformers" in summary and all(folder.is_dir() for folder in vits.values()):
        names = [f"ViT, {name}" for name in vits]
        written.append(overlay_figure(out / "transformers-overlays.png", list(vits.values()), names))
    return written


def main(argv=None) -> dict:
    """``python -m study``: see :class:`StudyConfig`."""
    with cli.exit_on_error():
        study = StudyConfig.parse(argv).validate()
        if study.quick:
            study = study.miniature()
        out = Path(study.out)
        out.mkdir(parents=True, exist_ok=True)
        files.write_text_atomic(study.to_yaml(), out / "config.yaml")
        scale = QUICK if study.quick else Scale()
        path = out / "study.json"
        record = json.loads(path.read_text()) if path.is_file() else {"runs": {}}
        parts, skipped = runnable_parts(study.parts)
        for line in skipped:
            print(line, file=sys.stderr)
        runs = planned_runs(scale, parts, study)
        already = sum(r.key in record["runs"] for r in runs)
        print(f"study: {len(runs)} runs ({already} already in {path})", file=sys.stderr)
        execute(out, runs, record)
        summary = summarize(record, [r.key for r in runs])
        record["summary"] = summary
        path.write_text(json.dumps(record, indent=1) + "\n")
        planned = {r.key for r in runs}
        kept = {"runs": {k: v for k, v in record["runs"].items() if k in planned}}
        (out / "record.json").write_text(json.dumps(compact(kept), indent=1, sort_keys=True) + "\n")
        (out / "tables.md").write_text(markdown(summary) + "\n")
        written = figures(out, summary, study, scale)
        print(markdown(summary))
        print(f"wrote {path}, {out / 'tables.md'}, " + ", ".join(str(p) for p in written), file=sys.stderr)
        return record
