"""Histogram-of-oriented-gradients targets for masked image modelling, in torch.

dbMiM (METHODS.md section 1) optionally regresses each hidden patch's HOG as well as its voxels.
The descriptor here is exactly scikit-image's ``skimage.feature.hog`` on a 2D grey image with
``transform_sqrt=False`` and ``feature_vector=True``, computed in batch on the device:

1. gradients by central differences without the 1/2 factor, ``g[i] = I[i+1] - I[i-1]``, and zero
   on the first and last row / column (so each patch's border pixels carry no gradient);
2. unsigned orientation ``atan2(g_row, g_col)`` in degrees modulo 180, hard-assigned (no
   interpolation) to ``orientations`` equal bins [i*w, (i+1)*w), w = 180 / orientations; each pixel
   votes its gradient magnitude; a cell's histogram is the vote sum divided by the cell's pixel
   count; trailing pixels that do not fill a cell are ignored;
3. blocks of ``cells_per_block`` cells slide by one cell; each block is normalised with
   ``L1``, ``L1-sqrt``, ``L2`` or ``L2-Hys`` (clip at 0.2 and renormalise), eps = 1e-5;
4. features flattened in (block_row, block_col, cell_row, cell_col, orientation) order.

For a volume, :func:`patch_hog` applies this to every z-slice of every patch separately (the
patch as the whole image, which is what gives step 1's zero border) and concatenates
(channel, z-slice, descriptor). Default: 9 orientations, 8x8-pixel cells, 2x2-cell blocks with
L2-Hys, i.e. on a 16x16 patch slice one block, 36 numbers, normalised over the whole slice.
Computed in float32 with autocast off: it is a target, never differentiated.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field, model_validator
from torch import Tensor

from neuroray.config import StrictModel

BlockNorm = Literal["L1", "L1-sqrt", "L2", "L2-Hys"]
_EPS = 1e-5


class HOGConfig(StrictModel):
    """The HOG variant used as an MAE target (names and meanings as in skimage.feature.hog)."""

    orientations: int = Field(9, ge=1)
    pixels_per_cell: tuple[int, int] = (8, 8)
    cells_per_block: tuple[int, int] = (2, 2)
    block_norm: BlockNorm = "L2-Hys"

    @model_validator(mode="after")
    def _positive(self) -> HOGConfig:
        if min(self.pixels_per_cell) < 1 or min(self.cells_per_block) < 1:
            raise ValueError("pixels_per_cell and cells_per_block must be positive")
        return self


def hog_size(
    image_shape: Sequence[int],
    orientations: int = 9,
    pixels_per_cell: Sequence[int] = (8, 8),
    cells_per_block: Sequence[int] = (2, 2),
) -> int:
    """Length of the HOG descriptor of a (rows, cols) image; raises if the image is too small."""
    n_cells = [s // c for s, c in zip(image_shape, pixels_per_cell, strict=True)]
    n_blocks = [n - b + 1 for n, b in zip(n_cells, cells_per_block, strict=True)]
    if min(n_blocks) < 1:
        raise ValueError(
            f"image {tuple(image_shape)} is too small for {tuple(cells_per_block)} blocks of "
            f"{tuple(pixels_per_cell)}-pixel cells; use smaller cells or blocks"
        )
    return n_blocks[0] * n_blocks[1] * cells_per_block[0] * cells_per_block[1] * orientations


def _normalise_blocks(blocks: Tensor, method: str) -> Tensor:
    """skimage's _hog_normalize_block over the last three axes (cell_row, cell_col, bin)."""
    dims = (-3, -2, -1)
    if method == "L1":
        return blocks / (blocks.abs().sum(dims, keepdim=True) + _EPS)
    if method == "L1-sqrt":
        return torch.sqrt(blocks / (blocks.abs().sum(dims, keepdim=True) + _EPS))
    if method == "L2":
        return blocks / torch.sqrt(blocks.square().sum(dims, keepdim=True) + _EPS**2)
    if method == "L2-Hys":
        out = blocks / torch.sqrt(blocks.square().sum(dims, keepdim=True) + _EPS**2)
        out = out.clamp(max=0.2)
        return out / torch.sqrt(out.square().sum(dims, keepdim=True) + _EPS**2)
    raise ValueError(f"unknown block_norm {method!r}; use L1, L1-sqrt, L2 or L2-Hys")


def hog_2d(
    images: Tensor,
    orientations: int = 9,
    pixels_per_cell: Sequence[int] = (8, 8),
    cells_per_block: Sequence[int] = (2, 2),
    block_norm: BlockNorm = "L2-Hys",
) -> Tensor:
    """HOG of every 2D image in a batch: [..., H, W] -> [..., F] (skimage.feature.hog's numbers)."""
    cr, cc = (int(c) for c in pixels_per_cell)
    br, bc = (int(b) for b in cells_per_block)
    height, width = images.shape[-2:]
    hog_size((height, width), orientations, (cr, cc), (br, bc))  # validates the size
    with torch.autocast(device_type=images.device.type, enabled=False):
        img = images.float()
        g_row = F.pad(img[..., 2:, :] - img[..., :-2, :], (0, 0, 1, 1))
        g_col = F.pad(img[..., :, 2:] - img[..., :, :-2], (1, 1, 0, 0))
        magnitude = torch.hypot(g_col, g_row)
        orientation = torch.remainder(torch.rad2deg(torch.atan2(g_row, g_col)), 180.0)
        # bin i holds [i*w, (i+1)*w); like skimage, an angle that rounds to 180 votes nowhere
        edges = torch.tensor(
            [180.0 / orientations * (i + 1) for i in range(orientations)],
            dtype=torch.float32,
            device=img.device,
        )
        bins = torch.bucketize(orientation, edges, right=True)
        votes = F.one_hot(bins.clamp(max=orientations - 1), orientations).to(img.dtype)
        votes = votes * (magnitude * (bins < orientations))[..., None]

        n_rows, n_cols = height // cr, width // cc
        votes = votes[..., : n_rows * cr, : n_cols * cc, :]
        lead = votes.shape[:-3]
        cells = votes.reshape(*lead, n_rows, cr, n_cols, cc, orientations).sum((-4, -2))
        cells = cells / (cr * cc)  # [..., n_rows, n_cols, bins]

        blocks = cells.unfold(-3, br, 1).unfold(-3, bc, 1)  # [..., nbr, nbc, bins, br, bc]
        blocks = blocks.movedim(-3, -1)  # [..., nbr, nbc, br, bc, bins]
        blocks = _normalise_blocks(blocks, block_norm)
        return blocks.reshape(*lead, -1)


def patch_hog(x: Tensor, patch_size: Sequence[int], cfg: HOGConfig | None = None) -> Tensor:
    """HOG of every z-slice of every patch: [B, C, Z, Y, X] -> [B, N, C * pz * F] (z-major tokens)."""
    cfg = cfg or HOGConfig()
    b, c, z, y, xx = x.shape
    pz, py, px = (int(p) for p in patch_size)
    nz, ny, nx = z // pz, y // py, xx // px
    patches = x.reshape(b, c, nz, pz, ny, py, nx, px).permute(0, 2, 4, 6, 1, 3, 5, 7)
    feats = hog_2d(
        patches,
        orientations=cfg.orientations,
        pixels_per_cell=cfg.pixels_per_cell,
        cells_per_block=cfg.cells_per_block,
        block_norm=cfg.block_norm,
    )  # [B, Nz, Ny, Nx, C, pz, F]
    return feats.reshape(b, nz * ny * nx, -1)


def patch_hog_size(patch_size: Sequence[int], in_chans: int, cfg: HOGConfig | None = None) -> int:
    """Width of :func:`patch_hog` rows."""
    cfg = cfg or HOGConfig()
    per_slice = hog_size(patch_size[1:], cfg.orientations, cfg.pixels_per_cell, cfg.cells_per_block)
    return in_chans * int(patch_size[0]) * per_slice
