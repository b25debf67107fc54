"""PSNR, SSIM and the Y channel, as published restoration tables compute them.

Inputs are uint8 images (HWC RGB or HW), i.e. outputs already clamped, scaled by 255 and rounded. Everything
is computed in float64 with peak 255. ``y_channel`` uses ITU-R BT.601 *studio swing* luma (16-235), not
rounded; full-range luma (0.299, 0.587, 0.114) reads 1.32 dB lower on the same images (20 log10(255/219)), the
field's classic mistake.
SSIM is Wang et al.'s: 11x11 Gaussian window (sigma 1.5), K1 = 0.01, K2 = 0.03, L = 255, on the 'valid' region
of the filtered maps, averaged over channels for colour images.
"""

from __future__ import annotations

import numpy as np

#: BT.601 studio swing: Y = 16 + (65.481 R + 128.553 G + 24.966 B) / 255 for R, G, B in [0, 255].
Y_WEIGHTS = np.array([65.481, 128.553, 24.966], dtype=np.float64)


def rgb_to_y(image: np.ndarray) -> np.ndarray:
    """HWC RGB in [0, 255] (any dtype) -> HW float64 Y in [16, 235], not rounded."""
    image = np.asarray(image, dtype=np.float64)
    if image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"rgb_to_y expects an HWC RGB image, got shape {image.shape}")
    return image @ Y_WEIGHTS / 255.0 + 16.0


def _prepare(a: np.ndarray, b: np.ndarray, crop_border: int, y_channel: bool):
    a, b = np.asarray(a), np.asarray(b)
    if a.shape != b.shape:
        raise ValueError(f"images differ in shape: {a.shape} vs {b.shape}")
    if a.ndim not in (2, 3):
        raise ValueError(f"expected HW or HWC images, got shape {a.shape}")
    if y_channel:
        a, b = rgb_to_y(a), rgb_to_y(b)
    else:
        a, b = a.astype(np.float64), b.astype(np.float64)
    if crop_border:
        c = int(crop_border)
        if 2 * c >= min(a.shape[:2]):
            raise ValueError(f"crop_border {c} leaves nothing of a {a.shape[0]}x{a.shape[1]} image")
        a, b = a[c:-c, c:-c], b[c:-c, c:-c]
    return a, b


def psnr(a: np.ndarray, b: np.ndarray, crop_border: int = 0, y_channel: bool = False) -> float:
    """Peak signal-to-noise ratio in dB (peak 255); ``inf`` for identical images."""
    a, b = _prepare(a, b, crop_border, y_channel)
    mse = np.mean((a - b) ** 2)
    if mse == 0:
        return float("inf")
    return float(10.0 * np.log10(255.0 ** 2 / mse))


def gaussian_kernel(size: int = 11, sigma: float = 1.5) -> np.ndarray:
    """Normalised 1-D Gaussian; the 2-D SSIM window is its outer product (so filtering is separable)."""
    x = np.arange(size, dtype=np.float64) - (size - 1) / 2.0
    g = np.exp(-(x ** 2) / (2.0 * sigma ** 2))
    return g / g.sum()


def filter_valid(image: np.ndarray, kernel: np.ndarray) -> np.ndarray:
    """Correlate an HW image with ``outer(kernel, kernel)``, keeping only the 'valid' region."""
    k = len(kernel)
    h, w = image.shape
    rows = sum(kernel[i] * image[i:h - k + 1 + i, :] for i in range(k))
    return sum(kernel[j] * rows[:, j:w - k + 1 + j] for j in range(k))


def ssim_map(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """SSIM index map of two float64 HW images in [0, 255] (valid region: 10 pixels smaller on each axis)."""
    if min(a.shape) < 11:
        raise ValueError(f"SSIM needs images of at least 11x11 pixels, got {a.shape[0]}x{a.shape[1]}")
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    g = gaussian_kernel()
    mu_a, mu_b = filter_valid(a, g), filter_valid(b, g)
    var_a = filter_valid(a * a, g) - mu_a ** 2
    var_b = filter_valid(b * b, g) - mu_b ** 2
    cov = filter_valid(a * b, g) - mu_a * mu_b
    return ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a ** 2 + mu_b ** 2 + c1) * (var_a + var_b + c2))


def ssim(a: np.ndarray, b: np.ndarray, crop_border: int = 0, y_channel: bool = False) -> float:
    """Structural similarity (Wang et al. 2004), mean over channels for colour images."""
    a, b = _prepare(a, b, crop_border, y_channel)
    if a.ndim == 2:
        return float(ssim_map(a, b).mean())
    return float(np.mean([ssim_map(a[..., c], b[..., c]).mean() for c in range(a.shape[2])]))
