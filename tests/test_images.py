"""Image reading (PNG 8/16-bit, JPEG, DICOM MONOCHROME1/2 with window and rescale), resize, encode."""

from __future__ import annotations

import io

import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.uid import JPEGLSLossless, SecondaryCaptureImageStorage, generate_uid

from cxrdist.data.ingest.images import (
    IMAGE_SUFFIXES,
    decode_image,
    encode_image,
    load_for_shard,
    read_dicom,
    read_grayscale,
    resize_max,
    to_uint8,
)
from cxrdist.errors import BadImage, UserError

BONE = (slice(20, 40), slice(30, 50))  # rows, columns of the bright "bone" square


def phantom(background: int, soft: int, bone: int, dtype=np.uint16, shape=(64, 80)) -> np.ndarray:
    """Air background, a soft-tissue band, and a bone square (physical attenuation order)."""
    img = np.full(shape, background, dtype=dtype)
    img[10:54, :] = soft
    img[BONE] = bone
    return img


def assert_bone_brightest(img: np.ndarray, lossy: bool = False) -> None:
    assert img.dtype == np.uint8 and img.ndim == 2
    bone = img[BONE]
    if not lossy:  # JPEG ringing at the square's edges may overshoot
        assert bone.min() == img.max()
    assert bone.mean() > img[12:18, :].mean() > img[:5, :].mean()  # bone > soft tissue > air


def write_dicom(path, pixels, photometric, **attrs) -> None:
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.SOPClassUID = SecondaryCaptureImageStorage
    ds.Modality = "DX"
    ds.set_pixel_data(pixels, photometric_interpretation=photometric, bits_stored=attrs.pop("bits_stored", 12))
    for key, value in attrs.items():
        setattr(ds, key, value)
    ds.save_as(path, enforce_file_format=True)


def test_suffixes():
    assert IMAGE_SUFFIXES == {".png", ".jpg", ".jpeg", ".dcm", ".dicom"}


def test_png_8bit_is_read_exactly(tmp_path):
    img = phantom(10, 90, 230, dtype=np.uint8)
    Image.fromarray(img).save(tmp_path / "a.png")
    out = read_grayscale(tmp_path / "a.png")
    np.testing.assert_array_equal(out, img)


def test_png_16bit_scaled_by_bit_depth(tmp_path):
    img = phantom(100, 1500, 4000)  # 12-bit data in a 16-bit PNG
    Image.fromarray(img).save(tmp_path / "a.png")
    assert Image.open(tmp_path / "a.png").mode in ("I;16", "I")
    out = read_grayscale(tmp_path / "a.png")
    assert_bone_brightest(out)
    expected = np.rint(img.astype(np.float64) * 255 / 4095).astype(np.uint8)
    np.testing.assert_array_equal(out, expected)


def test_to_uint8_policy():
    assert to_uint8(np.array([[0, 65535]], dtype=np.uint16)).tolist() == [[0, 255]]
    assert to_uint8(np.array([[0, 1023]], dtype=np.uint16)).tolist() == [[0, 255]]
    assert to_uint8(np.array([[0, 256]], dtype=np.int32)).tolist() == [[0, 64]]  # 10-bit: 256/1023*255
    assert to_uint8(np.array([[-1.0, 0.0, 1.0]])).tolist() == [[0, 128, 255]]
    assert to_uint8(np.array([[-5, 5]], dtype=np.int16)).tolist() == [[0, 255]]
    assert to_uint8(np.full((2, 2), 7.5)).tolist() == [[0, 0], [0, 0]]


def test_rgb_jpeg_becomes_grayscale(tmp_path):
    gray = phantom(20, 100, 240, dtype=np.uint8)
    Image.fromarray(gray).convert("RGB").save(tmp_path / "a.jpg", quality=95)
    out = read_grayscale(tmp_path / "a.jpg")
    assert out.shape == gray.shape
    assert_bone_brightest(out, lossy=True)
    assert np.abs(out.astype(int) - gray).max() <= 12  # JPEG loss only


@pytest.mark.parametrize("photometric", ["MONOCHROME2", "MONOCHROME1"])
def test_dicom_bone_is_bright_for_both_photometric_interpretations(tmp_path, photometric):
    # 12-bit stored values; in MONOCHROME1 high values display dark, so bone is stored LOW.
    stored = phantom(300, 2000, 3800) if photometric == "MONOCHROME2" else phantom(3800, 2000, 300)
    write_dicom(tmp_path / "x.dcm", stored, photometric, RescaleSlope=1, RescaleIntercept=0)
    assert_bone_brightest(read_grayscale(tmp_path / "x.dcm"))


def test_dicom_window_and_rescale_match_hand_computation(tmp_path):
    # modality value = 2 * stored - 1000; LINEAR window C=1000, W=2000 (PS3.3 C.11.2.1.2):
    #   v <= C - 0.5 - (W-1)/2 = 0 -> 0;  v > C - 0.5 + (W-1)/2 = 1999 -> 255;
    #   else ((v - 999.5) / 1999 + 0.5) * 255
    stored = np.array([[500, 750, 1000, 1250], [2000, 3000, 4095, 0]], dtype=np.uint16)
    modality = 2.0 * stored - 1000
    expected = np.clip(np.rint(((modality - 999.5) / 1999 + 0.5) * 255), 0, 255).astype(np.uint8)
    assert expected.tolist() == [[0, 64, 128, 191], [255, 255, 255, 0]]
    attrs = dict(RescaleSlope=2, RescaleIntercept=-1000, WindowCenter=1000, WindowWidth=2000)

    write_dicom(tmp_path / "m2.dcm", stored, "MONOCHROME2", **attrs)
    np.testing.assert_array_equal(read_grayscale(tmp_path / "m2.dcm"), expected)
    write_dicom(tmp_path / "m1.dcm", stored, "MONOCHROME1", **attrs)
    np.testing.assert_array_equal(read_grayscale(tmp_path / "m1.dcm"), 255 - expected)

    # no saturated pixels: the window edges, not the data's min/max, define 0 and 255
    inside = np.array([[750, 1000], [1250, 1000]], dtype=np.uint16)
    write_dicom(tmp_path / "inside.dcm", inside, "MONOCHROME2", **attrs)
    np.testing.assert_array_equal(read_grayscale(tmp_path / "inside.dcm"), [[64, 128], [191, 128]])


def test_dicom_without_window_uses_data_range_and_accepts_a_dataset(tmp_path):
    stored = np.array([[100, 200], [400, 500]], dtype=np.uint16)
    write_dicom(tmp_path / "x.dicom", stored, "MONOCHROME2")
    ds = pydicom.dcmread(tmp_path / "x.dicom")
    np.testing.assert_array_equal(read_dicom(ds), [[0, 64], [191, 255]])


def test_dicom_voi_lut_sequence_output_range(tmp_path):
    stored = np.array([[0, 1, 2, 3]], dtype=np.uint16)
    lut = Dataset()
    lut.LUTDescriptor = [4, 0, 16]
    lut.add_new("LUTData", "US", [1000, 1500, 2500, 3000])
    write_dicom(tmp_path / "lut.dcm", stored, "MONOCHROME2", bits_stored=16, VOILUTSequence=[lut])
    # the LUT's output range [1000, 3000] maps to [0, 255]
    np.testing.assert_array_equal(read_grayscale(tmp_path / "lut.dcm"), [[0, 64, 191, 255]])


def test_dicom_detected_by_preamble_without_suffix(tmp_path):
    write_dicom(tmp_path / "IM0001", phantom(300, 2000, 3800), "MONOCHROME2")
    assert_bone_brightest(read_grayscale(tmp_path / "IM0001"))


def test_compressed_dicom_without_handler_names_the_missing_handler(tmp_path):
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = JPEGLSLossless
    ds.SOPClassUID = SecondaryCaptureImageStorage
    ds.SOPInstanceUID = generate_uid()
    ds.Rows, ds.Columns, ds.SamplesPerPixel = 8, 8, 1
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.PixelData = encapsulate([b"\xff\xd8" + b"\0" * 64])
    ds.save_as(tmp_path / "jls.dcm", enforce_file_format=True)
    with pytest.raises(BadImage, match=r"jls\.dcm: no pixel data handler.*JPEG-LS"):
        read_grayscale(tmp_path / "jls.dcm")


@pytest.mark.parametrize("suffix", [".png", ".jpg", ".dcm"])
def test_corrupt_and_truncated_files_raise_bad_image(tmp_path, suffix):
    good = tmp_path / f"good{suffix}"
    if suffix == ".dcm":
        write_dicom(good, phantom(300, 2000, 3800, shape=(256, 256)), "MONOCHROME2")
    else:
        noise = np.random.default_rng(0).integers(0, 256, (256, 256), dtype=np.uint8)
        Image.fromarray(noise).save(good)
    data = good.read_bytes()
    truncated = tmp_path / f"truncated{suffix}"
    truncated.write_bytes(data[: len(data) // 2])
    garbage = tmp_path / f"garbage{suffix}"
    garbage.write_bytes(b"this is not an image" * 20)
    for bad in (truncated, garbage):
        with pytest.raises(BadImage) as info:
            read_grayscale(bad)
        message = str(info.value)
        assert message.startswith(f"{bad}: ") and "\n" not in message
        assert isinstance(info.value, UserError)


def test_missing_file_raises_bad_image(tmp_path):
    with pytest.raises(BadImage, match="no such file"):
        read_grayscale(tmp_path / "nope.png")


@pytest.mark.parametrize(("shape", "expected"), [((1000, 600), (512, 307)), ((300, 2000), (77, 512))])
def test_resize_keeps_aspect_and_long_side(shape, expected):
    img = np.random.default_rng(0).integers(0, 256, shape, dtype=np.uint8)
    out = resize_max(img, 512)
    assert out.shape == expected and out.dtype == np.uint8
    short = min(shape) * 512 / max(shape)
    assert abs(min(out.shape) - short) <= 0.5


def test_resize_never_upscales():
    img = np.zeros((100, 50), dtype=np.uint8)
    assert resize_max(img, 512) is img


def test_resize_preserves_content():
    img = np.zeros((800, 800), dtype=np.uint8)
    img[200:600, 200:600] = 200
    out = resize_max(img, 200)
    assert out[100, 100] == 200 and out[10, 10] == 0


def test_load_for_shard_large_jpeg_uses_reduced_decode_but_same_result(tmp_path):
    img = phantom(20, 100, 240, dtype=np.uint8, shape=(64, 80))
    big = np.kron(img, np.ones((40, 40), dtype=np.uint8))  # 2560 x 3200
    Image.fromarray(big).save(tmp_path / "big.jpg", quality=95)
    out = load_for_shard(tmp_path / "big.jpg", 256)
    reference = resize_max(read_grayscale(tmp_path / "big.jpg"), 256)
    assert out.shape == reference.shape == (205, 256)
    assert np.abs(out.astype(int) - reference).max() <= 3


@pytest.mark.parametrize("fmt", ["png", "jpg"])
def test_encode_is_deterministic_and_decodes(fmt):
    img = np.random.default_rng(1).integers(0, 256, (61, 47), dtype=np.uint8)
    data = encode_image(img, fmt)
    assert data == encode_image(img.copy(), fmt)
    out = decode_image(data)
    assert out.shape == img.shape and out.dtype == np.uint8
    if fmt == "png":
        np.testing.assert_array_equal(out, img)
    else:
        assert Image.open(io.BytesIO(data)).format == "JPEG"


def test_encode_rejects_unknown_format():
    with pytest.raises(ValueError, match="png"):
        encode_image(np.zeros((4, 4), np.uint8), "webp")
