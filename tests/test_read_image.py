"""Images read as viewers show them (fastseg.data.read_image, the one reader of predict, eval and
training data): 16-bit pixels keep their top 8 bits, EXIF orientation applied (or not), anything
that is not an image file named in a ValueError."""
import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from fastseg.data import build_dataset, read_image
from fastseg.data.datasets import _as_rgb8


def gradient16(h=37, w=53):
    """Every 16-bit value range a 16-bit image uses, with low bytes that must not leak into the result."""
    return (np.arange(h * w, dtype=np.uint64).reshape(h, w) * 65535 // (h * w - 1)).astype(np.uint16)


def png48(rgb: np.ndarray) -> bytes:
    """A 16-bit-per-channel RGB PNG written by hand (Pillow cannot write one)."""
    h, w, _ = rgb.shape
    raw = b"".join(b"\x00" + rgb[y].astype(">u2").tobytes() for y in range(h))

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", w, h, 16, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b"")


def test_16_bit_grey_png_keeps_the_top_8_bits(tmp_path):
    a = gradient16()
    Image.fromarray(a).save(tmp_path / "g.png")
    with Image.open(tmp_path / "g.png") as im:
        assert im.mode.startswith("I")  # really a 16-bit file
    got = read_image(tmp_path / "g.png")
    assert got.shape == a.shape + (3,) and got.dtype == np.uint8
    want = (a >> 8).astype(np.uint8)
    for c in range(3):
        np.testing.assert_array_equal(got[..., c], want)
    assert (got == 255).mean() < 0.01  # convert("RGB") clipped 99 % of these pixels to 255


@pytest.mark.parametrize("mode", ["I;16", "I;16B", "I"])
def test_every_16_bit_mode_keeps_the_top_8_bits(mode):
    a = gradient16(5, 7)
    im = Image.fromarray(a.astype(np.int32)).convert("I") if mode == "I" else Image.frombytes(
        mode, (7, 5), a.astype(">u2" if mode == "I;16B" else "<u2").tobytes())
    assert im.mode == mode
    got = _as_rgb8(im, "x")
    np.testing.assert_array_equal(got, np.repeat((a >> 8).astype(np.uint8)[..., None], 3, axis=2))


def test_48_bit_rgb_png_keeps_the_top_8_bits(tmp_path):
    rgb = np.random.default_rng(0).integers(0, 65536, (9, 11, 3)).astype(np.uint16)
    (tmp_path / "c.png").write_bytes(png48(rgb))
    np.testing.assert_array_equal(read_image(tmp_path / "c.png"), (rgb >> 8).astype(np.uint8))


def test_grey_and_palette_images_become_rgb(tmp_path):
    g = np.random.default_rng(1).integers(0, 256, (6, 8), dtype=np.uint8)
    Image.fromarray(g).save(tmp_path / "g.png")
    np.testing.assert_array_equal(read_image(tmp_path / "g.png"), np.repeat(g[..., None], 3, axis=2))
    Image.fromarray(np.zeros((4, 4), np.float32), mode="F").save(tmp_path / "f.tif")
    with pytest.raises(ValueError, match="f.tif.*float"):
        read_image(tmp_path / "f.tif")


def exif_image(path, stored: np.ndarray, orientation: int = 6) -> None:
    exif = Image.Exif()
    exif[0x0112] = orientation
    Image.fromarray(stored).save(path, exif=exif.tobytes())


def test_exif_orientation_is_applied_unless_turned_off(tmp_path):
    stored = np.random.default_rng(2).integers(0, 256, (64, 96, 3), dtype=np.uint8)  # 96 wide, 64 high
    exif_image(tmp_path / "r.png", stored)  # orientation 6: shown rotated 90° clockwise, 64 wide
    np.testing.assert_array_equal(read_image(tmp_path / "r.png"), np.rot90(stored, k=-1))
    np.testing.assert_array_equal(read_image(tmp_path / "r.png", exif=False), stored)


def test_not_image_files_are_named(tmp_path):
    (tmp_path / "x.png").mkdir()
    (tmp_path / "y.jpg").write_text("not an image")
    with pytest.raises(ValueError, match=r"x\.png: it is a folder"):
        read_image(tmp_path / "x.png")
    with pytest.raises(ValueError, match=r"cannot read image .*y\.jpg"):
        read_image(tmp_path / "y.jpg")


def test_dataset_images_follow_exif_and_a_raw_size_label_gets_a_hint(tmp_path):
    stored = np.random.default_rng(3).integers(0, 256, (40, 56, 3), dtype=np.uint8)
    for d in ("images", "labels"):
        (tmp_path / d).mkdir()
    exif_image(tmp_path / "images" / "a.jpg", stored)
    Image.fromarray(np.zeros((56, 40), np.uint8)).save(tmp_path / "labels" / "a.png")  # labelled as shown
    ds = build_dataset("folder", "train", tmp_path, num_classes=2)
    image, label = ds.load(0)
    assert image.shape == (56, 40, 3) and label.shape == (56, 40)
    raw = build_dataset("folder", "train", tmp_path, num_classes=2, exif=False)
    with pytest.raises(ValueError, match="a.png is 40x56 but its image .*a.jpg is 56x40"):
        raw.load(0)
    Image.fromarray(np.zeros((40, 56), np.uint8)).save(tmp_path / "labels" / "a.png")  # labelled as stored
    with pytest.raises(ValueError, match="EXIF orientation; --no-exif"):
        ds.load(0)
    assert raw.load(0)[0].shape == (40, 56, 3)
