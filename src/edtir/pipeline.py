"""Restoration of a user's picture, keeping what they gave: grey stays grey, alpha is kept (MATLAB-bicubic
resized for SR), 16 bits stay 16 bits. The model always sees float RGB in [0, 1]; this module is the layer between
files/arrays and :func:`edtir.inference.restore`, shared by ``edtir restore`` and the Python API.

    import edtir
    out = edtir.restore("photo.png", task="sr-x4")        # numpy, laid out like the input
"""

from __future__ import annotations

import os
from functools import lru_cache

import numpy as np

from .data.io import Picture, read_picture
from .errors import ImageError, UsageError


def restore_picture(model, pic: Picture, *, task: str, **kwargs) -> Picture:
    """Run ``model`` on a :class:`Picture`; ``kwargs`` go to :func:`edtir.inference.restore` (tile,
    tile_overlap, tile_batch, self_ensemble, device, precision, progress).

    8-bit RGB gives exactly what ``edtir eval`` computes (the same float input, clamped and rounded the same
    way). A grey picture runs as three equal channels and comes back as their mean; 16-bit pixels go in as
    value / 65535 and come back with 16 bits; alpha is resized by MATLAB bicubic for SR and kept otherwise."""
    from .data.imresize import imresize
    from .inference import restore

    x = pic.rgb if pic.bits == 32 else pic.rgb.astype(np.float32) / np.float32(pic.peak)
    y = restore(model, x, task=task, **kwargs)
    if pic.grey:
        y = np.repeat(y.mean(axis=2, keepdims=True, dtype=np.float32), 3, axis=2)
    rgb = _quantise(y, pic)
    alpha = pic.alpha
    s = model.scale(task)
    if alpha is not None and s > 1:
        if alpha.dtype == np.uint8:
            alpha = imresize(alpha, s)  # MATLAB: rounded to uint8
        else:
            alpha = _quantise(imresize(alpha.astype(np.float64) / pic.peak, s), pic)
    return Picture(rgb, alpha, pic.grey, pic.name)


def _quantise(y: np.ndarray, like: Picture) -> np.ndarray:
    """Float in [0, 1] -> the picture's pixel type: clamped, then scaled and rounded (half to even, as torch)."""
    y = np.clip(y, 0, 1)
    if like.bits == 32:
        return y.astype(np.float32)
    dtype = np.uint8 if like.bits == 8 else np.uint16
    return np.round(y.astype(np.float32) * np.float32(like.peak)).astype(dtype)


def as_picture(image) -> Picture:
    """A path, a PIL image or a numpy array (HW, HWC with 1-4 channels; uint8, uint16 or float in [0, 1])."""
    if isinstance(image, (str, os.PathLike)):
        return read_picture(image)
    if isinstance(image, np.ndarray):
        return Picture.from_array(image, "array")
    try:
        from PIL import Image
    except ImportError:  # pragma: no cover - pillow is a dependency
        Image = None
    if Image is not None and isinstance(image, Image.Image):
        from PIL import ImageOps

        from .data.io import decode_pil

        return Picture.from_array(decode_pil(ImageOps.exif_transpose(image)), "PIL image")
    raise ImageError(f"expected a file path, a numpy array or a PIL image, got {type(image).__name__}")


@lru_cache(maxsize=4)
def _cached_model(model, weights, task, zoo_dir):
    from . import zoo

    return zoo.get_model(model=model, weights=weights, task=task)


def resolve_model(model=None, weights=None, task: str | None = None):
    """A model object from ``model`` (an object, a bundled/baseline name or 'default'), ``weights`` (a file) or
    neither (the default bundled model of ``task``); loaded models are cached for repeated calls."""
    from . import zoo

    if model is not None and not isinstance(model, str):
        return model
    if weights is not None:
        weights = os.fspath(weights)
    needs_task = weights is None and (model in (None, "default") or model not in zoo.registry())
    return _cached_model(model, weights, task if needs_task else None, str(zoo.zoo_dir()))


def restore(image, *args, task: str | None = None, model=None, weights=None, **kwargs):
    """Restore one image in a line: ``edtir.restore("photo.png", task="sr-x4")``.

    ``image``: a file path, a PIL image or a numpy array (HW grey, HWC with 1-4 channels; uint8, uint16 or float
    in [0, 1]). ``model``: a bundled model or baseline name, ``"default"``, or a model object; ``weights``: a
    checkpoint file; neither: the default bundled model of ``task``. Returns a numpy array laid out like the
    input (grey stays HW, alpha is kept, the pixel type is kept; a file or PIL image gives its stored layout).
    Other keyword arguments (tile, tile_overlap, tile_batch, self_ensemble, device, precision, progress) are
    those of :func:`edtir.inference.restore`.

    The engine's own form ``edtir.restore(model, image, task=..., ...)`` (a model first) still works and
    returns what :func:`edtir.inference.restore` returns."""
    import torch

    if isinstance(image, torch.nn.Module) or (callable(image) and hasattr(image, "size_multiple")):
        from .inference import restore as engine

        if not args:
            raise TypeError("restore(model, image, ...): the image is missing")
        return engine(image, *args, task=task, **kwargs)
    if args:
        raise TypeError("restore(image, *, task=..., model=..., weights=...): pass the model by keyword")
    net = resolve_model(model, weights, task)
    from .inference import resolve_task

    try:
        task = resolve_task(net, task)
    except ValueError as e:
        raise UsageError(str(e)) from None
    return restore_picture(net, as_picture(image), task=task, **kwargs).array()
