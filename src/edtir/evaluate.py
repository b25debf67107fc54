"""Task protocols and the benchmark runner: published tables, reproduced to the hundredth of a dB.

Per task (see docs/evaluation.md):

* ``sr-xS``: HR cropped top-left to a multiple of S ("modcrop"); LR = MATLAB ``imresize(HR, 1/S)`` as uint8;
  PSNR/SSIM on BT.601 studio-swing Y with ``S`` pixels cropped on each side.
* ``denoise-SIGMA``: noisy = uint8 GT + N(0, SIGMA) on the 0-255 scale, neither clipped nor rounded; the
  noise comes from ``numpy.random.RandomState(NOISE_SEED)`` seeded once per data set and drawn image by image
  in sorted file order (as the EDT release does with ``np.random.seed(0)``); metrics on RGB, no crop.
* ``derain-*``: pairs ``rainy/NAME`` and ``clean/NAME``; metrics on Y, no crop.

Outputs are clamped to [0, 1], scaled by 255 and rounded to uint8 before any metric. A data folder is either a
folder of clean images or a folder with ``rainy/`` and ``clean/`` (SR and denoising then use ``clean/``).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from .data.degrade import modcrop
from .data.imresize import imresize
from .data.io import list_images, read_image, tensor_to_uint8, write_image
from .errors import EdtirError, ImageError, UsageError
from .inference import restore
from .metrics import psnr, ssim
from .models.edt import TASKS, task_kind, task_scale

#: Seed of the denoising noise, once per data set (the EDT release's ``np.random.seed(0)``).
NOISE_SEED = 0


@dataclass
class Protocol:
    """How a task turns a ground truth into an input, and how it scores the output."""

    task: str
    kind: str
    scale: int = 1
    sigma: float = 0.0
    y_channel: bool = False
    crop_border: int = 0


def protocol(task: str) -> Protocol:
    if task not in TASKS:
        raise UsageError(f"unknown task {task!r}; expected one of: {' '.join(TASKS)}")
    kind = task_kind(task)
    if kind == "sr":
        s = task_scale(task)
        return Protocol(task, kind, scale=s, y_channel=True, crop_border=s)
    if kind == "denoise":
        return Protocol(task, kind, sigma=float(task.split("-")[1]))
    return Protocol(task, kind, y_channel=True)


def add_noise(gt: np.ndarray, sigma: float, rng: np.random.RandomState) -> np.ndarray:
    """uint8 GT -> float64 noisy image in the 0-255 scale, not clipped, not rounded. Unlike the training
    degradation (``degrade.add_noise``, float32 from a Generator), this reproduces the EDT release's
    ``np.random.seed(0)`` draws exactly."""
    return gt.astype(np.float64) + rng.normal(0.0, sigma, gt.shape)


# ------------------------------------------------------------------------------------------------------------
# Data
# ------------------------------------------------------------------------------------------------------------

def is_paired(folder: Path) -> bool:
    return (folder / "rainy").is_dir() and (folder / "clean").is_dir()


def check_folder(folder: str | Path, task: str) -> list[Path]:
    """The ground-truth files a task reads from ``folder`` (sorted); UsageError for a folder that cannot
    serve."""
    folder = Path(folder)
    if not folder.exists():
        raise UsageError(f"data folder {folder} does not exist")
    if not folder.is_dir():
        raise UsageError(f"data folder {folder} is not a folder")
    if task_kind(task) == "derain":
        if not is_paired(folder):
            raise UsageError(f"{folder}: deraining needs a folder with rainy/ and clean/ (same file names)")
        files = list_images(folder / "clean")
    else:
        files = list_images(folder / "clean" if is_paired(folder) else folder)
    if not files:
        raise UsageError(f"{folder}: no images found")
    return files


#: SSIM's Gaussian window: the scored area must be at least this many pixels on each side
SSIM_WINDOW = 11


def check_size(path: Path, gt: np.ndarray, p: Protocol) -> None:
    """ImageError for a ground truth too small to score under ``p``: after the modcrop and the border crop,
    SSIM needs its 11x11 window."""
    h, w = gt.shape[:2]
    need = -(-(SSIM_WINDOW + 2 * p.crop_border) // p.scale) * p.scale
    if min(h, w) < need:
        raise ImageError(f"{path}: {w}x{h} is too small to score for {p.task} (at least {need}x{need}: SSIM's "
                         f"{SSIM_WINDOW}x{SSIM_WINDOW} window after cropping {p.crop_border} pixels per side)")


@dataclass
class Sample:
    name: str
    input: torch.Tensor  # (1, 3, h, w) float32, model input scale [0, 1] (noisy inputs leave it)
    gt: np.ndarray       # HWC uint8


def samples(task: str, folder: str | Path, max_images: int | None = None, max_pixels: int | None = None
            ) -> Iterator[Sample | ImageError]:
    """Inputs and ground truths of a data set under ``task``'s protocol, in sorted file order. An image that
    cannot be read is yielded as its ImageError (the runner reports it and goes on; it draws no noise)."""
    p = protocol(task)
    folder = Path(folder)
    files = check_folder(folder, task)[:max_images]
    rng = np.random.RandomState(NOISE_SEED)
    for f in files:
        try:
            gt = read_image(f, limit=max_pixels)
            check_size(f, gt, p)
            if p.kind == "sr":
                gt = modcrop(gt, p.scale)
                x = imresize(gt, 1.0 / p.scale).astype(np.float32) / 255.0
            elif p.kind == "denoise":
                x = (add_noise(gt, p.sigma, rng) / 255.0).astype(np.float32)
            else:
                rainy_path = folder / "rainy" / f.name
                if not rainy_path.exists():
                    raise ImageError(f"{rainy_path}: no such file (clean/{f.name} has no rainy pair)")
                rainy = read_image(rainy_path, limit=max_pixels)
                if rainy.shape != gt.shape:
                    raise ImageError(f"{rainy_path}: size {rainy.shape[1]}x{rainy.shape[0]} differs from "
                                     f"clean/{f.name} ({gt.shape[1]}x{gt.shape[0]})")
                x = rainy.astype(np.float32) / 255.0
        except ImageError as e:
            yield e
            continue
        yield Sample(f.name, torch.from_numpy(np.ascontiguousarray(x.transpose(2, 0, 1)))[None], gt)


# ------------------------------------------------------------------------------------------------------------
# Runner
# ------------------------------------------------------------------------------------------------------------

@dataclass
class ImageResult:
    name: str
    psnr: float
    ssim: float
    seconds: float


def score(output: np.ndarray, gt: np.ndarray, task: str) -> tuple[float, float]:
    """PSNR and SSIM of a uint8 output against its uint8 ground truth under ``task``'s protocol."""
    p = protocol(task)
    if output.shape != gt.shape:
        raise EdtirError(f"output {output.shape} and ground truth {gt.shape} differ in shape")
    return (psnr(output, gt, p.crop_border, p.y_channel), ssim(output, gt, p.crop_border, p.y_channel))


def model_name(model) -> str:
    info = getattr(model, "info", None)
    if info is None:
        return type(model).__name__
    return f"EDT-{info.size}" if info.arch == "EDT" and info.size else info.arch


def evaluate_folder(model, task: str, folder: str | Path, *, tile: int | None = None, tile_overlap: int = 32,
                    tile_batch: int = 1, self_ensemble: bool = False, device=None, precision: str = "fp32",
                    save_dir: str | Path | None = None, progress: bool = True, name: str | None = None,
                    max_images: int | None = None, max_pixels: int | None = None) -> dict:
    """Evaluate ``model`` on one data folder under ``task``'s protocol.

    Returns ``{"task", "dataset" (folder name), "model", "psnr", "ssim" (means over scored images), "images"
    (count scored), "seconds" (total), "rows" (per image: name, psnr, ssim, seconds), "failed" (list of
    "message" strings for images that could not be read or scored)}``. Outputs are written to
    ``save_dir/NAME.png`` when ``save_dir`` is given; ``max_images`` scores only the first N files in sorted
    order (quick validation during training; the noise of those N is the same as in a full run). ``name`` is
    the model name reported (default: from ``model.info``); ``max_pixels``: the decompression-bomb limit of the
    image reader (default ``$EDTIR_MAX_PIXELS`` or 400 megapixels). Raises UsageError for a bad task, folder or
    model; an image that cannot be read, restored or scored is reported in "failed" and the others go on.
    """
    from tqdm import tqdm

    protocol(task)
    if task not in model.tasks:
        raise UsageError(f"the model does not do task {task!r} (it does: {', '.join(model.tasks)})")
    folder = Path(folder)
    files = check_folder(folder, task)[:max_images]
    rows, failed = [], []
    start = time.perf_counter()
    bar = tqdm(total=len(files), desc=f"{folder.name} {task}", unit="img", disable=not progress,
               leave=False, dynamic_ncols=True)
    for item in samples(task, folder, max_images, max_pixels):
        bar.update(1)
        if isinstance(item, ImageError):
            failed.append(str(item))
            continue
        t0 = time.perf_counter()
        try:
            y = restore(model, item.input, task=task, tile=tile, tile_overlap=tile_overlap,
                        tile_batch=tile_batch, self_ensemble=self_ensemble, device=device,
                        precision=precision)
            out = tensor_to_uint8(y)
            p, s = score(out, item.gt, task)
            if save_dir is not None:
                write_image(Path(save_dir) / (Path(item.name).stem + ".png"), out)
        except EdtirError as e:
            failed.append(f"{folder / item.name}: {e}")
            continue
        except (ValueError, RuntimeError) as e:  # anything else this image alone triggers: report, go on
            why = (str(e).strip() or type(e).__name__).splitlines()[0]
            failed.append(f"{folder / item.name}: cannot restore or score it ({why[:200]})")
            continue
        rows.append(ImageResult(item.name, p, s, time.perf_counter() - t0))
        bar.set_postfix(psnr=f"{np.mean([r.psnr for r in rows]):.2f}")
    bar.close()
    return {
        "task": task,
        "dataset": folder.name,
        "model": name or model_name(model),
        "psnr": float(np.mean([r.psnr for r in rows])) if rows else float("nan"),
        "ssim": float(np.mean([r.ssim for r in rows])) if rows else float("nan"),
        "images": len(rows),
        "seconds": time.perf_counter() - start,
        "rows": [asdict(r) for r in rows],
        "failed": failed,
    }
