"""PSNR, SSIM and Y against values derived by hand from the published definitions."""

import math

import numpy as np
import pytest

from edtir import imresize, psnr, ssim
from edtir.data.io import read_image
from edtir.metrics import gaussian_kernel, rgb_to_y, ssim_map


def test_y_is_bt601_studio_swing():
    px = np.array([[[0, 0, 0], [255, 255, 255], [255, 0, 0], [0, 255, 0], [0, 0, 255]]], np.uint8)
    y = rgb_to_y(px)
    assert y.dtype == np.float64
    assert np.allclose(y[0], [16.0, 235.0, 16 + 65.481, 16 + 128.553, 16 + 24.966], atol=1e-12)
    assert rgb_to_y(np.full((1, 1, 3), 128, np.uint8))[0, 0] == pytest.approx(16 + 219 * 128 / 255)  # not rounded


def test_psnr_by_hand():
    a = np.zeros((8, 8, 3), np.uint8)
    assert psnr(a, a + 1) == pytest.approx(20 * math.log10(255))  # MSE 1: 48.1308 dB
    assert psnr(a, a + 10) == pytest.approx(20 * math.log10(25.5))
    assert psnr(a, a) == math.inf
    # MSE over all pixels and channels: one channel off by 3 -> MSE 3.
    b = a.copy()
    b[..., 1] = 3
    assert psnr(a, b) == pytest.approx(10 * math.log10(255 ** 2 / 3))


def test_psnr_y_channel_and_crop():
    a = np.full((10, 10, 3), 100, np.uint8)
    b = a + 10  # grey shift of 10 -> Y shift of 219/255 * 10
    assert psnr(a, b, y_channel=True) == pytest.approx(20 * math.log10(255 / (2190 / 255)))
    c = a.copy()
    c[:2] = 0  # differences only in a 2-pixel border
    assert psnr(a, c, crop_border=2) == math.inf
    assert psnr(a, c, crop_border=1) < 20


def test_psnr_rejects_mismatched_shapes():
    with pytest.raises(ValueError):
        psnr(np.zeros((4, 4, 3), np.uint8), np.zeros((4, 5, 3), np.uint8))


def test_gaussian_window():
    g = gaussian_kernel(11, 1.5)
    assert g.sum() == pytest.approx(1.0)
    assert np.array_equal(g, g[::-1])
    assert g[5] / g[0] == pytest.approx(math.exp(25 / (2 * 1.5 ** 2)))


def test_ssim_of_constant_images_by_hand():
    # Zero variances: SSIM = (2 mu_a mu_b + C1) / (mu_a^2 + mu_b^2 + C1); the C2 factors cancel.
    a, b = np.full((16, 16), 100, np.uint8), np.full((16, 16), 120, np.uint8)
    c1 = (0.01 * 255) ** 2
    want = (2 * 100 * 120 + c1) / (100 ** 2 + 120 ** 2 + c1)
    assert ssim(a, b) == pytest.approx(want, rel=1e-12)
    assert ssim(a, a) == pytest.approx(1.0)


def naive_ssim(a, b):
    """The published definition, pixel by pixel: 11x11 Gaussian-weighted statistics over each full window."""
    w = np.outer(gaussian_kernel(), gaussian_kernel())
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    vals = []
    for i in range(a.shape[0] - 10):
        for j in range(a.shape[1] - 10):
            pa, pb = a[i:i + 11, j:j + 11], b[i:i + 11, j:j + 11]
            ma, mb = (w * pa).sum(), (w * pb).sum()
            va, vb = (w * (pa - ma) ** 2).sum(), (w * (pb - mb) ** 2).sum()
            cov = (w * (pa - ma) * (pb - mb)).sum()
            vals.append((2 * ma * mb + c1) * (2 * cov + c2) / ((ma ** 2 + mb ** 2 + c1) * (va + vb + c2)))
    return np.mean(vals)


def test_ssim_matches_the_definition_on_the_valid_region():
    rng = np.random.default_rng(0)
    a = rng.integers(0, 256, (19, 23)).astype(np.uint8)
    b = np.clip(a + rng.normal(0, 20, a.shape), 0, 255).astype(np.uint8)
    assert ssim_map(a.astype(float), b.astype(float)).shape == (9, 13)
    assert ssim(a, b) == pytest.approx(naive_ssim(a.astype(float), b.astype(float)), abs=1e-10)


def test_ssim_rgb_is_the_mean_over_channels():
    rng = np.random.default_rng(1)
    a = rng.integers(0, 256, (20, 20, 3)).astype(np.uint8)
    b = np.clip(a + rng.normal(0, 30, a.shape), 0, 255).astype(np.uint8)
    per = [ssim(a[..., c], b[..., c]) for c in range(3)]
    assert ssim(a, b) == pytest.approx(np.mean(per), rel=1e-12)
    assert ssim(a, b, crop_border=2) == pytest.approx(np.mean([ssim(a[2:-2, 2:-2, c], b[2:-2, 2:-2, c])
                                                               for c in range(3)]), rel=1e-12)


def full_range_y(img):
    return img.astype(np.float64) @ np.array([0.299, 0.587, 0.114])


def test_full_range_luma_reads_1_32_db_lower(data_dir):
    # The classic mistake: the same bicubic x2 outputs scored on full-range luma lose 20 log10(255/219) dB.
    gaps = []
    for name in ("baby", "butterfly", "woman"):
        hr = read_image(data_dir / "Set5" / f"{name}.png")
        hr = hr[: hr.shape[0] // 2 * 2, : hr.shape[1] // 2 * 2]
        sr = imresize(imresize(hr, 1 / 2), 2)
        studio = psnr(sr, hr, crop_border=2, y_channel=True)
        fy_sr, fy_hr = full_range_y(sr)[2:-2, 2:-2], full_range_y(hr)[2:-2, 2:-2]
        full = 10 * math.log10(255 ** 2 / np.mean((fy_sr - fy_hr) ** 2))
        gaps.append(studio - full)
    assert np.allclose(gaps, 1.32, atol=0.01), gaps
