"""The CGC term for any training loop: the augmented view, one forward pass of both views,
differentiable CAMs and the consistency loss, in three layers like Liger-Kernel's ops.

- the kernels: :mod:`cgc.ops` (fused CAM weighting + ReLU, the batched warp, InfoNCE);
- the functional form :func:`cgc_term` (a model or a :class:`cgc.CAM`, a batch of images);
- the module :class:`CGCTerm`, which keeps the hook, the CAM method and the loss settings.

Either returns a :class:`CGCOutput`: the loss together with the logits of both views, so the
caller adds its own cross-entropy without a second forward pass::

    term = cgc.CGCTerm(model, temperature=0.5)
    out = term(images)
    loss = F.cross_entropy(out.logits, labels) + lam * out.loss
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from . import transforms
from .cam import CAM
from .errors import ConfigError
from .losses import CGCLoss
from .term_config import KINDS, TermConfig


@dataclass
class CGCOutput:
    """What one CGC term computed for a batch ``x`` [B,C,H,W].

    ``loss``: the term (a scalar, in the graph); ``logits`` / ``logits_aug`` [B,classes] of the
    original and augmented views; ``cams`` / ``cams_aug`` [B,h,w] their heatmaps (float32,
    differentiable); ``theta`` [B,2,3] the crop/flip maps that made ``x_aug`` from ``x``;
    ``targets`` [B] the explained classes; ``extra_logits``: the logits of each ``extra``
    view passed in, in order (forwarded in the same batch); ``cams_other`` [B,K,h,w] the
    augmented view's heatmaps for its K most probable other classes (``class_negatives=K``;
    None without); ``activations`` the hooked layer's activations of the whole batch (in the
    graph), which :func:`bounded_lambda` differentiates; ``floored``: the share of the 2B
    heatmaps whose mean is at or below the loss's floor (:class:`cgc.CGCLoss`; without a floor:
    the all-zero ones): the nearly empty heatmaps, which the floor compares as nearly uniform.
    """

    loss: torch.Tensor
    logits: torch.Tensor
    logits_aug: torch.Tensor
    cams: torch.Tensor
    cams_aug: torch.Tensor
    theta: torch.Tensor
    targets: torch.Tensor
    x_aug: torch.Tensor
    extra_logits: list[torch.Tensor] = field(default_factory=list)
    cams_other: torch.Tensor | None = None
    activations: torch.Tensor | None = None
    floored: torch.Tensor | None = None


#: keyword names the term took before its settings were one section, and the setting each means
ALIASES = {"method": "cam", "kind": "loss", "floor": "heatmap_floor", "ratio": "crop_ratio"}


def term_settings(config: TermConfig | None = None, **settings) -> TermConfig:
    """``config`` (default: :class:`cgc.term_config.TermConfig`'s defaults) with ``settings``
    changed by their names (also the :data:`ALIASES`; ``kind="infonce"`` is ``loss="cgc"``),
    checked: a :class:`cgc.errors.ConfigError` names every bad value."""
    changes = {ALIASES.get(k, k): v for k, v in settings.items()}
    if changes.get("loss") == "infonce":
        changes["loss"] = "cgc"
    config = (config or TermConfig()).replace(**changes)
    config.validate()
    if not config.enabled:
        raise ConfigError("loss='ce' is the baseline without a CGC term: there is no term to compute")
    return config


def cgc_loss(config: TermConfig, *, backend: str | None = None, gather=None) -> CGCLoss:
    """The :class:`cgc.CGCLoss` of a term's settings (``gather``: the negatives of every
    process)."""
    if not config.enabled:
        raise ConfigError("loss='ce' is the baseline without a CGC term: there is no loss to build")
    return CGCLoss(
        config.temperature,
        config.heatmap_size,
        kind=KINDS[config.loss],
        backend=backend,
        gather=gather,
        padding_mode=config.heatmap_padding,
        mask_outside=config.mask_outside,
        detach_target=config.detach_target,
        floor=config.heatmap_floor,
    )


def cgc_term(
    model_or_cam: nn.Module | CAM,
    x: torch.Tensor,
    config: TermConfig | None = None,
    *,
    theta: torch.Tensor | None = None,
    targets: torch.Tensor | None = None,
    extra: Sequence[torch.Tensor] = (),
    loss: CGCLoss | None = None,
    generator: torch.Generator | None = None,
    backend: str | None = None,
    reshape=None,
    **settings,
) -> CGCOutput:
    """The CGC term of a batch of images ``x`` (normalized, on the model's device), with the
    term's settings ``config`` changed by ``settings`` (:func:`term_settings`: ``temperature=``,
    ``cam=`` (or ``method=``), ``target_layer=``, ``crop_scale=``, ``crop_sampler=``, ...).

    Draws a RandomResizedCrop + horizontal flip per image (``crop_scale``, ``crop_ratio``,
    ``flip_p``, from ``generator``) unless ``theta`` [B,2,3] is given, warps ``x`` into
    ``x_aug`` on the device, runs the model once on ``[x, x_aug, *extra]``, takes the CAMs of
    ``x`` and ``x_aug`` for ``targets`` (default: the class predicted on ``x``, so unlabeled
    images work) with ``create_graph=True``, and compares them with ``loss`` (default: the
    :class:`cgc.CGCLoss` of the settings, :func:`cgc_loss`). ``model_or_cam`` is a
    model (hooked for this call only, at the settings' ``target_layer`` with their CAM method)
    or a :class:`cgc.CAM`.

    Two options against what a crop-consistency term may otherwise learn:

    - ``crop_sampler="uniform"``: the crops may extend past the image's borders, placed so
      that every pixel is covered equally often (RandomResizedCrop, ``"rrc"``, covers the center
      most: a heatmap drawn to the center then matches its crops best). ``x_aug`` is padded
      with zeros (the mean color of normalized images) and the default loss leaves the padding
      out of the comparison (``CGCLoss(mask_outside=True)``);
    - ``class_negatives=K``: the augmented view's heatmaps for its K most probable other
      classes (by the logits of ``x``) join the InfoNCE negatives, so a heatmap that looks the
      same whatever the class is penalized. Each costs one more gradient of a class score with
      respect to the hooked activations (``create_graph=True``).
    """
    config = term_settings(config, **settings)
    loss = loss or cgc_loss(config, backend=backend)
    draw = Draw(config, generator)
    if isinstance(model_or_cam, CAM):
        return _compute_term(model_or_cam, x, theta, targets, extra, loss, draw, backend)
    with CAM(model_or_cam, config.target_layer, method=config.cam, backend=backend, reshape=reshape) as cam:
        return _compute_term(cam, x, theta, targets, extra, loss, draw, backend)


@dataclass(frozen=True)
class Draw:
    """How the term draws each image's augmented view and how many other classes' heatmaps join
    its negatives: the settings' crops and flips, from ``generator``."""

    config: TermConfig
    generator: torch.Generator | None = None

    def theta(self, B: int, H: int, W: int, device) -> torch.Tensor:
        c = self.config
        crops = transforms.random_crop_flip(
            B,
            H,
            W,
            scale=tuple(c.crop_scale),
            ratio=tuple(c.crop_ratio),
            flip_p=c.flip_p,
            vflip_p=0.5 if c.vflip else 0.0,
            generator=self.generator,
            device=device,
            sampler=c.crop_sampler,
        )
        return crops.theta()


def _wide(cams: torch.Tensor) -> torch.Tensor:
    """Heatmaps in float32 when autocast made them 16-bit: the loss normalizes and exponentiates."""
    return cams.float() if cams.dtype in (torch.float16, torch.bfloat16) else cams


def other_classes(logits: torch.Tensor, targets: torch.Tensor, k: int) -> torch.Tensor:
    """[B,k]: each row's k most probable classes other than its target (by ``logits`` [B,C])."""
    if not 0 < k < logits.shape[1]:
        raise ValueError(f"class_negatives={k} needs more than {k} classes, the model has {logits.shape[1]}")
    scores = logits.detach().float().scatter(1, targets[:, None].long(), float("-inf"))
    return scores.topk(k, dim=1).indices


def _compute_term(cam: CAM, x, theta, targets, extra, loss: CGCLoss, draw: Draw, backend) -> CGCOutput:
    if not isinstance(x, torch.Tensor) or x.dim() != 4:
        raise ValueError(f"cgc_term expects an image batch [B,C,H,W], got {getattr(x, 'shape', type(x).__name__)}")
    B, _, H, W = x.shape
    if B < 2 and loss.kind == "infonce" and loss.gather is None:
        raise ValueError(
            f"the InfoNCE term needs a batch of at least 2 images (the other images are the negatives), got {B}"
        )
    if theta is None:
        theta = draw.theta(B, H, W, x.device)
    elif theta.shape != (B, 2, 3):
        raise ValueError(f"theta must be [{B},2,3] for a batch of {B}, got {tuple(theta.shape)}")
    x_aug = transforms.apply(x, theta, padding_mode=transforms.image_padding(draw.config.crop_sampler), backend=backend)
    class_negatives = draw.config.class_negatives
    logits, acts = cam.forward(torch.cat([x, x_aug, *extra]) if len(extra) else torch.cat([x, x_aug]))
    if targets is None:
        targets = logits[:B].detach().argmax(1)
    cams = _wide(cam.heatmaps(logits, acts, targets.repeat(2), rows=slice(0, 2 * B), create_graph=True))
    others = None
    if class_negatives:
        picked = other_classes(logits[:B], targets, class_negatives)
        aug = slice(B, 2 * B)
        others = _wide(
            torch.stack(
                [cam.heatmaps(logits, acts, picked[:, k], rows=aug, create_graph=True) for k in range(class_negatives)],
                1,
            )
        )
    floor = loss.floor_value(cams[:B], cams[B:])
    value = loss(cams[:B], cams[B:], theta, size=(H, W), class_negatives=others, cell_floor=floor)
    floored = (cams.detach().mean((1, 2)) <= (0.0 if floor is None else floor)).float().mean()
    sizes = [B, B] + [e.shape[0] for e in extra]
    parts = list(logits.split(sizes))
    return CGCOutput(
        value, parts[0], parts[1], cams[:B], cams[B:], theta, targets, x_aug, parts[2:], others, acts, floored
    )


class CGCTerm(nn.Module):
    """The CGC term as a module: ``CGCTerm(model)(x)`` is :func:`cgc_term` with these settings
    (``config``, a :class:`cgc.term_config.TermConfig`, changed by ``settings`` by name:
    ``temperature=``, ``cam=`` (or ``method=``), ``crop_sampler=``, ``class_negatives=``, ...;
    ``target_layer`` may also come first, by position). :meth:`from_config` builds it from a
    run's term section, as ``python -m cgc.train`` and the trainers' integrations do.

    The model is hooked, not owned: it is not a submodule (``term.parameters()`` is empty and
    ``term.state_dict()`` holds nothing), so the optimizer and checkpoints stay the model's.
    ``loss`` replaces the default :class:`cgc.CGCLoss` (a subclass, e.g. another warp);
    ``gather`` gives the default loss the negatives of every process
    (:meth:`cgc.distributed.Context.gather`). Under DistributedDataParallel every parameter must
    get a gradient in each step (add a cross-entropy, as :mod:`cgc.train` does, or pass
    ``find_unused_parameters=True``): a classifier's bias, for one, does not move a heatmap.
    ``close()`` (or leaving a ``with`` block) removes the hook.
    """

    def __init__(
        self,
        model: nn.Module,
        target_layer: str | None = None,
        config: TermConfig | None = None,
        *,
        loss: CGCLoss | None = None,
        gather=None,
        backend: str | None = None,
        channels_last: bool = False,
        reshape=None,
        **settings,
    ):
        super().__init__()
        if target_layer is not None:
            settings["target_layer"] = target_layer
        self.config = term_settings(config, **settings)
        self.cam = CAM(
            model,
            self.config.target_layer,
            method=self.config.cam,
            backend=backend,
            channels_last=channels_last,
            reshape=reshape,
        )
        self.loss = loss or cgc_loss(self.config, backend=backend, gather=gather)
        self.backend = backend

    @classmethod
    def from_config(cls, model: nn.Module, config: TermConfig, **kwargs) -> CGCTerm:
        """The term of a run's term section on ``model`` (``kwargs``: ``target_layer``,
        ``gather``, ``backend``, ``channels_last``, ``reshape``, ``loss``)."""
        return cls(model, config=config, **kwargs)

    @property
    def target_layer(self) -> str:
        return self.cam.target_layer

    def forward(
        self,
        x: torch.Tensor,
        *,
        theta: torch.Tensor | None = None,
        targets: torch.Tensor | None = None,
        extra: Sequence[torch.Tensor] = (),
        generator: torch.Generator | None = None,
    ) -> CGCOutput:
        """See :func:`cgc_term`."""
        return _compute_term(self.cam, x, theta, targets, extra, self.loss, Draw(self.config, generator), self.backend)

    def close(self) -> None:
        self.cam.close()

    def __enter__(self) -> CGCTerm:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def extra_repr(self) -> str:
        c = self.config
        return (
            f"method={self.cam.method}, target_layer={self.cam.target_layer!r}, "
            f"crop_scale={tuple(c.crop_scale)}, flip_p={c.flip_p}, crop_sampler={c.crop_sampler!r}, "
            f"class_negatives={c.class_negatives}"
        )
