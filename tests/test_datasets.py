"""Training data: folders (flat/nested), subsets, exclusions, pairs, patches, augmentation, reproducibility."""

import numpy as np
import pytest
import torch

from edtir.data.datasets import (
    StepSampler,
    TaskSource,
    TrainPatches,
    dihedral,
    list_pairs,
    list_training_images,
    make_loader,
)
from edtir.data.io import write_image
from edtir.errors import ConfigError


@pytest.fixture
def tree(tmp_path):
    """A small ImageNet-style folder: class subfolders of random images (some smaller than a patch)."""
    rng = np.random.default_rng(0)
    for c in ("n01", "n02"):
        for i in range(3):
            h, w = (40, 30) if i == 0 else (70, 90)
            write_image(tmp_path / "train" / c / f"{c}_{i}.png", rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
    return tmp_path / "train"


def test_nested_listing_subset_and_exclude(tree, tmp_path):
    assert len(list_training_images([tree])) == 6
    with pytest.raises(ConfigError, match="no training images"):
        list_training_images([tree], recursive=False)
    a = list_training_images([tree], subset=4, seed=1)
    assert len(a) == 4 and a == list_training_images([tree], subset=4, seed=1) and a == sorted(a)
    assert any(list_training_images([tree], subset=4, seed=s) != a for s in range(2, 6))
    kept = list_training_images([tree], exclude={"n01_0", "n02_2"})
    assert len(kept) == 4 and not {p.stem for p in kept} & {"n01_0", "n02_2"}
    with pytest.raises(ConfigError, match="subset of 7"):
        list_training_images([tree], subset=7)


def test_pairs(tmp_path):
    rng = np.random.default_rng(0)
    for sub in ("rainy", "clean"):
        for i in range(2):
            write_image(tmp_path / "set" / sub / f"{i}.png", rng.integers(0, 256, (20, 20, 3), dtype=np.uint8))
    pairs = list_pairs([tmp_path / "set"])
    assert [(p.parent.name, q.parent.name, p.name == q.name) for p, q in pairs] == [("rainy", "clean", True)] * 2
    (tmp_path / "set" / "clean" / "1.png").unlink()
    with pytest.raises(ConfigError, match="without a partner"):
        list_pairs([tmp_path / "set"])


def test_patch_shapes_ranges_and_determinism(tree):
    images = list_training_images([tree])
    ds = TrainPatches([TaskSource("sr-x3", 24, "bicubic", images=images),
                       TaskSource("denoise-25", 96, "noise", noise_sigma=25, images=images),
                       TaskSource("derain-heavy", 96, "rain", rain="heavy", images=images)], seed=5)
    item = ds[7]
    assert item["sr-x3"][0].shape == (3, 24, 24) and item["sr-x3"][1].shape == (3, 72, 72)
    assert item["denoise-25"][0].shape == item["denoise-25"][1].shape == (3, 96, 96)
    noisy, clean = item["denoise-25"]
    assert abs((noisy - clean).std().item() * 255 - 25) < 2
    rainy, clean = item["derain-heavy"]
    assert rainy.mean() > clean.mean() and not torch.equal(rainy, clean)
    again = TrainPatches(ds.sources, seed=5)[7]
    for t in item:
        for a, b in zip(item[t], again[t], strict=True):
            assert torch.equal(a, b)
    other = ds[8]
    assert not torch.equal(item["sr-x3"][1], other["sr-x3"][1])


def test_sr_pair_is_consistent(tree):
    """The LR patch is the bicubic image of its HR patch (up to the patch border)."""
    from edtir.data.imresize import imresize

    ds = TrainPatches([TaskSource("sr-x2", 24, "bicubic", images=list_training_images([tree]))], seed=0)
    for n in range(4):
        lr, hr = ds[n]["sr-x2"]
        hr8 = (hr * 255).round().byte().permute(1, 2, 0).numpy()
        lr_of_hr = imresize(hr8, 0.5).astype(int)
        lr8 = (lr * 255).round().byte().permute(1, 2, 0).numpy().astype(int)
        assert np.abs(lr_of_hr[3:-3, 3:-3] - lr8[3:-3, 3:-3]).max() <= 1


def test_epoch_covers_every_image_once(tree):
    images = list_training_images([tree])
    ds = TrainPatches([TaskSource("denoise-15", 24, "noise", images=images)], seed=0)
    perm = ds._perm(0, len(images), 0)
    assert sorted(perm.tolist()) == list(range(len(images)))


def test_dihedral_gives_8_distinct_transforms():
    a = np.arange(2 * 3 * 1).reshape(2, 3, 1)
    outs = {dihedral(a, k).tobytes() + bytes(dihedral(a, k).shape) for k in range(8)}
    assert len(outs) == 8


def test_ranks_split_the_global_batch():
    one = StepSampler(0, 3, batch=4, rank=0, world=1)
    two = [StepSampler(0, 3, batch=2, rank=r, world=2) for r in range(2)]
    for step in range(3):
        assert one.indices(step) == two[0].indices(step) + two[1].indices(step)
    assert list(StepSampler(2, 4, batch=2)) == [[4, 5], [6, 7]]  # resuming at step 2


def test_worker_processes_give_the_same_batches(tree):
    ds = TrainPatches([TaskSource("sr-x2", 24, "bicubic", images=list_training_images([tree]))], seed=3)
    serial = list(make_loader(ds, start=1, stop=3, batch=2, workers=0))
    parallel = list(make_loader(ds, start=1, stop=3, batch=2, workers=2))
    for a, b in zip(serial, parallel, strict=True):
        assert torch.equal(a["sr-x2"][0], b["sr-x2"][0]) and torch.equal(a["sr-x2"][1], b["sr-x2"][1])


def test_real_training_folder(data_dir):
    images = list_training_images([data_dir / "T91"])
    assert len(images) == 91
    lr, hr = TrainPatches([TaskSource("sr-x4", 48, "bicubic", images=images)])[0]["sr-x4"]
    assert lr.shape == (3, 48, 48) and hr.shape == (3, 192, 192)  # T91 images below 192 px are mirror-padded
    overlap = data_dir / "rain100-overlap-BSD200.txt"
    from edtir.data.datasets import read_exclude_list

    kept = list_training_images([data_dir / "BSD200"], exclude=read_exclude_list(overlap))
    assert len(kept) == 200 - 67


def test_training_on_a_test_set_warns(data_dir):
    with pytest.warns(UserWarning, match="evaluation set"):
        list_training_images([data_dir / "Set5"])


def test_image_cache_gives_the_same_patches_and_keeps_its_budget(tree):
    """Real 291 images through every degradation: the cache changes speed, never a bit of the patches."""
    from pathlib import Path

    from edtir.data.datasets import ImageCache

    real = Path(__file__).resolve().parents[2] / "shared" / "data" / "T91"
    images = list_training_images([real])[:6] if real.is_dir() else list_training_images([tree])
    sources = [TaskSource("sr-x4", 24, "bicubic", images=images),
               TaskSource("denoise-50", 64, "noise", noise_sigma=50, images=images),
               TaskSource("derain-heavy", 64, "rain", rain="heavy", images=images)]
    plain, cached = TrainPatches(sources, seed=2), TrainPatches(sources, seed=2, cache_mb=64)
    for n in range(2 * len(images)):  # the second epoch reads every image from the cache
        a, b = plain[n], cached[n]
        for task in a:
            for x, y in zip(a[task], b[task], strict=True):
                assert torch.equal(x, y), (task, n)
    assert len(cached._read._items) == len(images)
    small = ImageCache(max(ImageCache(0)(p).nbytes for p in images[:3]) + 1)
    for p in images[:3]:
        small(p)
    assert list(small._items) == [images[2]]  # least recently used dropped first, budget kept
    assert small.bytes == small._items[images[2]].nbytes <= small.max_bytes


def test_a_gpu_lease_copy_is_lossless_and_read_like_the_original(data_dir, tmp_path, capsys):
    """benchmarks/prepare_carry.py re-encodes data as WebP to fit a lease: same pixels (colour and grey), found by
    stem so exclude lists still apply, and a carry over the budget is an error."""
    import importlib.util

    from conftest import REPO

    from edtir.data.datasets import read_exclude_list
    from edtir.data.io import read_image

    spec = importlib.util.spec_from_file_location("prepare_carry", REPO / "benchmarks" / "prepare_carry.py")
    carry = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(carry)
    shared = tmp_path / "shared"
    for folder, names in (("BSD200", ["100075", "2092"]), ("Train400", ["test_001"])):
        (shared / "data" / folder).mkdir(parents=True)
        for n in names:
            (shared / "data" / folder / f"{n}.png").write_bytes((data_dir / folder / f"{n}.png").read_bytes())
    (shared / "data" / "rain100-overlap-BSD200.txt").write_text("100075\n")
    out = tmp_path / "carry"
    args = ["--shared", str(shared), "--out", str(out), "--train", "BSD200", "Train400", "--eval"]
    assert carry.main(args + ["--budget-mib", "1000"]) == 0
    for folder, n, suffix in (("BSD200", "2092", ".webp"), ("Train400", "test_001", ".png")):  # grey: as it is
        a, b = read_image(data_dir / folder / f"{n}.png"), read_image(out / "data" / folder / f"{n}{suffix}")
        assert a.shape == b.shape and np.array_equal(a, b), (folder, n)
    exclude = read_exclude_list(out / "data" / "rain100-overlap-BSD200.txt")
    assert [p.name for p in list_training_images([out / "data" / "BSD200"], exclude=exclude)] == ["2092.webp"]
    assert carry.main(args + ["--budget-mib", "1"]) == 1  # the repository alone is over 1 MiB
    assert "over the lease's limit" in capsys.readouterr().err
