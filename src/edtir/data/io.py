"""Safe image reading and writing.

Images are numpy arrays, HWC, RGB, uint8 (3 channels). Grey images become three equal channels; an alpha channel is
dropped with a warning; 16-bit images are scaled to 8 bits. Writes go to a temporary name in the same folder and
are renamed into place, so a user's file is never half-written.
"""

from __future__ import annotations

import logging
import os
import tempfile
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from ..errors import ImageError

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp", ".ppm", ".pgm")
MAX_PIXELS = 20000 * 20000  # refuse decompression bombs, far above any real photo

Image.MAX_IMAGE_PIXELS = MAX_PIXELS


def is_image_file(path: str | os.PathLike) -> bool:
    return Path(path).suffix.lower() in IMAGE_EXTENSIONS and not Path(path).name.startswith(".")


def list_images(folder: str | os.PathLike, recursive: bool = False) -> list[Path]:
    """Image files of a folder in sorted order (nested folders too when ``recursive``)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ImageError(f"{folder}: not a folder")
    it = folder.rglob("*") if recursive else folder.iterdir()
    return sorted(p for p in it if p.is_file() and is_image_file(p))


def to_rgb_uint8(arr: np.ndarray, name: str = "image") -> np.ndarray:
    """Any HW / HWC array of 1-4 channels, uint8 or uint16 -> HWC RGB uint8."""
    if arr.dtype == np.uint16:
        arr = np.round(arr.astype(np.float64) / 257.0).astype(np.uint8)
    elif arr.dtype == np.bool_:
        arr = arr.astype(np.uint8) * 255
    elif arr.dtype != np.uint8:
        raise ImageError(f"{name}: unsupported pixel type {arr.dtype}")
    if arr.ndim == 2:
        arr = arr[..., None]
    if arr.ndim != 3 or arr.shape[2] not in (1, 2, 3, 4):
        raise ImageError(f"{name}: unsupported image shape {arr.shape}")
    if arr.shape[2] in (2, 4):
        warnings.warn(f"{name}: alpha channel dropped", stacklevel=3)
        arr = arr[..., :-1]
    if arr.shape[2] == 1:
        arr = np.repeat(arr, 3, axis=2)
    return np.ascontiguousarray(arr)


def read_image(path: str | os.PathLike) -> np.ndarray:
    """Read an image file as HWC RGB uint8; a clear ImageError for anything that is not a readable image."""
    path = Path(path)
    if not path.exists():
        raise ImageError(f"{path}: no such file")
    if path.is_dir():
        raise ImageError(f"{path}: is a folder, not an image")
    try:
        with Image.open(path) as im:
            im.load()
            mode = im.mode
            if mode in ("I;16", "I;16B", "I;16L", "I"):
                arr = np.asarray(im).astype(np.uint16 if mode.startswith("I;16") else np.int64)
                if arr.dtype != np.uint16:
                    arr = np.clip(arr, 0, 65535).astype(np.uint16)
            elif mode == "P":
                arr = np.asarray(im.convert("RGBA" if "transparency" in im.info else "RGB"))
            elif mode in ("L", "LA", "RGB", "RGBA"):
                arr = np.asarray(im)
            elif mode == "1":
                arr = np.asarray(im.convert("L"))
            else:  # CMYK, YCbCr, F, ...
                arr = np.asarray(im.convert("RGB"))
    except UnidentifiedImageError:
        raise ImageError(f"{path}: not an image file (or an unsupported format)") from None
    except Image.DecompressionBombError:
        raise ImageError(f"{path}: image is too large (over {MAX_PIXELS:,} pixels)") from None
    except (OSError, SyntaxError, ValueError) as e:
        raise ImageError(f"{path}: cannot decode image ({e})") from None
    if arr.size == 0 or min(arr.shape[:2]) == 0:
        raise ImageError(f"{path}: empty image")
    return to_rgb_uint8(arr, str(path))


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_bytes(path: str | os.PathLike, write) -> None:
    """Call ``write(tmp_path)``, fsync, then rename the temporary file onto ``path`` (same folder, so atomic):
    a reader, or a run killed at any moment, never sees a partial file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; give the file the usual permissions
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def write_image(path: str | os.PathLike, image: np.ndarray, *, overwrite: bool = True) -> Path:
    """Write HWC RGB uint8 (or float in [0, 1], rounded) atomically; the format follows the extension."""
    path = Path(path)
    if path.suffix.lower() not in IMAGE_EXTENSIONS:
        raise ImageError(f"{path}: unsupported output extension (use one of {', '.join(IMAGE_EXTENSIONS)})")
    if not overwrite and path.exists():
        raise ImageError(f"{path}: exists (refusing to overwrite)")
    if image.dtype != np.uint8:
        image = np.clip(np.round(np.asarray(image, dtype=np.float64) * 255.0), 0, 255).astype(np.uint8)
    fmt = {".jpg": "JPEG", ".jpeg": "JPEG", ".tif": "TIFF", ".tiff": "TIFF", ".pgm": "PPM"}.get(
        path.suffix.lower(), path.suffix.lower().lstrip(".").upper())
    im = Image.fromarray(image.squeeze(-1) if image.ndim == 3 and image.shape[2] == 1 else image)
    atomic_write_bytes(path, lambda tmp: im.save(tmp, format=fmt))
    return path


def uint8_to_tensor(image: np.ndarray):
    """HWC uint8 -> (1, 3, H, W) float32 in [0, 1]."""
    import torch

    return torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1))).float().div_(255.0).unsqueeze(0)


def tensor_to_uint8(t) -> np.ndarray:
    """(1, 3, H, W) or (3, H, W) float in [0, 1] -> HWC uint8, clamped and rounded (the field's convention)."""
    if t.ndim == 4:
        t = t[0]
    return t.detach().float().clamp(0, 1).mul(255.0).round().byte().permute(1, 2, 0).cpu().numpy()
