"""``python -m cgc.evaluate``: compare the explanations of trained checkpoints side by side.

Every checkpoint is evaluated on the same validation images (the dataset and sizes the first
checkpoint was trained on, unless overridden) with the protocols of METHOD.md: top-1/top-5
accuracy, content heatmap, pointing game, insertion / deletion AUC and consistency under
random crops/flips (the same crops for every model). Writes ``report.json``, ``report.md``
(the table), ``overlays.png`` (each image, then every model's heatmap) and ``curves.png``
(the mean insertion and deletion curves of every model).
"""
from __future__ import annotations

import argparse
import inspect
import json
import sys
from pathlib import Path

from . import checkpoint, data, distributed, metrics, transforms, viz
from .cam import GradCAM
from .cam_methods import CAM_METHODS
from .cli import exit_on_error
from .errors import ConfigError, UnsupportedModel
from .models import build_model

#: rows of the table: (report key, label, format)
ROWS = (("top1", "top-1 (%)", ".2f"), ("top5", "top-5 (%)", ".2f"),
        ("content_heatmap", "content heatmap (%) ↑", ".2f"), ("pointing_game", "pointing game (%) ↑", ".2f"),
        ("insertion_auc", "insertion AUC ↑", ".4f"), ("deletion_auc", "deletion AUC ↓", ".4f"),
        ("consistency", "consistency (cosine) ↑", ".4f"), ("consistency_iou", "consistency (top-20% IoU) ↑", ".4f"))
#: data arguments taken from the first checkpoint unless given on the command line
DATA_ARGS = ("dataset", "data", "image_size", "train_size", "val_size", "num_classes", "seed")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m cgc.evaluate", description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--checkpoint", action="append", required=True, metavar="PATH",
                   help="checkpoint file or run folder (its last.pt); repeat to compare models")
    p.add_argument("--name", action="append", default=None,
                   help="column name of each checkpoint, in order (default: the run folder's name)")
    g = p.add_argument_group("data (default: what the first checkpoint was trained on)")
    g.add_argument("--dataset", default=None, choices=data.DATASETS)
    g.add_argument("--data", default=None, metavar="ROOT", help="dataset root folder (datasets on disk)")
    g.add_argument("--image-size", type=int, default=None)
    g.add_argument("--train-size", type=int, default=None, help="synthetic: training images")
    g.add_argument("--val-size", type=int, default=None, help="synthetic: validation images")
    g.add_argument("--num-classes", type=int, default=None, help="synthetic: number of classes")
    g.add_argument("--seed", type=int, default=None, help="dataset seed")
    g.add_argument("--limit", type=int, default=None, help="evaluate only the first N validation images")
    g.add_argument("--workers", type=int, default=None,
                   help="image decoding processes (default: 0 for in-memory datasets, else 4)")
    g = p.add_argument_group("explanations")
    g.add_argument("--cam", default=None, choices=tuple(CAM_METHODS),
                   help="CAM method to evaluate (default: each checkpoint's training method)")
    g.add_argument("--target-layer", default=None, help="CAM layer (default: each checkpoint's)")
    g = p.add_argument_group("protocols")
    g.add_argument("--batch-size", type=int, default=64)
    g.add_argument("--pixels-per-step", type=int, default=None,
                   help="insertion/deletion: pixels per step (default: H*W/28, RISE's 224*8 at 224 px)")
    g.add_argument("--causal-batch", type=int, default=256,
                   help="insertion/deletion: images per forward pass (bounds memory)")
    g.add_argument("--no-causal", action="store_true", help="skip insertion/deletion (the slowest metrics)")
    g.add_argument("--tolerance", type=float, default=0.0,
                   help="pointing game tolerance in pixels (the original game used 15 at 224 px)")
    g.add_argument("--cam-input-size", type=int, default=None,
                   help="content heatmap / pointing game: resize images to this size for Grad-CAM and "
                        "the heatmap back (METHOD's ImageNet protocol: 448; default: no resizing)")
    g.add_argument("--crop-scale", type=float, nargs=2, default=transforms.DEFAULT_SCALE, metavar=("MIN", "MAX"),
                   help="consistency: area range of the random crops")
    g.add_argument("--consistency-seed", type=int, default=12345, help="seed of the consistency crops")
    g = p.add_argument_group("run")
    g.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
    g.add_argument("--backend", default=None, help="ops backend (default: $CGC_BACKEND or auto)")
    g.add_argument("--out", default="runs/eval", help="output folder")
    g.add_argument("--overlays", type=int, default=8, help="images in the overlay PNG")
    args = p.parse_args(argv)
    if args.name is not None and len(args.name) != len(args.checkpoint):
        p.error(f"give one --name per --checkpoint ({len(args.checkpoint)}), got {len(args.name)}")
    for name in ("batch_size", "causal_batch", "overlays", "limit", "pixels_per_step", "cam_input_size"):
        value = getattr(args, name)
        if value is not None and value < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.tolerance < 0 or (args.workers is not None and args.workers < 0):
        p.error("--tolerance and --workers must be >= 0")
    return args


def model_names(paths: list[str], names: list[str] | None) -> list[str]:
    """Column names: given, or each run folder's name, made unique with a suffix."""
    if names is not None:
        if len(set(names)) != len(names):
            raise ConfigError(f"--name values must be distinct, got {names}")
        return names
    out: list[str] = []
    for path in paths:
        p = Path(path)
        base = p.name if p.is_dir() else p.parent.name or p.stem
        name, k = base, 2
        while name in out:
            name, k = f"{base}-{k}", k + 1
        out.append(name)
    return out


def build_data(train_args: dict, overrides: dict) -> data.DataBundle:
    """The first checkpoint's dataset with the command line's ``overrides`` (None: not given).
    Only the arguments that :func:`cgc.data.build` accepts are passed (``data`` also as
    ``root``), so datasets added to it need no change here."""
    chosen = {k: train_args.get(k) for k in DATA_ARGS}
    chosen.update({k: v for k, v in overrides.items() if k in DATA_ARGS and v is not None})
    chosen["root"] = chosen["data"]
    accepted = inspect.signature(data.build).parameters
    kwargs = {k: v for k, v in chosen.items() if k in accepted and k != "name" and v is not None}
    return data.build(chosen["dataset"], **kwargs)


def load_model(path: str, bundle: data.DataBundle, device, backend, *, method: str | None = None,
               target_layer: str | None = None):
    """``(GradCAM of the checkpoint's model on device, checkpoint args)`` with the checkpoint's
    CAM method and layer unless ``method`` / ``target_layer`` are given; the checkpoint must
    classify the bundle's classes."""
    ckpt = checkpoint.load(path)
    train_args = ckpt.get("args", {})
    classes = ckpt.get("classes")
    if classes is not None and list(classes) != list(bundle.classes):
        raise ConfigError(f"{path} was trained on classes {list(classes)[:6]}..., not the evaluation "
                          f"dataset's {bundle.classes[:6]}...; evaluate checkpoints of one dataset together")
    model = build_model(train_args.get("arch", "compact"), len(bundle.classes), norm=train_args.get("norm", "batch"))
    try:
        model.load_state_dict(ckpt["model"])
    except RuntimeError as err:
        raise UnsupportedModel(f"the weights in {path} do not fit {train_args.get('arch')}: "
                               f"{str(err).splitlines()[0]}") from err
    model.to(device).eval()
    cam = GradCAM(model, target_layer or ckpt.get("target_layer"), method=method or checkpoint.cam_method(train_args),
                  backend=backend, channels_last=device.type == "cpu")
    return cam, train_args


def format_table(report: dict[str, dict]) -> str:
    """Markdown table: one row per metric, one column per model."""
    names = list(report)
    lines = ["| metric | " + " | ".join(names) + " |", "|---|" + "---:|" * len(names)]
    for key, label, fmt in ROWS:
        cells = [("—" if report[n].get(key) is None else format(report[n][key], fmt)) for n in names]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> dict:
    """``python -m cgc.evaluate``: parse the flags and evaluate (see :func:`run`); a library
    error ends the process with one ``error: ...`` line."""
    args = parse_args(argv)
    with exit_on_error():
        ctx = distributed.init(args.device)
        try:
            return run(args, ctx)
        finally:
            distributed.shutdown(ctx)


def run(args, ctx: distributed.Context | None = None) -> dict:
    """Evaluate every checkpoint on the same images and write the report, table and pictures.
    Under torchrun the images are shared out over the processes, the totals summed, and the
    first process writes."""
    ctx = ctx or distributed.Context(distributed.pick_device(args.device))
    device = ctx.device
    out = Path(args.out)
    names = model_names(args.checkpoint, args.name)
    first_args = checkpoint.load(args.checkpoint[0]).get("args", {})
    if not (args.dataset or first_args.get("dataset")):
        raise ConfigError(f"{args.checkpoint[0]} does not say its dataset; pass --dataset")
    bundle = build_data(first_args, vars(args))
    cams, train_args = zip(*(load_model(path, bundle, device, args.backend, method=args.cam,
                                        target_layer=args.target_layer) for path in args.checkpoint))
    out.mkdir(parents=True, exist_ok=True)
    n = len(bundle.val) if args.limit is None else min(args.limit, len(bundle.val))
    if ctx.primary:
        procs = f" x {ctx.world_size} processes" if ctx.distributed else ""
        print(f"cgc.evaluate: {len(cams)} model(s) on {bundle.val.__class__.__name__} val ({n} images, "
              f"{len(bundle.classes)} classes, {bundle.image_size}px), device={device}{procs}", file=sys.stderr)

    workers = args.workers if args.workers is not None else (0 if bundle.in_memory else 4)
    report: dict[str, dict] = {}
    for name, cam, targs, path in zip(names, cams, train_args, args.checkpoint):
        result = metrics.explanation_metrics(
            cam, bundle.val, device, batch_size=args.batch_size, crop_scale=tuple(args.crop_scale),
            seed=args.consistency_seed, limit=args.limit, causal=not args.no_causal, step=args.pixels_per_step,
            causal_batch=args.causal_batch, cam_input_size=args.cam_input_size, tolerance=args.tolerance,
            workers=workers, desc=f"evaluate {name}", rank=ctx.rank, world_size=ctx.world_size,
            reduce=ctx.sum_values)
        result.update(checkpoint=str(path), arch=targs.get("arch"), loss=targs.get("loss"),
                      target_layer=cam.target_layer, cam=cam.method)
        report[name] = result

    if not ctx.primary:
        for cam in cams:
            cam.close()
        return report
    table = format_table(report)
    settings = {"dataset": bundle.val.__class__.__name__, "images": n, "image_size": bundle.image_size,
                "classes": bundle.classes, "pixels_per_step": args.pixels_per_step, "tolerance": args.tolerance,
                "cam_input_size": args.cam_input_size, "crop_scale": list(args.crop_scale),
                "consistency_seed": args.consistency_seed}
    (out / "report.json").write_text(json.dumps({"settings": settings, "models": report}, indent=2) + "\n")
    (out / "report.md").write_text(table + "\n")
    viz.save_overlays(out / "overlays.png", cams, list(names), bundle.val, device,
                      min(args.overlays, len(bundle.val)), bundle.classes)
    written = ["report.json", "report.md", "overlays.png"]
    if not args.no_causal:
        panels = {}
        for mode in ("insertion", "deletion"):
            panels[f"{mode} (mean prob. of the predicted class)"] = {
                name: [(i / (len(r[f"{mode}_curve"]) - 1), v) for i, v in enumerate(r[f"{mode}_curve"])]
                for name, r in report.items()}
        viz.plot_curves(out / "curves.png", panels, xlabel="fraction of pixels")
        written.append("curves.png")
    for cam in cams:
        cam.close()
    print(table)
    print(f"wrote {', '.join(str(out / w) for w in written)}", file=sys.stderr)
    return report


if __name__ == "__main__":
    main()
