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
MAX_PIXELS = 40_000_000  # refuse decompression bombs long before they fill memory


class ImageError(UserError):
    """The bytes are not a decodable image, or hold no digit."""


def decode_image(data: bytes) -> np.ndarray:
    """Image bytes -> float32 grayscale [H, W] in [0, 1]; transparency is composited over white."""
    from PIL import Image, UnidentifiedImageError

    Image.MAX_IMAGE_PIXELS = MAX_PIXELS
    try:
        with Image.open(io.BytesIO(data)) as img:
            img.load()
            if img.mode in ("RGBA", "LA", "P"):
                img = img.convert("RGBA")
                background = Image.new("RGBA", img.size, (255, 255, 255, 255))
                img = Image.alpha_composite(background, img)
            if img.mode in ("I;16", "I;16B", "I;16L", "I"):  # 16- or 32-bit gray: scale, never clip to 8 bits
                wide = np.asarray(img, dtype=np.float64)
                top = 65535.0 if img.mode.startswith("I;16") or wide.max() <= 65535 else float(wide.max())
                return (np.clip(wide, 0, None) / top).astype(np.float32)
            gray = img.convert("L")
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as exc:
        raise ImageError(f"cannot decode the image ({str(exc).splitlines()[0][:120] or type(exc).__name__})") from None
    return np.asarray(gray, dtype=np.float32) / 255.0


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
