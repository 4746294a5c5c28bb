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
from .losses import CGCLoss


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


def bounded_lambda(
    lam: float,
    ce: torch.Tensor,
    term_loss: torch.Tensor,
    activations: torch.Tensor,
    bound: float,
    all_reduce_sum=None,
) -> torch.Tensor:
    """The term's weight with its gradient bounded by cross-entropy's (an adaptive λ):
    ``min(lam, bound * |dCE/dA| / |dterm/dA|)``, A the CAM layer's activations
    (:attr:`CGCOutput.activations`, from which both losses were computed).

    The norms are over the whole batch; ``all_reduce_sum`` (e.g.
    :meth:`cgc.distributed.Context.all_reduce_sum`) sums their squares over the processes, so
    every process gets the weight one process would. Each loss is a mean over this process's
    images, so the ratio does not depend on how the batch is split. The weight is detached: it
    scales the term's gradient and adds none of its own. Costs two gradients of the losses with
    respect to A (the layers after the CAM layer, run backward twice more).
    """
    if bound <= 0:
        raise ValueError(f"the gradient bound must be positive, got {bound}")
    # the backward runs in this thread on a CPU: outside autocast, so that each op's gradient keeps
    # the dtypes its forward recorded
    with torch.autocast(activations.device.type, enabled=False):
        grads = [torch.autograd.grad(v, activations, retain_graph=True)[0] for v in (ce, term_loss)]
    squares = torch.stack([g.detach().double().square().sum() for g in grads])
    if all_reduce_sum is not None:
        squares = all_reduce_sum(squares)
    norm_ce, norm_term = squares.sqrt().unbind()
    # a term without gradient at A keeps its full weight (the ratio is +inf, clamped to lam)
    return (bound * norm_ce / norm_term.clamp_min(1e-300)).clamp(max=lam).to(term_loss.dtype)


def cgc_term(
    model_or_cam: nn.Module | CAM,
    x: torch.Tensor,
    *,
    theta: torch.Tensor | None = None,
    targets: torch.Tensor | None = None,
    extra: Sequence[torch.Tensor] = (),
    loss: CGCLoss | None = None,
    target_layer: str | None = None,
    method: str = "gradcam",
    temperature: float = 0.5,
    heatmap_size: int | None = None,
    kind: str = "infonce",
    crop_scale: tuple[float, float] = transforms.DEFAULT_SCALE,
    ratio: tuple[float, float] = transforms.DEFAULT_RATIO,
    flip_p: float = 0.5,
    crop_sampler: str = "rrc",
    class_negatives: int = 0,
    detach_target: bool = False,
    floor: float = 0.0,
    generator: torch.Generator | None = None,
    backend: str | None = None,
    reshape=None,
) -> CGCOutput:
    """The CGC term of a batch of images ``x`` (normalized, on the model's device).

    Draws a RandomResizedCrop + horizontal flip per image (``crop_scale``, ``ratio``,
    ``flip_p``, from ``generator``) unless ``theta`` [B,2,3] is given, warps ``x`` into
    ``x_aug`` on the device, runs the model once on ``[x, x_aug, *extra]``, takes the CAMs of
    ``x`` and ``x_aug`` for ``targets`` (default: the class predicted on ``x``, so unlabeled
    images work) with ``create_graph=True``, and compares them with ``loss`` (default: a
    :class:`cgc.CGCLoss` of ``kind``, ``temperature`` and ``heatmap_size``, the image size
    when None). ``model_or_cam`` is a model (hooked for this call only, at ``target_layer``
    with ``method``) or a :class:`cgc.CAM`.

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
    if loss is None:
        mask = crop_sampler == "uniform"
        loss = CGCLoss(
            temperature,
            heatmap_size,
            kind=kind,
            backend=backend,
            mask_outside=mask,
            detach_target=detach_target,
            floor=floor,
        )
    draw = dict(scale=tuple(crop_scale), ratio=tuple(ratio), flip_p=flip_p, generator=generator, sampler=crop_sampler)
    if isinstance(model_or_cam, CAM):
        return _compute_term(model_or_cam, x, theta, targets, extra, loss, draw, class_negatives, backend)
    with CAM(model_or_cam, target_layer, method=method, backend=backend, reshape=reshape) as cam:
        return _compute_term(cam, x, theta, targets, extra, loss, draw, class_negatives, backend)


def _wide(cams: torch.Tensor) -> torch.Tensor:
    """Heatmaps in float32 when autocast made them 16-bit: the loss normalizes and exponentiates."""
    return cams.float() if cams.dtype in (torch.float16, torch.bfloat16) else cams


def other_classes(logits: torch.Tensor, targets: torch.Tensor, k: int) -> torch.Tensor:
    """[B,k]: each row's k most probable classes other than its target (by ``logits`` [B,C])."""
    if not 0 < k < logits.shape[1]:
        raise ValueError(f"class_negatives={k} needs more than {k} classes, the model has {logits.shape[1]}")
    scores = logits.detach().float().scatter(1, targets[:, None].long(), float("-inf"))
    return scores.topk(k, dim=1).indices


def _compute_term(
    cam: CAM, x, theta, targets, extra, loss: CGCLoss, draw: dict, class_negatives: int, backend
) -> CGCOutput:
    if not isinstance(x, torch.Tensor) or x.dim() != 4:
        raise ValueError(f"cgc_term expects an image batch [B,C,H,W], got {getattr(x, 'shape', type(x).__name__)}")
    B, _, H, W = x.shape
    if B < 2 and loss.kind == "infonce" and loss.gather is None:
        raise ValueError(
            f"the InfoNCE term needs a batch of at least 2 images (the other images are the negatives), got {B}"
        )
    if theta is None:
        theta = transforms.random_crop_flip(B, H, W, device=x.device, **draw).theta()
    elif theta.shape != (B, 2, 3):
        raise ValueError(f"theta must be [{B},2,3] for a batch of {B}, got {tuple(theta.shape)}")
    x_aug = transforms.apply(x, theta, padding_mode=transforms.image_padding(draw["sampler"]), backend=backend)
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
    (a CAM ``method`` at ``target_layer``, read as a map with ``reshape``, the loss ``kind``
    with ``temperature`` and ``heatmap_size``, the augmentation ``crop_scale`` / ``ratio`` /
    ``flip_p``).

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
        *,
        method: str = "gradcam",
        temperature: float = 0.5,
        heatmap_size: int | None = None,
        kind: str = "infonce",
        crop_scale: tuple[float, float] = transforms.DEFAULT_SCALE,
        ratio: tuple[float, float] = transforms.DEFAULT_RATIO,
        flip_p: float = 0.5,
        loss: CGCLoss | None = None,
        gather=None,
        backend: str | None = None,
        channels_last: bool = False,
        reshape=None,
        crop_sampler: str = "rrc",
        class_negatives: int = 0,
        detach_target: bool = False,
        floor: float = 0.0,
    ):
        super().__init__()
        self.cam = CAM(
            model, target_layer, method=method, backend=backend, channels_last=channels_last, reshape=reshape
        )
        if loss is None:
            loss = CGCLoss(
                temperature,
                heatmap_size,
                kind=kind,
                backend=backend,
                gather=gather,
                mask_outside=crop_sampler == "uniform",
                detach_target=detach_target,
                floor=floor,
            )
        self.loss = loss
        self.crop_scale, self.ratio, self.flip_p = tuple(crop_scale), tuple(ratio), flip_p
        self.crop_sampler, self.class_negatives = crop_sampler, class_negatives
        self.backend = backend

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
        return cgc_term(
            self.cam,
            x,
            theta=theta,
            targets=targets,
            extra=extra,
            loss=self.loss,
            crop_scale=self.crop_scale,
            ratio=self.ratio,
            flip_p=self.flip_p,
            crop_sampler=self.crop_sampler,
            class_negatives=self.class_negatives,
            generator=generator,
            backend=self.backend,
        )

    def close(self) -> None:
        self.cam.close()

    def __enter__(self) -> CGCTerm:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def extra_repr(self) -> str:
        return (
            f"method={self.cam.method}, target_layer={self.cam.target_layer!r}, "
            f"crop_scale={self.crop_scale}, flip_p={self.flip_p}, crop_sampler={self.crop_sampler!r}, "
            f"class_negatives={self.class_negatives}"
        )
