"""``python -m cgc.explain IMAGE...``: CAMs of the top-k classes of image files, as PNGs.

The model comes from a cgc checkpoint (``--checkpoint``, with its class names, image size,
CAM layer and method) or from a torchvision, timm or Hugging Face architecture (``--arch`` with
``--weights FILE`` or ``--pretrained``; class names from a Hugging Face config, or ImageNet's
from torchvision's weight metadata when the head has its 1000 classes). Each image is resized (shorter side) and center-cropped to the
model's input size; one PNG per image shows it and the heatmap of each of the ``--top-k``
classes, with ``--cam`` (default: the checkpoint's method, else Grad-CAM).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, UnidentifiedImageError

from . import cli, data, runtime, viz
from .cam import CAM, resize_heatmaps
from .cam_methods import CAM_METHODS
from .checkpoint import load_model
from .distributed import pick_device
from .errors import BadFile, MissingFile
from .metrics import eval_mode
from .settings import Settings, at_least, setting
from .structure import logits_of


def _cam_methods() -> tuple[str, ...]:
    return tuple(CAM_METHODS)


@dataclasses.dataclass(frozen=True)
class ExplainConfig(Settings):
    """What ``python -m cgc.explain`` explains and with which model (see each field's doc): the
    ``images``, a cgc ``checkpoint`` or an ``arch`` with ``weights`` or ``pretrained`` weights."""

    PROG: ClassVar[str] = "python -m cgc.explain"
    DESCRIPTION: ClassVar[str] = "CAMs of the top-k classes of image files, as PNGs."
    GROUPS: ClassVar[tuple[str, ...]] = ("images", "model", "explanations", "run")

    images: tuple[str, ...] = setting(
        dataclasses.MISSING, "image files (PNG, JPEG, ...)", "images", nargs="+", positional=True, metavar="IMAGE"
    )
    checkpoint: str | None = setting(None, "cgc checkpoint file or run folder", "model", metavar="PATH")
    arch: str | None = setting(
        None,
        "torchvision architecture, timm:NAME or hf:NAME_OR_PATH (with --weights or --pretrained)",
        "model",
        metavar="NAME",
    )
    weights: str | None = setting(
        None, "--arch: local state dict file (or a save_pretrained folder)", "model", metavar="PATH"
    )
    pretrained: bool = setting(
        False, "--arch: the library's ImageNet weights (hf:: the folder's or the hub model's)", "model"
    )
    num_classes: int | None = setting(
        None, "--arch: classes of the head (default: read from --weights, else 1000)", "model", check=at_least(1)
    )
    image_size: int | None = setting(
        None, "model input size (default: the checkpoint's, else the model's own, else 224)", "model", check=at_least(8)
    )
    target_layer: str | None = setting(None, "CAM layer (default: the checkpoint's / last conv stage)", "explanations")
    cam: str | None = setting(
        None, "CAM method (default: the checkpoint's, else gradcam)", "explanations", choices=_cam_methods
    )
    top_k: int = setting(3, "explain the k most probable classes", "explanations", check=at_least(1))
    device: str = setting("auto", "auto, cpu, cuda, cuda:1, ...", "run")
    out: str = setting("runs/explain", "output folder", "run", metavar="DIR")

    def relations(self) -> list[str]:
        found = []
        if (self.checkpoint is None) == (self.arch is None):
            found.append("give either --checkpoint or --arch")
        if self.arch is None and (self.weights or self.pretrained or self.num_classes):
            found.append("--weights, --pretrained and --num-classes go with --arch")
        if self.arch is not None and not (self.weights or self.pretrained):
            found.append("--arch needs --weights FILE or --pretrained (a random model explains nothing)")
        return found


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
    with cli.exit_on_error():
        return run(ExplainConfig.parse(argv).validate())


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
        CAM(
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
                probs = logits_of(model(x[:1])).softmax(1)[0]
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
