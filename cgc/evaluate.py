"""``python -m cgc.evaluate``: compare the explanations of models side by side.

The models are cgc checkpoints (``--checkpoint``) and/or any torchvision or timm model with
local weights (``--arch NAME --weights PATH``). Every model is evaluated on the same images (the
validation set of the first checkpoint's dataset, or ``--dataset`` / ``--data``: e.g. a folder
of photos with Pascal-VOC boxes) with the metrics of :data:`cgc.metrics.METRICS` (``--metrics``
to choose, ``--skip-slow``): accuracy, localization (content heatmap, pointing game),
faithfulness (insertion / deletion), consistency under crops and flips, robustness
(max-sensitivity), complexity (sparseness, entropy) and the sanity checks (random logit,
cascading model parameter randomization). Writes ``report.json``, ``report.md`` (the table),
``overlays.png`` (each image, then every model's heatmap), ``curves.png`` (the mean insertion and
deletion curves) and ``randomization.png`` (each model's heatmap after each randomization step).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
from pathlib import Path
from typing import ClassVar

import torch

from . import cli, data, distributed, files, metrics, runtime, tables, viz
from .cam import CAM
from .cam_methods import CAM_METHODS
from .checkpoint import LoadedModel, load_model
from .errors import ConfigError
from .metrics import MetricsConfig
from .settings import Settings, at_least, overrides, section, setting

log = logging.getLogger("cgc.evaluate")

CAUSAL = ("insertion_auc", "deletion_auc")


def _datasets() -> tuple[str, ...]:
    return tuple(data.DATASETS)


def _cam_methods() -> tuple[str, ...]:
    return tuple(CAM_METHODS)


def _metric_names() -> tuple[str, ...]:
    return tuple(metrics.METRICS)


MODELS = "models (repeat to compare; checkpoints first, then --arch models)"
DATA = "data (default: what the first checkpoint was trained on)"
#: the data settings an evaluation may change, with their flags, docs and checks from the
#: training's data section (each None: the first checkpoint's)
DataOverrides = overrides(
    data.DataConfig,
    ("dataset", "root", "image_size", "train_size", "val_size", "num_classes", "placement", "workers"),
    "DataOverrides",
    DATA,
)


@dataclasses.dataclass(frozen=True)
class EvalConfig(Settings):
    """What ``python -m cgc.evaluate`` evaluates, on what, and how (see each field's doc). The
    models: cgc ``checkpoint`` paths, then ``arch`` models with their ``weights``; ``name``: a
    column name per model. The data: the first checkpoint's, changed by the data fields that
    are not None."""

    PROG: ClassVar[str] = "python -m cgc.evaluate"
    DESCRIPTION: ClassVar[str] = "Compare the explanations of models side by side."
    GROUPS: ClassVar[tuple[str, ...]] = (MODELS, DATA, "explanations", "metrics", "run")

    checkpoint: tuple[str, ...] = setting(
        (), "cgc checkpoint file or run folder (its last.pt)", MODELS, nargs="append", metavar="PATH"
    )
    arch: tuple[str, ...] = setting(
        (),
        "a torchvision model name, timm:NAME or hf:NAME_OR_PATH, with its --weights",
        MODELS,
        nargs="append",
        metavar="NAME",
    )
    weights: tuple[str, ...] = setting(
        (),
        "local state dict of the --arch given in the same position (.pth, .pt, .safetensors, a save_pretrained folder)",
        MODELS,
        nargs="append",
        metavar="PATH",
    )
    name: tuple[str, ...] | None = setting(
        None, "column name of each model, in order (default: run folder or weights file name)", MODELS, nargs="append"
    )
    data: DataOverrides = section(DataOverrides, "the data of the first checkpoint, changed where given")
    seed: int | None = setting(None, "dataset seed", DATA)
    limit: int | None = setting(None, "evaluate only the first N images", DATA, check=at_least(1), metavar="N")
    cam: str | None = setting(
        None,
        "CAM method (default: each checkpoint's training method; gradcam for --arch models)",
        "explanations",
        choices=_cam_methods,
    )
    target_layer: str | None = setting(None, "CAM layer (default: each checkpoint's, else found)", "explanations")
    metrics: tuple[str, ...] | None = setting(
        None, "metrics to report (default: all)", "metrics", choices=_metric_names, nargs="+", metavar="NAME"
    )
    skip_slow: bool = setting(
        False, "leave out the slow metrics (insertion, deletion, max-sensitivity, MPRT)", "metrics"
    )
    no_causal: bool = setting(False, "leave out insertion/deletion", "metrics")
    batch_size: int = setting(64, "images per batch", "metrics", check=at_least(1))
    protocol: MetricsConfig = section(MetricsConfig, "the metrics' protocols")
    device: str = setting("auto", "auto, cpu, cuda, cuda:1, ...", "run")
    backend: str | None = setting(None, "ops backend (default: $CGC_BACKEND or auto)", "run")
    out: str = setting("runs/eval", "output folder", "run", metavar="DIR")
    overlays: int = setting(8, "images in the overlay PNG", "run", check=at_least(1))

    def relations(self) -> list[str]:
        found = []
        if not self.checkpoint and not self.arch:
            found.append("give at least one --checkpoint or --arch NAME --weights PATH")
        if len(self.arch) != len(self.weights):
            found.append(f"give one --weights per --arch ({len(self.arch)} --arch, {len(self.weights)} --weights)")
        if self.arch and not self.checkpoint and not self.data.dataset:
            found.append("--arch models need --dataset (and --data for files): no checkpoint says what to evaluate on")
        models = len(self.checkpoint) + len(self.arch)
        if self.name is not None and len(self.name) != models:
            found.append(f"give one --name per model ({models}), got {len(self.name)}")
        elif self.name is not None and len(set(self.name)) != len(self.name):
            found.append(f"--name values must be distinct, got {list(self.name)}")
        return found


def model_names(sources: list[str], names: list[str] | None) -> list[str]:
    """Column names: given, or each run folder's (weights file's) name, made unique."""
    if names is not None:
        return names
    out: list[str] = []
    for source in sources:
        p = Path(source)
        base = p.name if p.is_dir() else (p.parent.name if p.suffix == ".pt" and p.parent.name else p.stem)
        name, k = base, 2
        while name in out:
            name, k = f"{base}-{k}", k + 1
        out.append(name)
    return out


def label_map(loaded: LoadedModel, classes: list[str]) -> torch.Tensor | None:
    """Model class index of each dataset class (None: the same classes in the same order).

    A checkpoint must know the dataset's classes. Another model's classes are matched by
    name (e.g. torchvision's ImageNet names), by integer folder names (class indices), or,
    when the counts agree and the model has no names, by position."""
    mine = loaded.classes
    if list(mine) == list(classes):
        return None
    if loaded.from_checkpoint:
        raise ConfigError(
            f"{loaded.source} was trained on classes {list(mine)[:6]}..., not the evaluation "
            f"dataset's {classes[:6]}...; evaluate checkpoints of one dataset together"
        )
    if all(c.isdigit() and int(c) < len(mine) for c in classes):
        return torch.tensor([int(c) for c in classes])
    index = {c: i for i, c in enumerate(mine)}
    if all(c in index for c in classes):
        return torch.tensor([index[c] for c in classes])
    generic = all(c == f"class {i}" for i, c in enumerate(mine))
    if generic and len(mine) == len(classes):
        return None
    missing = [c for c in classes if c not in index][:4]
    raise ConfigError(
        f"cannot tell which of the model's {len(mine)} classes the dataset's {missing} are: name the "
        f"class folders (or the XML <name>s) by the model's class names or class indices"
    )


def format_table(report: dict[str, dict], chosen: list[metrics.Metric]) -> str:
    """Markdown: one row per metric (with its direction and what it measures), one column per model."""
    names = list(report)
    rows = [
        [
            m.label + m.arrow,
            *(None if report[n].get(m.name) is None else format(report[n][m.name], m.fmt) for n in names),
            m.about,
        ]
        for m in chosen
    ]
    if any("term_summary" in report[n] for n in names):
        ran = [report[n].get("term_summary", "no term (CE)") for n in names]
        rows.append(["CGC term ran", *ran, "the first training step whose loss held the term"])
    table = tables.markdown(["metric", *names, "what it measures"], rows, "l" + "r" * len(names) + "l")
    return table + "\n\n↑ higher is better, ↓ lower is better; — not measured (no boxes, or nothing to score)."


def main(argv=None) -> dict:
    """``python -m cgc.evaluate``: parse the flags and evaluate (see :func:`run`); a library
    error ends the process with one ``error: ...`` line."""
    with cli.exit_on_error():
        config = EvalConfig.parse(argv).validate()
        cli.setup_logging()
        return cli.run_in_job(lambda ctx: run(config, ctx), config.device)


def load_models(config: EvalConfig) -> list[LoadedModel]:
    """The checkpoints' models, then the ``--arch`` models with their weights."""
    loaded = [load_model(checkpoint_path=c) for c in config.checkpoint]
    return loaded + [
        load_model(arch=a, weights=w, image_size=config.data.image_size) for a, w in zip(config.arch, config.weights)
    ]


def evaluation_data(config: EvalConfig, loaded: list[LoadedModel]) -> data.DataBundle:
    """The images every model is evaluated on: the first checkpoint's dataset changed by the
    data flags given, or for ``--arch`` models alone the ``--dataset`` whole."""
    changes = {**config.data.to_dict(), "seed": config.seed}
    if config.checkpoint:
        run = loaded[0].config
        return data.build_for_run(run.data, run.run.seed, changes)
    changes["image_size"] = config.data.image_size or loaded[0].image_size
    return data.build_for_run(data.DataConfig(dataset=config.data.dataset), 0, changes, everything=True)


def chosen_metrics(config: EvalConfig, *, has_boxes: bool) -> list[metrics.Metric]:
    """``--metrics`` (default all) less the slow or causal ones when asked, and those that need
    boxes when the data has none."""
    chosen = metrics.select(
        None if config.metrics is None else list(config.metrics), skip_slow=config.skip_slow, has_boxes=has_boxes
    )
    return [m for m in chosen if not (config.no_causal and m.name in CAUSAL)]


def run(config: EvalConfig, ctx: distributed.Context | None = None) -> dict:
    """Evaluate every model on the same images and write the report, table and pictures.
    Under torchrun the images are shared out over the processes, the totals summed, and the
    first process writes."""
    ctx = ctx or distributed.Context(distributed.pick_device(config.device))
    device, out = ctx.device, Path(config.out)
    loaded = load_models(config)
    names = model_names([*config.checkpoint, *config.weights], None if config.name is None else list(config.name))
    bundle = evaluation_data(config, loaded)
    chosen = chosen_metrics(config, has_boxes=hasattr(bundle.val, "boxes"))
    n = len(bundle.val) if config.limit is None else min(config.limit, len(bundle.val))
    if ctx.primary:
        out.mkdir(parents=True, exist_ok=True)
        files.write_text_atomic(config.to_yaml(), out / "config.yaml")
        procs = f" x {ctx.world_size} processes" if ctx.distributed else ""
        log.info(
            f"cgc.evaluate: {len(loaded)} model(s) on {bundle.val.__class__.__name__} val ({n} images, "
            f"{len(bundle.classes)} classes, {bundle.image_size}px), device={device}{procs}; metrics: "
            f"{', '.join(m.name for m in chosen)}"
        )
    with contextlib.ExitStack() as stack:
        cams = [stack.enter_context(model_cam(config, m, device)) for m in loaded]
        report = {
            name: evaluate_model(config, cam, model, bundle, chosen, ctx, name)
            for name, cam, model in zip(names, cams, loaded)
        }
        if ctx.primary:
            write(out, report, chosen, config, bundle, n, cams, names, [m.classes for m in loaded], device)
    return report


def model_cam(config: EvalConfig, loaded: LoadedModel, device) -> CAM:
    """The CAM of a model in eval mode on ``device``: its training method and layer, unless
    ``--cam`` / ``--target-layer`` say otherwise."""
    return CAM(
        loaded.model.to(device).eval(),
        config.target_layer or loaded.target_layer,
        method=config.cam or loaded.method,
        backend=config.backend,
        channels_last=runtime.channels_last(device),
    )


def evaluate_model(config: EvalConfig, cam: CAM, loaded: LoadedModel, bundle, chosen, ctx, name: str) -> dict:
    """Every chosen metric of one model (None where not measured) and where it came from."""
    result = metrics.explanation_metrics(
        cam,
        bundle.val,
        ctx.device,
        metrics=chosen,
        settings=config.protocol,
        batch_size=config.batch_size,
        limit=config.limit,
        workers=runtime.loader_workers(config.data.workers, bundle.in_memory),
        desc=f"evaluate {name}",
        job=ctx,
        label_map=label_map(loaded, bundle.classes),
    )
    run = loaded.config
    result.update(
        source=loaded.source,
        arch=loaded.arch,
        loss=run.term.loss if run is not None else None,
        target_layer=cam.target_layer,
        cam=cam.method,
    )
    term = loaded.term
    if term is not None:
        result.update(term.to_dict(), term_summary=term.summary())
        if term.warning():
            result["term_warning"] = term.warning()
    return {**dict.fromkeys(metrics.METRICS), **result}


def write(
    out: Path,
    report: dict,
    chosen,
    config: EvalConfig,
    bundle,
    n: int,
    cams,
    names,
    model_classes: list[list[str]],
    device,
) -> None:
    """The report, the table and the pictures."""
    settings, overlays = config.protocol, config.overlays
    table = format_table(report, chosen)
    info = {
        "dataset": bundle.val.__class__.__name__,
        "images": n,
        "image_size": bundle.image_size,
        "classes": bundle.classes,
        "metrics": [m.name for m in chosen],
        "settings": settings.to_dict(),
    }
    (out / "report.json").write_text(json.dumps({"settings": info, "models": report}, indent=2) + "\n")
    (out / "report.md").write_text(table + "\n")
    written = ["report.json", "report.md"]
    viz.save_overlays(
        out / "overlays.png", cams, list(names), bundle.val, device, min(overlays, n), bundle.classes, model_classes
    )
    written.append("overlays.png")
    curves = {
        mode: {name: r[f"{mode}_curve"] for name, r in report.items() if r.get(f"{mode}_curve")}
        for mode in ("insertion", "deletion")
    }
    if any(curves.values()):
        viz.plot_curves(
            out / "curves.png",
            {
                f"{mode} (mean prob. of the predicted class)": {
                    name: [(i / (len(c) - 1), v) for i, v in enumerate(c)] for name, c in by_model.items()
                }
                for mode, by_model in curves.items()
                if by_model
            },
            xlabel="fraction of pixels",
        )
        written.append("curves.png")
    if any(m.name == "mprt" for m in chosen):
        viz.save_randomization(out / "randomization.png", cams, list(names), bundle.val, device, settings)
        written.append("randomization.png")
    print(table)
    log.info(f"wrote {', '.join(str(out / w) for w in written)}")
    for name, r in report.items():
        if r.get("term_warning"):
            log.warning(f"warning: {name}: {r['term_warning']}")


if __name__ == "__main__":
    main()
