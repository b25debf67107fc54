"""Local Attribution Maps (LAM; Gu & Dong, "Interpreting Super-Resolution Networks with Local Attribution
Maps", CVPR 2021): which input pixels a model uses to produce one output window.

* Objective: the texture of the output window, the sum over the window of the squared horizontal and vertical
  finite differences of the output (all channels), as the original ``attr_grad``.
* Path: integrated gradients along a *progressive blur* path, from the input blurred by an isotropic Gaussian
  (σ = 1.2, 9 x 9 kernel, reflect-101 borders as ``cv2.filter2D``) to the input itself, in 50 steps. Step i
  (1..50) is the input blurred with σ_i = σ (1 - i/50); its gradient is weighted by the derivative of the path
  image, ``blur(x, (k_i - k_{i-1}) * 50)``, and the 50 products are averaged.
* Map: |sum over channels|, normalised by its maximum. Diffusion index DI = (1 - Gini(map)) x 100: higher when
  the attribution spreads over more pixels.

Any model edtir can call works (``model(x, task)`` with a descriptor, or a plain module ``model(x)``). Inputs are
mirror-padded to the model's size multiple as in inference (the padding's gradient flows back to the pixels it
copies). Baselines upscale through numpy (no autograd); for them the gradient comes from the same MATLAB bicubic
written as two float64 resampling matrices, the float path of the baseline (its uint8 rounding has no gradient).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..errors import EdtirError, UsageError

SIGMA = 1.2
STEPS = 50
KERNEL = 9


# ---------------------------------------------------------------------------------------------------------------
# Blur path
# ---------------------------------------------------------------------------------------------------------------

def gaussian_kernel(size: int, sigma: float, eps: float = 1e-5) -> torch.Tensor:
    """Isotropic Gaussian (size x size), sums to 1; σ = 0 is (up to eps) the identity kernel. As LAM's
    ``isotropic_gaussian_kernel``."""
    ax = torch.arange(-(size // 2), size // 2 + 1, dtype=torch.float64)
    d2 = ax[:, None] ** 2 + ax[None, :] ** 2
    k = torch.exp(-d2 / (2.0 * (sigma + eps) ** 2))
    return k / k.sum()


def filter2d(x: torch.Tensor, kernel: torch.Tensor) -> torch.Tensor:
    """Correlate each channel of (B, C, H, W) with ``kernel`` (k x k), reflect-101 borders (cv2's default)."""
    k = kernel.shape[-1]
    p = k // 2
    c = x.shape[1]
    if min(x.shape[-2:]) <= p:
        raise UsageError(f"image {x.shape[-1]}x{x.shape[-2]} is too small for the {k}x{k} blur of LAM")
    w = kernel.to(x).expand(c, 1, k, k)
    return F.conv2d(F.pad(x, (p, p, p, p), mode="reflect"), w, groups=c)


def blur_path(x: torch.Tensor, sigma: float = SIGMA, steps: int = STEPS, size: int = KERNEL):
    """(images, derivatives), each (steps, C, H, W) float64, for one (1, C, H, W) input: the progressive-blur
    path from σ·(steps-1)/steps to 0 (the input) and d(image)/d(alpha) x 1/steps-spacing as LAM computes it."""
    sig = torch.linspace(sigma, 0.0, steps + 1, dtype=torch.float64)
    kernels = [gaussian_kernel(size, float(s)) for s in sig]
    x = x.to(torch.float64)
    imgs = torch.cat([filter2d(x, kernels[i]) for i in range(1, steps + 1)])
    ders = torch.cat([filter2d(x, (kernels[i] - kernels[i - 1]) * steps) for i in range(1, steps + 1)])
    return imgs, ders


# ---------------------------------------------------------------------------------------------------------------
# Objective, Gini, DI
# ---------------------------------------------------------------------------------------------------------------

def window_objective(out: torch.Tensor, x: int, y: int, size: int) -> torch.Tensor:
    """Per-sample texture of the output window with top-left corner (x, y) (column, row) and side ``size``:
    sum of squared vertical + horizontal differences (LAM's ``attr_grad``, reduce='sum'). Shape (B,)."""
    crop = out[..., y:y + size + 1, x:x + size + 1]
    dh = crop[..., :-1, :] - crop[..., 1:, :]
    dw = crop[..., :, :-1] - crop[..., :, 1:]
    g = dh[..., :, :-1].square() + dw[..., :-1, :].square()
    return g[..., :size, :size].sum(dim=(1, 2, 3))


def gini(values) -> float:
    """Gini coefficient of a non-negative array (LAM's: shifted to >= 0, plus 1e-7)."""
    a = np.sort(np.asarray(values, dtype=np.float64).ravel())
    if a.size == 0:
        raise ValueError("Gini of an empty array")
    if a[0] < 0:
        a = a - a[0]
    a = a + 1e-7
    n = a.size
    index = np.arange(1, n + 1)
    return float(np.sum((2 * index - n - 1) * a) / (n * np.sum(a)))


def diffusion_index(attribution) -> float:
    """DI = (1 - Gini) x 100 of an attribution map."""
    return (1.0 - gini(attribution)) * 100.0


# ---------------------------------------------------------------------------------------------------------------
# Calling a model with gradients
# ---------------------------------------------------------------------------------------------------------------

def resize_matrix(n_in: int, scale: int) -> torch.Tensor:
    """(n_in * scale, n_in) float64 matrix of MATLAB's bicubic along one axis (``imresize.contributions``)."""
    from ..data.imresize import contributions

    n_out = n_in * scale
    w, idx = contributions(n_in, n_out, float(scale))
    m = np.zeros((n_out, n_in))
    np.add.at(m, (np.repeat(np.arange(n_out), w.shape[1]), idx.ravel()), w.ravel())
    return torch.from_numpy(m)


class DifferentiableBicubic(nn.Module):
    """MATLAB bicubic upscaling by ``scale`` as ``A x Bᵀ`` per channel: the float path of the bicubic baseline,
    with autograd."""

    def __init__(self, scale: int):
        super().__init__()
        self.s = scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = resize_matrix(x.shape[-2], self.s).to(x)
        b = resize_matrix(x.shape[-1], self.s).to(x)
        return torch.einsum("oh,bchw,pw->bcop", a, x, b)


def differentiable(model, task: str | None):
    """A function x -> output with gradients, for any model edtir can call."""
    from ..baselines import Baseline
    from ..inference import forward_padded, resolve_task

    if not hasattr(model, "size_multiple"):  # a plain module
        return model
    try:
        task = resolve_task(model, task)
    except ValueError as e:
        raise UsageError(str(e)) from None
    if isinstance(model, Baseline):
        s = model.scale(task)
        return DifferentiableBicubic(s) if s > 1 else (lambda x: model(x, task))
    return lambda x: forward_padded(model, x, task)


def degraded_input(image: np.ndarray, task: str, seed: int = 0) -> np.ndarray:
    """A clean HWC uint8 image made into the task's input, float32 HWC in [0, 1] (noisy inputs leave it):
    MATLAB bicubic LR (SR), seeded Gaussian noise (denoise), seeded synthetic rain (derain)."""
    from ..data.degrade import add_noise, add_rain, bicubic_lr
    from ..models.edt import task_kind, task_scale

    kind = task_kind(task)
    rng = np.random.default_rng(seed)
    if kind == "sr":
        return bicubic_lr(image, task_scale(task)).astype(np.float32) / 255.0
    if kind == "denoise":
        return add_noise(image, float(task.split("-")[1]), rng)
    return add_rain(image, rng, task.split("-")[1]).astype(np.float32) / 255.0


# ---------------------------------------------------------------------------------------------------------------
# LAM
# ---------------------------------------------------------------------------------------------------------------

@dataclass
class LAMResult:
    attribution: np.ndarray  # (H, W) |sum over channels| / max, in [0, 1]
    gradient: np.ndarray     # (C, H, W) path-integrated gradient x path derivative (signed)
    di: float
    gini: float
    output: np.ndarray       # (C, sH, sW) the model's output for the input itself (the path's end)
    objective: list[float]   # window objective along the path (blurred -> sharp)
    window: tuple[int, int, int]
    scale: int
    sigma: float = SIGMA

    def to_json(self) -> dict:
        a = self.attribution
        nz = np.argwhere(a >= 0.01)
        return {"window": {"x": self.window[0], "y": self.window[1], "size": self.window[2]},
                "scale": self.scale, "input_size": [a.shape[1], a.shape[0]],
                "diffusion_index": round(self.di, 4), "gini": round(self.gini, 6),
                "sigma": self.sigma, "steps": len(self.objective),
                "objective_blurred": self.objective[0], "objective_input": self.objective[-1],
                "extent_1pct": None if nz.size == 0 else
                {"x0": int(nz[:, 1].min()), "y0": int(nz[:, 0].min()), "x1": int(nz[:, 1].max()),
                 "y1": int(nz[:, 0].max())}}


def check_window(window: tuple[int, int, int], out_h: int, out_w: int) -> None:
    x, y, size = window
    if size < 1 or x < 0 or y < 0:
        raise UsageError(f"window {x},{y},{size}: X and Y must be >= 0 and SIZE >= 1")
    if x + size > out_w or y + size > out_h:
        raise UsageError(f"window {x},{y},{size} does not fit in the {out_w}x{out_h} output "
                         f"(X + SIZE <= {out_w}, Y + SIZE <= {out_h})")


def lam(model, image: torch.Tensor, window: tuple[int, int, int], task: str | None = None, *,
        sigma: float = SIGMA, steps: int = STEPS, kernel: int = KERNEL, batch: int = 4, device=None,
        precision: str = "fp32", progress: bool = False) -> LAMResult:
    """LAM of ``model`` for the output window ``(x, y, size)`` (output pixels, x = column) given the input
    ``image`` (1, C, H, W) (or (C, H, W)) in [0, 1]. ``batch`` path steps go through the model at once (memory
    grows with it: an EDT-T on a 48 x 48 input needs about 0.25 GB per step on the CPU)."""
    from tqdm import tqdm

    from ..inference import autocast, resolve_task

    if image.ndim == 3:
        image = image[None]
    if image.ndim != 4 or image.shape[0] != 1:
        raise UsageError(f"LAM explains one image (1, C, H, W), got shape {tuple(image.shape)}")
    if steps < 1 or batch < 1:
        raise UsageError("steps and batch must be >= 1")
    fn = differentiable(model, task)
    if hasattr(model, "scale"):  # check the window before any work
        s = model.scale(resolve_task(model, task))
        check_window(window, image.shape[-2] * s, image.shape[-1] * s)
    if device is None:
        device = next((p.device for p in model.parameters()), torch.device("cpu")) \
            if isinstance(model, nn.Module) else torch.device("cpu")
    imgs, ders = blur_path(image.detach().cpu(), sigma, steps, kernel)
    grads, objective, output = [], [], None
    bar = tqdm(total=steps, desc="LAM", unit="step", disable=not progress, leave=False, dynamic_ncols=True)
    for i in range(0, steps, batch):
        x = imgs[i:i + batch].to(device=device, dtype=torch.float32).requires_grad_(True)
        with torch.enable_grad(), autocast(torch.device(device), precision):
            out = fn(x).float()
            if i == 0:
                check_window(window, out.shape[-2], out.shape[-1])
            if not out.requires_grad:
                raise EdtirError("the model's output carries no gradient: LAM needs a differentiable model")
            obj = window_objective(out, *window)
            (g,) = torch.autograd.grad(obj.sum(), x)
        grads.append(torch.nan_to_num(g.detach().to("cpu", torch.float64)))
        objective += obj.detach().cpu().tolist()
        output = out[-1].detach().float().cpu()
        bar.update(x.shape[0])
    bar.close()
    grad = (torch.cat(grads) * ders).mean(0)  # (C, H, W)
    amap = grad.sum(0).abs()
    peak = float(amap.max())
    if not math.isfinite(peak) or peak == 0.0:
        raise EdtirError(f"window {','.join(map(str, window))}: the attribution is zero everywhere (a flat output "
                         "window has no texture to explain; pick a window on edges or texture)")
    amap = (amap / peak).numpy()
    g = gini(amap)
    scale = output.shape[-1] // image.shape[-1]
    return LAMResult(attribution=amap, gradient=grad.numpy(), di=(1.0 - g) * 100.0, gini=g,
                     output=output.numpy(), objective=objective, window=tuple(window), scale=scale,
                     sigma=sigma)
