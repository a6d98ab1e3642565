"""Image and mask files in, uint8 arrays out, with errors that name the file.

Images come back as OpenCV delivers them (H x W x 3, uint8, BGR) whatever they were on disk (grey, with an
alpha channel, 16-bit), so that training, evaluation and the edge runtime all see the same pixels.
"""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

from amoe_sdk.errors import DataError

# The one list of image files every command and the runtime read (OpenCV reads each).
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")


def list_images(folder: str | Path) -> list[Path]:
    """The image files directly inside ``folder``, sorted by name (hidden files skipped)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"{folder} is not a folder; pass a folder of {'/'.join(IMAGE_SUFFIXES)} images")
    return sorted(
        p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith(".")
    )


def _read_raw(path: Path, flags: int, what: str) -> np.ndarray:
    if not path.is_file():
        raise DataError(f"{what} {path} does not exist")
    if path.stat().st_size == 0:
        raise DataError(f"{what} {path} is an empty file (0 bytes); re-export or delete it")
    # imdecode instead of imread: imread returns None silently and cannot read non-ASCII paths on Windows.
    data = np.fromfile(str(path), dtype=np.uint8)
    array = cv2.imdecode(data, flags)
    if array is None or array.size == 0:
        raise DataError(f"{what} {path} cannot be decoded (corrupt or not an image); re-export or delete it")
    return array


def _to_uint8(array: np.ndarray) -> np.ndarray:
    if array.dtype == np.uint8:
        return array
    if array.dtype == np.uint16:
        return (array >> 8).astype(np.uint8)
    scale = 255.0 / max(float(array.max()), 1e-12)
    return np.clip(array.astype(np.float64) * scale, 0, 255).astype(np.uint8)


def read_image(path: str | Path) -> np.ndarray:
    """Read a colour or grey image as a uint8 BGR array of shape (H, W, 3)."""
    path = Path(path)
    array = _to_uint8(_read_raw(path, cv2.IMREAD_UNCHANGED, "image"))
    if array.ndim == 2:
        array = cv2.cvtColor(array, cv2.COLOR_GRAY2BGR)
    elif array.shape[2] == 4:
        array = cv2.cvtColor(array, cv2.COLOR_BGRA2BGR)
    elif array.shape[2] == 1:
        array = cv2.cvtColor(array[:, :, 0], cv2.COLOR_GRAY2BGR)
    if min(array.shape[:2]) < 8:
        raise DataError(f"image {path} is only {array.shape[1]}x{array.shape[0]} pixels; it needs at least 8x8")
    return np.ascontiguousarray(array)


def read_mask(path: str | Path, expected_shape: tuple[int, int] | None = None, image_path: Path | None = None) -> np.ndarray:
    """Read a ground-truth mask as a bool (H, W) array; any non-zero pixel is anomalous.

    ``expected_shape`` (H, W) is the paired image's size; a mask of another size is an error that names both files.
    """
    path = Path(path)
    array = _to_uint8(_read_raw(path, cv2.IMREAD_UNCHANGED, "mask"))
    if array.ndim == 3:
        array = array.max(axis=2)
    if expected_shape is not None and array.shape[:2] != tuple(expected_shape):
        raise DataError(
            f"mask {path} is {array.shape[1]}x{array.shape[0]} but its image {image_path} is "
            f"{expected_shape[1]}x{expected_shape[0]}; masks must have the size of their image"
        )
    return array > 0


def resize_to_input(image: np.ndarray, size: int) -> np.ndarray:
    """H x W x 3 uint8 -> size x size x 3 uint8, bilinear (OpenCV); a frame of that size is passed through.

    The one resize: training, calibration, evaluation and every backend use it, so the pixels the exported graph
    sees are the pixels the PyTorch model was trained and calibrated on.
    """
    if image.shape[0] == size and image.shape[1] == size:
        return image
    return cv2.resize(image, (size, size), interpolation=cv2.INTER_LINEAR)
