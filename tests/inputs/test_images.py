"""Images at the edge: every bad input is one InvalidJob line naming its field."""

from __future__ import annotations

import io
import os
import struct
import zlib
from pathlib import Path

import pytest
from PIL import Image, PngImagePlugin

from farm.errors import InvalidJob
from farm.inputs.images import (
    MAX_SIDE,
    as_mask,
    check_mask_matches,
    decode_image,
    encode_png,
    grid,
    load_image_input,
    sha256_hex,
)


def gradient(size=(48, 32), mode="RGB") -> Image.Image:
    w, h = size
    img = Image.new("RGB", size)
    img.putdata([((x * 5) % 256, (y * 7) % 256, (x * y) % 256) for y in range(h) for x in range(w)])
    return img.convert(mode)


def encoded(img: Image.Image, fmt: str, **kwargs) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kwargs)
    return buf.getvalue()


def png_claiming(width: int, height: int) -> bytes:
    """A tiny PNG whose header claims `width`x`height` (a decompression bomb, cheaply)."""
    data = bytearray(encoded(Image.new("L", (1, 1)), "PNG"))
    assert data[12:16] == b"IHDR"
    data[16:24] = struct.pack(">II", width, height)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
    return bytes(data)


def refused(data: bytes, field: str = "image") -> InvalidJob:
    with pytest.raises(InvalidJob) as info:
        decode_image(data, field=field)
    err = info.value
    assert err.field == field
    assert str(err).startswith(f"{field}: ")
    assert "\n" not in str(err)
    return err


# --------------------------------------------------------------------------- decode_image


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "WEBP"])
def test_decodes_the_three_formats(fmt: str) -> None:
    img = decode_image(encoded(gradient(), fmt), field="image")
    assert img.size == (48, 32)
    assert img.format == fmt


def test_truncated_png_fails_at_the_edge() -> None:
    data = encoded(gradient((256, 256)), "PNG")
    assert "truncated" in str(refused(data[: len(data) // 2]))


def test_truncated_jpeg_fails_at_the_edge() -> None:
    data = encoded(gradient((256, 256)), "JPEG")
    refused(data[: len(data) // 2])


def test_random_bytes_are_not_an_image() -> None:
    err = refused(os.urandom(4096), field="mask_image")
    assert "not a PNG, JPEG, WEBP image" in str(err)


def test_empty_bytes_are_not_an_image() -> None:
    assert "empty" in str(refused(b""))


@pytest.mark.parametrize("fmt", ["GIF", "BMP", "TIFF"])
def test_other_formats_are_refused_before_decoding(fmt: str) -> None:
    assert "not a PNG, JPEG, WEBP image" in str(refused(encoded(gradient(), fmt)))


def test_decompression_bomb_is_refused() -> None:
    err = refused(png_claiming(30_000, 30_000))
    assert "decompression bomb" in str(err) or "largest side" in str(err)


def test_over_max_image_pixels_is_refused_even_where_pillow_only_warns() -> None:
    # Between MAX_IMAGE_PIXELS and twice that, Pillow only warns; we refuse.
    limit = Image.MAX_IMAGE_PIXELS
    assert limit is not None
    side = int((limit * 1.5) ** 0.5)
    with pytest.warns(Image.DecompressionBombWarning):
        err = refused(png_claiming(side, side))
    assert "too large" in str(err) or "largest side" in str(err) or "over the limit" in str(err)


def test_a_side_over_the_maximum_is_refused_from_the_header() -> None:
    err = refused(png_claiming(MAX_SIDE + 1, 1))
    assert f"largest side allowed is {MAX_SIDE}" in str(err)
    assert f"{MAX_SIDE + 1}x1" in str(err)


def test_max_image_pixels_is_kept() -> None:
    assert Image.MAX_IMAGE_PIXELS is not None


# --------------------------------------------------------------------------- load_image_input


def test_loads_a_path_bytes_or_pil_image_as_rgb(tmp_path: Path) -> None:
    rgba = gradient(mode="RGBA")
    path = tmp_path / "in.png"
    path.write_bytes(encoded(rgba, "PNG"))

    for value in [path, str(path), path.read_bytes(), bytearray(path.read_bytes()), rgba]:
        img = load_image_input(value, field="image")
        assert img.mode == "RGB"
        assert img.tobytes() == rgba.convert("RGB").tobytes()


def test_a_text_file_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "notes.png"
    path.write_text("this is not a picture\n")
    with pytest.raises(InvalidJob, match="^image: not a PNG") as info:
        load_image_input(path, field="image")
    assert info.value.field == "image"


def test_a_missing_file_is_refused(tmp_path: Path) -> None:
    with pytest.raises(InvalidJob, match="mask_image: no such file .*gone.png"):
        load_image_input(tmp_path / "gone.png", field="mask_image")


@pytest.mark.parametrize("url", ["http://example.com/a.png", "https://x/y.png", "s3://b/k.png"])
def test_urls_are_not_fetched_here(url: str) -> None:
    with pytest.raises(InvalidJob, match="URLs are not fetched") as info:
        load_image_input(url, field="image")
    assert info.value.field == "image"


def test_other_types_are_refused() -> None:
    with pytest.raises(InvalidJob, match="got int"):
        load_image_input(42, field="image")


def test_a_zero_pixel_image_is_refused() -> None:
    with pytest.raises(InvalidJob, match="image: image has no pixels"):
        load_image_input(Image.new("RGB", (0, 0)), field="image")


def test_exif_orientation_is_applied_as_diffusers_does() -> None:
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° clockwise to display
    data = encoded(gradient((40, 20)), "JPEG", exif=exif)
    assert load_image_input(data, field="image").size == (20, 40)


# --------------------------------------------------------------------------- masks


def test_as_mask_is_one_channel() -> None:
    assert as_mask(gradient()).mode == "L"
    assert as_mask(Image.new("1", (8, 8), 1)).getpixel((0, 0)) == 255


def test_mask_must_match_the_image_size() -> None:
    check_mask_matches(gradient((64, 64)), Image.new("L", (64, 64)))
    with pytest.raises(InvalidJob) as info:
        check_mask_matches(gradient((64, 64)), Image.new("L", (64, 32)))
    assert info.value.field == "mask_image"
    assert str(info.value) == "mask_image: mask is 64x32 but the image is 64x64"


# --------------------------------------------------------------------------- encoding


@pytest.mark.parametrize("mode", ["RGB", "RGBA", "L"])
def test_encode_png_round_trips_losslessly(mode: str) -> None:
    img = gradient(mode=mode)
    back = decode_image(encode_png(img), field="image")
    assert (back.mode, back.size) == (img.mode, img.size)
    assert back.tobytes() == img.tobytes()


def test_encode_png_depends_only_on_the_pixels() -> None:
    plain = gradient()
    info = PngImagePlugin.PngInfo()
    info.add_text("Software", "something with a clock")
    decorated = decode_image(
        encoded(plain, "PNG", pnginfo=info, dpi=(300, 300), icc_profile=b"\0" * 128),
        field="image",
    )
    assert decorated.info  # it carries metadata...

    assert encode_png(decorated) == encode_png(plain)  # ...which never reaches the output
    assert encode_png(plain) == encode_png(plain.copy())
    assert b"tEXt" not in encode_png(decorated) and b"iCCP" not in encode_png(decorated)


def test_sha256_hex() -> None:
    assert sha256_hex(b"") == "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"


# --------------------------------------------------------------------------- contact sheet


def test_grid_is_white_and_sized_by_its_longest_row() -> None:
    rows = [
        [gradient((64, 64)), as_mask(gradient((64, 64))), gradient((96, 48))],
        [gradient((16, 32))],
    ]
    sheet = grid(rows, cell=50)

    gap = 4
    assert sheet.mode == "RGB"
    assert sheet.size == (3 * 50 + 4 * gap, 2 * 50 + 3 * gap)
    assert sheet.getpixel((0, 0)) == (255, 255, 255)
    assert sheet.getpixel((sheet.width - 1, sheet.height - 1)) == (255, 255, 255)  # empty cell
    assert sheet.getpixel((gap + 25, gap + 25)) != (255, 255, 255)  # first image is there


def test_grid_needs_a_row() -> None:
    with pytest.raises(ValueError):
        grid([])


def test_grid_labels_its_columns_and_rows_and_keeps_empty_cells_empty() -> None:
    """A contact sheet you can read: a header over each column, a caption under each row, and
    a None cell left blank so every column keeps one meaning."""
    from farm.inputs.images import label_height

    red, blue = Image.new("RGB", (40, 40), "red"), Image.new("RGB", (40, 40), "blue")
    plain = grid([[red, blue], [None, blue]], cell=50)
    sheet = grid(
        [[red, blue], [None, blue]],
        cell=50,
        header=["source", "output 1"],
        captions=["row 1 · seed 7 · a red house", "row 2 · seed 8 · a blue house"],
    )
    line = label_height()
    assert sheet.size == (plain.width, plain.height + line + 4 + 2 * line)

    def dark(box: tuple[int, int, int, int]) -> bool:
        return min(sheet.convert("L").crop(box).getdata()) < 128

    assert dark((4, 4, 54, 4 + line)) and dark((58, 4, 108, 4 + line))  # each column's label
    first, second = line + 8, line + 8 + 50 + line + 4
    assert dark((4, first + 50, 104, first + 50 + line))  # each row's caption
    assert dark((4, second + 50, 104, second + 50 + line))
    assert sheet.getpixel((29, first + 25)) == (255, 0, 0)
    assert sheet.getpixel((29, second + 25)) == (255, 255, 255)  # the empty cell stays empty
    assert sheet.getpixel((83, second + 25)) == (0, 0, 255)
    with pytest.raises(ValueError, match="captions"):
        grid([[red]], captions=["one", "two"])
