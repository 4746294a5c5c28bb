"""``python -m cgc.explain IMAGE...``: CAMs of the top-k classes of image files, as PNGs.

The model comes from a cgc checkpoint (``--checkpoint``, with its class names, image size,
CAM layer and method) or from a torchvision or timm architecture (``--arch`` with ``--weights
FILE`` or ``--pretrained``; ImageNet class names from torchvision's weight metadata when the
head has its 1000 classes). Each image is resized (shorter side) and center-cropped to the
model's input size; one PNG per image shows it and the heatmap of each of the ``--top-k``
classes, with ``--cam`` (default: the checkpoint's method, else Grad-CAM).
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, UnidentifiedImageError

from . import cli, data, runtime, viz
from .cam import GradCAM, resize_heatmaps
from .cam_methods import CAM_METHODS
from .distributed import pick_device
from .errors import BadFile, MissingFile
from .metrics import eval_mode
from .models import load_model


@dataclasses.dataclass(frozen=True)
class ExplainConfig:
    """What ``python -m cgc.explain`` explains and with which model (the flags' values; see
    ``--help``): the ``images``, a cgc ``checkpoint`` or an ``arch`` with ``weights`` or
    ``pretrained`` weights."""

    images: tuple[str, ...]
    checkpoint: str | None = None
    arch: str | None = None
    weights: str | None = None
    pretrained: bool = False
    num_classes: int | None = None
    image_size: int | None = None
    target_layer: str | None = None
    cam: str | None = None
    top_k: int = 3
    device: str = "auto"
    out: str = "runs/explain"


def parse_args(argv=None) -> ExplainConfig:
    p = cli.ArgumentParser(
        prog="python -m cgc.explain",
        description=__doc__.split("\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("images", nargs="+", metavar="IMAGE", help="image files (PNG, JPEG, ...)")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--checkpoint", help="cgc checkpoint file or run folder")
    src.add_argument("--arch", help="torchvision architecture or timm:NAME (with --weights or --pretrained)")
    p.add_argument("--weights", default=None, help="--arch: local state dict file")
    p.add_argument("--pretrained", action="store_true", help="--arch: the library's ImageNet weights")
    p.add_argument(
        "--num-classes",
        type=int,
        default=None,
        help="--arch: classes of the head (default: read from --weights, else 1000)",
    )
    p.add_argument(
        "--image-size", type=int, default=None, help="model input size (default: the checkpoint's, else 224)"
    )
    p.add_argument("--target-layer", default=None, help="CAM layer (default: the checkpoint's / last conv stage)")
    p.add_argument(
        "--cam", default=None, choices=tuple(CAM_METHODS), help="CAM method (default: the checkpoint's, else gradcam)"
    )
    p.add_argument("--top-k", type=int, default=3, help="explain the k most probable classes")
    p.add_argument("--device", default="auto")
    p.add_argument("--out", default="runs/explain", help="output folder")
    args = p.parse_args(argv)
    if args.arch is None and (args.weights or args.pretrained or args.num_classes):
        p.error("--weights, --pretrained and --num-classes go with --arch")
    if args.arch is not None and not (args.weights or args.pretrained):
        p.error("--arch needs --weights FILE or --pretrained (a random model explains nothing)")
    if args.top_k < 1 or (args.image_size is not None and args.image_size < 8):
        p.error("--top-k must be >= 1 and --image-size >= 8")
    return ExplainConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in vars(args).items()})


def read_image(path: str | Path, size: int) -> torch.Tensor:
    """uint8 [3,size,size]: the file as RGB, shorter side resized to ``size``, center crop."""
    path = Path(path)
    if not path.is_file():
        raise MissingFile(f"image not found: {path}")
    try:
        with Image.open(path) as img:
            img = img.convert("RGB")
    except (UnidentifiedImageError, OSError, ValueError) as err:
        raise BadFile(f"cannot read image {path} (corrupt or not an image): {err}") from err
    x = torch.from_numpy(np.array(img)).permute(2, 0, 1)[None].float()
    h, w = x.shape[-2:]
    scale = size / min(h, w)
    nh, nw = max(size, round(h * scale)), max(size, round(w * scale))
    x = F.interpolate(x, (nh, nw), mode="bilinear", align_corners=False, antialias=True)
    top, left = (nh - size) // 2, (nw - size) // 2
    return x[0, :, top : top + size, left : left + size].round().clamp(0, 255).byte()


def main(argv=None) -> list[Path]:
    """``python -m cgc.explain``: parse the flags and explain (see :func:`run`); a library error
    ends the process with one ``error: ...`` line."""
    config = parse_args(argv)
    with cli.exit_on_error():
        return run(config)


def run(config: ExplainConfig) -> list[Path]:
    """Explain every image file and write one PNG per image."""
    device = pick_device(config.device)
    loaded = load_model(
        checkpoint_path=config.checkpoint,
        arch=config.arch,
        weights=config.weights,
        pretrained=config.pretrained,
        num_classes=config.num_classes,
        image_size=config.image_size,
    )
    model, classes = loaded.model, loaded.classes
    size = config.image_size or loaded.image_size
    images = torch.stack([read_image(p, size) for p in config.images])  # every file checked before any work
    model.to(device)
    k = min(config.top_k, len(classes))
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    with (
        GradCAM(
            model,
            config.target_layer or loaded.target_layer,
            method=config.cam or loaded.method,
            channels_last=runtime.channels_last(device),
        ) as cam,
        eval_mode(model),
    ):
        for path, img in zip(config.images, images):
            x = data.normalize(img[None].to(device)).expand(k, -1, -1, -1)
            with torch.no_grad():
                probs = model(x[:1]).softmax(1)[0]
            top = probs.topk(k)
            heat = resize_heatmaps(cam(x, top.indices).cams, (size, size)).cpu()
            titles = [f"{classes[int(c)]} ({100 * float(p):.1f}%)" for p, c in zip(top.values, top.indices)]
            dest = out / f"{Path(path).stem}_gradcam.png"
            viz.save_overlay_grid(
                dest, img[None].float() / 255, [h[None] for h in heat], titles, captions=[Path(path).name]
            )
            written.append(dest)
            print(f"{path}: " + ", ".join(titles) + f" -> {dest}")
    return written


if __name__ == "__main__":
    main()
