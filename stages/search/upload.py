"""A query photo as a public web service takes it: size, pixel and memory limits.

:func:`decode_upload` refuses what is too big or not an image with a :class:`BadImage`
that carries the HTTP status to answer, and decodes a big JPEG at reduced size so that a
decode never holds more than :data:`DECODE_BYTES`.
"""

from __future__ import annotations

import io
from typing import Optional

import numpy as np

from stages.featurize.images import IMAGE_SIZE, DecodeError, decode_image
from stages.reduce.index import MAX_QUERY_PIXELS

MAX_UPLOAD_BYTES = 10 * 1024 * 1024


_MP = MAX_QUERY_PIXELS // 1_000_000


# A decode holds the whole image: Pillow keeps RGB and RGBA at 4 bytes a pixel, and a
# conversion to RGB or an EXIF turn makes one more copy each (a 64 MP RGBA PNG peaked at
# 726 MiB).  Above DECODE_PIXELS a JPEG is decoded at 1/2, 1/4 or 1/8 scale in the DCT
# (Pillow's draft), to at most DECODE_PIXELS; any other format is refused (413).
DECODE_PIXELS = 16_000_000


DECODE_BYTES_PER_PIXEL = 12


DECODE_BYTES = DECODE_PIXELS * DECODE_BYTES_PER_PIXEL


_DRAFTABLE = ("JPEG", "MPO")


class BadImage(ValueError):
    """A query image that cannot be used; ``status`` is the HTTP status to answer."""

    def __init__(self, message: str, status: int = 422) -> None:
        super().__init__(message)
        self.status = status


def decode_upload(data: bytes, exif_orientation: bool = False, draft: int = 0) -> np.ndarray:
    """Decode a query photo exactly as ``featurize`` decodes the bucket's images
    (``exif_orientation`` as recorded in the features' model).

    Raises
    ------
    BadImage
        Empty, over :data:`MAX_UPLOAD_BYTES`, not an image, truncated, or more pixels
        than :data:`MAX_QUERY_PIXELS` (checked from the header, before decoding).
    """
    from PIL import Image

    if not data:
        raise BadImage("the image is empty (0 bytes)", 400)
    if len(data) > MAX_UPLOAD_BYTES:
        raise BadImage(f"the image is {len(data)} bytes, over the limit of 10 MB", 413)
    try:
        with Image.open(io.BytesIO(data)) as img:
            w, h = img.size
            fmt = img.format
    except Image.UnidentifiedImageError:
        raise BadImage("not an image (expected a JPEG, PNG or another photo format)", 415) from None
    except Image.DecompressionBombError:  # Pillow's own limit, far above ours
        raise BadImage(
            f"the image has hundreds of megapixels, over the limit of {_MP} MP "
            "(a decompression bomb?)",
            413,
        ) from None
    except (OSError, ValueError, SyntaxError) as exc:
        raise BadImage(f"cannot read the image: {exc}", 422) from None
    if w * h > MAX_QUERY_PIXELS:
        raise BadImage(
            f"the image is {w}x{h} pixels, over the limit of {_MP} MP (a decompression bomb?)",
            413,
        )
    if w * h > DECODE_PIXELS:
        draft = _draft_within_budget(w, h, fmt, draft)
    try:
        return decode_image(data, exif_orientation=exif_orientation, draft=draft)
    except DecodeError as exc:
        raise BadImage(f"cannot decode the image: {exc}", 422) from None


def _draft_within_budget(w: int, h: int, fmt: Optional[str], draft: int) -> int:
    """The ``draft`` of :func:`stages.featurize.images.decode_image` that decodes a ``w`` x
    ``h`` JPEG to at most :data:`DECODE_PIXELS` (the features' own ``draft`` if it reduces
    more); :class:`BadImage` (413) for a format that cannot be decoded at reduced size."""
    mp = DECODE_PIXELS // 1_000_000
    for scale in (2, 4, 8):
        if -(-w // scale) * -(-h // scale) <= DECODE_PIXELS:
            break
    # draft k asks for a decode at least k*224 px a side: Pillow picks the largest scale
    # that keeps it, so k*224 <= min(w, h) / scale gives that scale or a larger one.
    k = min(w, h) // scale // IMAGE_SIZE
    if fmt not in _DRAFTABLE or k < 1 or -(-w // 8) * -(-h // 8) > DECODE_PIXELS:
        raise BadImage(
            f"the image is {w}x{h} pixels: a {fmt or 'non-JPEG'} over {mp} MP is decoded whole, "
            f"over this server's memory budget (a JPEG photo is read at reduced size; send it "
            f"as a JPEG or at most {mp} MP)",
            413,
        )
    return min(k, draft) if draft > 0 else k
