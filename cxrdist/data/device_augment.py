"""Train augmentation of a whole batch on the accelerator (`data.augment: device`).

The workers only decode: each image is edge-padded into the batch's canvas (uint8) and its
augmentation parameters are drawn exactly as the per-sample CPU path draws them
(`transforms.draw_train_params`, same seeded RNG), so a resumed run sees the same augmentations.
Here the random resized crop, flip and rotation become ONE affine map per sample, applied by a
single batched `affine_grid` + `grid_sample`, followed by the normalisation.

Output pixel (x_o, y_o) in [-1, 1] (align_corners=False) -> crop coordinates u, v (the rotation
of `transforms.rotate`, about the output centre) -> mirrored when flipped -> canvas coordinates of
the crop (top, left, h, w). Pixels the rotation brings in from outside the crop are faded to 0
exactly as bilinear sampling with zero padding does on the CPU path.

The resampling follows the ImageSpec's interpolation (bilinear, bicubic or nearest), as the CPU
path's resize does. Differences from the CPU path, both sub-pixel: one resampling instead of two
(resize, then a bilinear rotation), and no antialias filter when the crop is shrunk (crops are at most 1/0.77 of the
output side at the default scale, so the filter is narrow). tests/test_device_augment.py bounds them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from cxrdist.data.spec import ImageSpec
from cxrdist.data.transforms import normalisation

# Columns of the per-sample parameter rows the workers send (`transforms.draw_train_params`): the crop
# in pixels of the decoded image, which sits at the canvas's top-left corner; flip (0/1); angle (degrees).
PARAM_COLUMNS = ("top", "left", "h", "w", "flip", "angle")


def affine_thetas(params: torch.Tensor, canvas_hw: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, 2, 3) maps output -> canvas and output -> crop (before the flip), from (B, 6) parameter rows."""
    p = params.to(torch.float64)  # the offsets are differences of numbers near 1: float32 would lose ~1e-4 px
    top, left, h, w, flip, angle = p[:, 0], p[:, 1], p[:, 2], p[:, 3], p[:, 4], p[:, 5]
    canvas_h, canvas_w = canvas_hw
    theta = torch.deg2rad(angle)
    cos, sin = torch.cos(theta), torch.sin(theta)
    mirror = 1.0 - 2.0 * flip
    sx, sy = w / canvas_w, h / canvas_h
    zero = torch.zeros_like(cos)
    to_canvas = torch.stack([
        torch.stack([sx * mirror * cos, -sx * mirror * sin, (2 * left + w) / canvas_w - 1], dim=1),
        torch.stack([sy * sin, sy * cos, (2 * top + h) / canvas_h - 1], dim=1),
    ], dim=1)
    to_crop = torch.stack([torch.stack([cos, -sin, zero], dim=1), torch.stack([sin, cos, zero], dim=1)], dim=1)
    return to_canvas.to(torch.float32), to_crop.to(torch.float32)


def inside_crop_weight(crop_grid: torch.Tensor, size: int) -> torch.Tensor:
    """(B, 1, S, S): what bilinear sampling of an all-ones S x S image with zero padding gives at
    `crop_grid` (1 inside, a linear fade over the outer pixel, 0 beyond): the CPU rotation's fill."""
    pixel = ((crop_grid + 1) * size - 1) / 2  # align_corners=False pixel coordinates
    per_axis = torch.minimum(pixel + 1, size - pixel).clamp(0, 1)
    return (per_axis[..., 0] * per_axis[..., 1]).unsqueeze(1)


def augment_batch(canvas: torch.Tensor, params: torch.Tensor, spec: ImageSpec,
                  scale_shift: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """(B, 1, H, W) uint8 canvases + (B, 6) parameters -> (B, C, spec.size, spec.size) float32 on the canvas's device,
    resampled with the spec's interpolation and normalised as x * scale + shift (`transforms.normalisation(spec)`;
    pass `scale_shift` already on the device to save the two small copies per batch)."""
    batch, size = canvas.shape[0], spec.size
    scale, shift = scale_shift if scale_shift is not None else normalisation(spec)
    if batch == 0:  # every sample of the batch was corrupt
        return torch.empty(0, scale.shape[0], size, size, device=canvas.device)
    to_canvas, to_crop = affine_thetas(params.to(canvas.device, non_blocking=True), tuple(canvas.shape[-2:]))
    shape = [batch, 1, size, size]
    grid = F.affine_grid(to_canvas, shape, align_corners=False)
    pixels = F.grid_sample(canvas.to(torch.float32), grid, mode=spec.interpolation, padding_mode="border", align_corners=False)
    if spec.interpolation == "bicubic":  # overshoots; the CPU path's resize to uint8 clamps
        pixels = pixels.clamp(0, 255)
    pixels = pixels * inside_crop_weight(F.affine_grid(to_crop, shape, align_corners=False), size)
    scale, shift = scale.to(canvas.device), shift.to(canvas.device)
    return torch.addcmul(shift, pixels, scale)  # (B, 1, S, S) broadcast to (B, C, S, S)
