"""Per-sample transforms: hand-computed normalisation, flips, determinism, crop bounds, draft decoding."""

from __future__ import annotations

import io
import numpy as np
import pytest
import torch
from PIL import Image

from cxrdist.data.spec import ImageSpec
from cxrdist.data.transforms import (
    CROP_RATIO,
    CROP_SCALE,
    channel_stats,
    crop_params,
    decode_grayscale,
    eval_transform,
    rotate,
    train_transform,
)
from cxrdist.errors import UserError

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def textured(height: int = 40, width: int = 56, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width), dtype=np.uint8)


def encode(array: np.ndarray, fmt: str, mode: str = "L") -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).convert(mode).save(buffer, format=fmt, quality=95)
    return buffer.getvalue()


@pytest.mark.parametrize("in_chans", [1, 3])
def test_eval_constant_image_matches_hand_computation(in_chans):
    cfg = ImageSpec(32, channels=in_chans)
    out = eval_transform(np.full((40, 56), 100, np.uint8), cfg)
    assert out.shape == (in_chans, 32, 32) and out.dtype == torch.float32
    means = MEAN if in_chans == 3 else (sum(MEAN) / 3,)
    stds = STD if in_chans == 3 else (sum(STD) / 3,)
    for c in range(in_chans):
        expected = (100 / 255 - means[c]) / stds[c]
        assert torch.allclose(out[c], torch.full((32, 32), expected), atol=1e-5)
    applied_mean, applied_std = channel_stats(cfg)
    assert applied_mean == pytest.approx(means) and applied_std == pytest.approx(stds)


def test_eval_squashes_whole_image_without_cropping():
    image = np.zeros((40, 80), np.uint8)
    image[:, :4] = 255  # a bright strip at the far left edge must survive a squash, not a centre crop
    out = eval_transform(image, ImageSpec(20, channels=1, mean=(0.0,), std=(1.0,)))
    assert out.shape == (1, 20, 20)
    assert out[0, :, 0].min() > 0.5 and out[0, :, -1].max() < 0.05


def test_eval_hflip_is_torch_flip():
    cfg = ImageSpec(24)
    image = textured()
    assert torch.equal(eval_transform(image, cfg, hflip=True), torch.flip(eval_transform(image, cfg), dims=[-1]))


def test_train_transform_deterministic_per_rng_seed():
    cfg = ImageSpec(32)
    image = textured(64, 64)
    first = train_transform(image, np.random.default_rng(5), cfg)
    again = train_transform(image, np.random.default_rng(5), cfg)
    other = train_transform(image, np.random.default_rng(6), cfg)
    assert first.shape == (3, 32, 32) and first.dtype == torch.float32
    assert torch.equal(first, again)
    assert not torch.equal(first, other)
    unnormalised = first * torch.tensor(STD).view(3, 1, 1) + torch.tensor(MEAN).view(3, 1, 1)
    assert torch.allclose(unnormalised[0], unnormalised[1], atol=1e-5)  # grayscale replicated
    assert torch.allclose(unnormalised[0], unnormalised[2], atol=1e-5)


def test_train_transform_constant_image_keeps_value_inside_and_fills_zero():
    cfg = ImageSpec(32, channels=1, mean=(0.0,), std=(1.0,))
    values = set()
    for seed in range(20):
        out = train_transform(np.full((48, 48), 200, np.uint8), np.random.default_rng(seed), cfg)
        assert out[0, 12:20, 12:20] == pytest.approx(200 / 255, abs=1e-5)
        values.add(round(float(out[0, 0, 0]), 3))  # a corner: rotated-in black unless the angle was ~0
    assert min(values) < 200 / 255 - 0.05


@pytest.mark.parametrize("shape", [(1, 64, 64), (1, 50, 72), (3, 33, 20)])
def test_rotate_matches_torchvision(shape):
    import torchvision.transforms.v2.functional as F

    image = torch.from_numpy(np.random.default_rng(1).uniform(0, 255, shape).astype(np.float32))
    for angle in (-10.0, -3.3, 0.0, 7.9):
        expected = F.rotate(image, angle, interpolation=F.InterpolationMode.BILINEAR)
        assert torch.allclose(rotate(image, angle), expected, atol=0.02), angle


def test_train_does_not_touch_global_rng():
    torch.manual_seed(0)
    np.random.seed(0)
    before = (torch.rand(1), np.random.rand())
    torch.manual_seed(0)
    np.random.seed(0)
    train_transform(textured(), np.random.default_rng(1), ImageSpec(16))
    assert (torch.rand(1), np.random.rand()) == before


def test_crop_params_respect_scale_and_ratio():
    height, width = 300, 250
    for seed in range(200):
        top, left, h, w = crop_params(height, width, np.random.default_rng(seed))
        assert 0 <= top and top + h <= height and 0 <= left and left + w <= width
        assert CROP_SCALE[0] - 0.01 <= h * w / (height * width) <= CROP_SCALE[1] + 0.01
        assert CROP_RATIO[0] - 0.01 <= w / h <= CROP_RATIO[1] + 0.01


def test_crop_params_fallback_for_extreme_aspect():
    top, left, h, w = crop_params(10, 200, np.random.default_rng(0))
    assert (h, w) == (10, round(10 * CROP_RATIO[1])) and left == (200 - w) // 2


def test_decode_draft_scales_large_jpeg_only_down_to_min_side():
    big = textured(512, 512)
    jpeg = encode(big, "JPEG")
    assert decode_grayscale(jpeg).shape == (512, 512)
    assert decode_grayscale(jpeg, 256).shape == (256, 256)
    assert decode_grayscale(jpeg, 100).shape == (128, 128)  # 1/4 scale: never below the requested side
    assert decode_grayscale(jpeg, 300).shape == (512, 512)  # not twice as large: full decode
    assert decode_grayscale(encode(big, "PNG"), 100).shape == (512, 512)  # PNG has no draft mode
    assert np.array_equal(decode_grayscale(encode(big, "PNG")), big)


def test_decode_converts_rgb_and_rejects_garbage():
    out = decode_grayscale(encode(textured(), "JPEG", mode="RGB"))
    assert out.dtype == np.uint8 and out.shape == (40, 56)
    with pytest.raises(OSError):  # PIL's UnidentifiedImageError
        decode_grayscale(b"not an image at all")


def test_mismatched_channel_stats_refused():
    with pytest.raises(UserError):
        eval_transform(textured(), ImageSpec(8, channels=2))
    with pytest.raises(UserError, match="interpolation"):
        ImageSpec(8, interpolation="lanczos")


@pytest.mark.parametrize("interpolation", ["bilinear", "bicubic"])
@pytest.mark.parametrize("resampler", ["pillow", "torchvision"])
def test_resize_uses_the_specs_interpolation_and_resampler(interpolation, resampler):
    """Pillow's Image.resize for a current spec (what an exported model's preprocess.py runs with numpy + Pillow
    only), torchvision's antialiased resize for the legacy resampler of cards written before (their numbers keep)."""
    import torchvision.transforms.v2.functional as F

    image = textured(300, 256)
    spec = ImageSpec(224, channels=1, mean=(0.0,), std=(1.0,), interpolation=interpolation, resampler=resampler)
    if resampler == "pillow":
        filters = {"bilinear": Image.Resampling.BILINEAR, "bicubic": Image.Resampling.BICUBIC}
        expected = torch.from_numpy(np.asarray(Image.fromarray(image).resize((224, 224), filters[interpolation])).copy())[None].float() / 255
    else:
        mode = F.InterpolationMode.BICUBIC if interpolation == "bicubic" else F.InterpolationMode.BILINEAR
        expected = F.resize(torch.from_numpy(image)[None], [224, 224], interpolation=mode, antialias=True).float() / 255
    assert torch.allclose(eval_transform(image, spec), expected, atol=1e-6)
    other = ImageSpec(224, channels=1, mean=(0.0,), std=(1.0,), interpolation="bicubic" if interpolation == "bilinear" else "bilinear",
                      resampler=resampler)
    assert not torch.allclose(eval_transform(image, other), expected, atol=1e-3)
    other_resampler = ImageSpec(224, channels=1, mean=(0.0,), std=(1.0,), interpolation=interpolation,
                                resampler="torchvision" if resampler == "pillow" else "pillow")
    assert not torch.equal(eval_transform(image, other_resampler), eval_transform(image, spec))  # by a gray level here and there (bilinear)
