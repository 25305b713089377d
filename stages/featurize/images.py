"""Image decoding and MobileNetV2 preprocessing (Pillow + numpy, no TensorFlow).

The decode matches ``keras.utils.load_img(path, target_size=(224, 224),
interpolation="bilinear")``: any Pillow mode converted to RGB, then a bilinear
resize, so a single-process Keras run and the Spark job see the same pixels.
"""

from __future__ import annotations

import io
import warnings
from typing import Optional, Tuple

import numpy as np
from PIL import Image, ImageOps

__all__ = [
    "IMAGE_SIZE",
    "decode_image",
    "decode_photo",
    "preprocess",
    "thumbnail_jpeg",
    "DecodeError",
]

IMAGE_SIZE = 224
# A header may claim any size: a 691-byte JPEG claiming 14000 x 14000 cost 590 MB to
# decode.  Above this many pixels an image is refused before it is decoded (phone
# photos are 12-50 MP; Pillow's own guard only warns below twice its limit).
MAX_PIXELS = 100_000_000
Image.MAX_IMAGE_PIXELS = MAX_PIXELS  # Pillow's guard stays as a backstop; ours speaks first
warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)
# Decoded images where this share of pixels has one exact colour are refused: truncated
# JPEGs decode to grey fill, unsupported depths to white.  The 1000 Fruits-360 photos
# (white backgrounds) have at most 70 % of one colour.
FLAT_SHARE = 0.95
_APPLEDOUBLE = b"\x00\x05\x16\x07"


class DecodeError(ValueError):
    """An image that cannot be decoded; the message is the reason written to ``error``."""


def _to_rgb(img: Image.Image) -> Image.Image:
    """Any Pillow mode to 8-bit RGB, 16- and 32-bit greyscale scaled rather than clipped
    (``convert("RGB")`` clips a 16-bit PNG to solid white)."""
    if img.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
        arr = np.asarray(img, dtype=np.float64)
        top = float(arr.max(initial=0.0))
        if top > 255.0:
            arr = arr * (255.0 / (65535.0 if top <= 65535.0 else top))
        img = Image.fromarray(np.clip(np.rint(arr), 0, 255).astype(np.uint8), "L")
    return img if img.mode == "RGB" else img.convert("RGB")


def _flat_share(arr: np.ndarray) -> float:
    """Share of the pixels of an (h, w, 3) uint8 array that have the majority colour.

    Exact when one colour covers more than half of the pixels (it is then the median
    of the colour codes); at most one half otherwise.  That is all the one-colour test
    (:data:`FLAT_SHARE`, far above a half) needs, in linear time: counting every colour
    (``np.unique``, a sort) cost twice the decode.
    """
    flat = np.ascontiguousarray(arr, dtype=np.uint8).reshape(-1, 3)
    if len(flat) == 0:
        return 0.0
    codes = (flat[:, 0].astype(np.uint32) << 16) | (flat[:, 1].astype(np.uint32) << 8)
    codes |= flat[:, 2]
    middle = len(codes) // 2
    median = np.partition(codes, middle)[middle]
    return float(np.count_nonzero(codes == median) / len(codes))


def _upright_or_as_stored(img: Image.Image) -> Image.Image:
    """``img`` turned by its EXIF orientation for a thumbnail only: an EXIF block Pillow
    cannot read leaves the thumbnail as stored rather than costing the photo its row."""
    try:
        return ImageOps.exif_transpose(img)
    except Exception:  # any EXIF parse error: the model did not need the EXIF
        return img


def decode_image(
    data: Optional[bytes], size: int = IMAGE_SIZE, exif_orientation: bool = True, draft: int = 0
) -> np.ndarray:
    """Decode image bytes to an RGB uint8 array resized to ``size`` x ``size``
    (:func:`decode_photo` without a thumbnail; same parameters, same errors)."""
    return decode_photo(data, size, exif_orientation, draft)[0]


def decode_photo(
    data: Optional[bytes],
    size: int = IMAGE_SIZE,
    exif_orientation: bool = True,
    draft: int = 0,
    thumb_px: int = 0,
    thumb_quality: int = 80,
) -> Tuple[np.ndarray, Optional[bytes]]:
    """Decode image bytes to an RGB uint8 array resized to ``size`` x ``size``, and a
    thumbnail from the same decode.

    Parameters
    ----------
    data : bytes
        The file's content (JPEG, or anything Pillow reads).
    size : int
        Output height and width.
    exif_orientation : bool
        Turn the picture as its EXIF orientation says (phones store photos sideways
        with a tag); False decodes the pixels as stored, like Keras' ``load_img``.
    draft : int
        0: full decode (what Keras' ``load_img`` does).  ``k >= 1``: let a JPEG
        decoder scale by 1/2, 1/4 or 1/8 in the DCT while the image stays at
        least ``k * size`` on each side, then resize as usual: a 12 MP photo
        decodes several times faster, to slightly different pixels
        (``benchmarks/decode_bench.py``).
    thumb_px : int
        0: no thumbnail.  Otherwise a JPEG of at most ``thumb_px`` pixels a side (the
        photo's proportions, upright by its EXIF orientation whatever
        ``exif_orientation`` says), made from this decode: a second decode for the
        thumbnail cost featurize a third of the decode again.
    thumb_quality : int
        Its JPEG quality.

    Returns
    -------
    ndarray of shape (size, size, 3), uint8
    bytes or None
        The thumbnail (None when ``thumb_px`` is 0).

    Raises
    ------
    DecodeError
        Empty, truncated, corrupt, oversized or non-image content, or a decode that is
        one flat colour, with the reason.
    """
    if not data:
        raise DecodeError("empty file (0 bytes)")
    data = bytes(data)
    if data[:4] == _APPLEDOUBLE:
        raise DecodeError("macOS AppleDouble metadata file (a '._' name), not a photo")
    try:
        with Image.open(io.BytesIO(data)) as img:
            w, h = img.size
            if w * h > MAX_PIXELS:
                raise DecodeError(
                    f"image claims {w} x {h} pixels ({w * h / 1e6:.0f} MP), above the "
                    f"{MAX_PIXELS // 1_000_000} MP limit: not decoded"
                )
            if draft > 0:
                img.draft("RGB", (draft * size, draft * size))  # a no-op but for JPEG
            img.load()  # forces the full decode: truncated data fails here
            if exif_orientation:
                img = upright = ImageOps.exif_transpose(img)
            else:
                upright = _upright_or_as_stored(img) if thumb_px else img
            rgb = _to_rgb(img)
            arr = np.asarray(rgb.resize((size, size), Image.BILINEAR), dtype=np.uint8)
            if thumb_px:
                # People see the photo upright, whatever the model was asked to see.
                thumb = rgb if exif_orientation else _to_rgb(upright)
                thumb.thumbnail((thumb_px, thumb_px))  # in place: not needed again
    except Image.UnidentifiedImageError:
        raise DecodeError("not an image Pillow can identify") from None
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        if isinstance(exc, DecodeError):
            raise
        raise DecodeError(f"cannot decode image: {type(exc).__name__}: {exc}") from None
    if arr.shape != (size, size, 3):  # pragma: no cover - Pillow guarantees RGB here
        raise DecodeError(f"unexpected decoded shape {arr.shape}")
    share = _flat_share(arr)
    if share >= FLAT_SHARE:
        raise DecodeError(
            f"decoded to one flat colour ({share:.0%} of pixels): truncated data or an "
            "unsupported encoding, not a photo"
        )
    if not thumb_px:
        return arr, None
    buf = io.BytesIO()
    thumb.save(buf, format="JPEG", quality=thumb_quality)
    return arr, buf.getvalue()


def thumbnail_jpeg(
    data: Optional[bytes], px: int, quality: int = 80, max_pixels: int = MAX_PIXELS
) -> Optional[bytes]:
    """A JPEG of at most ``px`` x ``px`` pixels, or ``None`` when ``data`` is not an image
    (or claims more than ``max_pixels``, checked from the header before decoding)."""
    if not data:
        return None
    try:
        with Image.open(io.BytesIO(bytes(data))) as img:
            if img.width * img.height > max_pixels:
                return None
            img.draft("RGB", (px, px))  # JPEG: decode at a reduced scale, much faster
            img = ImageOps.exif_transpose(img).convert("RGB")  # upright, as featurize's
            img.thumbnail((px, px))
            buf = io.BytesIO()
            img.save(buf, format="JPEG", quality=quality)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError):
        return None
    return buf.getvalue()


def preprocess(batch: np.ndarray) -> np.ndarray:
    """MobileNetV2 preprocessing: uint8 RGB in [0, 255] to float32 in [-1, 1].

    Same arithmetic as ``keras.applications.mobilenet_v2.preprocess_input``
    (``x / 127.5 - 1`` in float32).
    """
    x = batch.astype(np.float32)
    x /= 127.5
    x -= 1.0
    return x
