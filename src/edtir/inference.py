"""The inference engine: any image through any model that carries EDT's descriptor.

    image ─ (x8 transforms) ─ mirror-pad to the size multiple ─ tiles ─ model ─ blend ─ crop ─ (inverse, mean)

The engine only knows the model through ``model(x, task)``, ``model.scale(task)`` and
``model.size_multiple(task)``; it never clips its input (noisy images leave [0, 1]) and leaves the output
unclamped for tensors (uint8 images come back clamped and rounded, the field's convention).
"""

from __future__ import annotations

import contextlib
import math

import numpy as np
import torch
import torch.nn.functional as F

PRECISIONS = ("fp32", "bf16")


# ------------------------------------------------------------------------------------------------------------
# Padding
# ------------------------------------------------------------------------------------------------------------

def mirror_pad(x: torch.Tensor, pad_h: int, pad_w: int) -> torch.Tensor:
    """Reflect-pad (B, C, H, W) at the bottom and right. Reflection cannot add more than side-1 pixels at a
    time, so tiny images are reflected repeatedly (and a 1-pixel side is repeated)."""
    while pad_h > 0 or pad_w > 0:
        H, W = x.shape[-2:]
        ph = min(pad_h, H - 1) if H > 1 else pad_h
        pw = min(pad_w, W - 1) if W > 1 else pad_w
        mode = "reflect" if (H > 1 or ph == 0) and (W > 1 or pw == 0) else "replicate"
        x = F.pad(x, (0, pw, 0, ph), mode=mode)
        pad_h, pad_w = pad_h - ph, pad_w - pw
    return x


def forward_padded(model, x: torch.Tensor, task: str) -> torch.Tensor:
    """model(x) for any H, W: pad to the size multiple, run, crop the (scaled) output back."""
    m, s = model.size_multiple(task), model.scale(task)
    H, W = x.shape[-2:]
    out = model(mirror_pad(x, -H % m, -W % m), task=task)
    return out[..., : H * s, : W * s]


# ------------------------------------------------------------------------------------------------------------
# Tiling
# ------------------------------------------------------------------------------------------------------------

def tile_starts(length: int, tile: int, overlap: int) -> list[int]:
    """Start offsets covering [0, length) with tiles of ``tile`` overlapping by at least ``overlap``; the last
    tile ends exactly at ``length``."""
    if length <= tile:
        return [0]
    stride = tile - overlap
    starts = list(range(0, length - tile, stride))
    return starts + [length - tile]


def blend_weights(n: int, overlap: int, lead: bool, trail: bool) -> torch.Tensor:
    """1-D blending weights of a tile side of ``n`` output pixels. On a side shared with a neighbouring tile
    (``lead``: the start, ``trail``: the end) the weight is 0 over the outer quarter of the overlap, where the
    tile lacks context, then rises linearly to 1 over the next half; on an image border it stays 1. The
    neighbour is at full weight wherever this tile is at 0, so every pixel is covered."""
    w = torch.ones(n)
    margin, ramp = overlap // 4, max(1, overlap // 2)
    d = torch.arange(n, dtype=torch.float32)
    rise = ((d - margin + 0.5) / ramp).clamp(0, 1)
    if lead:
        w = torch.minimum(w, rise)
    if trail:
        w = torch.minimum(w, rise.flip(0))
    return w


def forward_tiled(model, x: torch.Tensor, task: str, tile: int, overlap: int, tile_batch: int, device,
                  run, progress: bool) -> torch.Tensor:
    """Restore (B, C, H, W) tile by tile. ``x`` stays where it is (e.g. CPU); tiles go to ``device`` in
    batches of ``tile_batch``; outputs are blended on ``x``'s device, so device memory is bounded by the tile
    size."""
    m, s = model.size_multiple(task), model.scale(task)
    H, W = x.shape[-2:]
    xp = mirror_pad(x, -H % m, -W % m)  # every tile is then a multiple of m
    Hp, Wp = xp.shape[-2:]
    tile = max(m, math.ceil(tile / m) * m)
    th, tw = min(tile, Hp), min(tile, Wp)
    overlap = min(overlap, tile // 2)  # at most half a tile: the stride stays positive
    boxes = [(i, j) for i in tile_starts(Hp, th, overlap) for j in tile_starts(Wp, tw, overlap)]
    out = torch.zeros(x.shape[0], 3, Hp * s, Wp * s, dtype=torch.float32, device=x.device)
    weight = torch.zeros(1, 1, Hp * s, Wp * s, dtype=torch.float32, device=x.device)

    def mask(i, j):
        wy = blend_weights(th * s, overlap * s, i > 0, i + th < Hp)
        wx = blend_weights(tw * s, overlap * s, j > 0, j + tw < Wp)
        return (wy[:, None] * wx[None, :]).to(x.device)

    bar = _progress(len(boxes), progress, "tiles")
    for k in range(0, len(boxes), tile_batch):
        group = boxes[k:k + tile_batch]
        batch = torch.cat([xp[..., i:i + th, j:j + tw] for i, j in group]).to(device)
        res = run(batch).float().to(x.device)
        for n, (i, j) in enumerate(group):
            sl = (..., slice(i * s, (i + th) * s), slice(j * s, (j + tw) * s))
            w = mask(i, j)
            out[sl] += res[n * x.shape[0]:(n + 1) * x.shape[0]] * w
            weight[sl] += w
        bar.update(len(group))
    bar.close()
    return (out / weight)[..., : H * s, : W * s]


def _progress(total: int, enabled: bool, unit: str):
    from tqdm import tqdm

    return tqdm(total=total, disable=not enabled, unit=unit, leave=False, dynamic_ncols=True)


# ------------------------------------------------------------------------------------------------------------
# Self-ensemble
# ------------------------------------------------------------------------------------------------------------

def dihedral(x: torch.Tensor, k: int) -> torch.Tensor:
    """The k-th of the 8 flips/rotations (k = 0 is the identity)."""
    x = torch.flip(x, dims=(-1,)) if k >= 4 else x
    return torch.rot90(x, k % 4, dims=(-2, -1))


def dihedral_inverse(x: torch.Tensor, k: int) -> torch.Tensor:
    x = torch.rot90(x, -(k % 4), dims=(-2, -1))
    return torch.flip(x, dims=(-1,)) if k >= 4 else x


# ------------------------------------------------------------------------------------------------------------
# The main API
# ------------------------------------------------------------------------------------------------------------

def model_device(model) -> torch.device:
    for t in list(model.parameters()) + list(model.buffers()):
        return t.device
    return torch.device("cpu")


def autocast(device: torch.device, precision: str):
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; expected one of: {', '.join(PRECISIONS)}")
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)


def _as_batch(image):
    """Any accepted input -> ((B, 3, H, W) float32 tensor, a function that gives an output back in the
    input's kind)."""
    if isinstance(image, np.ndarray):
        if image.ndim != 3 or image.shape[2] != 3:
            raise ValueError(f"expected an HWC RGB image, got shape {image.shape}")
        if image.dtype == np.uint8:
            from .data.io import tensor_to_uint8, uint8_to_tensor

            return uint8_to_tensor(image), tensor_to_uint8
        if np.issubdtype(image.dtype, np.floating):
            t = torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1), dtype=np.float32))[None]
            return t, lambda y: y[0].permute(1, 2, 0).cpu().numpy().astype(image.dtype)
        raise ValueError(f"unsupported image dtype {image.dtype} (use uint8 or float in [0, 1])")
    if isinstance(image, torch.Tensor):
        if image.ndim == 3 and image.shape[0] == 3:
            return image[None].float(), lambda y: y[0].to(image.device)
        if image.ndim == 4 and image.shape[1] == 3:
            return image.float(), lambda y: y.to(image.device)
        raise ValueError(f"expected a (3, H, W) or (B, 3, H, W) tensor, got shape {tuple(image.shape)}")
    raise TypeError(f"expected a numpy image or a torch tensor, got {type(image).__name__}")


def resolve_task(model, task: str | None) -> str:
    """The task to run: the named one (which the model must have), or the model's only task."""
    if task is None:
        if len(model.tasks) != 1:
            raise ValueError(f"the model has several tasks ({', '.join(model.tasks)}): choose one (task=...)")
        return model.tasks[0]
    if task not in model.tasks:
        raise ValueError(f"task {task!r} is not in this model (it has: {', '.join(model.tasks)})")
    return task


@torch.inference_mode()
def restore(model, image, *, task: str | None = None, tile: int | None = None, tile_overlap: int = 32,
            tile_batch: int = 1, self_ensemble: bool = False, device=None, precision: str = "fp32",
            progress: bool = False):
    """Restore one image (or a batch) with ``model``.

    ``image``: uint8 HWC numpy (returns uint8 HWC, clamped and rounded), float HWC numpy in [0, 1] (returns
    float HWC), or a float tensor (3, H, W) / (B, 3, H, W) in [0, 1] (returns the same layout, unclamped,
    float32, on the input's device). Any size: the engine mirror-pads to the model's size multiple and crops
    back.
    ``tile``: input-side tile size (rounded up to the size multiple) for bounded memory; tiles overlap by
    ``tile_overlap`` input pixels (at most half a tile) and are blended; ``tile_batch`` tiles run per forward
    pass.
    ``self_ensemble``: average over the 8 flips/rotations. ``device``: where the model runs (the model is
    moved there; default: where it already is). ``precision``: "fp32" or "bf16" (autocast).
    """
    x, give_back = _as_batch(image)
    task = resolve_task(model, task)
    if tile is not None and tile <= 0:
        raise ValueError(f"tile must be positive, got {tile}")
    if tile_overlap < 0 or tile_batch < 1:
        raise ValueError("tile_overlap must be >= 0 and tile_batch >= 1")
    device = torch.device(device) if device is not None else model_device(model)
    model.to(device)
    was_training = model.training
    model.eval()

    def run(batch):
        with autocast(device, precision):
            return forward_padded(model, batch, task)

    def once(inp):
        if tile is None:
            return run(inp.to(device)).float()
        return forward_tiled(model, inp, task, tile, tile_overlap, tile_batch, device, run, progress)

    try:
        if not self_ensemble:
            y = once(x)
        else:
            y = None
            for k in range(8):
                out = dihedral_inverse(once(dihedral(x, k)), k).to(x.device)
                y = out if y is None else y + out
            y = y / 8
    finally:
        model.train(was_training)
    return give_back(y.to(x.device))
