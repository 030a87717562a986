"""Image and mask decoding: every odd input gives RGB uint8 or a clear ImageDecodeError."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from raysky.data.image_errors import ImageDecodeError
from raysky.data.images import (
    DEFAULT_MAX_PIXELS,
    decode_image,
    decode_mask,
    encode_png,
    load_mask,
    load_rgb,
)

SAMPLE_ID = "ISIC_0025250"


@pytest.fixture(scope="module")
def jpeg_bytes(sample_dir) -> bytes:
    return (sample_dir / "images" / f"{SAMPLE_ID}.jpg").read_bytes()


@pytest.fixture(scope="module")
def sample_rgb(jpeg_bytes) -> Image.Image:
    return Image.open(io.BytesIO(jpeg_bytes)).convert("RGB")


def _save(image: Image.Image, fmt: str, **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **kwargs)
    return buffer.getvalue()


def _png(width: int, height: int, bit_depth: int, color_type: int, row_bytes: int,
         rows=None) -> bytes:
    """A PNG written by hand, for headers and bit depths Pillow cannot produce cheaply.

    ``rows`` yields the raw scanlines (without filter byte); all-zero rows by default, fed to
    zlib one at a time so that even a huge canvas costs no memory.
    """

    def chunk(tag: bytes, body: bytes) -> bytes:
        crc = zlib.crc32(tag + body) & 0xFFFFFFFF
        return struct.pack(">I", len(body)) + tag + body + struct.pack(">I", crc)

    compressor = zlib.compressobj(9)
    zero_row = b"\x00" * (row_bytes + 1)
    parts = []
    for y in range(height):
        parts.append(compressor.compress(b"\x00" + rows[y] if rows is not None else zero_row))
    parts.append(compressor.flush())
    header = struct.pack(">IIBBBBB", width, height, bit_depth, color_type, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", b"".join(parts))
            + chunk(b"IEND", b""))


def _assert_rgb(image: Image.Image, size: tuple[int, int]) -> np.ndarray:
    assert image.mode == "RGB"
    assert image.size == size
    array = np.asarray(image)
    assert array.dtype == np.uint8 and array.shape == (size[1], size[0], 3)
    return array


# ------------------------------------------------------------------ valid inputs


def test_sample_jpeg_decodes_to_rgb(jpeg_bytes, sample_rgb):
    array = _assert_rgb(decode_image(jpeg_bytes, "sample.jpg"), (200, 150))
    assert np.array_equal(array, np.asarray(sample_rgb))


def test_grayscale_becomes_three_equal_channels(sample_rgb):
    array = _assert_rgb(decode_image(_save(sample_rgb.convert("L"), "JPEG")), (200, 150))
    assert np.array_equal(array[..., 0], array[..., 1])
    assert np.array_equal(array[..., 1], array[..., 2])


def test_cmyk_jpeg_keeps_its_colours(sample_rgb):
    data = _save(sample_rgb.convert("CMYK"), "JPEG", quality=95)
    assert Image.open(io.BytesIO(data)).mode == "CMYK"
    array = _assert_rgb(decode_image(data), (200, 150))
    original = np.asarray(sample_rgb).astype(float)
    assert np.abs(array.astype(float) - original).mean() < 8


def test_rgba_is_composited_onto_white(sample_rgb):
    rgba = sample_rgb.convert("RGBA")
    alpha = np.full((150, 200), 255, np.uint8)
    alpha[:, :50] = 0  # left quarter fully transparent
    rgba.putalpha(Image.fromarray(alpha))
    array = _assert_rgb(decode_image(_save(rgba, "PNG")), (200, 150))
    assert (array[:, :50] == 255).all()
    assert np.array_equal(array[:, 50:], np.asarray(sample_rgb)[:, 50:])


def test_la_and_palette_images(sample_rgb):
    _assert_rgb(decode_image(_save(sample_rgb.convert("LA"), "PNG")), (200, 150))
    palette = sample_rgb.convert("P", palette=Image.Palette.ADAPTIVE, colors=64)
    array = _assert_rgb(decode_image(_save(palette, "PNG")), (200, 150))
    assert np.abs(array.astype(float) - np.asarray(sample_rgb, dtype=float)).mean() < 12


def test_palette_transparency_is_white():
    palette = Image.new("P", (4, 3), 1)
    palette.putpalette([0, 0, 0, 200, 10, 10] + [0] * 762)
    palette.putpixel((0, 0), 0)
    array = _assert_rgb(decode_image(_save(palette, "PNG", transparency=0)), (4, 3))
    assert tuple(array[0, 0]) == (255, 255, 255)
    assert tuple(array[1, 1]) == (200, 10, 10)


def test_bilevel_image():
    image = Image.new("1", (10, 5), 1)
    array = _assert_rgb(decode_image(_save(image, "PNG")), (10, 5))
    assert (array == 255).all()


def test_16bit_grayscale_png_is_scaled_not_clipped():
    values = np.linspace(0, 65535, 64 * 48).reshape(48, 64).astype(np.uint16)
    image = Image.fromarray(values)
    assert image.mode.startswith("I;16")
    array = _assert_rgb(decode_image(_save(image, "PNG")), (64, 48))
    expected = np.rint(values / 65535.0 * 255.0)
    assert np.abs(array[..., 0].astype(float) - expected).max() <= 1
    assert array.min() == 0 and array.max() == 255


def test_16bit_rgb_png():
    rng = np.random.default_rng(0)
    values = rng.integers(0, 65536, size=(12, 16, 3), dtype=np.uint16)
    rows = [values[y].astype(">u2").tobytes() for y in range(12)]
    data = _png(16, 12, bit_depth=16, color_type=2, row_bytes=16 * 6, rows=rows)
    array = _assert_rgb(decode_image(data), (16, 12))
    assert np.abs(array.astype(int) - (values >> 8).astype(int)).max() <= 1


def test_32bit_float_tiff_is_stretched():
    values = np.linspace(0.0, 1.0, 20 * 10, dtype=np.float32).reshape(10, 20)
    array = _assert_rgb(decode_image(_save(Image.fromarray(values, "F"), "TIFF")), (20, 10))
    assert array[0, 0, 0] == 0 and array[-1, -1, 0] == 255


def test_exif_orientation_is_applied(sample_rgb):
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise when displayed
    data = _save(sample_rgb, "JPEG", exif=exif)
    _assert_rgb(decode_image(data), (150, 200))


# ------------------------------------------------------------------ invalid inputs


def _decode_error(data: bytes, source: str = "upload/x.jpg", **kwargs) -> ImageDecodeError:
    with pytest.raises(ImageDecodeError) as info:
        decode_image(data, source, **kwargs)
    assert source in str(info.value)
    assert info.value.source == source
    return info.value


def test_empty_file():
    assert _decode_error(b"").reason == "empty file"


def test_truncated_jpeg(jpeg_bytes):
    error = _decode_error(jpeg_bytes[: len(jpeg_bytes) // 2])
    assert error.reason == "truncated image"
    assert "bytes not processed" in error.detail and error.detail in str(error)


def test_truncated_png(sample_rgb):
    data = _save(sample_rgb, "PNG")
    assert _decode_error(data[: len(data) // 2]).reason in ("truncated image", "corrupt image data")


@pytest.mark.parametrize(
    "data",
    [
        np.random.default_rng(1).integers(0, 256, 4096, dtype=np.uint8).tobytes(),
        b"lesion_id,image_id,dx\nHAM_1,ISIC_1,mel\n",
        # Pillow could open EPS by running Ghostscript; untrusted bytes must never get there.
        b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\nshowpage\n",
    ],
    ids=["random-bytes", "text", "eps"],
)
def test_not_an_image(data):
    assert _decode_error(data).reason == "not an image"


@pytest.fixture
def no_pixel_decoding(monkeypatch):
    """Fail the test if any image's pixels are decoded: the header alone must decide."""
    from PIL import ImageFile

    def refuse(self):
        raise AssertionError(f"pixels of a {self.size} image were decoded")

    monkeypatch.setattr(ImageFile.ImageFile, "load", refuse)


def test_bomb_rejected_from_header_without_decoding(no_pixel_decoding):
    # 1-bit 20000x20000: 400 megapixels, beyond Pillow's own hard limit too.
    data = _png(20000, 20000, bit_depth=1, color_type=0, row_bytes=2500)
    assert len(data) < 200_000
    error = _decode_error(data, "bomb.png")
    assert error.reason.startswith(f"image too large ({20000 * 20000} pixels > limit ")


def test_over_our_limit_but_under_pillows(no_pixel_decoding):
    # 8500x8500 = 72 MP: over DEFAULT_MAX_PIXELS, under Pillow's warning threshold.
    data = _png(8500, 8500, bit_depth=1, color_type=0, row_bytes=1063)
    error = _decode_error(data, "big.png")
    assert error.reason == f"image too large ({8500 * 8500} pixels > limit {DEFAULT_MAX_PIXELS})"
    assert Image.MAX_IMAGE_PIXELS == 89478485  # Pillow's global limit is left alone


def test_max_pixels_argument(jpeg_bytes):
    error = _decode_error(jpeg_bytes, max_pixels=10_000)
    assert error.reason == "image too large (30000 pixels > limit 10000)"
    assert decode_image(jpeg_bytes, max_pixels=30_000).size == (200, 150)


# ------------------------------------------------------------------ masks and helpers


def test_sample_mask_is_binary(sample_dir):
    uri = str(sample_dir / "masks" / f"{SAMPLE_ID}_segmentation.png")
    mask = load_mask(uri)
    assert mask.dtype == np.uint8 and mask.shape == (150, 200)
    assert set(np.unique(mask)) == {0, 1}
    raw = np.asarray(Image.open(uri))
    assert np.array_equal(mask, (raw > 127).astype(np.uint8))


@pytest.mark.parametrize("kind", ["zero-one", "zero-255", "soft", "rgb", "rgba", "16bit", "bool"])
def test_mask_variants(kind):
    truth = np.zeros((30, 40), np.uint8)
    truth[5:20, 10:30] = 1
    if kind == "zero-one":
        image = Image.fromarray(truth)
    elif kind == "zero-255":
        image = Image.fromarray(truth * 255)
    elif kind == "soft":  # anti-aliased edges: only values above 127 are lesion
        image = Image.fromarray(np.where(truth == 1, 200, 100).astype(np.uint8))
    elif kind == "rgb":  # a red-on-black annotation
        rgb = np.zeros((30, 40, 3), np.uint8)
        rgb[..., 0] = truth * 255
        image = Image.fromarray(rgb)
    elif kind == "rgba":
        image = Image.fromarray(np.dstack([truth * 255] * 3 + [np.full_like(truth, 255)]))
    elif kind == "16bit":
        image = Image.fromarray(truth.astype(np.uint16) * 65535)
    else:
        image = Image.open(io.BytesIO(encode_png(truth.astype(bool), mask=True)))
    mask = decode_mask(_save(image, "PNG"), f"{kind}.png")
    assert mask.dtype == np.uint8
    assert np.array_equal(mask, truth)


def test_mask_errors_name_the_source():
    with pytest.raises(ImageDecodeError, match=r"m\.png: empty file"):
        decode_mask(b"", "m.png")
    with pytest.raises(ImageDecodeError, match="m.png: not an image"):
        decode_mask(b"not a png", "m.png")


def test_encode_png_round_trips(sample_rgb):
    rgb = np.asarray(sample_rgb)
    assert np.array_equal(np.asarray(decode_image(encode_png(rgb))), rgb)
    assert np.array_equal(np.asarray(decode_image(encode_png(sample_rgb))), rgb)
    mask = np.zeros((6, 8), np.uint8)
    mask[2:4, 3:6] = 1
    png = encode_png(mask, mask=True)
    assert np.asarray(Image.open(io.BytesIO(png))).max() == 255  # written viewable, as 0/255
    assert np.array_equal(decode_mask(png), mask)
    # Without mask=True the values stay: a faint heatmap of 0s and 1s is not a mask.
    assert np.asarray(Image.open(io.BytesIO(encode_png(mask)))).max() == 1
    with pytest.raises(ValueError, match="pass mask=True"):
        encode_png(mask.astype(bool))
    with pytest.raises(ValueError, match="uint8 or bool"):
        encode_png(np.zeros((4, 4), np.float32))


@pytest.mark.parametrize("level", [0, 1, 9])
def test_encode_png_compress_level_changes_size_not_pixels(sample_rgb, level):
    rgb = np.asarray(sample_rgb)
    assert np.array_equal(np.asarray(decode_image(encode_png(rgb, compress_level=level))), rgb)
    if level == 0:  # stored, not deflated: bigger than the default encoding
        assert len(encode_png(rgb, compress_level=0)) > len(encode_png(rgb))


def test_load_rgb_from_s3(s3, sample_dir):
    from raysky import storage

    bucket = s3.create_bucket("raysky-images-test")
    uri = f"{bucket}/x/{SAMPLE_ID}.jpg"
    storage.write_bytes(uri, (sample_dir / "images" / f"{SAMPLE_ID}.jpg").read_bytes())
    _assert_rgb(load_rgb(uri), (200, 150))
    storage.write_bytes(f"{bucket}/x/empty.jpg", b"")
    with pytest.raises(ImageDecodeError, match=f"{bucket}/x/empty.jpg: empty file"):
        load_rgb(f"{bucket}/x/empty.jpg")
