"""Decoding: Pillow's JPEG draft mode is opt-in and changes only large JPEGs."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from stages.featurize.images import DecodeError, decode_image, decode_photo, thumbnail_jpeg
from tests.conftest import SAMPLE


def _large_jpeg(width: int = 2016, height: int = 1512) -> bytes:
    """A real sample photo upscaled, with noise so that the JPEG holds fine detail."""
    src = sorted(SAMPLE.glob("Banana/*.jpg"))[0]
    arr = np.asarray(Image.open(src).convert("RGB").resize((width, height), Image.BICUBIC))
    noisy = arr + np.random.default_rng(0).normal(0, 4, arr.shape)
    buf = io.BytesIO()
    Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8)).save(buf, "JPEG", quality=92)
    return buf.getvalue()


def test_draft_decodes_a_large_jpeg_at_reduced_scale_to_close_pixels():
    data = _large_jpeg()
    full = decode_image(data).astype(np.int16)
    for k in (1, 2):
        draft = decode_image(data, draft=k).astype(np.int16)
        assert draft.shape == full.shape == (224, 224, 3)
        diff = np.abs(draft - full)
        assert 0 < diff.mean() < 3  # other pixels (DCT scaling), the same picture
    # At 2016 px, >= 2 x 224 allows 1/4 scale and >= 224 allows 1/8: two different decodes.
    assert not np.array_equal(decode_image(data, draft=1), decode_image(data, draft=2))


def test_draft_changes_nothing_for_small_photos_or_png():
    small = sorted(SAMPLE.glob("*/*.jpg"))[0].read_bytes()  # 100 x 100: no room to scale
    assert np.array_equal(decode_image(small, draft=2), decode_image(small))
    buf = io.BytesIO()
    Image.open(io.BytesIO(_large_jpeg(800, 600))).save(buf, "PNG")
    png = buf.getvalue()
    assert np.array_equal(decode_image(png, draft=1), decode_image(png))


def _jpeg(w: int, h: int, orientation: int = 0) -> bytes:
    rng = np.random.default_rng(0)
    img = Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8))
    exif = Image.Exif()
    if orientation:
        exif[0x0112] = orientation
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=90, exif=exif.tobytes())
    return buf.getvalue()


def test_the_thumbnail_comes_from_the_same_decode_with_the_photos_proportions():
    data = _jpeg(300, 150)
    arr, thumb = decode_photo(data, thumb_px=96)
    np.testing.assert_array_equal(arr, decode_image(data))  # the model's pixels unchanged
    with Image.open(io.BytesIO(thumb)) as t:
        assert t.format == "JPEG" and t.size == (96, 48)
    assert decode_photo(data)[1] is None  # no thumbnail unless asked


def test_the_thumbnail_is_upright_whatever_the_model_sees():
    data = _jpeg(300, 150, orientation=6)  # stored sideways, shown turned 90 degrees
    with Image.open(io.BytesIO(decode_photo(data, thumb_px=96)[1])) as t:
        assert t.size == (48, 96)
    arr, thumb = decode_photo(data, exif_orientation=False, thumb_px=96)
    np.testing.assert_array_equal(arr, decode_image(data, exif_orientation=False))
    with Image.open(io.BytesIO(thumb)) as t:
        assert t.size == (48, 96)
    with Image.open(io.BytesIO(thumbnail_jpeg(data, 96))) as t:  # the report's, from bytes
        assert t.size == (48, 96)


def test_a_photo_that_does_not_decode_has_no_thumbnail_either():
    with pytest.raises(DecodeError):
        decode_photo(_jpeg(300, 150)[:200], thumb_px=96)
