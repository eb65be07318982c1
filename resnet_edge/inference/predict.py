"""`predict`: image files -> digits, with the same MNIST-style preprocessing as the server's /v1/predict.

Torch-free. Every file is read and decoded before any answer is given, so a bad file in the list is
one clear error naming it, not a half-printed result.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from resnet_edge.core.contract import INPUT_NAME, OUTPUT_NAME, digit_prediction
from resnet_edge.core.errors import UserError
from resnet_edge.inference.preprocess import image_to_pixels

MAX_FILE_BYTES = 32 * 2**20  # an image file larger than this is refused before it is read


def read_pixels(path: Path) -> Any:
    try:
        size = Path(path).stat().st_size
        if size > MAX_FILE_BYTES:
            raise UserError(
                f"{path}: file of {size / 2**20:.0f} MiB is over the limit of {MAX_FILE_BYTES // 2**20} MiB "
                f"for an image"
            )
        with open(path, "rb") as f:
            data = f.read(MAX_FILE_BYTES + 1)  # a device or pipe has no size to stat
        if len(data) > MAX_FILE_BYTES:
            raise UserError(f"{path}: over the limit of {MAX_FILE_BYTES // 2**20} MiB for an image")
    except OSError as exc:
        raise UserError(f"{path}: cannot read ({exc.strerror or exc})") from None
    try:
        return image_to_pixels(data)
    except UserError as exc:
        raise UserError(f"{path}: {exc}") from None


def predict_files(session: Any, paths: list[Path]) -> list[dict[str, Any]]:
    """[{"path", "digit", "probabilities"}] for each image file, in order."""
    from resnet_edge.inference.runtime import check_output_shape

    inputs = [(path, read_pixels(path)) for path in paths]
    return [
        {
            "path": str(path),
            **digit_prediction(
                check_output_shape(session.run([OUTPUT_NAME], {INPUT_NAME: pixels})[0], len(pixels), "the model")[0]
            ),
        }
        for path, pixels in inputs
    ]
