"""Image decoding and MobileNetV2 preprocessing (Pillow + numpy, no TensorFlow).

The decode matches ``keras.utils.load_img(path, target_size=(224, 224),
interpolation="bilinear")``: any Pillow mode converted to RGB, then a bilinear
resize, so a single-process Keras run and the Spark job see the same pixels.
"""

from __future__ import annotations

import io
from typing import Optional

import numpy as np
from PIL import Image

__all__ = ["IMAGE_SIZE", "decode_image", "preprocess", "DecodeError"]

IMAGE_SIZE = 224
# A 100 MP photo is plausible; a decompression bomb is not.
Image.MAX_IMAGE_PIXELS = 200_000_000


class DecodeError(ValueError):
    """An image that cannot be decoded; the message is the reason written to ``error``."""


def decode_image(data: Optional[bytes], size: int = IMAGE_SIZE, draft: int = 0) -> np.ndarray:
    """Decode image bytes to an RGB uint8 array resized to ``size`` x ``size``.

    Parameters
    ----------
    data : bytes
        The file's content (JPEG, or anything Pillow reads).
    size : int
        Output height and width.
    draft : int
        0: full decode (what Keras' ``load_img`` does).  ``k >= 1``: let a JPEG
        decoder scale by 1/2, 1/4 or 1/8 in the DCT while the image stays at
        least ``k * size`` on each side, then resize as usual: a 12 MP photo
        decodes several times faster, to slightly different pixels
        (``benchmarks/decode_bench.py``).

    Returns
    -------
    ndarray of shape (size, size, 3), uint8

    Raises
    ------
    DecodeError
        Empty, truncated, corrupt or non-image content, with the reason.
    """
    if not data:
        raise DecodeError("empty file (0 bytes)")
    try:
        with Image.open(io.BytesIO(bytes(data))) as img:
            if draft > 0:
                img.draft("RGB", (draft * size, draft * size))  # a no-op but for JPEG
            img.load()  # forces the full decode: truncated data fails here
            if img.mode != "RGB":
                img = img.convert("RGB")
            img = img.resize((size, size), Image.BILINEAR)
            arr = np.asarray(img, dtype=np.uint8)
    except Image.UnidentifiedImageError:
        raise DecodeError("not an image Pillow can identify") from None
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        raise DecodeError(f"cannot decode image: {type(exc).__name__}: {exc}") from None
    if arr.shape != (size, size, 3):  # pragma: no cover - Pillow guarantees RGB here
        raise DecodeError(f"unexpected decoded shape {arr.shape}")
    return arr


def preprocess(batch: np.ndarray) -> np.ndarray:
    """MobileNetV2 preprocessing: uint8 RGB in [0, 255] to float32 in [-1, 1].

    Same arithmetic as ``keras.applications.mobilenet_v2.preprocess_input``
    (``x / 127.5 - 1`` in float32).
    """
    x = batch.astype(np.float32)
    x /= 127.5
    x -= 1.0
    return x
