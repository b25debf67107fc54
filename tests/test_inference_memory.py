"""Memory safety of the inference engine: images that would not fit are tiled automatically, and an
out-of-memory error (CUDA's, or the CPU allocator's) is retried with smaller tiles, giving exactly what a run
with that tile size gives."""

import logging

import pytest
import torch
from torch import nn

from edtir.data.io import read_image
from edtir.errors import OutOfMemory
from edtir.inference import (
    bytes_per_pixel,
    free_memory,
    is_out_of_memory,
    memory_budget,
    parse_bytes,
    plan_tile,
    restore,
    smaller_tile,
)
from edtir.models.edt import build_model


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return build_model("T", ["sr-x2"], depths=(2,)).eval()  # size multiple 24


@pytest.fixture(scope="module")
def image(data_dir_module):
    return read_image(data_dir_module / "Set5" / "butterfly.png")[100:160, 40:130]  # 60x90: padded to 72x96


@pytest.fixture(scope="module")
def tiled48(model, image):
    return restore(model, image, task="sr-x2", tile=48)


@pytest.fixture(scope="module")
def data_dir_module():
    from conftest import DATA, need

    return need(DATA)


class RunsOutAbove(nn.Module):
    """``inner`` with a device that has room for at most ``pixels`` input pixels per forward pass: above that it
    raises ``error`` as the allocator would. Records the input shapes it was given."""

    def __init__(self, inner, pixels: int, error: BaseException):
        super().__init__()
        self.inner, self.pixels, self.error = inner, pixels, error
        self.seen = []

    tasks = property(lambda self: self.inner.tasks)
    info = property(lambda self: self.inner.info)  # the descriptor: what the memory estimate reads

    def scale(self, task=None):
        return self.inner.scale(task)

    def size_multiple(self, task=None):
        return self.inner.size_multiple(task)

    def forward(self, x, task=None):
        self.seen.append(tuple(x.shape))
        if x.shape[0] * x.shape[-2] * x.shape[-1] > self.pixels:
            raise self.error
        return self.inner(x, task=task)


OOMS = {
    "cuda": torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (GPU 0; 79.1 GiB total)"),
    "cpu allocator": RuntimeError("[enforce fail at alloc_cpu.cpp:127] DefaultCPUAllocator: can't allocate "
                                  "memory: you tried to allocate 9663676416 bytes. Error code 12"),
    "cpu, newer torch": RuntimeError("DefaultCPUAllocator: not enough memory: you tried to allocate 1 GiB"),
    "python": MemoryError(),
}


def test_what_counts_as_out_of_memory():
    assert all(is_out_of_memory(e) for e in OOMS.values())
    assert not is_out_of_memory(RuntimeError("shape mismatch")) and not is_out_of_memory(ValueError("memory"))


@pytest.mark.parametrize("kind", ["cuda", "cpu allocator"])
def test_out_of_memory_retries_with_smaller_tiles_and_gives_that_tile_size_result(kind, model, image, tiled48,
                                                                                   caplog):
    tight = RunsOutAbove(model, 48 * 48, OOMS[kind])  # the whole 72x96 image does not fit, nor 48x48 tiles + pad
    with caplog.at_level(logging.WARNING):
        out = restore(tight, image, task="sr-x2")
    # whole image (72x96) -> tiles of 48 (the half of 96) -> fit: 48x48 = the limit
    assert tight.seen[0] == (1, 3, 72, 96) and set(tight.seen[1:]) == {(1, 3, 48, 48)}
    assert "retrying in tiles of 48" in caplog.text
    assert (out == tiled48).all()
    assert out.shape == (120, 180, 3)


def test_out_of_memory_halves_the_tile_batch_first(model, image, caplog):
    tight = RunsOutAbove(model, 2 * 48 * 48, OOMS["cuda"])  # two 48-tiles fit, four do not
    with caplog.at_level(logging.WARNING):
        out = restore(tight, image, task="sr-x2", tile=48, tile_batch=4)
    assert tight.seen[0] == (4, 3, 48, 48) and tight.seen[1] == (2, 3, 48, 48)
    assert "retrying with 2" in caplog.text
    ref = restore(model, image, task="sr-x2", tile=48, tile_batch=2)
    assert (out == ref).all()


def test_gives_up_with_one_line_below_the_size_multiple(model, image):
    hopeless = RunsOutAbove(model, 0, OOMS["cuda"])
    with pytest.raises(OutOfMemory) as e:
        restore(hopeless, image, task="sr-x2")
    assert "\n" not in str(e.value) and "even in tiles of 24" in str(e.value)
    assert [s[-1] for s in hopeless.seen] == [96, 48, 24]  # whole, 48, 24: then nothing smaller to try


def test_other_errors_are_not_retried(model, image):
    broken = RunsOutAbove(model, 0, RuntimeError("shape mismatch in a bad model"))
    with pytest.raises(RuntimeError, match="shape mismatch"):
        restore(broken, image, task="sr-x2")
    assert len(broken.seen) == 1


def test_automatic_tiling_when_the_estimate_is_over_the_budget(model, image, tiled48, monkeypatch, caplog):
    per_px = bytes_per_pixel(model, "sr-x2")
    budget = int(per_px * 50 * 50)  # room for a 48x48 tile, not for the 72x96 padded image
    assert plan_tile(model, "sr-x2", (1, 3, 60, 90), torch.device("cpu"), memory_limit=budget) == 48
    counting = RunsOutAbove(model, 10**9, OOMS["cuda"])
    with caplog.at_level(logging.WARNING):
        out = restore(counting, image, task="sr-x2", memory_limit=budget)
    assert set(counting.seen) == {(1, 3, 48, 48)} and "restoring in tiles of 48" in caplog.text
    assert (out == tiled48).all()
    monkeypatch.setenv("EDTIR_MEMORY_LIMIT", f"{budget / 2**20:.3f}M")  # the same budget from the environment
    counting.seen.clear()
    assert (restore(counting, image, task="sr-x2") == out).all() and set(counting.seen) == {(1, 3, 48, 48)}
    monkeypatch.setenv("EDTIR_MEMORY_LIMIT", "64G")  # plenty: one pass, the untiled result
    counting.seen.clear()
    assert (restore(counting, image, task="sr-x2") == restore(model, image, task="sr-x2", auto_tile=False)).all()
    assert counting.seen == [(1, 3, 72, 96)]


def test_estimates_and_budgets():
    t, b = build_model("T", ["sr-x2", "denoise-25"]), build_model("B", ["sr-x2"])
    # calibrated by benchmarks/inference_memory.py (CPU, fp32): EDT-T x2 measured 5.0-6.6 kB per input pixel
    assert 6_200 < bytes_per_pixel(t, "sr-x2") < 9_000
    assert bytes_per_pixel(t, "denoise-25") < bytes_per_pixel(t, "sr-x2") / 4  # 1 token per 16 pixels
    assert bytes_per_pixel(b, "sr-x2") > 2 * bytes_per_pixel(t, "sr-x2")
    assert parse_bytes("4G") == 4 << 30 and parse_bytes("512 MiB") == 512 << 20
    assert parse_bytes("1.5e9") == 1_500_000_000
    for bad in ("lots", "-1G", "0"):
        with pytest.raises(ValueError):
            parse_bytes(bad)
    free = free_memory(torch.device("cpu"))
    assert free is None or free > 0
    assert memory_budget(torch.device("cpu"), "1G") == 1 << 30
    assert smaller_tile(None, (1, 3, 72, 96), 24) == 48 and smaller_tile(48, (1, 3, 72, 96), 24) == 24
    assert smaller_tile(24, (1, 3, 72, 96), 24) is None
