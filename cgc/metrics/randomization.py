"""Sanity checks of explanations (Adebayo et al.; Sixt et al.): an explanation that does not
change when the model's weights are randomized, or when another class is asked about, does not
explain the model.

- :func:`randomization_steps`: the cascade, from the head down: ``stage`` granularity takes the
  model's top-level blocks in reverse order of execution (ResNet: fc, layer4, ..., conv1; a
  vision transformer: head, final norm, its blocks from the last, patch embedding), as
  Adebayo et al. randomize Inception's blocks; ``module`` takes every module that has
  ``reset_parameters`` in reverse registration order, as Quantus's MPRT does;
- :func:`randomized_models`: copies of the model with the first 1, 2, ... steps re-initialized
  (seeded; the user's model is never touched);
- :func:`other_classes`: a random class other than the explained one, per image, keyed;
- :func:`model_randomization` and :func:`random_logit`: the two tests for any explanation
  function ``explain(model, images, targets) -> heatmaps [B,H,W]``.

How to read them: a method that explains the model gives heatmaps that stay similar to the
original only while the weights are the trained ones. Its MPRT similarity (Spearman's rank
correlation) falls as soon as the head and the top blocks are randomized and ends near 0; its
random-logit similarity (SSIM between the heatmaps of two classes) is clearly below 1. Values
near 1 mean the heatmap does not depend on the weights (or on the class): it fails the check,
however consistent or well localized it is.
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import torch
from torch import nn

from .. import models, structure, transforms
from .similarity import spearman, ssim

#: an explanation of ``images`` by ``model`` for ``targets``: heatmaps [B,H,W]
Explain = Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor]

GRANULARITIES = ("stage", "module")


def _units(model: nn.Module, expand: tuple[str, ...]) -> dict[str, nn.Module]:
    """The model's top-level children, with each container named in ``expand`` replaced by its
    own children (recursively: ``encoder``, then ``encoder.layers``)."""
    units: dict[str, nn.Module] = {}

    def walk(prefix: str, module: nn.Module) -> None:
        for name, child in module.named_children():
            if prefix + name in expand:
                walk(prefix + name + ".", child)
            else:
                units[prefix + name] = child

    walk("", model)
    return units


def _execution_order(units: dict[str, nn.Module], model: nn.Module, hw: tuple[int, int]) -> list[str]:
    """Names of ``units`` in the order their forward passes finish (one pass of ``model`` on the
    meta device, nothing copied); units that do not run are left out."""
    done: list[str] = []
    handles = [unit.register_forward_hook(lambda *_, name=name: done.append(name)) for name, unit in units.items()]
    stand_ins = {
        n: torch.empty_like(t, device="meta")
        for n, t in [*model.named_parameters(remove_duplicate=False), *model.named_buffers(remove_duplicate=False)]
    }
    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
    x = torch.empty(2, 3, *hw, dtype=dtype, device="meta")
    try:
        with torch.no_grad():
            torch.func.functional_call(model, stand_ins, (x,))
    finally:
        for h in handles:
            h.remove()
    return list(dict.fromkeys(done))


def randomization_steps(
    model: nn.Module, granularity: str = "stage", input_size: int | None = None
) -> list[tuple[str, list[nn.Module]]]:
    """``[(name, modules)]``: what each step of the cascade re-initializes, from the head down.

    ``stage``: the top-level blocks that have parameters, in reverse order of execution; in a
    vision transformer (:func:`cgc.models.describe`) its blocks one by one (a ViT's
    ``blocks``, torchvision's ``encoder.layers``, Swin's stages), after the head and final
    norm and before the patch embedding. Tensors the model or an expanded container holds
    itself (class token, position embedding) are not randomized. The order comes from one
    forward pass of ``input_size`` images on the meta device (default: the size the model
    declares, :func:`cgc.structure.declared_size`, else 224).
    """
    if granularity not in GRANULARITIES:
        raise ValueError(f"granularity must be one of {GRANULARITIES}, got {granularity!r}")
    if granularity == "module":
        found = [(n, m) for n, m in model.named_modules() if hasattr(m, "reset_parameters")]
        return [(n, [m]) for n, m in reversed(found)]
    info = models.describe(model)
    units = _units(model, info.cascade if info is not None else ())
    hw = (input_size, input_size) if input_size else structure.declared_size(model, info) or (224, 224)
    order = [n for n in _execution_order(units, model, hw) if any(True for _ in units[n].parameters())]
    if not order:
        raise ValueError(f"{type(model).__name__} has no top-level block with parameters to randomize")
    return [(n, [units[n]]) for n in reversed(order)]


def _reinitialize(module: nn.Module, seed: int) -> None:
    """Fresh weights for ``module`` and everything in it: ``reset_parameters`` where a module
    has it (after ``torch.manual_seed(seed)``, as Quantus does), and for parameters no such
    method covers, normal draws with the parameter's own standard deviation."""
    covered = set()
    for sub in module.modules():
        if hasattr(sub, "reset_parameters"):
            torch.manual_seed(seed)
            sub.reset_parameters()
            covered.update(id(p) for p in sub.parameters(recurse=False))
    with torch.no_grad():
        for p in module.parameters():
            if id(p) not in covered:
                p.normal_(0.0, float(p.std()) if p.numel() > 1 else 1.0)


def randomized_models(model: nn.Module, steps: list[tuple[str, list[nn.Module]]], *, seed: int = 42):
    """``(step name, model copy)`` for the cumulative cascade: one deep copy of ``model``
    re-initialized step after step (the copy is yielded after each step; the caller uses it
    before asking for the next). The global RNG state is left as it was."""
    names = {id(m): n for n, m in model.named_modules()}
    twin = copy.deepcopy(model)
    twins = dict(twin.named_modules())
    devices = sorted({p.device.index for p in model.parameters() if p.device.type == "cuda"})
    with torch.random.fork_rng(devices=[d for d in devices if d is not None]):
        for name, modules in steps:
            for m in modules:
                _reinitialize(twins[names[id(m)]], seed + 1)
            yield name, twin


def other_classes(targets: torch.Tensor, num_classes: int, keys: list[int]) -> torch.Tensor:
    """A class other than ``targets[b]`` for every image, uniform over the other
    ``num_classes - 1`` and drawn from the image's key."""
    if num_classes < 2:
        raise ValueError("the random-logit test needs at least two classes")
    u = transforms.uniforms(len(keys), 1, keys=keys)[:, 0].to(targets.device)
    pick = (u * (num_classes - 1)).long().clamp_max(num_classes - 2)
    return pick + (pick >= targets).long()


def by_max(heatmaps: torch.Tensor) -> torch.Tensor:
    """Each map [B,H,W] divided by its largest absolute value (Quantus's normalize_by_max;
    an all-zero map stays zero)."""
    top = heatmaps.flatten(1).abs().amax(1).view(-1, *([1] * (heatmaps.dim() - 1)))
    return torch.where(top > 0, heatmaps / top.clamp_min(1e-30), heatmaps)


def model_randomization(
    model: nn.Module,
    explain: Explain,
    images: torch.Tensor,
    targets: torch.Tensor,
    steps: list[tuple[str, list[nn.Module]]],
    *,
    seed: int = 42,
    original: torch.Tensor | None = None,
) -> tuple[list[str], torch.Tensor, torch.Tensor]:
    """Cascading model parameter randomization: ``(step names, Spearman [S,B], SSIM [S,B])``
    between the heatmap of the trained model (``original``, else computed) and that after
    each cumulative step, for the same ``targets``. SSIM on maps divided by their maxima."""
    base = explain(model, images, targets) if original is None else original
    names, rho, sim = [], [], []
    for name, twin in randomized_models(model, steps, seed=seed):
        moved = explain(twin, images, targets)
        names.append(name)
        rho.append(spearman(base, moved))
        sim.append(ssim(by_max(base), by_max(moved)))
    return names, torch.stack(rho), torch.stack(sim)


def random_logit(
    model: nn.Module,
    explain: Explain,
    images: torch.Tensor,
    targets: torch.Tensor,
    num_classes: int,
    keys: list[int],
    *,
    original: torch.Tensor | None = None,
) -> torch.Tensor:
    """SSIM [B] between the heatmap for ``targets`` (``original``, else computed) and that for
    a random other class (:func:`other_classes`), both divided by their maxima, as Quantus's
    RandomLogit (which, unlike this 2-D SSIM, compares the maps flattened to 1-D)."""
    base = explain(model, images, targets) if original is None else original
    other = explain(model, images, other_classes(targets, num_classes, keys))
    return ssim(by_max(base), by_max(other))
