"""Training patches: image folders (flat or nested), paired folders, on-the-fly degradations, crops and the 8
flips/rotations.

Reproducibility is by construction: sample ``n`` of a task is a pure function of ``(seed, task, n)``. The
image is ``perm_epoch[n % len]`` with a permutation seeded by ``(seed, task, epoch)``; crop, flip/rotation and
noise/rain come from a generator seeded by ``(seed, task, n)``. A :class:`StepSampler` hands step ``s`` on
rank ``r`` the global sample numbers ``(s * world + r) * batch + i``, so ranks split the stream like a
DistributedSampler, the same global batch gives the same samples for any number of processes, and a resumed
run replays exactly what an uninterrupted one would have seen, whatever the worker processes did before."""

from __future__ import annotations

import logging
import warnings
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from ..errors import ConfigError
from ..models.edt import TASKS, task_kind, task_scale
from . import degrade
from .io import list_images, read_image

log = logging.getLogger(__name__)

#: Folder names of the evaluation sets: training on them makes their scores meaningless.
TEST_SET_NAMES = {"set5", "set14", "b100", "bsd100", "urban100", "manga109", "cbsd68", "kodak24", "mcmaster",
                  "rain100l", "rain100h", "rain12"}

_SUBSET_SALT = 7919  # the subset of a folder is the same for every task of a run (one "ImageNet200K")


# ------------------------------------------------------------------------------------------------------------
# Listing
# ------------------------------------------------------------------------------------------------------------

def read_exclude_list(path: str | Path) -> set[str]:
    """Image names (stems) to leave out, one per line; '#' starts a comment."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: exclude list not found")
    names = set()
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            names.add(Path(line).stem)
    return names


def _warn_if_test_set(folder: Path) -> None:
    if any(part.lower() in TEST_SET_NAMES for part in folder.resolve().parts[-2:]):
        warnings.warn(f"{folder}: looks like an evaluation set; never train on a test set", stacklevel=3)


def list_training_images(folders, *, recursive: bool = True, subset: int | None = None, seed: int = 0,
                         exclude: set[str] | frozenset = frozenset()) -> list[Path]:
    """All images of the folders (sorted, nested ones too when ``recursive``), less the excluded names, then
    an optional random subset of ``subset`` images drawn with ``seed`` (kept in sorted order)."""
    paths: list[Path] = []
    for f in folders:
        f = Path(f)
        _warn_if_test_set(f)
        paths += list_images(f, recursive=recursive)
    paths = [p for p in paths if p.stem not in exclude]
    if not paths:
        raise ConfigError(f"no training images found in {', '.join(map(str, folders))}")
    if subset is not None:
        if subset > len(paths):
            raise ConfigError(f"subset of {subset} images asked but only {len(paths)} found in "
                              f"{', '.join(map(str, folders))}")
        pick = np.random.default_rng([seed, _SUBSET_SALT]).choice(len(paths), size=subset, replace=False)
        paths = [paths[i] for i in sorted(pick)]
    return paths


def list_pairs(folders, input_name: str = "rainy", target_name: str = "clean") -> list[tuple[Path, Path]]:
    """(degraded, clean) pairs from ``<folder>/<input_name>/`` and ``<folder>/<target_name>/``, matched by
    their relative path without extension."""
    pairs = []
    for f in folders:
        f = Path(f)
        _warn_if_test_set(f)
        inp, tgt = f / input_name, f / target_name
        for d in (inp, tgt):
            if not d.is_dir():
                raise ConfigError(f"{f}: paired folder needs {input_name}/ and {target_name}/ subfolders "
                                  f"({d} is missing)")
        targets = {p.relative_to(tgt).with_suffix(""): p for p in list_images(tgt, recursive=True)}
        inputs = {p.relative_to(inp).with_suffix(""): p for p in list_images(inp, recursive=True)}
        missing = sorted(set(inputs) ^ set(targets))
        if missing:
            raise ConfigError(f"{f}: {len(missing)} images without a partner, e.g. {missing[0]}")
        pairs += [(inputs[k], targets[k]) for k in sorted(targets)]
    return pairs


# ------------------------------------------------------------------------------------------------------------
# Patches
# ------------------------------------------------------------------------------------------------------------

@dataclass
class TaskSource:
    """Everything needed to make training pairs for one task."""

    task: str
    patch: int  # input side (LR side for SR)
    degradation: str  # bicubic, noise, rain
    noise_sigma: float = 25.0
    rain: str = "light"
    images: list[Path] = field(default_factory=list)  # clean images, degraded on the fly
    pairs: list[tuple[Path, Path]] = field(default_factory=list)  # (degraded, clean), used as they are

    @property
    def size(self) -> int:
        return len(self.images) + len(self.pairs)


SR_MARGIN = 2  # LR pixels cut around an SR patch so its bicubic LR does not see the crop border


def pad_to(image: np.ndarray, h: int, w: int) -> np.ndarray:
    """Mirror-pad (symmetric) bottom/right up to at least h x w: images smaller than a patch still serve."""
    ph, pw = max(0, h - image.shape[0]), max(0, w - image.shape[1])
    if ph or pw:
        while ph > image.shape[0] or pw > image.shape[1]:  # tiny images: pad in rounds
            image = pad_to(image, min(h, 2 * image.shape[0]), min(w, 2 * image.shape[1]))
            ph, pw = max(0, h - image.shape[0]), max(0, w - image.shape[1])
        image = np.pad(image, ((0, ph), (0, pw), (0, 0)), mode="symmetric")
    return image


def random_crop(arrays, size: int, rng: np.random.Generator):
    """The same random size x size window of every array (all the same height and width)."""
    h, w = arrays[0].shape[:2]
    y = int(rng.integers(0, h - size + 1))
    x = int(rng.integers(0, w - size + 1))
    return [a[y:y + size, x:x + size] for a in arrays]


def dihedral(image: np.ndarray, k: int) -> np.ndarray:
    """One of the 8 flips/rotations: rotate by k*90 degrees, then flip left-right when k >= 4."""
    out = np.rot90(image, k % 4)
    return np.ascontiguousarray(out[:, ::-1] if k >= 4 else out)


def make_pair(src: TaskSource, n: int, rng: np.random.Generator, read=read_image) -> tuple[np.ndarray, np.ndarray]:
    """(input, target) arrays for item ``n`` of the source: input HWC float32 (noise) or uint8, target
    uint8. ``read`` decodes a clean image (an :class:`ImageCache` in training)."""
    if n >= len(src.images):  # a real pair
        inp_path, tgt_path = src.pairs[n - len(src.images)]
        inp, tgt = read_image(inp_path), read_image(tgt_path)
        if inp.shape != tgt.shape:
            raise ValueError(f"{inp_path}: size {inp.shape[:2]} differs from its target {tgt.shape[:2]}")
        inp, tgt = (pad_to(a, src.patch, src.patch) for a in (inp, tgt))
        return tuple(random_crop([inp, tgt], src.patch, rng))
    clean = read(src.images[n])
    if src.degradation == "bicubic":
        s = task_scale(src.task)
        side = (src.patch + 2 * SR_MARGIN) * s
        (hr,) = random_crop([pad_to(clean, side, side)], side, rng)
        lr = degrade.bicubic_lr(hr, s)
        m = SR_MARGIN
        return lr[m:m + src.patch, m:m + src.patch], hr[m * s:(m + src.patch) * s, m * s:(m + src.patch) * s]
    (gt,) = random_crop([pad_to(clean, src.patch, src.patch)], src.patch, rng)
    if src.degradation == "noise":
        return degrade.add_noise(gt, src.noise_sigma, rng), gt
    if src.degradation == "rain":
        return degrade.add_rain(gt, rng, src.rain), gt
    raise ValueError(f"unknown degradation {src.degradation!r}")


def to_tensor(a: np.ndarray) -> torch.Tensor:
    """HWC uint8 (or float already in the [0, 1] scale) -> CHW float32."""
    t = torch.from_numpy(np.ascontiguousarray(a.transpose(2, 0, 1)))
    return t.float().div_(255.0) if a.dtype == np.uint8 else t.float()


class ImageCache:
    """Decoded clean images kept in memory, least recently used dropped past ``max_bytes``: decoding a PNG costs
    as much as making the patch, and a GPU step wants hundreds of patches. One per data process; 0 turns it
    off. The images are never modified (crops are views that every later step copies)."""

    def __init__(self, max_bytes: int):
        self.max_bytes = int(max_bytes)
        self.bytes = 0
        self._items: OrderedDict = OrderedDict()

    def __call__(self, path) -> np.ndarray:
        image = self._items.get(path)
        if image is not None:
            self._items.move_to_end(path)
            return image
        image = read_image(path)
        if self.max_bytes <= 0 or image.nbytes > self.max_bytes:
            return image
        image.setflags(write=False)
        self._items[path] = image
        self.bytes += image.nbytes
        while self.bytes > self.max_bytes:
            _, old = self._items.popitem(last=False)
            self.bytes -= old.nbytes
        return image


class TrainPatches(Dataset):
    """Index ``n`` (a global sample number) -> ``{task: (input, target)}`` CHW float tensors, one pair per
    task. Input in [0, 1] (noisy inputs may leave it), target in [0, 1]."""

    def __init__(self, sources: list[TaskSource], seed: int = 0, cache_mb: float = 0):
        self.sources = sources
        self.seed = int(seed)
        self._perms: OrderedDict = OrderedDict()
        self._read = ImageCache(int(cache_mb * 2**20))

    def __len__(self) -> int:  # an endless stream; the sampler decides how much of it a run uses
        return 2**62

    def _perm(self, tid: int, size: int, epoch: int) -> np.ndarray:
        key = (tid, epoch)
        if key not in self._perms:
            self._perms[key] = np.random.default_rng([self.seed, tid, epoch, 1]).permutation(size)
            while len(self._perms) > 2 * len(self.sources):
                self._perms.popitem(last=False)
        return self._perms[key]

    def sample(self, src: TaskSource, n: int):
        tid = TASKS.index(src.task)
        item = int(self._perm(tid, src.size, n // src.size)[n % src.size])
        rng = np.random.default_rng([self.seed, tid, n, 2])
        inp, tgt = make_pair(src, item, rng, self._read)
        k = int(rng.integers(8))
        return to_tensor(dihedral(inp, k)), to_tensor(dihedral(tgt, k))

    def __getitem__(self, n: int) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        return {src.task: self.sample(src, int(n)) for src in self.sources}


class StepSampler(Sampler):
    """Batches of global sample numbers for steps ``start..stop-1`` on one rank (see the module docstring)."""

    def __init__(self, start: int, stop: int, batch: int, rank: int = 0, world: int = 1):
        self.start, self.stop, self.batch, self.rank, self.world = start, stop, batch, rank, world

    def indices(self, step: int) -> list[int]:
        base = (step * self.world + self.rank) * self.batch
        return list(range(base, base + self.batch))

    def __iter__(self):
        for step in range(self.start, self.stop):
            yield self.indices(step)

    def __len__(self) -> int:
        return max(0, self.stop - self.start)


def _worker_init(_):
    from ..train.signals import ignore_in_worker

    torch.set_num_threads(1)  # numpy does the work in workers; don't oversubscribe the cores
    ignore_in_worker()  # Ctrl-C / SIGTERM to the process group: the trainer saves, then stops the workers


def make_loader(dataset: TrainPatches, *, start: int, stop: int, batch: int, rank: int = 0, world: int = 1,
                workers: int = 0, pin_memory: bool = False) -> DataLoader:
    """A loader yielding one ``{task: [inputs, targets]}`` batch per step from ``start`` to ``stop``."""
    sampler = StepSampler(start, stop, batch, rank, world)
    return DataLoader(dataset, batch_sampler=sampler, num_workers=workers,
                      pin_memory=pin_memory, worker_init_fn=_worker_init if workers else None,
                      prefetch_factor=2 if workers else None)


def build_sources(cfg) -> list[TaskSource]:
    """One :class:`TaskSource` per task of a training config (``edtir.train.config.Config``)."""
    from ..train.config import degradation_of, noise_sigma_of, rain_of

    sources = []
    for task in cfg.model.tasks:
        d = cfg.data[task]
        exclude: set[str] = set()
        for f in d.exclude:
            exclude |= read_exclude_list(f)
        images = (list_training_images(d.folders, recursive=d.recursive, subset=d.subset, seed=cfg.train.seed,
                                       exclude=exclude) if d.folders else [])
        pairs = list_pairs(d.paired, d.paired_input, d.paired_target) if d.paired else []
        pairs = [p for p in pairs if p[1].stem not in exclude]
        src = TaskSource(task=task, patch=cfg.patch(task), degradation=degradation_of(cfg, task),
                         noise_sigma=noise_sigma_of(cfg, task), rain=rain_of(cfg, task), images=images,
                         pairs=pairs)
        if task_kind(task) == "derain" and images:
            log.info("%s: %d clean images get synthetic %s rain", task, len(images), src.rain)
        sources.append(src)
    return sources
