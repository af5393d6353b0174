"""Reading radiographs (PNG, JPEG, DICOM) as 8-bit grayscale, resizing, and encoding for shards.

Every reader returns a 2-D uint8 array in display orientation: bone is bright, air is dark,
whatever the file's photometric interpretation.

Bit-depth policy for integer images deeper than 8 bits (16-bit PNG, 16-bit TIFF-like data),
see `to_uint8`: the value range is taken from the smallest standard bit depth (8, 10, 12, 14,
16, ...) that holds the image's maximum, so a 12-bit radiograph stored in a 16-bit PNG uses the
full 8-bit range and absolute brightness is kept (no per-image contrast stretch). Floats and
signed data are min-max scaled. DICOM is different: it carries its own display transform
(modality LUT, VOI LUT or window), which `read_dicom` applies.
"""

from __future__ import annotations

import io
import warnings
from contextlib import contextmanager
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from cxrdist.errors import BadImage

IMAGE_SUFFIXES: frozenset[str] = frozenset({".png", ".jpg", ".jpeg", ".dcm", ".dicom"})
DICOM_SUFFIXES: frozenset[str] = frozenset({".dcm", ".dicom"})
_DICOM_MAGIC_OFFSET = 128
_STANDARD_BIT_DEPTHS = (8, 10, 12, 14, 16, 24, 32)
# A JPEG is decoded at a reduced DCT scale (1/2, 1/4, 1/8) only while the decoded image stays at
# least this many times larger than the target, so the final LANCZOS step still antialiases.
_DRAFT_MARGIN = 2
MISSING_FILE = "no such file"
# Real radiographs are at most ~4,300 x 4,300 (18.5 Mpx); anything far larger is refused before decoding,
# so that a small file (a 13,000 x 13,000 PNG compresses to 328 KB) cannot take gigabytes in every worker.
MAX_PIXELS = 64_000_000


def _one_line(error: BaseException) -> str:
    text = " ".join(str(error).split())
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


def is_dicom(path: Path) -> bool:
    """True for a .dcm/.dicom name or a file with the 'DICM' preamble marker."""
    if path.suffix.lower() in DICOM_SUFFIXES:
        return True
    try:
        with open(path, "rb") as f:
            head = f.read(_DICOM_MAGIC_OFFSET + 4)
    except OSError:
        return False
    return head[_DICOM_MAGIC_OFFSET:] == b"DICM"


def read_grayscale(path: Path) -> np.ndarray:
    """Any supported image file -> 2-D uint8 (bone bright). Raises BadImage("PATH: why")."""
    return _read(Path(path), max_size=None)


def load_for_shard(path: Path, max_size: int) -> np.ndarray:
    """read_grayscale + resize_max; large JPEGs are decoded at a reduced DCT scale first."""
    return resize_max(_read(Path(path), max_size=max_size), max_size)


def _read(path: Path, max_size: int | None) -> np.ndarray:
    if not path.is_file():
        raise BadImage(f"{path}: {MISSING_FILE}")
    if is_dicom(path):
        return read_dicom(path)
    try:
        with quiet_bomb_warning(), Image.open(path) as image:
            check_pixels(path, *image.size)
            if max_size is not None and image.format == "JPEG":
                _draft_for(image, max_size)
            image.load()
            return _pil_to_gray(ImageOps.exif_transpose(image))
    except BadImage:
        raise
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        raise BadImage(f"{path}: cannot decode image ({_one_line(e)})") from e


@contextmanager
def quiet_bomb_warning():
    """PIL warns on opening a large image; `check_pixels` refuses it right after, so the warning is noise."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        yield


def check_pixels(where, width: int, height: int, frames: int = 1) -> None:
    if int(width) * int(height) * max(int(frames), 1) > MAX_PIXELS:
        size = f"{width} x {height} pixels" + (f" x {frames} frames" if frames > 1 else "")
        raise BadImage(f"{where}: {size} is more than the limit of {MAX_PIXELS:,} (not a radiograph?)")


def _draft_for(image: Image.Image, max_size: int) -> None:
    width, height = image.size
    scale = max_size * _DRAFT_MARGIN / max(width, height)
    if scale < 1:
        image.draft("L", (max(1, int(width * scale)), max(1, int(height * scale))))


def _pil_to_gray(image: Image.Image) -> np.ndarray:
    if image.mode == "L":
        return np.asarray(image, dtype=np.uint8).copy()
    if image.mode.startswith("I") or image.mode == "F":
        return to_uint8(np.asarray(image))
    return np.asarray(image.convert("L"), dtype=np.uint8).copy()


def to_uint8(arr) -> np.ndarray:
    """A 2-D numeric array -> uint8.

    uint8: unchanged. Non-negative integers: divided by 2**b - 1 for the smallest b in
    (8, 10, 12, 14, 16, 24, 32) holding the maximum (see the module docstring). Signed data with
    negative values and floats: min-max scaled to 0..255 (a constant image becomes all zeros).
    """
    arr = np.asarray(arr)
    if arr.dtype == np.uint8:
        return arr
    if arr.dtype == np.bool_:
        return arr.astype(np.uint8) * 255
    if np.issubdtype(arr.dtype, np.integer) and arr.size and arr.min() >= 0:
        peak = int(arr.max())
        bits = next((b for b in _STANDARD_BIT_DEPTHS if peak < 2**b), 64)
        return _scale_to_uint8(arr, 0.0, float(2**bits - 1))
    values = arr.astype(np.float64)
    finite = values[np.isfinite(values)]
    if finite.size == 0:
        return np.zeros(arr.shape, dtype=np.uint8)
    return _scale_to_uint8(np.nan_to_num(values, nan=finite.min()), float(finite.min()), float(finite.max()))


def _scale_to_uint8(arr: np.ndarray, low: float, high: float) -> np.ndarray:
    """Linear map of [low, high] onto [0, 255], rounded and clipped."""
    if high <= low:
        return np.zeros(arr.shape, dtype=np.uint8)
    scaled = (arr.astype(np.float64) - low) * (255.0 / (high - low))
    return np.clip(np.rint(scaled), 0, 255).astype(np.uint8)


def read_dicom(path_or_dataset) -> np.ndarray:
    """DICOM -> 2-D uint8, bone bright.

    Order: modality LUT (RescaleSlope/Intercept or a Modality LUT Sequence), then the VOI LUT
    Sequence or the first WindowCenter/WindowWidth (pydicom's apply_voi_lut), then scaling to
    0..255 over the VOI output range (the window edges map to 0 and 255; without a VOI
    transform, the data min/max), then MONOCHROME1 inversion.
    """
    import pydicom
    from pydicom.dataset import Dataset

    if isinstance(path_or_dataset, Dataset):
        ds = path_or_dataset
        where = str(getattr(ds, "filename", None) or "<DICOM dataset>")
    else:
        where = str(path_or_dataset)
        if not Path(path_or_dataset).is_file():
            raise BadImage(f"{where}: no such file")
        try:
            ds = pydicom.dcmread(path_or_dataset)
        except Exception as e:  # pydicom raises many types on a corrupt or truncated file
            raise BadImage(f"{where}: not a readable DICOM file ({_one_line(e)})") from e
    try:
        return _dicom_to_uint8(ds, where)
    except BadImage:
        raise
    except Exception as e:
        raise BadImage(f"{where}: cannot decode DICOM pixel data ({_one_line(e)})") from e


def _dicom_to_uint8(ds, where: str) -> np.ndarray:
    from pydicom.pixels import apply_modality_lut, apply_voi_lut

    if "PixelData" not in ds:
        raise BadImage(f"{where}: DICOM file has no pixel data")
    check_pixels(where, ds.get("Columns", 0), ds.get("Rows", 0), ds.get("NumberOfFrames", 1) or 1)
    pixels = _dicom_pixels(ds, where)
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).upper()
    if photometric not in ("MONOCHROME1", "MONOCHROME2"):
        if pixels.ndim == 3 and pixels.shape[-1] == 3:
            return np.asarray(Image.fromarray(to_uint8(pixels)).convert("L"))
        raise BadImage(f"{where}: unsupported DICOM PhotometricInterpretation {photometric!r}")
    if pixels.ndim != 2:
        raise BadImage(f"{where}: expected one 2-D grayscale frame, got pixel array of shape {pixels.shape}")
    values = apply_voi_lut(apply_modality_lut(pixels, ds), ds)
    output_range = _voi_output_range(ds)
    if output_range is None:
        output_range = (float(values.min()), float(values.max()))
    image = _scale_to_uint8(values, *output_range)
    return 255 - image if photometric == "MONOCHROME1" else image


def _dicom_pixels(ds, where: str) -> np.ndarray:
    try:
        return ds.pixel_array
    except (NotImplementedError, RuntimeError) as e:
        syntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
        if syntax is None or not syntax.is_compressed:
            raise
        if "missing dependencies" in str(e) or isinstance(e, NotImplementedError):
            raise BadImage(
                f"{where}: no pixel data handler installed for DICOM transfer syntax "
                f"{syntax.name!r} ({syntax}); install one that pydicom supports for it "
                f"(e.g. pylibjpeg + pylibjpeg-libjpeg / pylibjpeg-openjpeg, or python-gdcm): {_one_line(e)}"
            ) from e
        raise BadImage(f"{where}: corrupt {syntax.name!r} compressed pixel data ({_one_line(e)})") from e


def _voi_output_range(ds) -> tuple[float, float] | None:
    """Output range of the VOI transform apply_voi_lut will use, or None if there is none.

    Found by pushing the transform's whole input domain (LUT) or points far outside the window
    (windowing, which saturates there) through pydicom itself, so pydicom's conventions hold.
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


def resize_max(img: np.ndarray, max_size: int) -> np.ndarray:
    """Shrink so the long side is at most max_size, keeping the aspect ratio; never upscales.

    LANCZOS with reducing_gap=3.0 (PIL first box-reduces by an integer factor while the image stays
    3x the target, then resamples: indistinguishable from plain LANCZOS, several times faster).
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


def encode_image(img: np.ndarray, fmt: str, quality: int = 95) -> bytes:
    """2-D uint8 -> PNG or JPEG bytes; the same input always gives the same bytes (no metadata)."""
    if img.dtype != np.uint8 or img.ndim != 2:
        raise ValueError(f"encode_image expects a 2-D uint8 array, got {img.dtype} {img.shape}")
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


def decode_image(data: bytes) -> np.ndarray:
    """PNG/JPEG bytes -> 2-D uint8."""
    try:
        with quiet_bomb_warning(), Image.open(io.BytesIO(data)) as image:
            check_pixels(f"<{len(data)} bytes>", *image.size)
            image.load()
            return _pil_to_gray(image)
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as e:
        raise BadImage(f"<{len(data)} bytes>: cannot decode image ({_one_line(e)})") from e
