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

import argparse
import dataclasses
import inspect
import json
import logging
from pathlib import Path

import torch

from . import cli, data, distributed, metrics, runtime, tables, transforms, viz
from .cam import GradCAM
from .cam_methods import CAM_METHODS
from .errors import ConfigError
from .metrics.randomization import GRANULARITIES
from .models import LoadedModel, load_model

log = logging.getLogger("cgc.evaluate")

#: data arguments taken from the first checkpoint unless given on the command line
DATA_ARGS = ("dataset", "data", "image_size", "train_size", "val_size", "num_classes", "seed")
CAUSAL = ("insertion_auc", "deletion_auc")


@dataclasses.dataclass(frozen=True)
class EvalConfig:
    """What ``python -m cgc.evaluate`` evaluates, on what, and how (the flags' values; see
    ``--help``). The models: cgc ``checkpoint`` paths, then ``arch`` models with their
    ``weights``; ``name``: a column name per model. The data: the first checkpoint's, changed by
    the data fields that are not None."""

    checkpoint: tuple[str, ...] = ()
    arch: tuple[str, ...] = ()
    weights: tuple[str, ...] = ()
    name: tuple[str, ...] | None = None
    dataset: str | None = None
    data: str | None = None
    image_size: int | None = None
    train_size: int | None = None
    val_size: int | None = None
    num_classes: int | None = None
    seed: int | None = None
    limit: int | None = None
    workers: int | None = None
    cam: str | None = None
    target_layer: str | None = None
    metrics: tuple[str, ...] | None = None
    skip_slow: bool = False
    no_causal: bool = False
    batch_size: int = 64
    pixels_per_step: int | None = None
    causal_batch: int = 256
    tolerance: float = 0.0
    cam_input_size: int | None = None
    crop_scale: tuple[float, float] = transforms.DEFAULT_SCALE
    sensitivity_radius: float = 0.2
    sensitivity_samples: int = 10
    randomization: str = "stage"
    metric_seed: int = 12345
    device: str = "auto"
    backend: str | None = None
    out: str = "runs/eval"
    overlays: int = 8

    def settings(self) -> metrics.Settings:
        """The metrics' protocol parameters."""
        return metrics.Settings(
            seed=self.metric_seed,
            crop_scale=tuple(self.crop_scale),
            tolerance=self.tolerance,
            cam_input_size=self.cam_input_size,
            pixels_per_step=self.pixels_per_step,
            causal_batch=self.causal_batch,
            sensitivity_radius=self.sensitivity_radius,
            sensitivity_samples=self.sensitivity_samples,
            randomization=self.randomization,
        )


def parse_args(argv=None) -> EvalConfig:
    p = cli.ArgumentParser(
        prog="python -m cgc.evaluate",
        description=__doc__.split("\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    g = p.add_argument_group("models (repeat to compare; checkpoints first, then --arch models)")
    g.add_argument(
        "--checkpoint",
        action="append",
        default=[],
        metavar="PATH",
        help="cgc checkpoint file or run folder (its last.pt)",
    )
    g.add_argument(
        "--arch",
        action="append",
        default=[],
        metavar="NAME",
        help="a torchvision model name or timm:NAME, with its --weights",
    )
    g.add_argument(
        "--weights",
        action="append",
        default=[],
        metavar="PATH",
        help="local state dict of the --arch given in the same position (.pth, .pt, .safetensors)",
    )
    g.add_argument(
        "--name",
        action="append",
        default=None,
        help="column name of each model, in order (default: run folder or weights file name)",
    )
    g = p.add_argument_group("data (default: what the first checkpoint was trained on)")
    g.add_argument("--dataset", default=None, choices=data.DATASETS)
    g.add_argument(
        "--data",
        default=None,
        metavar="ROOT",
        help="dataset root folder; for --arch models a 'folder' tree is evaluated whole",
    )
    g.add_argument("--image-size", type=int, default=None)
    g.add_argument("--train-size", type=int, default=None, help="synthetic: training images")
    g.add_argument("--val-size", type=int, default=None, help="synthetic: validation images")
    g.add_argument("--num-classes", type=int, default=None, help="synthetic: number of classes")
    g.add_argument("--seed", type=int, default=None, help="dataset seed")
    g.add_argument("--limit", type=int, default=None, help="evaluate only the first N images")
    g.add_argument(
        "--workers", type=int, default=None, help="image decoding processes (default: 0 for in-memory datasets, else 4)"
    )
    g = p.add_argument_group("explanations")
    g.add_argument(
        "--cam",
        default=None,
        choices=tuple(CAM_METHODS),
        help="CAM method (default: each checkpoint's training method; gradcam for --arch models)",
    )
    g.add_argument("--target-layer", default=None, help="CAM layer (default: each checkpoint's, else found)")
    g = p.add_argument_group("metrics")
    g.add_argument(
        "--metrics",
        nargs="+",
        default=None,
        choices=tuple(metrics.METRICS),
        metavar="NAME",
        help=f"metrics to report (default: all): {', '.join(metrics.METRICS)}",
    )
    g.add_argument(
        "--skip-slow",
        action="store_true",
        help="leave out the slow metrics: " + ", ".join(n for n, m in metrics.METRICS.items() if m.slow),
    )
    g.add_argument("--no-causal", action="store_true", help="leave out insertion/deletion")
    g.add_argument("--batch-size", type=int, default=64)
    g.add_argument(
        "--pixels-per-step",
        type=int,
        default=None,
        help="insertion/deletion: pixels per step (default: H*W/28, RISE's 224*8 at 224 px)",
    )
    g.add_argument(
        "--causal-batch",
        type=int,
        default=256,
        help="insertion/deletion and max-sensitivity: images per forward pass (bounds memory)",
    )
    g.add_argument(
        "--tolerance",
        type=float,
        default=0.0,
        help="pointing game tolerance in pixels (the original game used 15 at 224 px)",
    )
    g.add_argument(
        "--cam-input-size",
        type=int,
        default=None,
        help="content heatmap / pointing game: resize images to this size for the CAM and the "
        "heatmap back (the ImageNet protocol of docs/method.md: 448; default: no resizing)",
    )
    g.add_argument(
        "--crop-scale",
        type=float,
        nargs=2,
        default=transforms.DEFAULT_SCALE,
        metavar=("MIN", "MAX"),
        help="consistency: area range of the random crops",
    )
    g.add_argument(
        "--sensitivity-radius",
        type=float,
        default=0.2,
        help="max-sensitivity: uniform noise in [-r, r] per normalized input value (Quantus's default)",
    )
    g.add_argument("--sensitivity-samples", type=int, default=10, help="max-sensitivity: noise samples per image")
    g.add_argument(
        "--randomization",
        default="stage",
        choices=GRANULARITIES,
        help="MPRT steps: the model's top-level blocks from the head down (Adebayo et al.), or every "
        "module with reset_parameters (Quantus)",
    )
    g.add_argument(
        "--metric-seed",
        type=int,
        default=12345,
        help="seed of the metrics' random draws (crops, noise, classes, randomized weights)",
    )
    g = p.add_argument_group("run")
    g.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
    g.add_argument("--backend", default=None, help="ops backend (default: $CGC_BACKEND or auto)")
    g.add_argument("--out", default="runs/eval", help="output folder")
    g.add_argument("--overlays", type=int, default=8, help="images in the overlay PNG")
    args = p.parse_args(argv)
    if not args.checkpoint and not args.arch:
        p.error("give at least one --checkpoint or --arch NAME --weights PATH")
    if len(args.arch) != len(args.weights):
        p.error(f"give one --weights per --arch ({len(args.arch)} --arch, {len(args.weights)} --weights)")
    if args.arch and not args.checkpoint and not args.dataset:
        p.error("--arch models need --dataset (and --data for files): no checkpoint says what to evaluate on")
    if args.name is not None and len(args.name) != len(args.checkpoint) + len(args.arch):
        p.error(f"give one --name per model ({len(args.checkpoint) + len(args.arch)}), got {len(args.name)}")
    for name in (
        "batch_size",
        "causal_batch",
        "overlays",
        "limit",
        "pixels_per_step",
        "cam_input_size",
        "sensitivity_samples",
    ):
        value = getattr(args, name)
        if value is not None and value < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.tolerance < 0 or (args.workers is not None and args.workers < 0) or not args.sensitivity_radius > 0:
        p.error("--tolerance and --workers must be >= 0, --sensitivity-radius > 0")
    values = {k: tuple(v) if isinstance(v, list) else v for k, v in vars(args).items()}
    return EvalConfig(**values)


def model_names(sources: list[str], names: list[str] | None) -> list[str]:
    """Column names: given, or each run folder's (weights file's) name, made unique."""
    if names is not None:
        if len(set(names)) != len(names):
            raise ConfigError(f"--name values must be distinct, got {names}")
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


def build_data(train_args: dict, overrides: dict, *, everything: bool = False) -> data.DataBundle:
    """The first checkpoint's dataset with the command line's ``overrides`` (None: not given).
    Only the arguments that :func:`cgc.data.build` accepts are passed (``data`` also as
    ``root``), so datasets added to it need no change here; a run trained on a subset of the
    built-in shapes (``--classes``) is evaluated on the same subset."""
    chosen = {k: train_args.get(k) for k in DATA_ARGS}
    chosen.update({k: v for k, v in overrides.items() if k in DATA_ARGS and v is not None})
    chosen["root"] = chosen["data"]
    if train_args.get("classes") and chosen["dataset"] == train_args.get("dataset"):
        chosen["classes"] = list(train_args["classes"])
    accepted = inspect.signature(data.build).parameters
    kwargs = {k: v for k, v in chosen.items() if k in accepted and k != "name" and v is not None}
    return data.build(chosen["dataset"], everything=everything, **kwargs)


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
    table = tables.markdown(["metric", *names, "what it measures"], rows, "l" + "r" * len(names) + "l")
    return table + "\n\n↑ higher is better, ↓ lower is better; — not measured (no boxes, or nothing to score)."


def main(argv=None) -> dict:
    """``python -m cgc.evaluate``: parse the flags and evaluate (see :func:`run`); a library
    error ends the process with one ``error: ...`` line."""
    config = parse_args(argv)
    with cli.exit_on_error():
        cli.setup_logging()
        return cli.run_in_job(lambda ctx: run(config, ctx), config.device)


def run(config: EvalConfig, ctx: distributed.Context | None = None) -> dict:
    """Evaluate every model on the same images and write the report, table and pictures.
    Under torchrun the images are shared out over the processes, the totals summed, and the
    first process writes."""
    ctx = ctx or distributed.Context(distributed.pick_device(config.device))
    device = ctx.device
    out = Path(config.out)
    loaded = [load_model(checkpoint_path=c) for c in config.checkpoint]
    loaded += [load_model(arch=a, weights=w, image_size=config.image_size) for a, w in zip(config.arch, config.weights)]
    names = model_names([*config.checkpoint, *config.weights], None if config.name is None else list(config.name))
    if config.checkpoint:
        first_args = loaded[0].train_args
        if not (config.dataset or first_args.get("dataset")):
            raise ConfigError(f"{config.checkpoint[0]} does not say its dataset; pass --dataset")
        bundle = build_data(first_args, dataclasses.asdict(config))
    else:
        overrides = {**dataclasses.asdict(config), "image_size": config.image_size or loaded[0].image_size}
        bundle = build_data({}, overrides, everything=True)
    maps = [label_map(m, bundle.classes) for m in loaded]
    chosen = metrics.select(
        None if config.metrics is None else list(config.metrics),
        skip_slow=config.skip_slow,
        has_boxes=hasattr(bundle.val, "boxes"),
    )
    if config.no_causal:
        chosen = [m for m in chosen if m.name not in CAUSAL]
    settings = config.settings()
    cams = [
        GradCAM(
            m.model.to(device).eval(),
            config.target_layer or m.target_layer,
            method=config.cam or m.method,
            backend=config.backend,
            channels_last=runtime.channels_last(device),
        )
        for m in loaded
    ]
    n = len(bundle.val) if config.limit is None else min(config.limit, len(bundle.val))
    if ctx.primary:
        procs = f" x {ctx.world_size} processes" if ctx.distributed else ""
        log.info(
            f"cgc.evaluate: {len(cams)} model(s) on {bundle.val.__class__.__name__} val ({n} images, "
            f"{len(bundle.classes)} classes, {bundle.image_size}px), device={device}{procs}; metrics: "
            f"{', '.join(m.name for m in chosen)}"
        )
    out.mkdir(parents=True, exist_ok=True)
    workers = runtime.loader_workers(config.workers, bundle.in_memory)
    report: dict[str, dict] = {}
    for name, cam, model, mapping in zip(names, cams, loaded, maps):
        result = metrics.explanation_metrics(
            cam,
            bundle.val,
            device,
            metrics=chosen,
            settings=settings,
            batch_size=config.batch_size,
            limit=config.limit,
            workers=workers,
            desc=f"evaluate {name}",
            rank=ctx.rank,
            world_size=ctx.world_size,
            reduce=ctx.sum_values,
            label_map=mapping,
        )
        result.update(
            source=model.source,
            arch=model.train_args.get("arch"),
            loss=model.train_args.get("loss"),
            target_layer=cam.target_layer,
            cam=cam.method,
        )
        report[name] = {**dict.fromkeys(metrics.METRICS), **result}  # every key, None where not measured
    if ctx.primary:
        write(
            out, report, chosen, settings, bundle, n, cams, names, [m.classes for m in loaded], device, config.overlays
        )
    for cam in cams:
        cam.close()
    return report


def write(
    out: Path,
    report: dict,
    chosen,
    settings: metrics.Settings,
    bundle,
    n: int,
    cams,
    names,
    model_classes: list[list[str]],
    device,
    overlays: int,
) -> None:
    """The report, the table and the pictures."""
    table = format_table(report, chosen)
    info = {
        "dataset": bundle.val.__class__.__name__,
        "images": n,
        "image_size": bundle.image_size,
        "classes": bundle.classes,
        "metrics": [m.name for m in chosen],
        "settings": {k: (list(v) if isinstance(v, tuple) else v) for k, v in vars(settings).items()},
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


if __name__ == "__main__":
    main()
