"""The inference engine: any image through any model that carries EDT's descriptor.

    image ─ (x8 transforms) ─ mirror-pad to the size multiple ─ tiles ─ model ─ blend ─ crop ─ (inverse, mean)

The engine only knows the model through ``model(x, task)``, ``model.scale(task)`` and
``model.size_multiple(task)``; it never clips its input (noisy images leave [0, 1]) and leaves the output
unclamped for tensors (uint8 images come back clamped and rounded, the field's convention).

Memory: an image whose forward pass would not fit the free memory of the device (estimated from the model's
descriptor, see :func:`bytes_per_pixel`) is restored in tiles automatically, and an out-of-memory error during a
pass is retried with tiles half the size, down to the size multiple (docs/reliability.md).
"""

from __future__ import annotations

import contextlib
import gc
import logging
import math
import os
import re

import numpy as np
import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)

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

    with _progress(len(boxes), progress, "tiles") as bar:
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
    return (out / weight)[..., : H * s, : W * s]


def _progress(total: int, enabled: bool, unit: str):
    from tqdm import tqdm

    return tqdm(total=total, disable=not enabled, unit=unit, leave=False, dynamic_ncols=True)


# ------------------------------------------------------------------------------------------------------------
# Memory: automatic tiling and out-of-memory retries
# ------------------------------------------------------------------------------------------------------------

#: A forward-pass budget in bytes (``4G``, ``512M``, ``1.5e9``); replaces the measured free memory.
MEMORY_LIMIT_ENV = "EDTIR_MEMORY_LIMIT"
#: Share of the free memory one forward pass may plan on: the rest is for what else runs, fragmentation and
#: the error of the estimate (CPU: other processes share the RAM; CUDA: the caching allocator).
FREE_FRACTION = {"cpu": 0.5, "cuda": 0.8}
_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
_OOM_WORDS = ("out of memory", "not enough memory", "can't allocate memory", "cannot allocate memory")


def parse_bytes(text: str) -> int:
    """``"4G"``, ``"512M"``, ``"1.5e9"``, ``"800 MiB"`` -> bytes (powers of 1024 for the suffixes)."""
    m = re.fullmatch(r"\s*([0-9.]+(?:e[0-9]+)?)\s*([KMGT]?)(?:i?B)?\s*", text, re.IGNORECASE)
    if not m:
        raise ValueError(f"not an amount of memory: {text!r} (e.g. 4G, 512M or a number of bytes)")
    value = float(m.group(1)) * _UNITS[m.group(2).upper()]
    if value <= 0:
        raise ValueError(f"a memory limit must be positive, got {text!r}")
    return int(value)


def bytes_per_pixel(model, task: str) -> float:
    """Estimated peak bytes of one fp32 forward pass per input pixel, from the model's descriptor.

    EDT (``model.info.config``): per body token ``4 * 24 * embed_dim`` (the activations alive at once inside a
    block) plus ``8 * window area`` (the two cached shift masks); one token per input pixel for SR, one per 16
    for the down-sampling denoise/derain heads, which add ``4 * 16 * num_feat`` at full resolution; the tail
    adds ``4 * (2 * num_feat + 6) * scale**2``. Calibrated on the CPU for EDT-T/S/B, SR x2-x4 and denoising
    (``python benchmarks/inference_memory.py``: the estimate was 9-46 % above the measured peak). A model may
    give its own figure with a ``memory_per_pixel(task)`` method; models without a config (the baselines) are
    taken as a few image-sized float32 copies."""
    own = getattr(model, "memory_per_pixel", None)
    if callable(own):
        return float(own(task))
    s = model.scale(task)
    info = getattr(model, "info", None)
    cfg = getattr(info, "config", None)
    if cfg is None or not hasattr(cfg, "embed_dim"):
        return 4.0 * 4 * 3 * (1 + s * s)
    down = bool(cfg.downsample) and s == 1  # denoise/derain heads of EDT (not EDT-SF) work at 1/4 the side
    wh, ww = cfg.window_size
    per_token = 4.0 * 24 * cfg.embed_dim + 8.0 * wh * ww
    return per_token / (16 if down else 1) + (4.0 * 16 * cfg.num_feat if down else 0.0) \
        + 4.0 * (2 * cfg.num_feat + 6) * s * s


def _read_kib(path: str, key: str) -> int | None:
    try:
        with open(path) as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def _cgroup_free() -> int | None:
    """Memory left under a container's cgroup limit (v2 or v1), None without a limit."""
    for limit_file, usage_file in (("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
                                   ("/sys/fs/cgroup/memory/memory.limit_in_bytes",
                                    "/sys/fs/cgroup/memory/memory.usage_in_bytes")):
        try:
            with open(limit_file) as f:
                limit = f.read().strip()
            with open(usage_file) as f:
                usage = int(f.read().strip())
        except (OSError, ValueError):
            continue
        if limit.isdigit() and int(limit) < 1 << 60:
            return max(0, int(limit) - usage)
    return None


def free_memory(device: torch.device) -> int | None:
    """Bytes the device can still give: CUDA's free memory plus what torch holds cached but unused; on the CPU
    the kernel's MemAvailable, capped by a cgroup limit. None where it cannot be told (then no automatic
    tiling; out-of-memory retries still apply)."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device))
    if device.type == "cpu":
        found = [v for v in (_read_kib("/proc/meminfo", "MemAvailable"), _cgroup_free()) if v is not None]
        if not found and hasattr(os, "sysconf"):
            try:
                found = [os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")]
            except (ValueError, OSError):
                pass
        return min(found) if found else None
    return None


def memory_budget(device: torch.device, limit: int | str | None = None) -> int | None:
    """Bytes one forward pass may use: ``limit``, else ``$EDTIR_MEMORY_LIMIT``, else a share of the free
    memory (:data:`FREE_FRACTION`)."""
    if limit is None:
        limit = os.environ.get(MEMORY_LIMIT_ENV) or None
    if limit is not None:
        return parse_bytes(limit) if isinstance(limit, str) else int(limit)
    free = free_memory(device)
    return None if free is None else int(free * FREE_FRACTION.get(device.type, 0.5))


def plan_tile(model, task: str, shape, device: torch.device, tile_batch: int = 1,
              memory_limit: int | str | None = None) -> int | None:
    """None when the whole (B, 3, H, W) input fits the memory budget in one pass; else the largest tile side
    (a multiple of the size multiple) whose ``tile_batch`` tiles fit, at least the size multiple."""
    budget = memory_budget(device, memory_limit)
    if budget is None:
        return None
    B, H, W = shape[0], shape[-2], shape[-1]
    m = model.size_multiple(task)
    per_px = bytes_per_pixel(model, task)
    need = per_px * B * math.ceil(H / m) * m * math.ceil(W / m) * m
    if need <= budget:
        return None
    side = max(m, int(math.sqrt(budget / (per_px * B * tile_batch))) // m * m)
    log.warning("a %dx%d input needs about %s for one pass, %s can be spent: restoring in tiles of %d pixels",
                W, H, _gib(need), _gib(budget), side)
    return side


def _gib(n: float) -> str:
    return f"{n / (1 << 30):.2f} GiB"


def is_out_of_memory(e: BaseException) -> bool:
    """torch.OutOfMemoryError (CUDA), MemoryError, or an allocator's RuntimeError (CPU: "can't allocate
    memory" / "not enough memory")."""
    if isinstance(e, (MemoryError, _TORCH_OOM)):
        return True
    return isinstance(e, RuntimeError) and any(w in str(e).lower() for w in _OOM_WORDS)


_TORCH_OOM = getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError)


def smaller_tile(tile: int | None, shape, multiple: int) -> int | None:
    """The next tile side to try after running out of memory with ``tile`` (None: the whole image): half of
    it (half of the longer side for the whole image), a multiple of ``multiple``; None below ``multiple``."""
    H, W = shape[-2], shape[-1]
    if tile is None:
        side = math.ceil(max(H, W) / 2 / multiple) * multiple
    else:
        side = (min(tile, max(H, W)) // 2) // multiple * multiple
    return side if multiple <= side and (tile is None or side < tile) else None


def release_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


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
            progress: bool = False, auto_tile: bool = True, memory_limit: int | str | None = None):
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
    ``auto_tile``: without ``tile``, restore in tiles when the estimated need of one pass is over
    ``memory_limit`` (bytes or "4G"; default ``$EDTIR_MEMORY_LIMIT``, else a share of the device's free
    memory). Whatever the tiling, an out-of-memory error halves the tile batch, then the tile, and tries
    again (the result is then the one of that tile size); :class:`~edtir.errors.OutOfMemory` when even tiles of
    the size multiple do not fit.
    """
    from .errors import OutOfMemory

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
    m = model.size_multiple(task)
    plan = {"tile": tile, "batch": tile_batch}
    if tile is None and auto_tile:
        plan["tile"] = plan_tile(model, task, x.shape, device, tile_batch, memory_limit)

    def run(batch):
        with autocast(device, precision):
            return forward_padded(model, batch, task)

    def once(inp):
        while True:
            t, tb = plan["tile"], plan["batch"]
            try:
                if t is None:
                    return run(inp.to(device)).float()
                return forward_tiled(model, inp, task, t, tile_overlap, tb, device, run, progress)
            except Exception as e:  # noqa: BLE001 - only out-of-memory errors are retried
                if not is_out_of_memory(e):
                    raise
                why = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
            release_memory(device)  # outside the except block: the traceback no longer pins the tensors
            if t is not None and tb > 1:
                plan["batch"] = tb // 2
                log.warning("out of memory on %s with %d tiles of %d per pass; retrying with %d", device, tb,
                            t, tb // 2)
                continue
            plan["tile"] = smaller_tile(t, inp.shape, m)
            if plan["tile"] is None:
                raise OutOfMemory(f"out of memory on {device} even in tiles of {t or max(inp.shape[-2:])} "
                                  f"pixels ({why}); free memory or use another --device") from None
            log.warning("out of memory on %s with %s; retrying in tiles of %d pixels", device,
                        "the whole image" if t is None else f"tiles of {t}", plan["tile"])

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
