"""Reference preprocessing of cxrdist models: a radiograph file (PNG, JPEG, DICOM) -> the float32 model input.

Standalone on purpose: numpy and Pillow only (pydicom too, imported when a DICOM file is read), nothing of
cxrdist. It is the one implementation of these steps: cxrdist reads images for `prepare` through it
(data/ingest/images.py), resizes for evaluation through it (data/transforms.py eval_transform) and `cxrdist
predict` calls it; `cxrdist export` copies this file beside the exported model, and the sidecar's
preprocessing "arguments" are the keyword arguments of `model_input`:

    import json, numpy as np, onnxruntime, preprocess
    sidecar = json.load(open("cxr.onnx.json"))
    batch = np.stack([preprocess.model_input(p, **sidecar["preprocessing"]["arguments"]) for p in ["a.dcm", "b.png"]])
    probabilities = onnxruntime.InferenceSession("cxr.onnx").run(None, {sidecar["input"]["name"]: batch})[0]

The steps, in order (`model_input`):
1. read as 8-bit grayscale, bone bright (`read_grayscale`): PNG/JPEG through Pillow (EXIF orientation applied;
   a JPEG more than twice `max_size` decoded at 1/2, 1/4 or 1/8 scale by libjpeg); integer images deeper
   than 8 bits divided by 2**b - 1 for the smallest standard depth b holding their maximum (`to_uint8`);
   DICOM through its modality LUT, then its VOI LUT or first window, scaled over the VOI output range,
   MONOCHROME1 inverted (`read_dicom`);
2. long side shrunk to at most `max_size` (LANCZOS), then stored as `stored_format` (JPEG quality `quality`
   or PNG) and decoded again, as `cxrdist prepare` stored the training images (`stored_image`);
3. that stored image decoded (a JPEG at least twice `draft_side` on both sides at 1/2, 1/4 or 1/8 scale, never
   below `draft_side`: the side training decoded it at; `size` when not given), the whole image resized to
   size x size with `interpolation` by Pillow (`resize_square`; antialiased when shrinking), optionally mirrored;
4. x / 255, then (x - mean) / std per channel, as x * (1 / (255 std)) + (-mean / std) in float32 (`normalise`):
   (len(mean), size, size).
Pixel results depend on Pillow's resampling and libjpeg's coding: the sidecar records the versions it was made with.
"""

from __future__ import annotations

import io
import warnings
from contextlib import contextmanager
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".dcm", ".dicom"})
DICOM_SUFFIXES = frozenset({".dcm", ".dicom"})
STORED_FORMATS = ("jpg", "png")
INTERPOLATIONS = {"bilinear": Image.Resampling.BILINEAR, "bicubic": Image.Resampling.BICUBIC, "nearest": Image.Resampling.NEAREST}
# How the square resize is computed. "pillow": this module. "torchvision": torchvision's antialiased resize of
# the uint8 tensor, what cxrdist used before; models whose card records it keep it (needs torch + torchvision).
RESAMPLERS = ("pillow", "torchvision")
MISSING_FILE = "no such file"
# Real radiographs are at most ~4,300 x 4,300 (18.5 Mpx); anything far larger is refused before decoding,
# so that a small file (a 13,000 x 13,000 PNG compresses to 328 KB) cannot take gigabytes.
MAX_PIXELS = 64_000_000
_DICOM_MAGIC_OFFSET = 128
_STANDARD_BIT_DEPTHS = (8, 10, 12, 14, 16, 24, 32)
# A source JPEG is decoded at a reduced DCT scale only while the decoded image stays at least this many
# times larger than max_size, so the LANCZOS step still antialiases.
_DRAFT_MARGIN = 2


class UnreadableImage(ValueError):
    """A file or byte string that is not a readable radiograph; the message is 'WHERE: why'."""


def model_input(path, *, size: int, mean, std, interpolation: str = "bilinear", resampler: str = "pillow",
                stored_format: str = "jpg", max_size: int = 512, quality: int = 95, hflip: bool = False,
                draft_side: int | None = None) -> np.ndarray:
    """A radiograph file -> the model's float32 input (len(mean), size, size): steps 1-4 of the module docstring."""
    stored = stored_image(path, stored_format, max_size, quality)
    return stored_to_input(stored, size, mean, std, interpolation, resampler, hflip, draft_side=draft_side)


def stored_image(path, stored_format: str, max_size: int, quality: int = 95) -> bytes:
    """Steps 1-2: the bytes `cxrdist prepare` would have written to a shard for this file."""
    return encode(load_resized(path, max_size), stored_format, quality)


def stored_to_input(data: bytes, size: int, mean, std, interpolation: str = "bilinear", resampler: str = "pillow",
                    hflip: bool = False, *, draft_side: int | None = None) -> np.ndarray:
    """Steps 3-4: stored image bytes -> the float32 model input. Without `draft_side` (a sidecar written before it was
    recorded) the JPEG draft is at `size`, as those models were evaluated."""
    pixels = resize_square(decode(data, draft_side or size), size, interpolation, resampler)
    return normalise(pixels[:, ::-1] if hflip else pixels, mean, std)


# ---------------------------------------------------------------- step 1: reading


def is_dicom(path) -> bool:
    """True for a .dcm/.dicom name or a file with the 'DICM' preamble marker."""
    path = Path(path)
    if path.suffix.lower() in DICOM_SUFFIXES:
        return True
    try:
        with open(path, "rb") as f:
            head = f.read(_DICOM_MAGIC_OFFSET + 4)
    except OSError:
        return False
    return head[_DICOM_MAGIC_OFFSET:] == b"DICM"


def read_grayscale(path, max_size: int | None = None) -> np.ndarray:
    """Any supported image file -> 2-D uint8 (bone bright). With `max_size`, a large JPEG is decoded at a reduced
    DCT scale that keeps it at least twice `max_size` (what `load_resized` shrinks it to)."""
    path = Path(path)
    if not path.is_file():
        raise UnreadableImage(f"{path}: {MISSING_FILE}")
    if is_dicom(path):
        return read_dicom(path)
    try:
        with quiet_bomb_warning(), Image.open(path) as image:
            check_pixels(path, *image.size)
            if max_size is not None and image.format == "JPEG":
                _draft_for(image, max_size)
            image.load()
            return pil_to_gray(ImageOps.exif_transpose(image))
    except UnreadableImage:
        raise
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        raise UnreadableImage(f"{path}: cannot decode image ({one_line(e)})") from e


def load_resized(path, max_size: int) -> np.ndarray:
    """read_grayscale + resize_max."""
    return resize_max(read_grayscale(path, max_size=max_size), max_size)


def one_line(error: BaseException) -> str:
    text = " ".join(str(error).split())
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


@contextmanager
def quiet_bomb_warning():
    """PIL warns on opening a large image; `check_pixels` refuses it right after, so the warning is noise."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        yield


def check_pixels(where, width: int, height: int, frames: int = 1) -> None:
    if int(width) * int(height) * max(int(frames), 1) > MAX_PIXELS:
        size = f"{width} x {height} pixels" + (f" x {frames} frames" if frames > 1 else "")
        raise UnreadableImage(f"{where}: {size} is more than the limit of {MAX_PIXELS:,} (not a radiograph?)")


def _draft_for(image: Image.Image, max_size: int) -> None:
    width, height = image.size
    scale = max_size * _DRAFT_MARGIN / max(width, height)
    if scale < 1:
        image.draft("L", (max(1, int(width * scale)), max(1, int(height * scale))))


def pil_to_gray(image: Image.Image) -> np.ndarray:
    if image.mode == "L":
        return np.asarray(image, dtype=np.uint8).copy()
    if image.mode.startswith("I") or image.mode == "F":
        return to_uint8(np.asarray(image))
    return np.asarray(image.convert("L"), dtype=np.uint8).copy()


def to_uint8(arr) -> np.ndarray:
    """A 2-D numeric array -> uint8.

    uint8: unchanged. Non-negative integers: divided by 2**b - 1 for the smallest b in (8, 10, 12, 14, 16, 24, 32)
    holding the maximum, so a 12-bit radiograph in a 16-bit PNG uses the full 8-bit range and absolute brightness
    is kept (no per-image contrast stretch). Signed data with negative values and floats: min-max scaled to
    0..255 (a constant image becomes all zeros).
    """
    arr = np.asarray(arr)
    if arr.dtype == np.uint8:
        return arr
    if arr.dtype == np.bool_:
        return arr.astype(np.uint8) * 255
    if np.issubdtype(arr.dtype, np.integer) and arr.size and arr.min() >= 0:
        peak = int(arr.max())
        bits = next((b for b in _STANDARD_BIT_DEPTHS if peak < 2**b), 64)
        return scale_to_uint8(arr, 0.0, float(2**bits - 1))
    values = arr.astype(np.float64)
    finite = values[np.isfinite(values)]
    if finite.size == 0:
        return np.zeros(arr.shape, dtype=np.uint8)
    return scale_to_uint8(np.nan_to_num(values, nan=finite.min()), float(finite.min()), float(finite.max()))


def scale_to_uint8(arr: np.ndarray, low: float, high: float) -> np.ndarray:
    """Linear map of [low, high] onto [0, 255], rounded and clipped."""
    if high <= low:
        return np.zeros(arr.shape, dtype=np.uint8)
    scaled = (arr.astype(np.float64) - low) * (255.0 / (high - low))
    return np.clip(np.rint(scaled), 0, 255).astype(np.uint8)


def read_dicom(path_or_dataset) -> np.ndarray:
    """DICOM -> 2-D uint8, bone bright.

    Order: modality LUT (RescaleSlope/Intercept or a Modality LUT Sequence), then the VOI LUT Sequence or the
    first WindowCenter/WindowWidth (pydicom's apply_voi_lut), then scaling to 0..255 over the VOI output range
    (the window edges map to 0 and 255; without a VOI transform, the data min/max), then MONOCHROME1 inversion.
    """
    import pydicom
    from pydicom.dataset import Dataset

    if isinstance(path_or_dataset, Dataset):
        ds = path_or_dataset
        where = str(getattr(ds, "filename", None) or "<DICOM dataset>")
    else:
        where = str(path_or_dataset)
        if not Path(path_or_dataset).is_file():
            raise UnreadableImage(f"{where}: {MISSING_FILE}")
        try:
            ds = pydicom.dcmread(path_or_dataset)
        except Exception as e:  # pydicom raises many types on a corrupt or truncated file
            raise UnreadableImage(f"{where}: not a readable DICOM file ({one_line(e)})") from e
    try:
        return _dicom_to_uint8(ds, where)
    except UnreadableImage:
        raise
    except Exception as e:
        raise UnreadableImage(f"{where}: cannot decode DICOM pixel data ({one_line(e)})") from e


def _dicom_to_uint8(ds, where: str) -> np.ndarray:
    from pydicom.pixels import apply_modality_lut, apply_voi_lut

    if "PixelData" not in ds:
        raise UnreadableImage(f"{where}: DICOM file has no pixel data")
    check_pixels(where, ds.get("Columns", 0), ds.get("Rows", 0), ds.get("NumberOfFrames", 1) or 1)
    pixels = _dicom_pixels(ds, where)
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).upper()
    if photometric not in ("MONOCHROME1", "MONOCHROME2"):
        if pixels.ndim == 3 and pixels.shape[-1] == 3:
            return np.asarray(Image.fromarray(to_uint8(pixels)).convert("L"))
        raise UnreadableImage(f"{where}: unsupported DICOM PhotometricInterpretation {photometric!r}")
    if pixels.ndim != 2:
        raise UnreadableImage(f"{where}: expected one 2-D grayscale frame, got pixel array of shape {pixels.shape}")
    values = apply_voi_lut(apply_modality_lut(pixels, ds), ds)
    output_range = _voi_output_range(ds)
    if output_range is None:
        output_range = (float(values.min()), float(values.max()))
    image = scale_to_uint8(values, *output_range)
    return 255 - image if photometric == "MONOCHROME1" else image


def _dicom_pixels(ds, where: str) -> np.ndarray:
    try:
        return ds.pixel_array
    except (NotImplementedError, RuntimeError) as e:
        syntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
        if syntax is None or not syntax.is_compressed:
            raise
        if "missing dependencies" in str(e) or isinstance(e, NotImplementedError):
            raise UnreadableImage(
                f"{where}: no pixel data handler installed for DICOM transfer syntax "
                f"{syntax.name!r} ({syntax}); install one that pydicom supports for it "
                f"(e.g. pylibjpeg + pylibjpeg-libjpeg / pylibjpeg-openjpeg, or python-gdcm): {one_line(e)}"
            ) from e
        raise UnreadableImage(f"{where}: corrupt {syntax.name!r} compressed pixel data ({one_line(e)})") from e


def _voi_output_range(ds) -> tuple[float, float] | None:
    """Output range of the VOI transform apply_voi_lut will use, or None if there is none.

    Found by pushing the transform's whole input domain (LUT) or points far outside the window (windowing,
    which saturates there) through pydicom itself, so pydicom's conventions hold.
    """
    from pydicom.pixels import apply_voi_lut

    lut_items = ds.get("VOILUTSequence")
    if lut_items and lut_items[0].get("LUTDescriptor") is not None and lut_items[0].get("LUTData") is not None:
        entries, first, _ = lut_items[0].LUTDescriptor
        probe = np.arange(first, first + (entries or 2**16), dtype=np.int64)
    elif ds.get("WindowCenter") is not None and ds.get("WindowWidth") is not None:
        center, width = (_first_value(ds["WindowCenter"]), _first_value(ds["WindowWidth"]))
        reach = 20 * abs(width) + 1
        probe = np.array([center - reach, center + reach], dtype=np.float64)
    else:
        return None
    out = apply_voi_lut(probe, ds)
    return float(out.min()), float(out.max())


def _first_value(element) -> float:
    return float(element.value[0] if element.VM > 1 else element.value)


# ---------------------------------------------------------------- step 2: storing as prepare does


def resize_max(img: np.ndarray, max_size: int) -> np.ndarray:
    """Shrink so the long side is at most max_size, keeping the aspect ratio; never upscales.

    LANCZOS with reducing_gap=3.0 (Pillow first box-reduces by an integer factor while the image stays 3x the
    target, then resamples: indistinguishable from plain LANCZOS, several times faster).
    """
    if max_size < 1:
        raise ValueError(f"max_size must be >= 1, got {max_size}")
    height, width = img.shape[:2]
    long_side = max(height, width)
    if long_side <= max_size:
        return img
    scale = max_size / long_side
    if width >= height:
        size = (max_size, max(1, round(height * scale)))
    else:
        size = (max(1, round(width * scale)), max_size)
    resized = Image.fromarray(img).resize(size, Image.Resampling.LANCZOS, reducing_gap=3.0)
    return np.asarray(resized)


def encode(img: np.ndarray, fmt: str, quality: int = 95) -> bytes:
    """2-D uint8 -> PNG or JPEG bytes; the same input always gives the same bytes (no metadata)."""
    if img.dtype != np.uint8 or img.ndim != 2:
        raise ValueError(f"encode expects a 2-D uint8 array, got {img.dtype} {img.shape}")
    buffer = io.BytesIO()
    image = Image.fromarray(img)
    fmt = fmt.lower()
    if fmt == "png":
        image.save(buffer, format="PNG", optimize=False)
    elif fmt in ("jpg", "jpeg"):
        image.save(buffer, format="JPEG", quality=quality, optimize=False, progressive=False)
    else:
        raise ValueError(f"image format must be 'png' or 'jpg', got {fmt!r}")
    return buffer.getvalue()


# ---------------------------------------------------------------- steps 3-4: the model input


def decode(data: bytes, min_side: int | None = None) -> np.ndarray:
    """8-bit grayscale (H, W) array from stored PNG/JPEG bytes.

    With `min_side`, a JPEG at least twice that size in both dimensions is decoded at 1/2, 1/4 or 1/8 scale
    (libjpeg's DCT scaling, `Image.draft`), never below `min_side`: much faster than a full decode followed by a
    downscale. Raises (OSError, ValueError, ...) for bytes that are not a readable image.
    """
    with Image.open(io.BytesIO(data)) as image:
        if min_side is not None and image.format == "JPEG":
            image.draft("L", (min_side, min_side))
        image.load()
        if image.mode != "L":
            image = image.convert("L")
        return np.array(image)  # writable, so torch.from_numpy does not warn


def resize_square(gray: np.ndarray, size: int, interpolation: str = "bilinear", resampler: str = "pillow") -> np.ndarray:
    """(H, W) uint8 -> (size, size) uint8, the whole image squashed (nothing cropped). Pillow: antialiased when
    shrinking (its filter support widens with the scale), rounded to uint8; "torchvision": the legacy resampler."""
    gray = np.asarray(gray)
    if gray.dtype != np.uint8 or gray.ndim != 2:
        raise ValueError(f"expected a 2-D 8-bit grayscale image, got {gray.dtype} of shape {gray.shape}")
    if interpolation not in INTERPOLATIONS or resampler not in RESAMPLERS:
        raise ValueError(f"interpolation must be one of {', '.join(INTERPOLATIONS)} and resampler one of "
                         f"{', '.join(RESAMPLERS)}, got {interpolation!r}, {resampler!r}")
    if resampler == "torchvision":
        return _torchvision_resize(gray, size, interpolation)
    return np.asarray(Image.fromarray(gray).resize((size, size), INTERPOLATIONS[interpolation]))


def _torchvision_resize(gray: np.ndarray, size: int, interpolation: str) -> np.ndarray:
    import torch
    import torchvision.transforms.v2.functional as F

    mode = getattr(F.InterpolationMode, interpolation.upper())
    tensor = torch.from_numpy(np.ascontiguousarray(gray)).unsqueeze(0)
    return F.resize(tensor, [size, size], interpolation=mode, antialias=True)[0].numpy()


def scale_shift(mean, std) -> tuple[np.ndarray, np.ndarray]:
    """(x/255 - mean) / std == x * scale + shift: float32 (C, 1, 1) arrays, scale = 1 / (255 std), shift = -mean / std."""
    if len(mean) != len(std):
        raise ValueError(f"mean has {len(mean)} values but std has {len(std)}")
    scale = np.array([1.0 / (255.0 * s) for s in std], dtype=np.float32).reshape(-1, 1, 1)
    shift = np.array([-m / s for m, s in zip(mean, std)], dtype=np.float32).reshape(-1, 1, 1)
    return scale, shift


def normalise(pixels: np.ndarray, mean, std) -> np.ndarray:
    """(H, W) pixels in 0..255 -> (len(mean), H, W) float32 x * scale + shift (`scale_shift`), grayscale repeated."""
    scale, shift = scale_shift(mean, std)
    return np.asarray(pixels, dtype=np.float32)[None] * scale + shift
