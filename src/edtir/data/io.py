"""Safe image reading and writing.

Two readers: :func:`read_image` gives what evaluation and training use (HWC RGB uint8: grey becomes three equal
channels, alpha is dropped with a warning, 16 bits are rounded to 8); :func:`read_picture` keeps what restore
gives back (grey, alpha, 16 bits) in a :class:`Picture`. Both apply the EXIF orientation, refuse images over a
pixel limit before decoding them (``$EDTIR_MAX_PIXELS``, default 400 megapixels) and turn every bad file into a
one-line ImageError naming it. Writes go to a temporary name in the same folder and are renamed into place, so a
user's file is never half-written, and a failed write leaves nothing.
"""

from __future__ import annotations

import errno
import logging
import os
import struct
import tempfile
import warnings
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from ..errors import EdtirError, ImageError

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp", ".ppm", ".pgm")
#: default decompression-bomb limit (400 megapixels, far above any real photo); $EDTIR_MAX_PIXELS changes it
MAX_PIXELS = 20000 * 20000
MAX_PIXELS_ENV = "EDTIR_MAX_PIXELS"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"

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


#: EXIF orientation -> numpy steps that show the image upright (as PIL's ImageOps.exif_transpose)
ORIENT = {2: "lr", 3: "r180", 4: "ud", 5: "t", 6: "cw", 7: "tv", 8: "ccw"}


def max_pixels(limit: int | None = None) -> int:
    """The decompression-bomb limit: ``limit`` when given, else ``$EDTIR_MAX_PIXELS``, else MAX_PIXELS."""
    if limit is None:
        text = os.environ.get(MAX_PIXELS_ENV, "").replace("_", "").replace(",", "")
        if not text:
            return MAX_PIXELS
        try:
            limit = int(float(text))
        except ValueError:
            raise ImageError(f"{MAX_PIXELS_ENV}={os.environ[MAX_PIXELS_ENV]!r}: not a number of pixels") from None
    if limit <= 0:
        raise ImageError(f"the pixel limit must be positive (got {limit})")
    return int(limit)


@dataclass
class Picture:
    """An image as ``edtir restore`` must give it back: colour, alpha, grey-ness and bit depth.

    ``rgb`` is HWC with 3 channels (a grey image has three equal ones), uint8, uint16 or float32 in [0, 1];
    ``alpha`` is HW of the same type, or None."""

    rgb: np.ndarray
    alpha: np.ndarray | None = None
    grey: bool = False
    name: str = "image"

    @property
    def bits(self) -> int:
        return {np.dtype(np.uint8): 8, np.dtype(np.uint16): 16}.get(self.rgb.dtype, 32)

    @property
    def peak(self) -> float:
        return {8: 255.0, 16: 65535.0}.get(self.bits, 1.0)

    @property
    def mode(self) -> str:
        return ("L" if self.grey else "RGB") + ("A" if self.alpha is not None else "")

    def array(self) -> np.ndarray:
        """As stored: (H, W) grey, (H, W, 2) grey + alpha, (H, W, 3) RGB or (H, W, 4) RGBA."""
        colour = self.rgb[..., :1] if self.grey else self.rgb
        if self.alpha is not None:
            colour = np.concatenate([colour, self.alpha[..., None]], axis=2)
        return colour[..., 0] if colour.shape[2] == 1 else np.ascontiguousarray(colour)

    @classmethod
    def from_array(cls, arr: np.ndarray, name: str = "image") -> Picture:
        """(H, W) or (H, W, C) with C in 1-4 (grey, grey + alpha, RGB, RGBA): uint8, uint16, bool or float in
        [0, 1]."""
        arr = np.asarray(arr)
        if arr.dtype == np.bool_:
            arr = arr.astype(np.uint8) * 255
        elif np.issubdtype(arr.dtype, np.floating):
            arr = arr.astype(np.float32)
        elif arr.dtype not in (np.uint8, np.uint16):
            raise ImageError(f"{name}: unsupported pixel type {arr.dtype} (use uint8, uint16 or float in [0, 1])")
        if arr.ndim == 2:
            arr = arr[..., None]
        if arr.ndim != 3 or arr.shape[2] not in (1, 2, 3, 4) or min(arr.shape[:2]) == 0:
            raise ImageError(f"{name}: unsupported image shape {arr.shape} (expected HxW or HxWxC, C = 1 to 4)")
        if arr.dtype == np.float32:
            arr = _unit_range(arr, name)
        c = arr.shape[2]
        alpha = np.ascontiguousarray(arr[..., -1]) if c in (2, 4) else None
        colour = arr[..., :1] if c <= 2 else arr[..., :3]
        return cls(np.ascontiguousarray(np.repeat(colour, 3, axis=2) if c <= 2 else colour), alpha, c <= 2, name)


def _unit_range(arr: np.ndarray, name: str) -> np.ndarray:
    """Float pixels (a non-empty image) in [0, 1], refused otherwise: 0-255 floats would come back as a white image,
    without a word. A rounding's overshoot (up to 0.01 past either end) is clipped."""
    if not np.isfinite(arr).all():
        raise ImageError(f"{name}: has NaN or infinite pixels")
    lo, hi = float(arr.min()), float(arr.max())
    if lo < -0.01 or hi > 1.01:
        hint = " (0-255 data: divide by 255, or pass uint8)" if hi > 1.5 else ""
        raise ImageError(f"{name}: float pixels must lie in [0, 1]; these span [{lo:.4g}, {hi:.4g}]{hint}")
    return np.clip(arr, 0.0, 1.0)


def _orient(arr: np.ndarray, orientation: int) -> np.ndarray:
    step = ORIENT.get(orientation)
    if step is None:
        return arr
    if step in ("t", "tv"):
        arr = np.swapaxes(arr, 0, 1)
        return arr[::-1, ::-1] if step == "tv" else arr
    ops = {"lr": lambda a: a[:, ::-1], "ud": lambda a: a[::-1], "r180": lambda a: a[::-1, ::-1],
           "cw": lambda a: np.rot90(a, -1), "ccw": lambda a: np.rot90(a, 1)}
    return np.ascontiguousarray(ops[step](arr))


def _png_depth(path: Path) -> tuple[int, int] | None:
    """(bit depth, colour type) from a PNG's IHDR, None for another format."""
    with open(path, "rb") as f:
        head = f.read(26)
    if len(head) < 26 or not head.startswith(PNG_SIGNATURE):
        return None
    return head[24], head[25]


def _needs_opencv(path: Path, im) -> bool:
    """16-bit colour (or grey + alpha): PIL reads only 8 bits of these, OpenCV all 16."""
    if im.format == "PNG":
        depth = _png_depth(path)
        return depth is not None and depth[0] == 16 and depth[1] != 0
    if im.format == "TIFF":
        bits = im.tag_v2.get(258, (8,))
        bits = bits if isinstance(bits, tuple) else (bits,)
        return 16 in bits and len(bits) > 1
    return False


def _read_16bit(path: Path, name: str) -> tuple[np.ndarray, bool]:
    """(array as stored: HW, HWC RGB or RGBA, uint16; grey + alpha flag) by OpenCV."""
    try:
        import cv2
    except ImportError:
        raise ImageError(f"{name}: 16-bit colour images need OpenCV (pip install opencv-python-headless)") from None
    try:
        cv2.setLogLevel(0)  # errors come back as None here, not as lines on stderr
    except AttributeError:
        pass
    arr = cv2.imdecode(np.fromfile(path, np.uint8), cv2.IMREAD_UNCHANGED)
    if arr is None or arr.dtype != np.uint16:
        raise ImageError(f"{name}: cannot decode this 16-bit image")
    depth = _png_depth(path)
    grey_alpha = depth is not None and depth[1] == 4
    if arr.ndim == 3:
        arr = arr[..., [2, 1, 0, 3][: arr.shape[2]]]  # BGR(A) -> RGB(A)
        if grey_alpha:
            arr = arr[..., [0, 3]]
    return arr, grey_alpha


def decode_pil(im, name: str = "PIL image", path: Path | None = None) -> np.ndarray:
    """PIL image -> array as stored (HW, HWC with 2-4 channels), uint8 or uint16. ``path``: the file it was
    opened from, re-read by OpenCV when it has 16-bit colour (which PIL reduces to 8 bits)."""
    mode = im.mode
    if path is not None and _needs_opencv(path, im):
        return _read_16bit(path, name)[0]
    if mode.startswith("I;16"):
        return np.asarray(im).astype(np.uint16)
    if mode == "I":
        return np.clip(np.asarray(im), 0, 65535).astype(np.uint16)
    if mode == "F":
        raise ImageError(f"{name}: 32-bit float pixels are not supported (save as 8- or 16-bit)")
    if mode in ("L", "LA", "RGB", "RGBA"):
        return np.asarray(im)
    if mode in ("P", "PA"):
        return np.asarray(im.convert("RGBA" if mode == "PA" or "transparency" in im.info else "RGB"))
    if mode == "1":
        return np.asarray(im.convert("L"))
    if mode in ("La", "RGBa"):
        return np.asarray(im.convert(mode.upper()))
    return np.asarray(im.convert("RGB"))  # CMYK, YCbCr, LAB, HSV, RGBX


def _check_path(path: Path) -> None:
    if not path.exists():
        raise ImageError(f"{path}: no such file")
    if path.is_dir():
        raise ImageError(f"{path}: is a folder, not an image")
    if not os.access(path, os.R_OK):
        raise ImageError(f"{path}: permission denied")
    if path.stat().st_size == 0:
        raise ImageError(f"{path}: empty file (0 bytes)")


def read_picture(path: str | os.PathLike, *, limit: int | None = None) -> Picture:
    """Read an image file keeping what restore gives back: grey stays grey, alpha is kept, 16 bits stay 16
    bits; the EXIF orientation is applied. Palette images become RGB(A), CMYK and other colour spaces RGB.
    Refused with a one-line ImageError naming the file: missing, unreadable, empty, truncated or not an image,
    and images over ``limit`` pixels (default: :func:`max_pixels`), checked before decoding."""
    path = Path(path)
    name = str(path)
    _check_path(path)
    limit = max_pixels(limit)
    hint = f"raise the limit with {MAX_PIXELS_ENV} or --max-pixels"
    Image.MAX_IMAGE_PIXELS = limit  # PIL's own check (at twice this) guards formats that decode on open
    try:
        with warnings.catch_warnings():  # PIL's notes on damaged tags: the pixels decode or fail below
            warnings.simplefilter("ignore")
            im = Image.open(path)
            with im:
                w, h = im.size
                if w * h > limit:
                    raise ImageError(f"{name}: {w}x{h} is {w * h:,} pixels, over the limit of {limit:,} ({hint})")
                if w == 0 or h == 0:
                    raise ImageError(f"{name}: empty image ({w}x{h})")
                try:
                    orientation = int(im.getexif().get(0x0112, 1))
                except Exception:  # a broken EXIF block is no reason to refuse the pixels
                    orientation = 1
                im.load()
                arr = decode_pil(im, name, path)
    except UnidentifiedImageError:
        raise ImageError(f"{name}: not an image file (or an unsupported format)") from None
    except Image.DecompressionBombError:
        raise ImageError(f"{name}: declared size is over the limit of {limit:,} pixels ({hint})") from None
    except PermissionError:
        raise ImageError(f"{name}: permission denied") from None
    except (OSError, SyntaxError, ValueError, EOFError, struct.error) as e:
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ImageError(f"{name}: cannot decode image ({reason[:120]})") from None
    return Picture.from_array(_orient(arr, orientation), name)


def read_image(path: str | os.PathLike, *, limit: int | None = None) -> np.ndarray:
    """Read an image file as HWC RGB uint8 (what evaluation and training use): grey becomes three equal
    channels, alpha is dropped with a warning, 16 bits are rounded to 8. Errors as :func:`read_picture`."""
    pic = read_picture(path, limit=limit)
    rgb = pic.rgb
    if pic.alpha is not None:
        warnings.warn(f"{path}: alpha channel dropped", stacklevel=2)
    if rgb.dtype == np.uint16:
        rgb = np.round(rgb.astype(np.float64) / 257.0).astype(np.uint8)
    return rgb


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_bytes(path: str | os.PathLike, write, *, overwrite: bool = True) -> None:
    """Call ``write(tmp_path)``, fsync, then rename the temporary file onto ``path`` (same folder, so atomic):
    a reader, or a run killed at any moment, never sees a partial file, and a failed write (a full disk)
    leaves nothing behind. ``overwrite=False`` links instead of renaming, so a file that appeared meanwhile is
    never replaced (FileExistsError)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; give the file the usual permissions
        if overwrite:
            os.replace(tmp, path)
            return
        try:
            os.link(tmp, path)  # atomic and never clobbers
        except FileExistsError:
            raise
        except OSError:  # a file system without hard links
            if path.exists():
                raise FileExistsError(errno.EEXIST, "file exists", str(path)) from None
            os.replace(tmp, path)
    finally:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass


def ensure_writable_dir(folder: str | os.PathLike) -> Path:
    """Create ``folder`` if needed and prove a file can be written there: a clear error before any work."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise EdtirError(f"{folder}: exists and is not a folder")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".edtir-write-test.", dir=folder)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise EdtirError(f"{folder}: cannot write to this output folder ({e.strerror or e})") from None
    return folder


#: output format per extension; what each can hold: (alpha, grey, 16 bits)
FORMATS = {".png": ("PNG", True, True, True), ".tif": ("TIFF", True, True, False),
           ".tiff": ("TIFF", True, True, False), ".webp": ("WEBP", True, False, False),
           ".bmp": ("BMP", False, True, False), ".jpg": ("JPEG", False, True, False),
           ".jpeg": ("JPEG", False, True, False), ".ppm": ("PPM", False, True, False),
           ".pgm": ("PPM", False, True, False)}


def encode_png16(arr: np.ndarray) -> bytes:
    """(H, W) or (H, W, C) uint16 with C = 1-4 -> 16-bit PNG bytes (PIL cannot write 16-bit colour). Rows use
    the 'Up' filter (vectorised, close to adaptive filtering on photos) and zlib."""
    a = arr[..., None] if arr.ndim == 2 else arr
    h, w, c = a.shape
    rows = np.ascontiguousarray(a, dtype=">u2").view(np.uint8).reshape(h, w * c * 2)
    up = rows.copy()
    up[1:] -= rows[:-1]  # uint8 arithmetic wraps modulo 256, as the filter is defined

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", w, h, 16, {1: 0, 2: 4, 3: 2, 4: 6}[c], 0, 0, 0)
    data = np.concatenate([np.full((h, 1), 2, np.uint8), up], axis=1).tobytes()
    return PNG_SIGNATURE + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(data, 6)) + chunk(b"IEND", b"")


def _to_bits8(x: np.ndarray) -> np.ndarray:
    if x.dtype == np.uint8:
        return x
    if x.dtype == np.uint16:
        return np.round(x.astype(np.float64) / 257.0).astype(np.uint8)
    return np.clip(np.round(np.asarray(x, dtype=np.float64) * 255.0), 0, 255).astype(np.uint8)


def write_picture(path: str | os.PathLike, pic: Picture, *, overwrite: bool = False) -> Path:
    """Write a :class:`Picture` atomically, keeping grey, alpha and 16 bits where the format can hold them
    (PNG holds all; what a format cannot hold is converted, with a warning). Never replaces an existing file
    unless ``overwrite``; a failed write (disk full) leaves no file. Float pictures are written as 8 bits."""
    path = Path(path)
    spec = FORMATS.get(path.suffix.lower())
    if spec is None:
        raise ImageError(f"{path}: unsupported output extension (use one of {', '.join(FORMATS)})")
    fmt, has_alpha, has_grey, has_16 = spec
    alpha = pic.alpha
    if alpha is not None and not has_alpha:
        log.warning("%s: %s has no alpha channel; alpha dropped", path, fmt)
        alpha = None
    grey = pic.grey and has_grey
    view = Picture(pic.rgb, alpha, grey, pic.name)
    if pic.bits == 16 and has_16:
        payload = encode_png16(view.array())

        def write(tmp):
            Path(tmp).write_bytes(payload)
    else:
        if pic.bits == 16:
            log.warning("%s: %s is written with 8 bits per channel (use .png to keep 16)", path, fmt)
        arr = view.array()
        im = Image.fromarray(_to_bits8(arr))

        def write(tmp):
            im.save(tmp, format=fmt)
    try:
        atomic_write_bytes(path, write, overwrite=overwrite)
    except FileExistsError:
        raise ImageError(f"{path}: exists (use --overwrite to replace it)") from None
    except OSError as e:
        raise ImageError(f"{path}: cannot write ({e.strerror or e}); nothing was left behind") from None
    return path


def write_image(path: str | os.PathLike, image: np.ndarray, *, overwrite: bool = True) -> Path:
    """Write HWC RGB uint8 (or float in [0, 1], rounded; or uint16) atomically; the format follows the
    extension."""
    arr = np.asarray(image)
    if arr.dtype not in (np.uint8, np.uint16):
        arr = _to_bits8(arr)
    pic = Picture.from_array(arr, str(path))
    return write_picture(path, pic, overwrite=overwrite)


def uint8_to_tensor(image: np.ndarray):
    """HWC uint8 -> (1, 3, H, W) float32 in [0, 1]."""
    import torch

    return torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1))).float().div_(255.0).unsqueeze(0)


def tensor_to_uint8(t) -> np.ndarray:
    """(1, 3, H, W) or (3, H, W) float in [0, 1] -> HWC uint8, clamped and rounded (the field's convention)."""
    if t.ndim == 4:
        t = t[0]
    return t.detach().float().clamp(0, 1).mul(255.0).round().byte().permute(1, 2, 0).cpu().numpy()
