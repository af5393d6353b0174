"""Reading radiographs (PNG, JPEG, DICOM) as 8-bit grayscale, resizing, and encoding for shards.

The pixel work is `data/preprocess.py`'s, the standalone module `cxrdist export` ships beside a model, so
that prepare, predict and an exported model read a file the same way; this module gives it cxrdist's
error type (`BadImage`, a user error) and the names the stages import.

Every reader returns a 2-D uint8 array in display orientation: bone is bright, air is dark, whatever the
file's photometric interpretation. Integer images deeper than 8 bits (16-bit PNG) are scaled by the
smallest standard bit depth (8, 10, 12, 14, 16, ...) that holds their maximum (`to_uint8`: absolute
brightness kept, no per-image contrast stretch); floats and signed data are min-max scaled. DICOM carries
its own display transform (modality LUT, VOI LUT or window), which `read_dicom` applies.
"""

from __future__ import annotations

import io
from contextlib import contextmanager
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from cxrdist.data import preprocess
from cxrdist.data.preprocess import (  # noqa: F401 - re-exported: the names the stages and tests import
    DICOM_SUFFIXES,
    IMAGE_SUFFIXES,
    MAX_PIXELS,
    MISSING_FILE,
    is_dicom,
    resize_max,
    to_uint8,
)
from cxrdist.errors import BadImage


@contextmanager
def bad_image():
    """preprocess's UnreadableImage ("WHERE: why") as cxrdist's BadImage, the same line."""
    try:
        yield
    except preprocess.UnreadableImage as err:
        raise BadImage(str(err)) from err


def read_grayscale(path: Path) -> np.ndarray:
    """Any supported image file -> 2-D uint8 (bone bright). Raises BadImage("PATH: why")."""
    with bad_image():
        return preprocess.read_grayscale(path)


def load_for_shard(path: Path, max_size: int) -> np.ndarray:
    """read_grayscale + resize_max; large JPEGs are decoded at a reduced DCT scale first."""
    with bad_image():
        return preprocess.load_resized(path, max_size)


def check_pixels(where, width: int, height: int, frames: int = 1) -> None:
    with bad_image():
        preprocess.check_pixels(where, width, height, frames)


def read_dicom(path_or_dataset) -> np.ndarray:
    """DICOM (a path or a pydicom Dataset) -> 2-D uint8, bone bright (see preprocess.read_dicom)."""
    with bad_image():
        return preprocess.read_dicom(path_or_dataset)


def encode_image(img: np.ndarray, fmt: str, quality: int = 95) -> bytes:
    """2-D uint8 -> PNG or JPEG bytes; the same input always gives the same bytes (no metadata)."""
    return preprocess.encode(img, fmt, quality)


def decode_image(data: bytes) -> np.ndarray:
    """PNG/JPEG bytes -> 2-D uint8 at full size (16-bit PNGs scaled as `to_uint8` does)."""
    where = f"<{len(data)} bytes>"
    try:
        with bad_image(), preprocess.quiet_bomb_warning(), Image.open(io.BytesIO(data)) as image:
            preprocess.check_pixels(where, *image.size)
            image.load()
            return preprocess.pil_to_gray(image)
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as e:
        raise BadImage(f"{where}: cannot decode image ({preprocess.one_line(e)})") from e
