"""On-the-fly degradations: bicubic LR, Gaussian noise, synthetic rain."""

import numpy as np
import pytest

from edtir.data import degrade
from edtir.data.imresize import imresize


def grey(h=96, w=96, value=100):
    return np.full((h, w, 3), value, np.uint8)


def test_bicubic_lr_is_imresize_of_modcrop():
    rng = np.random.default_rng(0)
    hr = rng.integers(0, 256, (50, 37, 3), dtype=np.uint8)
    lr = degrade.bicubic_lr(hr, 3)
    assert lr.shape == (16, 12, 3) and lr.dtype == np.uint8
    np.testing.assert_array_equal(lr, imresize(hr[:48, :36], 1 / 3))


def test_noise_statistics_unclipped_and_seeded():
    img = np.zeros((128, 128, 3), np.uint8)
    x = degrade.add_noise(img, 25, np.random.default_rng(1))
    assert x.dtype == np.float32 and x.min() < 0  # not clipped
    assert abs(x.std() * 255 - 25) < 0.5 and abs(x.mean() * 255) < 0.5
    np.testing.assert_array_equal(x, degrade.add_noise(img, 25, np.random.default_rng(1)))
    assert not np.array_equal(x, degrade.add_noise(img, 25, np.random.default_rng(2)))


def test_rain_is_seeded_and_only_brightens_light():
    img = grey()
    a = degrade.add_rain(img, np.random.default_rng(3), "light")
    np.testing.assert_array_equal(a, degrade.add_rain(img, np.random.default_rng(3), "light"))
    assert not np.array_equal(a, degrade.add_rain(img, np.random.default_rng(4), "light"))
    assert a.dtype == np.uint8 and (a >= img).all() and (a > img).mean() > 0.01  # screen blend adds light
    assert np.ptp(a.astype(int), axis=2).max() == 0  # streaks are colourless on a grey image


def test_heavy_rain_is_heavier_than_light():
    img = grey(128, 128, 60)
    light = [degrade.add_rain(img, np.random.default_rng(s), "light").mean() for s in range(4)]
    heavy = [degrade.add_rain(img, np.random.default_rng(s), "heavy").mean() for s in range(4)]
    assert min(heavy) > max(light) > img.mean()


@pytest.mark.parametrize("angle, vertical", [(0.0, True), (90.0, False)])
def test_streaks_follow_the_angle(angle, vertical):
    layer = degrade.rain_layer((128, 128), np.random.default_rng(0), density=0.004, length=20, width=0.5,
                               angle=angle, intensity=1.0)
    across_x = np.abs(np.diff(layer, axis=1)).mean()  # large for vertical streaks
    across_y = np.abs(np.diff(layer, axis=0)).mean()
    assert (across_x > 2 * across_y) if vertical else (across_y > 2 * across_x)


def test_streak_kernel_shape():
    k = degrade.streak_kernel(21, 0.0, 0.5)
    assert k.max() == pytest.approx(1.0)
    c = k.shape[1] // 2
    column = k[:, c]
    assert abs(int((column > 0.5).sum()) - 21) <= 2  # about `length` pixels long
    assert (k[:, c + 3] < 1e-3).all()  # and thin


def test_unknown_rain_level():
    with pytest.raises(ValueError, match="unknown rain level"):
        degrade.add_rain(grey(), np.random.default_rng(0), "drizzle")


def test_light_wide_blends_both_ways():
    # The same seed draws the same streaks over any image. Screen blending brightens a dark grey twice as much as
    # a mid grey (the rise is s * (1 - x)); adding streaks brightens both alike (until 255). "light-wide" must do
    # both across images, "light" only the screen.
    def rise_ratios(level):
        ratios = []
        for seed in range(16):
            dark, mid = (degrade.add_rain(grey(96, 96, v), np.random.default_rng(seed), level).astype(float) - v
                         for v in (50, 150))
            faint = (dark > 20) & (dark < 90)  # neither rounding noise nor clipped at 255 in `mid`
            ratios.append(np.median(dark[faint] / np.maximum(mid[faint], 1)))
        return np.array(ratios)

    wide = rise_ratios("light-wide")
    assert ((wide > 0.9) & (wide < 1.15)).sum() >= 3  # additive images
    assert ((wide > 1.7) & (wide < 2.2)).sum() >= 3  # screened images (205 / 105 = 1.95)
    light = rise_ratios("light")
    assert ((light > 1.7) & (light < 2.2)).all()


@pytest.mark.parametrize("base", ["light", "heavy"])
def test_wide_presets_are_as_heavy_as_their_base(data_dir, base):
    # The *-wide presets widen the kinds of rain, not its amount: on real training images the rainy input's median
    # PSNR stays within 1.5 dB of the preset they widen (benchmarks/rain_levels.py prints the full table).
    from edtir.data.io import list_images, read_image
    from edtir.metrics import psnr, rgb_to_y

    images = [read_image(f) for f in list_images(data_dir / "T91")[::9][:10]]  # the benchmark's defaults

    def median_psnr(level):
        return np.median([psnr(rgb_to_y(degrade.add_rain(c, np.random.default_rng(s), level)), rgb_to_y(c))
                          for s, c in enumerate(images * 3)])

    assert abs(median_psnr(f"{base}-wide") - median_psnr(base)) < 1.5
