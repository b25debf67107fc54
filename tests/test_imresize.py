"""MATLAB-compatible bicubic: weights, indices, sizes, rounding and padding derived by hand from the algorithm
MATLAB documents (Keys' cubic, a = -0.5; antialiasing kernel scale * cubic(scale * x); u = x/s + (1 - 1/s)/2)."""

import time

import numpy as np
import pytest

from edtir import imresize
from edtir.data.imresize import contributions, cubic, resize_axis


def test_cubic_kernel_values():
    # Keys with a = -0.5: 1.5|x|^3 - 2.5|x|^2 + 1 on [0, 1]; -0.5|x|^3 + 2.5|x|^2 - 4|x| + 2 on (1, 2].
    x = np.array([0, 0.25, 0.5, 0.75, 1, 1.25, 1.5, 1.75, 2, 2.5])
    want = [1, 0.8671875, 0.5625, 0.2265625, 0, -0.0703125, -0.0625, -0.0234375, 0, 0]
    assert np.array_equal(cubic(x), want)
    assert np.array_equal(cubic(-x), want)


def test_weights_shrink_by_two():
    # Output pixel 1 of a x1/2 shrink sits at u = 1/0.5 + 0.5 * (1 - 2) = 1.5. Kernel 0.5 * cubic(0.5 t) at
    # t = +-0.5, +-1.5, +-2.5, +-3.5: 0.5 * cubic(0.25), 0.5 * cubic(0.75), 0.5 * cubic(1.25), 0.5 * cubic(1.75);
    # the eight taps already sum to 1.
    w, idx = contributions(8, 4, 0.5)
    half = [-0.01171875, -0.03515625, 0.11328125, 0.43359375]
    assert np.array_equal(w[0], half + half[::-1])
    # Taps 1-based -2..5: -2, -1, 0 mirror to 3, 2, 1 (symmetric padding repeats the edge pixel).
    assert idx[0].tolist() == [2, 1, 0, 0, 1, 2, 3, 4]
    # The last output pixel (u = 7.5) has taps 4..11, mirrored at the far edge to 4..8, 8, 7, 6 (1-based).
    assert idx[-1].tolist() == [3, 4, 5, 6, 7, 7, 6, 5]


def test_weights_enlarge_by_two():
    # Output pixel 1 of a x2 enlargement sits at u = 0.5 + 0.25 = 0.75; taps -1..2 (1-based) at distances
    # 1.75, 0.75, -0.25, -1.25; the two all-zero tap columns of the 6 are dropped, as MATLAB does.
    w, idx = contributions(4, 8, 2.0)
    assert w.shape == (8, 4)
    assert np.array_equal(w[0], [-0.0234375, 0.2265625, 0.8671875, -0.0703125])
    assert idx[0].tolist() == [1, 0, 0, 1]
    assert np.allclose(w.sum(1), 1.0)


def test_one_dimensional_case_by_hand():
    col = np.array([10.0, 20.0, 40.0, 80.0])[:, None]
    out = imresize(col, (2, 1))
    assert out.shape == (8, 1)
    # out[0] = -0.0234375 * a[1] + 0.2265625 * a[0] + 0.8671875 * a[0] - 0.0703125 * a[1]
    #        = 1.09375 * 10 - 0.09375 * 20
    assert out[0, 0] == 1.09375 * 10 - 0.09375 * 20  # 9.0625
    # out[3] at u = 2.25: taps 1..4 at distances 1.25, 0.25, -0.75, -1.75
    assert out[3, 0] == -0.0703125 * 10 + 0.8671875 * 20 + 0.2265625 * 40 - 0.0234375 * 80


@pytest.mark.parametrize("scale", [1 / 4, 1 / 3, 1 / 2, 2, 3, 4])
def test_constant_image_stays_constant(scale):
    img = np.full((13, 17, 3), 77, np.uint8)
    assert np.array_equal(imresize(img, scale), np.full(imresize(img, scale).shape, 77, np.uint8))
    f = np.full((13, 17), 0.3, np.float32)
    out = imresize(f, scale)
    assert out.dtype == np.float32 and np.allclose(out, 0.3, atol=1e-6)


@pytest.mark.parametrize("shape,scale,want", [((5, 7), 1 / 2, (3, 4)), ((5, 7), 1 / 3, (2, 3)),
                                              ((5, 7), 4, (20, 28)), ((256, 256), 1 / 3, (86, 86)),
                                              ((255, 255), 1 / 3, (85, 85)), ((321, 480), 1 / 4, (81, 120))])
def test_output_size_is_ceil(shape, scale, want):
    assert imresize(np.zeros(shape, np.uint8), scale).shape == want
    assert imresize(np.zeros(shape + (3,), np.uint8), scale).shape == want + (3,)


@pytest.mark.parametrize("s", [2, 3, 4])
def test_integer_downscale_averages_a_ramp(s):
    # The antialiased kernel is symmetric about u, and u is the centre of the s pixels each output pixel covers;
    # cubic convolution reproduces linear functions, so away from the borders a ramp becomes its block means.
    n = 48
    col = np.arange(n, dtype=np.float64) * 1.5 + 3.0
    out = imresize(np.tile(col[:, None], (1, n)), 1 / s)
    block_means = col.reshape(n // s, s).mean(axis=1)
    assert np.allclose(out, out[:, :1])  # constant along the rows, borders included
    assert np.allclose(out[3:-3, 0], block_means[3:-3], atol=1e-9)
    assert not np.allclose(out[0, 0], block_means[0], atol=1e-3)  # the mirrored border is not linear


def test_uint8_is_clipped_and_rounded_from_the_float_result():
    rng = np.random.default_rng(0)
    img = (rng.random((30, 40, 3)) > 0.5).astype(np.uint8) * 255  # hard edges overshoot below 0 and above 255
    f = imresize(img.astype(np.float64), 3)
    assert f.min() < 0 and f.max() > 255  # float: neither clipped nor rounded
    u = imresize(img, 3)
    assert u.dtype == np.uint8
    assert np.array_equal(u, np.floor(np.clip(f, 0, 255) + 0.5).astype(np.uint8))


def test_half_rounds_away_from_zero():
    # out[0] = 1.09375 * a - 0.09375 * b; a = 2, b = 18 -> 2.1875 - 1.6875 = 0.5 -> MATLAB rounds to 1.
    col = np.array([2, 18, 18, 18], np.uint8)[:, None]
    assert imresize(col.astype(np.float64), (2, 1))[0, 0] == 0.5
    assert imresize(col, (2, 1))[0, 0] == 1


def test_symmetric_padding_at_the_border():
    # A shrink by 2 of [a b c d ...]: output 1 reads taps (1-based) -2..5 = c b a a b c d e.
    row = np.arange(1, 9, dtype=np.float64)[None, :] ** 2
    out = imresize(row, (1, 1 / 2))
    w, _ = contributions(8, 4, 0.5)
    taps = np.array([9, 4, 1, 1, 4, 9, 16, 25], dtype=np.float64)
    assert out[0, 0] == pytest.approx(float((w[0] * taps).sum()), abs=1e-12)


def test_smaller_scale_is_resized_first():
    rng = np.random.default_rng(1)
    img = rng.random((20, 30)) * 255
    rows_first = resize_axis(resize_axis(img, 0, 10, 0.5), 1, 60, 2.0)
    cols_first = resize_axis(resize_axis(img, 1, 60, 2.0), 0, 10, 0.5)
    assert not np.array_equal(rows_first, cols_first)  # the order is visible in float64
    assert np.array_equal(imresize(img, (0.5, 2.0)), rows_first)
    # Rows scale 3, columns 1/3: columns go first.
    want = resize_axis(resize_axis(img, 1, 10, 1 / 3), 0, 60, 3.0)
    assert np.array_equal(imresize(img, (3.0, 1 / 3)), want)


def test_downscale_then_enlarge_is_close():
    # Sanity on a smooth image: x1/2 then x2 loses little.
    y, x = np.mgrid[0:64, 0:64]
    img = (127.5 + 100 * np.sin(x / 7.0) * np.cos(y / 9.0)).astype(np.uint8)
    back = imresize(imresize(img, 1 / 2), 2).astype(float)
    assert np.abs(back - img)[4:-4, 4:-4].max() < 6


def test_rejects_bad_input():
    with pytest.raises(ValueError):
        imresize(np.zeros((4, 4, 3, 1), np.uint8), 2)
    with pytest.raises(ValueError):
        imresize(np.zeros((4, 4), np.int32), 2)
    with pytest.raises(ValueError):
        imresize(np.zeros((4, 4), np.uint8), 0)


def test_fast_enough_for_data_pipelines():
    img = np.random.default_rng(0).integers(0, 256, (500, 500, 3), dtype=np.uint8)
    imresize(img, 1 / 4)
    t = time.perf_counter()
    imresize(img, 1 / 4)
    assert time.perf_counter() - t < 0.5  # about 0.01 s alone on a 2-core machine; generous for busy CI
