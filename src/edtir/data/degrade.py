"""Degradations made on the fly for training (and for synthetic test inputs): bicubic downscaling, Gaussian
noise, synthetic rain streaks. Every random draw comes from the ``numpy.random.Generator`` passed in, so a
sample is a pure function of its seed.

Rain model (``add_rain``) ------------------------- A rain streak is the trace a falling drop leaves on the
sensor during the exposure: a short, thin, bright line whose length grows with fall speed x exposure, tilted
by the wind, blurred by defocus, and brighter the closer the drop. We render one *layer* of streaks as

1. sparse impulses: each pixel seeds a drop with probability ``density``, with its own brightness in
   [0.4, 1] (drops at different depths scatter different amounts of light);
2. motion blur: the impulses are convolved with an anti-aliased line kernel of ``length`` pixels at ``angle``
   degrees from vertical, widened across the line by a Gaussian of sigma ``width`` (defocus, drop size), peak
   normalised to 1 so a streak keeps its drop's brightness;
3. scaled by ``intensity`` and composited onto the image with the **screen** blend
   ``out = 1 - (1 - img) (1 - streaks)``: light adds, bright backgrounds saturate gently instead of clipping.

``light`` rain is one layer of short, thin, sparse streaks (like Rain100L); ``heavy`` rain is two or three
layers at slightly different angles (depth), longer, wider and denser, plus a veil of scattered light
``out = (1 - a) out + a * airlight`` (the haze that accumulates in downpours, as in Rain100H-style data). Each
parameter is drawn uniformly from the preset's range per image, and each layer jitters the angle by a few
degrees. This is the procedural recipe the Rain100 sets were made with (noise, motion blur, screen blend),
written out as code. ``light-wide`` and ``heavy-wide`` draw from wider ranges (``heavy-wide``: one to five
layers whose directions spread by up to 15 degrees) and blend half of the images additively
(``out = min(img + streaks, 1)``), for training a model that meets rain it was not made from.
``docs/img/rain-samples.png`` shows samples (``docs/make_rain_figure.py``).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# ------------------------------------------------------------------------------------------------------------
# Bicubic and noise
# ------------------------------------------------------------------------------------------------------------


def modcrop(image: np.ndarray, scale: int) -> np.ndarray:
    """Crop bottom/right so both sides are multiples of ``scale`` (the SR convention)."""
    h, w = image.shape[:2]
    return image[: h - h % scale, : w - w % scale]


def bicubic_lr(hr: np.ndarray, scale: int) -> np.ndarray:
    """MATLAB-compatible bicubic LR of an HWC uint8 image (modcropped first): the SR degradation."""
    from .imresize import imresize

    hr = modcrop(hr, scale)
    return imresize(hr, 1.0 / scale)


def add_noise(image: np.ndarray, sigma: float, rng: np.random.Generator) -> np.ndarray:
    """uint8 HWC -> float32 in the [0, 1] scale plus N(0, sigma/255), neither clipped nor rounded (the
    convention)."""
    x = image.astype(np.float32) / 255.0
    return x + rng.standard_normal(x.shape, dtype=np.float32) * np.float32(sigma / 255.0)


# ------------------------------------------------------------------------------------------------------------
# Rain
# ------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RainPreset:
    """Ranges (low, high) each image draws its rain parameters from."""

    layers: tuple[int, int]
    density: tuple[float, float]  # probability that a pixel seeds a drop
    length: tuple[float, float]  # streak length, pixels
    width: tuple[float, float]  # Gaussian sigma across the streak, pixels
    angle: tuple[float, float]  # degrees from vertical (wind)
    intensity: tuple[float, float]  # peak brightness of a streak in [0, 1]
    haze: tuple[float, float] = (0.0, 0.0)  # veil opacity
    airlight: tuple[float, float] = (0.8, 0.95)
    additive: float = 0.0  # probability that an image's streaks are added (then clipped) instead of screened
    jitter: float = 5.0  # each layer's angle: the image's angle +- up to this many degrees


RAIN_PRESETS = {
    "light": RainPreset(layers=(1, 1), density=(0.002, 0.005), length=(8, 20), width=(0.35, 0.6),
                        angle=(-25, 25), intensity=(0.5, 0.8)),
    "heavy": RainPreset(layers=(2, 3), density=(0.0015, 0.003), length=(20, 40), width=(0.7, 1.2),
                        angle=(-30, 30), intensity=(0.45, 0.7), haze=(0.05, 0.2)),
    # Domain randomisation around "light": a model trained on "light" alone removed our streaks (26.8 -> 32.6 dB)
    # but gained far less on Rain100L, so this draws from wider ranges (longer, wider, fainter or brighter
    # streaks, both blends: Photoshop-style screen and the additive O = B + S of the Rain100 papers' model)
    # instead of guessing one setting closer to someone else's generator.
    # The ranges keep the rainy input's PSNR about where "light" puts it (median 27.7 dB on T91, 10-90 % 21-33
    # dB; "light": 27.8, 23-31; benchmarks/rain_levels.py), so the rain is as light, only of more kinds.
    "light-wide": RainPreset(layers=(1, 1), density=(0.001, 0.004), length=(8, 35), width=(0.3, 0.8),
                             angle=(-30, 30), intensity=(0.3, 0.8), additive=0.5),
    # The same around "heavy": one to five layers whose directions spread more (Rain100H is described as rain of
    # five streak directions), a wider range of lengths, widths, brightness and haze, both blends; as heavy as
    # "heavy" (input PSNR on T91: median 16.8 dB, 10-90 % 14.6-20.6; "heavy": 16.6, 14.4-21.1; same script).
    "heavy-wide": RainPreset(layers=(1, 5), density=(0.0008, 0.002), length=(15, 45), width=(0.5, 1.3),
                             angle=(-30, 30), intensity=(0.35, 0.75), haze=(0.0, 0.2), additive=0.5, jitter=15.0),
}


def streak_kernel(length: float, angle_deg: float, width: float) -> np.ndarray:
    """Anti-aliased line of ``length`` pixels at ``angle_deg`` from vertical, Gaussian across it; peak 1."""
    theta = np.deg2rad(angle_deg)
    dy, dx = np.cos(theta), np.sin(theta)  # direction of fall
    half = int(np.ceil(length / 2 + 3 * width)) + 1
    yy, xx = np.mgrid[-half:half + 1, -half:half + 1].astype(np.float64)
    along = yy * dy + xx * dx
    across = -yy * dx + xx * dy
    # Distance to the segment [-L/2, L/2] along the fall direction; soft ends and a Gaussian profile across.
    beyond = np.maximum(np.abs(along) - length / 2, 0.0)
    s = max(width, 0.3)
    k = np.exp(-0.5 * (across / s) ** 2) * np.exp(-0.5 * (beyond / s) ** 2)
    return (k / k.max()).astype(np.float32)


def _convolve_fft(x: np.ndarray, k: np.ndarray) -> np.ndarray:
    """Linear 'same' convolution via FFT (both 2-D float)."""
    H, W = x.shape
    kh, kw = k.shape
    fh, fw = H + kh - 1, W + kw - 1
    y = np.fft.irfft2(np.fft.rfft2(x, (fh, fw)) * np.fft.rfft2(k, (fh, fw)), (fh, fw))
    oy, ox = kh // 2, kw // 2
    return y[oy:oy + H, ox:ox + W]


def rain_layer(shape: tuple[int, int], rng: np.random.Generator, *, density: float, length: float,
               width: float, angle: float, intensity: float) -> np.ndarray:
    """One layer of streaks, HxW float32 in [0, 1]."""
    H, W = shape
    k = streak_kernel(length, angle, width)
    m = k.shape[0] // 2  # seed drops beyond the borders too, so streaks enter the frame
    seeds = rng.random((H + 2 * m, W + 2 * m))
    drops = np.where(seeds < density, rng.uniform(0.4, 1.0, seeds.shape), 0.0)
    streaks = _convolve_fft(drops, k)[m:m + H, m:m + W]
    return (np.clip(streaks, 0.0, 1.0) * intensity).astype(np.float32)


def rain_preset(level: str) -> RainPreset:
    if level not in RAIN_PRESETS:
        raise ValueError(f"unknown rain level {level!r}; expected one of {', '.join(RAIN_PRESETS)}")
    return RAIN_PRESETS[level]


def rain_streaks(shape: tuple[int, int], rng: np.random.Generator, level: str = "light"):
    """(streaks HxW in [0, 1] composited from all layers by screen blending, haze opacity, airlight)."""
    p = rain_preset(level)
    u = lambda r: float(rng.uniform(*r))  # noqa: E731
    n_layers = int(rng.integers(p.layers[0], p.layers[1] + 1))
    base_angle = u(p.angle)
    total = np.zeros(shape, np.float32)
    for _ in range(n_layers):
        layer = rain_layer(shape, rng, density=u(p.density), length=u(p.length), width=u(p.width),
                           angle=base_angle + float(rng.uniform(-p.jitter, p.jitter)), intensity=u(p.intensity))
        total = 1.0 - (1.0 - total) * (1.0 - layer)
    return total, u(p.haze), u(p.airlight)


def add_rain(image: np.ndarray, rng: np.random.Generator, level: str = "light") -> np.ndarray:
    """uint8 HWC clean image -> uint8 rainy image (rounded, like stored rainy data sets)."""
    x = image.astype(np.float32) / 255.0
    streaks, haze, airlight = rain_streaks(x.shape[:2], rng, level)
    # Presets without additive images draw nothing more, so their samples stay what they were.
    additive = rain_preset(level).additive
    if additive > 0 and rng.random() < additive:
        out = np.minimum(x + streaks[..., None], 1.0)
    else:
        out = 1.0 - (1.0 - x) * (1.0 - streaks[..., None])
    if haze > 0:
        out = (1.0 - haze) * out + haze * airlight
    return np.clip(np.round(out * 255.0), 0, 255).astype(np.uint8)
