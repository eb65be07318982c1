"""Any photo or scan of one digit -> the model's input, the way MNIST itself was made.

MNIST (LeCun et al.): the digit, white on black, is size-normalized to fit a 20x20 box with its aspect
ratio kept, then placed in a 28x28 image so that its centre of mass sits at the centre. We do the same
with Pillow and numpy (no torch): grayscale, invert when the digit is dark on a light background, crop
to the digit, fit into 20x20, centre by mass.
"""

from __future__ import annotations

import io

import numpy as np

from .contract import IMAGE_SIZE
from .errors import UserError

MNIST_BOX = 20  # MNIST fits each digit into a 20x20 box of the 28x28 image
# What a photo or scan of a digit comes as; Pillow's other formats (EPS runs Ghostscript, ...) are refused.
FORMATS = ("PNG", "JPEG", "BMP", "GIF", "WEBP", "TIFF")
MAX_SIDE = 4096  # refused above 4096 x 4096 pixels, from the header, before any decoding
MAX_PIXELS = MAX_SIDE * MAX_SIDE
MAX_DECODED_BYTES = 32 * 2**20  # and above 32 MiB decoded (JPEG: after its cheap 1/2-1/8 scaling): RGBA 2896x2896
WORK_SIDE = 512  # decoded images are reduced to at most this side before any float conversion


class ImageError(UserError):
    """The bytes are not a decodable image, or hold no digit."""


def _opened(data: bytes):
    """The image, header read and checked (format, pixel count), not decoded yet."""
    from PIL import Image

    Image.MAX_IMAGE_PIXELS = MAX_PIXELS  # a second guard: Pillow refuses twice this itself
    img = Image.open(io.BytesIO(data), formats=FORMATS)
    width, height = img.size
    if width * height > MAX_PIXELS or width < 1 or height < 1:
        raise ImageError(f"image of {width}x{height} pixels is over the limit of {MAX_SIDE}x{MAX_SIDE} "
                         f"({MAX_PIXELS:,} pixels)")
    img.draft("L", (WORK_SIDE, WORK_SIDE))  # JPEG: decoded at 1/2, 1/4 or 1/8 scale when that is enough
    depth = 2 if img.mode.startswith("I;16") else 4 if img.mode in ("I", "F") else 1
    decoded = img.size[0] * img.size[1] * len(img.getbands()) * depth
    if decoded > MAX_DECODED_BYTES:
        raise ImageError(f"image of {width}x{height} {img.mode} pixels would take {decoded / 2**20:.0f} MiB decoded, "
                         f"over the limit of {MAX_DECODED_BYTES // 2**20} MiB; send a smaller image")
    return img


def _reduced(img):
    """Decode, reduce to at most WORK_SIDE in the image's own mode, then composite transparency over
    white and convert to 8- or 32-bit gray: nothing is copied or converted at full size."""
    from PIL import Image

    img.load()
    wide = img.mode in ("I;16", "I;16B", "I;16L", "I")
    if wide:
        img = img.convert("I")
    elif img.mode in ("P", "PA"):
        img = img.convert("RGBA" if img.mode == "PA" or "transparency" in img.info else "L")
    elif img.mode not in ("L", "LA", "RGB", "RGBA"):
        img = img.convert("L")  # 1-bit, CMYK, YCbCr, F, ...
    factor = -(-max(img.size) // WORK_SIDE)
    if factor > 1:
        img = img.reduce(factor)  # box average in C
    if img.mode in ("LA", "RGBA"):
        img = img.convert("RGBA")
        img = Image.alpha_composite(Image.new("RGBA", img.size, (255, 255, 255, 255)), img)
    return (img if wide else img.convert("L")), wide


def decode_image(data: bytes) -> np.ndarray:
    """Image bytes -> float32 grayscale [H, W] in [0, 1], H and W at most WORK_SIDE; transparency is
    composited over white. Only FORMATS, at most MAX_PIXELS (checked from the header)."""
    from PIL import Image, UnidentifiedImageError

    try:
        with _opened(data) as img:
            reduced, wide = _reduced(img)
    except ImageError:
        raise
    except Image.DecompressionBombError:
        raise ImageError(f"image is over the limit of {MAX_SIDE}x{MAX_SIDE} ({MAX_PIXELS:,} pixels)") from None
    except UnidentifiedImageError:
        raise ImageError(f"cannot decode the image (not one of {', '.join(FORMATS)})") from None
    except Exception as exc:  # a decoder's error on untrusted bytes (bad chunks, truncation, bombs): the file is bad
        detail = (str(exc).splitlines() or [""])[0][:120] or type(exc).__name__
        raise ImageError(f"cannot decode the image ({detail})") from None
    if wide:  # 16- or 32-bit gray: scale, never clip to 8 bits
        values = np.asarray(reduced, dtype=np.float64)
        top = 65535.0 if values.max() <= 65535 else float(values.max())
        return (np.clip(values, 0, None) / top).astype(np.float32)
    return np.asarray(reduced, dtype=np.float32) / 255.0


def mnist_style(gray: np.ndarray) -> np.ndarray:
    """float32 [H, W] in [0, 1] -> float32 [1, 28, 28]: white digit on black, 20x20 box, centred by mass."""
    from PIL import Image

    if gray.ndim != 2 or min(gray.shape) < 1:
        raise ImageError(f"expected a 2-D grayscale image, got shape {gray.shape}")
    def background(a: np.ndarray) -> float:
        return float(np.median(np.concatenate([a[0], a[-1], a[:, 0], a[:, -1]])))

    if background(gray) > 0.5:  # dark ink on light paper
        gray = 1.0 - gray
    gray = np.clip(gray - background(gray), 0, None)
    peak = float(gray.max())
    if peak < 0.1:
        raise ImageError("the image is blank: no digit stands out from the background")
    gray = gray / peak
    rows, cols = np.nonzero(gray > 0.2)
    crop = gray[rows.min():rows.max() + 1, cols.min():cols.max() + 1]
    h, w = crop.shape
    scale = MNIST_BOX / max(h, w)
    nh, nw = max(1, round(h * scale)), max(1, round(w * scale))
    resized = np.asarray(Image.fromarray((crop * 255).astype(np.uint8)).resize((nw, nh), Image.LANCZOS),
                         dtype=np.float32) / 255.0
    total = resized.sum()
    cy, cx = ((np.arange(nh) @ resized.sum(1)) / total, (np.arange(nw) @ resized.sum(0)) / total) if total > 0 else (nh / 2, nw / 2)
    centre = IMAGE_SIZE / 2
    top = int(np.clip(round(centre - cy), 0, IMAGE_SIZE - nh))
    left = int(np.clip(round(centre - cx), 0, IMAGE_SIZE - nw))
    out = np.zeros((IMAGE_SIZE, IMAGE_SIZE), dtype=np.float32)
    out[top:top + nh, left:left + nw] = resized
    return out[None]


def image_to_pixels(data: bytes) -> np.ndarray:
    """Image bytes -> float32 [1, 1, 28, 28] ready for the model."""
    return mnist_style(decode_image(data))[None]
