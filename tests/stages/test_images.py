"""Decoding: Pillow's JPEG draft mode is opt-in and changes only large JPEGs."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

from stages.featurize.images import decode_image
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
