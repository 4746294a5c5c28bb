"""The CGC term's settings, in one section that every way of training with the term shares:
``python -m cgc.train``'s flags, :class:`cgc.CGCTerm` / :func:`cgc.cgc_term` in your own loop,
and the trainers' integrations.

:class:`TermConfig` holds what the term computes (the loss, its temperature and floor, the
crops, the negatives, the CAM method and layer) and the safeguards a training loop applies
around it (its weight λ and the ramp, the gate, the class its CAMs explain, the gradient bound:
:class:`cgc.safeguards.Safeguards`). :func:`cgc.term.cgc_loss` is the one place a
:class:`cgc.CGCLoss` is built from them, and the rules that follow from them (uniform crops
compare only what the view shows of the image) are written here once.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

from .cam_methods import CAM_METHODS
from .settings import Settings, area_range, at_least, non_negative, positive, probability, setting, unit_interval
from .transforms import DEFAULT_RATIO, DEFAULT_SCALE, SAMPLERS

LOSSES = ("cgc", "mse", "ce")
PADDINGS = ("border", "zeros")
CAM_TARGETS = ("predicted", "label")
#: the loss's kind for each --loss that has a term
KINDS = {"cgc": "infonce", "mse": "mse"}
GROUP = "CGC"


def _cam_methods() -> tuple[str, ...]:
    return tuple(CAM_METHODS)


def _ratio(v) -> str | None:
    low, high = v
    return None if 0 < low <= high else "must be MIN MAX with 0 < MIN <= MAX"


@dataclasses.dataclass(frozen=True)
class TermConfig(Settings):
    """The CGC term and its safeguards (see each setting's doc; ``python -m cgc.train --help``)."""

    GROUPS: ClassVar[tuple[str, ...]] = (GROUP, "model")

    loss: str = setting(
        "cgc", "cgc: CE + lambda InfoNCE; mse: CE + lambda MSE (no negatives); ce: CE only", GROUP, choices=LOSSES
    )
    lam: float = setting(1.0, "weight lambda of the CGC term", GROUP, flag="--lambda", check=non_negative)
    lambda_warmup_epochs: float = setting(
        3.0, "ramp lambda linearly from 0 over these epochs (0: full weight from the start)", GROUP, check=non_negative
    )
    temperature: float = setting(0.5, "InfoNCE temperature (the paper's ImageNet recipe)", GROUP, check=positive)
    heatmap_size: int | None = setting(
        None, "resolution at which heatmaps are compared (default: the image size)", GROUP, check=at_least(2)
    )
    crop_scale: tuple[float, float] = setting(
        DEFAULT_SCALE, "area range of the augmented view's crop", GROUP, check=area_range, metavar=("MIN", "MAX")
    )
    crop_ratio: tuple[float, float] = setting(
        DEFAULT_RATIO, "aspect-ratio range of the augmented view's crop", GROUP, check=_ratio, metavar=("MIN", "MAX")
    )
    flip_p: float = setting(0.5, "probability of flipping the augmented view horizontally", GROUP, check=probability)
    crop_sampler: str = setting(
        "rrc",
        "where the augmented view's crops lie: rrc (RandomResizedCrop: inside the image, so the center is covered "
        "most often) or uniform (anywhere they overlap the image, every pixel covered equally often; the padding "
        "is left out of the comparison)",
        GROUP,
        choices=SAMPLERS,
    )
    class_negatives: int = setting(
        0,
        "K: the augmented image's heatmaps for its K most probable other classes join the InfoNCE negatives (0: none)",
        GROUP,
        check=at_least(0),
        metavar="K",
    )
    cam_target: str = setting(
        "label",
        "the class the CGC term's CAMs explain on labeled images: the one predicted on the original view (the "
        "paper's), or the label; unlabeled images always use the predicted one",
        GROUP,
        choices=CAM_TARGETS,
    )
    term_gate: float = setting(
        0.5,
        "cross-entropy first: the CGC term waits until the training top-1 (a moving average over about 50 steps) "
        "reaches this fraction, then --lambda-warmup-epochs ramp it in (0: on from the first step)",
        GROUP,
        check=unit_interval,
        metavar="TOP1",
    )
    detach_target: bool = setting(
        False,
        "stop the gradient through the warped original heatmap (the positive): only the augmented one moves",
        GROUP,
    )
    heatmap_floor: float = setting(
        1.0,
        "keeps the term well-conditioned on nearly empty heatmaps: every cell of every heatmap gets FLOOR times "
        "the batch's mean heatmap value added before the comparison (0: the paper's term)",
        GROUP,
        check=non_negative,
        metavar="FLOOR",
    )
    grad_bound: float = setting(
        0.0,
        "an adaptive lambda: each step lambda becomes min(lambda, BOUND * |dCE/dA| / |dCGC/dA|), A the CAM "
        "layer's activations, so the term's gradient there never exceeds BOUND times cross-entropy's (0: off)",
        GROUP,
        check=non_negative,
        metavar="BOUND",
    )
    vflip: bool = setting(False, "flip the augmented view vertically too, with probability 0.5", GROUP)
    heatmap_padding: str = setting(
        "border", "what the heatmap warp sees beyond the original's edge", GROUP, choices=PADDINGS
    )
    cam: str = setting("gradcam", "CAM method of the CGC term and of the explanations", "model", choices=_cam_methods)
    target_layer: str | None = setting(
        None, "CAM layer by dotted module name (default: found from the architecture)", "model"
    )

    @property
    def enabled(self) -> bool:
        """Whether there is a term at all (``--loss ce`` is the baseline without one)."""
        return self.loss != "ce"

    @property
    def mask_outside(self) -> bool:
        """Uniform crops reach past the image: the comparison leaves out what the view shows of
        the padding (the images themselves are padded with zeros: :func:`cgc.transforms.image_padding`)."""
        return self.crop_sampler == "uniform"

    def relations(self) -> list[str]:
        found = []
        if self.crop_sampler != "rrc" and not self.enabled:
            found.append(f"--crop-sampler {self.crop_sampler} places the CGC term's crops: use --loss cgc or mse")
        if self.class_negatives and self.loss != "cgc":
            found.append("--class-negatives are InfoNCE negatives: use --loss cgc")
        return found
