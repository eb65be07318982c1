"""Any photo or scan of one digit -> the model's input, the way MNIST itself was made.

MNIST (LeCun et al.): the digit, white on black, is size-normalized to fit a 20x20 box with its aspect
ratio kept, then placed in a 28x28 image so that its centre of mass sits at the centre. We do the same
with Pillow and numpy (no torch): grayscale, invert when the digit is dark on a light background, crop
to the digit, fit into 20x20, centre by mass.
"""

from __future__ import annotations

import io

import numpy as np

from resnet_edge.core.contract import IMAGE_SIZE
from resnet_edge.core.errors import UserError

MNIST_BOX = 20  # MNIST fits each digit into a 20x20 box of the 28x28 image
# What a photo or scan of a digit comes as; Pillow's other formats (EPS runs Ghostscript, ...) are refused.
FORMATS = ("PNG", "JPEG", "BMP", "GIF", "WEBP", "TIFF")
MAX_SIDE = 4096
MAX_PIXELS = MAX_SIDE * MAX_SIDE  # images of more pixels (width x height, any shape) are refused from the header
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
        raise ImageError(
            f"image of {width}x{height} = {width * height:,} pixels is over the limit of {MAX_PIXELS:,} pixels "
            f"(the area of {MAX_SIDE}x{MAX_SIDE})"
        )
    img.draft("L", (WORK_SIDE, WORK_SIDE))  # JPEG: decoded at 1/2, 1/4 or 1/8 scale when that is enough
    depth = 2 if img.mode.startswith("I;16") else 4 if img.mode in ("I", "F") else 1
    decoded = img.size[0] * img.size[1] * len(img.getbands()) * depth
    if decoded > MAX_DECODED_BYTES:
        raise ImageError(
            f"image of {width}x{height} {img.mode} pixels would take {decoded / 2**20:.0f} MiB decoded, "
            f"over the limit of {MAX_DECODED_BYTES // 2**20} MiB; send a smaller image"
        )
    return img


def _reduced(img):
    """Decode, reduce to at most WORK_SIDE, then composite transparency over white and convert to 8-bit
    gray (or 32-bit int / float gray): a conversion to a wider mode (P with transparency -> RGBA, I;16 -> I)
    runs strip by strip, each strip reduced at once, so nothing wider than the decoded image is held whole."""
    from PIL import Image

    img.load()
    factor = -(-max(img.size) // WORK_SIDE)
    wide = img.mode in ("I;16", "I;16B", "I;16L", "I", "F")
    if wide:
        target = "F" if img.mode == "F" else "I"
    elif img.mode in ("P", "PA"):
        target = "RGBA" if img.mode == "PA" or "transparency" in img.info else "L"
    elif img.mode not in ("L", "LA", "RGB", "RGBA"):
        target = "L"  # 1-bit, CMYK, YCbCr, ...
    else:
        target = img.mode
    if target != img.mode:
        img = _convert_reduced(img, target, factor)
    elif factor > 1:
        img = img.reduce(factor)  # box average in C
    if img.mode in ("LA", "RGBA"):
        img = img.convert("RGBA")
        img = Image.alpha_composite(Image.new("RGBA", img.size, (255, 255, 255, 255)), img)
    return (img if wide else img.convert("L")), wide


def _convert_reduced(img, mode: str, factor: int):
    """``img.convert(mode).reduce(factor)`` one strip of ``factor`` rows at a time (the same box averages)."""
    from PIL import Image

    if factor <= 1:
        return img.convert(mode)
    width, height = img.size
    out = Image.new(mode, (-(-width // factor), -(-height // factor)))
    for top in range(0, height, factor):
        strip = img.crop((0, top, width, min(height, top + factor))).convert(mode)
        out.paste(strip.reduce(factor), (0, top // factor))
    return out


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
        raise ImageError(
            f"image is over the limit of {MAX_PIXELS:,} pixels (the area of {MAX_SIDE}x{MAX_SIDE})"
        ) from None
    except UnidentifiedImageError:
        raise ImageError(f"cannot decode the image (not one of {', '.join(FORMATS)})") from None
    except Exception as exc:  # a decoder's error on untrusted bytes (bad chunks, truncation, bombs): the file is bad
        detail = (str(exc).splitlines() or [""])[0][:120] or type(exc).__name__
        raise ImageError(f"cannot decode the image ({detail})") from None
    if wide:  # 16-bit, 32-bit or float gray: scaled by its range, never clipped to 8 bits
        values = np.nan_to_num(np.asarray(reduced, dtype=np.float64), nan=0.0, posinf=0.0, neginf=0.0)
        peak = float(values.max()) if values.size else 0.0
        ranges = (1.0, 255.0, 65535.0) if reduced.mode == "F" else (65535.0,)  # float: [0, 1], [0, 255], ...
        top = next((r for r in ranges if peak <= r), peak)
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
    crop = gray[rows.min() : rows.max() + 1, cols.min() : cols.max() + 1]
    h, w = crop.shape
    scale = MNIST_BOX / max(h, w)
    nh, nw = max(1, round(h * scale)), max(1, round(w * scale))
    resized = (
        np.asarray(
            Image.fromarray((crop * 255).astype(np.uint8)).resize((nw, nh), Image.Resampling.LANCZOS), dtype=np.float32
        )
        / 255.0
    )
    total = resized.sum()
    cy, cx = (
        ((np.arange(nh) @ resized.sum(1)) / total, (np.arange(nw) @ resized.sum(0)) / total)
        if total > 0
        else (nh / 2, nw / 2)
    )
    centre = IMAGE_SIZE / 2
    top = int(np.clip(round(centre - cy), 0, IMAGE_SIZE - nh))
    left = int(np.clip(round(centre - cx), 0, IMAGE_SIZE - nw))
    out = np.zeros((IMAGE_SIZE, IMAGE_SIZE), dtype=np.float32)
    out[top : top + nh, left : left + nw] = resized
    return out[None]


def image_to_pixels(data: bytes) -> np.ndarray:
    """Image bytes -> float32 [1, 1, 28, 28] ready for the model."""
    return mnist_style(decode_image(data))[None]
