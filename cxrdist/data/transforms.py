"""Per-sample image transforms: decode, train augmentation, eval resize, normalisation.

Decoding and the eval resize and normalisation are `preprocess.py`'s (the module an exported model ships with).

Pure functions of their inputs: randomness comes only from the numpy Generator passed in, never from
a global RNG, so a sample's augmentation is reproducible from its seed (resume, any worker count).
"""

from __future__ import annotations

import math
from functools import lru_cache

import numpy as np
import torch
import torchvision.transforms.v2.functional as F

from cxrdist.data import preprocess
from cxrdist.data.spec import EVAL_DECODE, ImageSpec

CROP_SCALE = (0.7, 1.0)  # fraction of the image area kept by the random resized crop
CROP_RATIO = (0.85, 1.15)  # width / height of the crop
HFLIP_P = 0.5
MAX_ROTATION_DEG = 10.0
# The smallest crop side is sqrt(0.7 * 0.85) = 0.77 of the image side; JPEG draft decoding for
# training keeps enough pixels that even that crop is not upsampled.
TRAIN_DRAFT_MARGIN = 1.0 / math.sqrt(CROP_SCALE[0] * CROP_RATIO[0])
INTERPOLATION = {"bilinear": F.InterpolationMode.BILINEAR, "bicubic": F.InterpolationMode.BICUBIC, "nearest": F.InterpolationMode.NEAREST}


def decode_grayscale(data: bytes, min_side: int | None = None) -> np.ndarray:
    """8-bit grayscale (H, W) array from stored PNG/JPEG bytes; with `min_side`, a JPEG at least twice that size is
    decoded at a reduced DCT scale, never below `min_side` (preprocess.decode, the exported model's decoder)."""
    return preprocess.decode(data, min_side)


def train_draft_side(img_size: int) -> int:
    return math.ceil(img_size * TRAIN_DRAFT_MARGIN)


def eval_draft_side(spec: ImageSpec) -> int:
    """The `min_side` a stored JPEG is decoded at for evaluation, predict and export: training's, so from 2x the input
    size on evaluation resizes (antialiased) the same DCT-scaled pixels training cropped from; a model whose card
    predates that (spec.eval_decode legacy) keeps the draft at the input size it was scored with (data/spec.py)."""
    return train_draft_side(spec.size) if spec.eval_decode == EVAL_DECODE else spec.size


def channel_stats(spec: ImageSpec) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """The per-channel (mean, std) actually applied: the spec's, or their average for one channel."""
    mean, std = spec.mean, spec.std
    if len(mean) != spec.channels:  # ImageSpec allows 3 values for 1 channel (timm's RGB statistics) and no other mismatch
        mean, std = (sum(mean) / len(mean),), (sum(std) / len(std),)
    return mean, std


def model_input_arguments(spec: ImageSpec, stored_image: dict) -> dict:
    """The keyword arguments of `preprocess.model_input` for a model with this spec trained on images stored as
    `stored_image` (the model card's {"format", "max_size", "quality"}): what predict runs and an export's sidecar holds."""
    mean, std = channel_stats(spec)
    return {"size": spec.size, "mean": list(mean), "std": list(std), "interpolation": spec.interpolation, "resampler": spec.resampler,
            "stored_format": stored_image["format"], "max_size": int(stored_image["max_size"]), "quality": int(stored_image.get("quality", 95)),
            "draft_side": eval_draft_side(spec)}


@lru_cache(maxsize=16)
def _scale_shift(mean: tuple, std: tuple) -> tuple[torch.Tensor, torch.Tensor]:
    """preprocess.scale_shift as tensors: (x/255 - mean) / std == x * scale + shift, one fused op per image."""
    return tuple(torch.from_numpy(a) for a in preprocess.scale_shift(mean, std))


def normalisation(spec: ImageSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, shift) as (C, 1, 1) tensors with normalise(x) == x * scale + shift, for the batched device path."""
    return _scale_shift(*channel_stats(spec))


def normalise(image: torch.Tensor, spec: ImageSpec) -> torch.Tensor:
    """(1, H, W) pixels in 0..255 (uint8 or float) -> (channels, H, W) float32: grayscale replicated, (x/255 - mean) / std."""
    scale, shift = _scale_shift(*channel_stats(spec))
    return torch.addcmul(shift, image.to(torch.float32), scale)


def as_tensor(image: np.ndarray | torch.Tensor) -> torch.Tensor:
    """(H, W) or (1, H, W) uint8 array/tensor -> (1, H, W) uint8 tensor."""
    tensor = torch.from_numpy(np.ascontiguousarray(image)) if isinstance(image, np.ndarray) else image
    if tensor.dtype != torch.uint8:
        raise ValueError(f"expected an 8-bit grayscale image, got dtype {tensor.dtype}")
    if tensor.ndim == 2:
        tensor = tensor.unsqueeze(0)
    if tensor.ndim != 3 or tensor.shape[0] != 1:
        raise ValueError(f"expected a (H, W) grayscale image, got shape {tuple(tensor.shape)}")
    return tensor


def crop_params(height: int, width: int, rng: np.random.Generator) -> tuple[int, int, int, int]:
    """(top, left, h, w) of a random crop with area in CROP_SCALE and aspect in CROP_RATIO.

    torchvision's RandomResizedCrop.get_params, drawn from `rng` instead of the global torch RNG.
    """
    area = height * width
    log_ratio = (math.log(CROP_RATIO[0]), math.log(CROP_RATIO[1]))
    for _ in range(10):
        target_area = area * rng.uniform(*CROP_SCALE)
        aspect = math.exp(rng.uniform(*log_ratio))
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = int(rng.integers(0, height - h + 1))
            left = int(rng.integers(0, width - w + 1))
            return top, left, h, w
    # Fallback: the largest centred crop within the ratio bounds.
    in_ratio = width / height
    if in_ratio < CROP_RATIO[0]:
        w, h = width, int(round(width / CROP_RATIO[0]))
    elif in_ratio > CROP_RATIO[1]:
        h, w = height, int(round(height * CROP_RATIO[1]))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


@lru_cache(maxsize=8)
def _centred_pixel_coords(height: int, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Pixel-centre coordinates relative to the image centre: x as (1, W), y as (H, 1)."""
    xs = torch.linspace(-width * 0.5 + 0.5, width * 0.5 - 0.5, width).view(1, width)
    ys = torch.linspace(-height * 0.5 + 0.5, height * 0.5 - 0.5, height).view(height, 1)
    return xs, ys


def rotate(image: torch.Tensor, angle: float) -> torch.Tensor:
    """(C, H, W) float rotated counter-clockwise by `angle` degrees about the centre, bilinear, 0 outside.

    Same result as torchvision's rotate(..., BILINEAR) (fill 0 via zero padding) but ~5x faster on
    CPU: torchvision builds the sampling grid with a batched matmul, here it is two fused
    broadcasts into a preallocated grid.
    """
    height, width = image.shape[-2:]
    xs, ys = _centred_pixel_coords(height, width)
    theta = math.radians(angle)
    cos_x, sin_x = math.cos(theta) / (width * 0.5), math.sin(theta) / (width * 0.5)
    cos_y, sin_y = math.cos(theta) / (height * 0.5), math.sin(theta) / (height * 0.5)
    grid = torch.empty(1, height, width, 2)
    torch.sub(xs * cos_x, ys * sin_x, out=grid[0, :, :, 0])  # source x of each output pixel, in [-1, 1]
    torch.add(xs * sin_y, ys * cos_y, out=grid[0, :, :, 1])
    out = torch.nn.functional.grid_sample(image.unsqueeze(0), grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    return out.squeeze(0)


def draw_train_params(height: int, width: int, rng: np.random.Generator) -> tuple[int, int, int, int, bool, float]:
    """(top, left, h, w, flip, angle): one sample's train augmentation, drawn in a fixed order from `rng`
    (the per-sample CPU path and the batched device path both use it, so they see the same draws)."""
    top, left, h, w = crop_params(height, width, rng)
    flip = bool(rng.random() < HFLIP_P)
    angle = float(rng.uniform(-MAX_ROTATION_DEG, MAX_ROTATION_DEG))
    return top, left, h, w, flip, angle


def train_transform(image: np.ndarray | torch.Tensor, rng: np.random.Generator, spec: ImageSpec) -> torch.Tensor:
    """Random resized crop -> (size, size) with the spec's interpolation, hflip p=0.5, rotation +-10 deg (bilinear, fill 0), normalise.

    The crop is resized first and rotated at the output size (cheaper than rotating the full image,
    same distribution up to resampling).
    """
    tensor = as_tensor(image)
    return apply_train_params(tensor, draw_train_params(tensor.shape[1], tensor.shape[2], rng), spec)


def apply_train_params(tensor: torch.Tensor, params: tuple, spec: ImageSpec) -> torch.Tensor:
    """(1, H, W) uint8 + (top, left, h, w, flip, angle) -> the augmented, normalised (channels, S, S) float32."""
    top, left, h, w, flip, angle = params
    out = F.resized_crop(tensor, top, left, h, w, [spec.size, spec.size], interpolation=INTERPOLATION[spec.interpolation], antialias=True)
    if flip:
        out = F.horizontal_flip(out)
    return normalise(rotate(out.to(torch.float32), angle), spec)


def eval_transform(image: np.ndarray | torch.Tensor, spec: ImageSpec, hflip: bool = False) -> torch.Tensor:
    """The whole image squashed to (size, size) (nothing cropped) with the spec's interpolation and resampler, optionally
    mirrored, normalised: preprocess.resize_square + preprocess.normalise, the steps an exported model's preprocessor runs."""
    pixels = preprocess.resize_square(as_tensor(image)[0].numpy(), spec.size, spec.interpolation, spec.resampler)
    return torch.from_numpy(preprocess.normalise(pixels[:, ::-1] if hflip else pixels, *channel_stats(spec)))
