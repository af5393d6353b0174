"""data.augment=device: the batched affine grid_sample equals the per-sample CPU path for the same
drawn parameters, and the stream hands the device path exactly the CPU path's draws.

Tolerances, in gray levels (0..255) of the un-normalised output:
- The CPU path rounds its resized crop to uint8 before rotating: that alone differs from an exact
  resampling by up to 0.5 (mean 0.25 for a uniform rounding error).
- It interpolates twice (resize, then rotate) where the device path interpolates once, and it
  antialiases the (at most 1/0.77x) shrink: on a smooth image (period >= 40 px) both change a pixel by
  well under a gray level; at the crop's border the rotation's fade adds up to ~1.5.
So on the smooth image: mean <= 0.35, 99th percentile <= 1.0, max <= 2.5. A one-pixel shift of the
crop already exceeds these (checked below), so the bound does see a wrong geometry.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cxrdist.data.device_augment import augment_batch
from cxrdist.data.datasets import load_manifest
from cxrdist.data.spec import ImageSpec
from cxrdist.data.stream import RawSample, StreamConfig, augment_rng, collate_for_device, decode_sample, decode_train_batch, read_shards
from cxrdist.data.transforms import apply_train_params, as_tensor, draw_train_params, normalisation, train_draft_side

SPEC = ImageSpec(380)


def smooth_image(height: int, width: int, phase: float) -> np.ndarray:
    yy, xx = np.mgrid[0:height, 0:width]
    image = 128 + 60 * np.sin(xx / 23.0 + phase) * np.cos(yy / 31.0) + 40 * np.sin((xx + yy) / 41.0)
    return np.clip(image, 0, 255).astype(np.uint8)


def gray_levels(device: torch.Tensor, cpu: torch.Tensor, spec: ImageSpec) -> torch.Tensor:
    scale, _ = normalisation(spec)
    return ((device - cpu).abs() / scale)[:, 0]  # channels are replicas


def both_paths(images: list[np.ndarray], params: list[tuple], spec: ImageSpec = SPEC) -> tuple[torch.Tensor, torch.Tensor]:
    cpu = torch.stack([apply_train_params(as_tensor(image), p, spec) for image, p in zip(images, params)])
    labels = [np.zeros(2, np.float32)] * len(images)
    batch = collate_for_device([str(i) for i in range(len(images))], images, params, labels, [], StreamConfig(spec), 2)
    device = augment_batch(batch["image"], batch["augment"], spec)
    return device, cpu


@pytest.fixture(scope="module")
def images_and_params():
    # Mixed sizes in one batch (the canvas is padded to the largest), parameters from the real seeded draws.
    images = [smooth_image(*shape, phase) for phase, shape in enumerate([(512, 512), (512, 430), (470, 512), (512, 512), (400, 380), (512, 460)])]
    params = [draw_train_params(*image.shape, augment_rng(0, 1, f"key{k}")) for k, image in enumerate(images)]
    assert {p[4] for p in params} == {True, False}  # both flips occur
    return images, params


@pytest.mark.parametrize("interpolation", ["bilinear", "bicubic"])  # bicubic: seresnext101_32x4d's pretrained config
def test_device_path_equals_the_cpu_path_for_the_same_parameters(images_and_params, interpolation):
    images, params = images_and_params
    spec = ImageSpec(380, interpolation=interpolation)
    device, cpu = both_paths(images, params, spec)
    assert device.shape == cpu.shape == (len(images), 3, 380, 380) and device.dtype == torch.float32
    diff = gray_levels(device, cpu, spec)
    for k, per_image in enumerate(diff):
        assert per_image.mean() <= 0.35, (k, params[k], float(per_image.mean()))
        assert per_image.flatten().quantile(0.99) <= 1.0, (k, params[k])
        assert per_image.max() <= 2.5, (k, params[k], float(per_image.max()))


def test_the_tolerance_sees_a_one_pixel_error(images_and_params):
    images, params = images_and_params
    shifted = [(top, left + 1, h, w, flip, angle) for top, left, h, w, flip, angle in params]
    device, _ = both_paths(images, shifted)
    _, cpu = both_paths(images, params)
    means = gray_levels(device, cpu, SPEC).mean(dim=(1, 2))
    assert (means > 0.35).all(), means


def test_identity_parameters_give_the_image_itself():
    image = smooth_image(64, 64, 0.3)
    spec = ImageSpec(64, channels=1, mean=(0.5,), std=(0.25,))
    device, cpu = both_paths([image], [(0, 0, 64, 64, False, 0.0)], spec)
    expected = (torch.from_numpy(image).float() / 255 - 0.5) / 0.25
    assert torch.allclose(device[0, 0], expected, atol=1e-4)
    assert torch.allclose(cpu[0, 0], expected, atol=1e-4)


def test_the_stream_hands_the_device_path_the_cpu_paths_draws(synth_shards):
    manifest = load_manifest(synth_shards)
    raws = [(3, raw) for raw in list(read_shards(synth_shards, manifest.shards(["fold-1"])))[:12]]
    raws[4] = (3, RawSample(raws[4][1].key, b"not an image", raws[4][1].meta))  # a corrupt sample is dropped from both
    cfg_cpu = StreamConfig(ImageSpec(48), seed=7)
    cfg_device = StreamConfig(**{**cfg_cpu.__dict__, "augment": "device"})
    on_cpu = decode_train_batch(raws, cfg_cpu, len(manifest.labels))
    for_device = decode_train_batch(raws, cfg_device, len(manifest.labels))
    assert for_device["key"] == on_cpu["key"] and for_device["corrupt"] == on_cpu["corrupt"] == 1
    assert torch.equal(for_device["labels_raw"].nan_to_num(9), on_cpu["labels_raw"].nan_to_num(9))  # blank = NaN
    assert for_device["image"].dtype == torch.uint8  # workers only decoded
    expected = []
    for pass_index, raw in raws:
        decoded = decode_sample(raw, len(manifest.labels), train_draft_side(cfg_cpu.image.size))
        if decoded is not None:
            expected.append(draw_train_params(*decoded[0].shape, augment_rng(cfg_cpu.seed, pass_index, raw.key)))
    assert torch.equal(for_device["augment"], torch.tensor(expected, dtype=torch.float32))
    device = augment_batch(for_device["image"], for_device["augment"], cfg_cpu.image)
    # Synthetic radiographs have sharp edges, where one vs two interpolations differ most (a few gray
    # levels on average at 64 -> 48 px); another sample's draw is several times further off.
    close = gray_levels(device, on_cpu["image"], cfg_cpu.image).mean()
    swapped = augment_batch(for_device["image"], for_device["augment"].roll(1, dims=0), cfg_cpu.image)
    assert close <= 3.0 and gray_levels(swapped, on_cpu["image"], cfg_cpu.image).mean() > 3 * close


def test_a_batch_of_only_corrupt_samples():
    spec = ImageSpec(32)
    batch = collate_for_device([], [], [], [], ["bad"], StreamConfig(spec), 14)
    out = augment_batch(batch["image"], batch["augment"], spec)
    assert out.shape == (0, 3, 32, 32) and batch["labels_raw"].shape == (0, 14)
