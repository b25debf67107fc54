"""The inference engine: padding to the size multiple, tiling, self-ensemble, input kinds, precision."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from edtir import imresize, restore
from edtir.baselines import get_baseline
from edtir.data.io import read_image
from edtir.inference import dihedral, dihedral_inverse, mirror_pad, tile_starts
from edtir.models.edt import build_model


class Toy(nn.Module):
    """A model with EDT's descriptor that insists on its size multiple, like EDT does."""

    def __init__(self, scale=2, multiple=8, task="sr-x2"):
        super().__init__()
        self._scale, self._multiple, self.task = scale, multiple, task
        self.seen = []
        self.register_buffer("dummy", torch.zeros(1))

    @property
    def tasks(self):
        return (self.task,)

    def scale(self, task=None):
        return self._scale

    def size_multiple(self, task=None):
        return self._multiple

    def body(self, x):
        return x

    def forward(self, x, task=None):
        assert x.shape[-2] % self._multiple == 0 and x.shape[-1] % self._multiple == 0, x.shape
        self.seen.append(tuple(x.shape))
        y = self.body(x)
        return y.repeat_interleave(self._scale, -2).repeat_interleave(self._scale, -1) if self._scale > 1 else y


class Conv(Toy):
    """3x3 conv + nonlinearity + nearest upscale: local, so tiling with enough overlap is exact."""

    def __init__(self, kernel: torch.Tensor, **kw):
        super().__init__(**kw)
        self.register_buffer("k", kernel.expand(3, 1, 3, 3).clone())

    def body(self, x):
        return torch.tanh(F.conv2d(x, self.k, padding=1, groups=3)) + x


SYMMETRIC = torch.tensor([[0.1, 0.2, 0.1], [0.2, -0.6, 0.2], [0.1, 0.2, 0.1]])  # invariant under the 8 maps
ASYMMETRIC = torch.tensor([[0.3, -0.2, 0.0], [0.5, -0.4, 0.1], [0.0, 0.2, -0.1]])


def test_mirror_pad_reflects_bottom_right_only():
    x = torch.arange(12.0).view(1, 1, 3, 4)
    y = mirror_pad(x, 2, 1)
    assert y.shape == (1, 1, 5, 5)
    assert torch.equal(y[..., :3, :4], x)
    assert torch.equal(y[0, 0, 3, :4], x[0, 0, 1]) and torch.equal(y[0, 0, 4, :4], x[0, 0, 0])
    assert torch.equal(y[0, 0, :3, 4], x[0, 0, :, 2])
    # Pads larger than the image reflect repeatedly; a 1-pixel side is repeated.
    assert mirror_pad(x, 10, 20).shape == (1, 1, 13, 24)
    assert torch.equal(mirror_pad(torch.ones(1, 1, 1, 1) * 7, 5, 2), torch.full((1, 1, 6, 3), 7.0))


def test_pads_to_the_multiple_and_crops_back():
    m = Toy(scale=2, multiple=8)
    x = torch.rand(1, 3, 13, 21)
    y = restore(m, x)
    assert m.seen == [(1, 3, 16, 24)]  # only as much padding as needed
    assert y.shape == (1, 3, 26, 42)
    assert torch.equal(y, x.repeat_interleave(2, -2).repeat_interleave(2, -1))


def test_input_kinds_and_no_clipping():
    m = Toy(scale=1, multiple=4, task="denoise-25")
    x = torch.rand(3, 10, 9) * 1.6 - 0.3  # a noisy input leaves [0, 1]
    y = restore(m, x)
    assert y.shape == (3, 10, 9) and torch.equal(y, x)  # never clipped, in or out
    img = (np.random.default_rng(0).random((10, 9, 3)) * 255).astype(np.uint8)
    out = restore(m, img)
    assert out.dtype == np.uint8 and np.array_equal(out, img)
    f = restore(m, img.astype(np.float32) / 255)
    assert f.dtype == np.float32 and f.shape == (10, 9, 3)
    with pytest.raises(ValueError):
        restore(m, np.zeros((10, 9), np.uint8))
    with pytest.raises(ValueError):
        restore(m, x, task="sr-x2")


def test_tile_starts_cover_and_end_flush():
    assert tile_starts(100, 100, 10) == [0]
    assert tile_starts(50, 100, 10) == [0]
    assert tile_starts(100, 40, 10) == [0, 30, 60]
    assert tile_starts(96, 48, 16) == [0, 32, 48]


@pytest.mark.parametrize("tile,overlap,batch", [(16, 4, 1), (20, 8, 3), (64, 4, 2)])
def test_tiling_is_exact_for_a_local_model(tile, overlap, batch):
    # Receptive field of 1 pixel on each side, overlap >= 2: every output pixel some tile saw with full context.
    m = Conv(ASYMMETRIC, scale=2, multiple=4)
    x = torch.rand(1, 3, 37, 45)
    full = restore(m, x)
    m.seen.clear()
    tiled = restore(m, x, tile=tile, tile_overlap=overlap, tile_batch=batch)
    assert torch.allclose(tiled, full, atol=1e-5)
    t = -(-tile // 4) * 4  # rounded up to the size multiple, at most the padded image (40x48)
    assert all(s[-2:] == (min(t, 40), min(t, 48)) for s in m.seen) and all(s[0] <= batch for s in m.seen)


def test_tiling_without_overlap_would_show_seams():
    # The check above has teeth: too little context at tile borders changes the output.
    m = Conv(ASYMMETRIC, scale=1, multiple=4)
    x = torch.rand(1, 3, 32, 32)
    assert not torch.allclose(restore(m, x, tile=8, tile_overlap=0), restore(m, x), atol=1e-3)


def test_tiled_equals_untiled_on_a_real_image_with_edt(data_dir):
    torch.manual_seed(0)
    model = build_model("T", ["sr-x2"]).eval()
    img = read_image(data_dir / "Set14" / "comic.png")[30:150, 40:160]  # 120x120 LR: 2x2 tiles of 72
    full = restore(model, img)
    tiled = restore(model, img, tile=72, tile_overlap=24, tile_batch=2)
    diff = np.abs(full.astype(int) - tiled.astype(int))
    assert full.shape == (240, 240, 3)
    assert diff.max() <= 1, f"max difference {diff.max()}"
    assert (diff > 0).mean() < 0.05


def test_dihedral_inverse():
    x = torch.rand(1, 3, 5, 7)
    outs = {tuple(dihedral(x, k).flatten().tolist()) for k in range(8)}
    assert len(outs) == 8  # eight distinct maps
    for k in range(8):
        assert torch.equal(dihedral_inverse(dihedral(x, k), k), x)


def test_self_ensemble_of_an_equivariant_model_equals_the_model():
    # Sides already multiples of 4: bottom/right padding would break the model's symmetry at the borders.
    m = Conv(SYMMETRIC, scale=2, multiple=4)
    x = torch.rand(1, 3, 20, 16)
    assert torch.allclose(restore(m, x, self_ensemble=True), restore(m, x), atol=1e-6)


def test_self_ensemble_averages_the_eight_inverted_outputs():
    m = Conv(ASYMMETRIC, scale=2, multiple=4)
    x = torch.rand(1, 3, 20, 16)
    want = sum(dihedral_inverse(m(dihedral(x, k)), k) for k in range(8)) / 8
    got = restore(m, x, self_ensemble=True)
    assert torch.allclose(got, want, atol=1e-6)
    assert not torch.allclose(got, restore(m, x), atol=1e-3)  # the model is not equivariant


def test_self_ensemble_with_tiles_and_padding():
    m = Conv(ASYMMETRIC, scale=2, multiple=8)
    x = torch.rand(1, 3, 30, 19)
    a = restore(m, x, self_ensemble=True, tile=16, tile_overlap=4)
    assert a.shape == (1, 3, 60, 38)
    assert torch.allclose(a, restore(m, x, self_ensemble=True), atol=1e-5)


def test_bf16_autocast_on_cpu_is_close():
    m = Conv(ASYMMETRIC, scale=2, multiple=4)
    x = torch.rand(1, 3, 24, 24)
    a, b = restore(m, x), restore(m, x, precision="bf16")
    assert b.dtype == torch.float32
    assert 0 < (a - b).abs().max() < 0.02  # rounded to bfloat16 inside the conv, close to float32
    with pytest.raises(ValueError):
        restore(m, x, precision="fp8")


def test_restores_training_mode_and_runs_without_grad():
    m = Conv(ASYMMETRIC, scale=2, multiple=4).train()
    y = restore(m, torch.rand(1, 3, 8, 8))
    assert m.training and not y.requires_grad


def test_bicubic_baseline_is_matlab_imresize_of_the_uint8_image():
    lr = (np.random.default_rng(0).random((17, 23, 3)) * 255).astype(np.uint8)
    for s in (2, 3, 4):
        out = restore(get_baseline("bicubic", f"sr-x{s}"), lr)
        assert np.array_equal(out, imresize(lr, s))
    ident = get_baseline("identity", "denoise-25")
    x = torch.rand(1, 3, 9, 9) * 2 - 0.5
    assert torch.equal(restore(ident, x), x)
