"""Vision transformers at another image size, whatever their family: the patch size that leaves
a usable grid, the sizes a Swin takes, and the resampling of weights made at another size
(position embeddings, patch kernels, relative position tables)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..errors import ConfigError, UnsupportedModel

#: a ViT built for an image size keeps at least this many patch tokens per side (see patch_size_for)
MIN_GRID = 7
#: Swin merges its 4 px patches three times: image sides that are multiples of 32 keep every
#: stage's map aligned with the image, and 64 px leave the last stage (the CAM layer) a 2x2 map
SWIN_MULTIPLE, SWIN_MIN_SIZE = 32, 64


def patch_size_for(arch: str, image_size: int, patch: int) -> int:
    """The patch size of a ViT built for ``image_size``: ``patch`` if it divides the image size
    into at least :data:`MIN_GRID` tokens per side, else the largest smaller size that does
    (:class:`cgc.errors.ConfigError` when none of 2 px or more does)."""
    for p in range(patch, 1, -1):
        if image_size % p == 0 and image_size // p >= MIN_GRID:
            return p
    q = min(patch, 8)
    raise ConfigError(
        f"{arch} cannot take {image_size} px images: no patch of 2 to {patch} px divides them into at least "
        f"{MIN_GRID} patches per side (multiples of {q} px from {MIN_GRID * q} px do)"
    )


def check_swin(arch: str, image_size: int) -> None:
    if image_size < SWIN_MIN_SIZE or image_size % SWIN_MULTIPLE:
        raise ConfigError(
            f"{arch} cannot take {image_size} px images: a Swin needs a multiple of {SWIN_MULTIPLE} px "
            f"(its 4 px patches are merged three times), at least {SWIN_MIN_SIZE} px (a 2x2 map at its last stage)"
        )


def resample_patch_kernel(kernel: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """A patch-embedding kernel ``[O,I,p,q]`` for ``size`` patches, as FlexiViT resizes one: the
    kernel whose response to a patch resized (bicubic, antialiased) to ``size`` is closest to
    the old kernel's response to the patch itself (pseudo-inverse of the resize)."""
    old = kernel.shape[-2:]
    basis = torch.eye(old[0] * old[1], dtype=torch.float32).view(-1, 1, *old)
    resize = F.interpolate(basis, size=size, mode="bicubic", antialias=True, align_corners=False).flatten(1)
    flat = kernel.float().flatten(2).transpose(0, 2)  # [p*q, I, O]
    new = torch.tensordot(torch.linalg.pinv(resize), flat, dims=1)  # [size, I, O]
    return new.transpose(0, 2).reshape(*kernel.shape[:2], *size).to(kernel.dtype)


def resize_positions(pos: torch.Tensor, prefix: int, grid: tuple[int, int]) -> torch.Tensor:
    """Position embeddings ``[1, prefix + n*n, C]`` for a ``grid`` of patches."""
    side = math.isqrt(pos.shape[1] - prefix)
    patches = pos[:, prefix:].reshape(1, side, side, -1).permute(0, 3, 1, 2).float()
    patches = F.interpolate(patches, size=grid, mode="bicubic", align_corners=False, antialias=True)
    return torch.cat([pos[:, :prefix], patches.permute(0, 2, 3, 1).flatten(1, 2).to(pos.dtype)], 1)


def resize_relative_table(table: torch.Tensor, rows: int) -> torch.Tensor:
    """A relative position table ``[(2a-1)^2 + extra, heads]`` with ``rows`` rows: its
    ``(2a-1) x (2a-1)`` part resized (bicubic), its ``extra`` rows (BEiT's 3 class-token
    entries) kept."""

    def square(n: int) -> bool:
        return n > 0 and math.isqrt(n) ** 2 == n

    extra = next((e for e in (0, 3) if square(table.shape[0] - e) and square(rows - e)), None)
    if extra is None:
        raise UnsupportedModel(f"cannot resample a relative position table of {table.shape[0]} rows to {rows}")
    old, new = math.isqrt(table.shape[0] - extra), math.isqrt(rows - extra)
    grid = table[: old * old].T.reshape(1, -1, old, old).float()
    grid = F.interpolate(grid, size=(new, new), mode="bicubic", align_corners=False)
    return torch.cat([grid.reshape(-1, new * new).T.to(table.dtype), table[old * old :]])
