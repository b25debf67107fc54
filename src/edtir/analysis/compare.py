"""Layer-by-layer CKA between two models (or a model and itself) on crops of a data folder: the analysis of the
paper's section on pre-training (why it helps SR more than denoising).

Inputs follow the evaluation protocol of the task (``edtir.evaluate.samples``: bicubic LR for SR, seeded noise
for denoising, the rainy/ images for deraining); random crops of those inputs are the samples, the same crops
for both models. Features of every layer (``features.layers``) are reduced to their linear Gram matrix batch by
batch, so memory does not grow with the number of batches, and combined by :class:`~.cka.MinibatchCKA`.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np
import torch

from ..errors import UsageError
from .cka import MinibatchCKA, linear_gram
from .features import FeatureCapture


def default_crop(models, task: str) -> int:
    """Smallest multiple of every model's size multiple that is at least 48 input pixels (the paper's SR
    training patch; 96 for the down-sampling denoise/derain heads)."""
    m = math.lcm(*(int(model.size_multiple(task)) for model in models))
    return m * max(1, -(-48 // m))


def input_crops(task: str, folder, count: int, crop: int, seed: int = 0) -> list[torch.Tensor]:
    """``count`` random (3, crop, crop) crops of the task's inputs made from ``folder``, spread evenly over its
    images (cycling when there are fewer images than crops), in a seeded random order."""
    from ..evaluate import check_folder, samples
    from ..inference import mirror_pad

    files = check_folder(folder, task)
    per_image = -(-count // len(files))
    rng = np.random.default_rng(seed)
    crops = []
    for s in samples(task, folder):
        if isinstance(s, Exception):
            raise s
        x = s.input
        H, W = x.shape[-2:]
        x = mirror_pad(x, max(0, crop - H), max(0, crop - W))[0]
        for _ in range(per_image):
            i = int(rng.integers(0, x.shape[-2] - crop + 1))
            j = int(rng.integers(0, x.shape[-1] - crop + 1))
            crops.append(x[:, i:i + crop, j:j + crop].clone())
        if len(crops) >= count:
            break
    order = rng.permutation(len(crops))[:count]
    return [crops[k] for k in order]


def batched(crops: list[torch.Tensor], batch: int) -> list[torch.Tensor]:
    """Stack crops into batches of ``batch`` (a last partial batch is dropped when it has fewer than 4 samples,
    the minimum of the unbiased HSIC)."""
    out = [torch.stack(crops[i:i + batch]) for i in range(0, len(crops), batch)]
    return [b for b in out if b.shape[0] >= 4]


@dataclass
class CKAResult:
    layers_a: list[str]
    layers_b: list[str]
    matrix: np.ndarray  # (len(layers_a), len(layers_b))
    samples: int = 0
    batches: int = 0
    meta: dict = field(default_factory=dict)

    def corresponding(self) -> list[tuple[str, float]]:
        """CKA of the layers that both sides have (same name), in A's order: the diagonal when the
        architectures match."""
        idx_b = {n: j for j, n in enumerate(self.layers_b)}
        return [(n, float(self.matrix[i, idx_b[n]])) for i, n in enumerate(self.layers_a) if n in idx_b]

    def to_json(self) -> dict:
        def num(v):
            return round(float(v), 6) if math.isfinite(v) else None

        return {"layers_a": self.layers_a, "layers_b": self.layers_b,
                "matrix": [[num(v) for v in row] for row in self.matrix],
                "corresponding": {n: num(v) for n, v in self.corresponding()},
                "samples": self.samples, "batches": self.batches, **self.meta}


def layer_grams(model, task: str, x: torch.Tensor, precision: str = "fp32") -> tuple[list[str], torch.Tensor]:
    """(layer names, (layers, n, n) float64 linear Grams) of one input batch."""
    from ..inference import autocast

    grams: dict[str, torch.Tensor] = {}
    with FeatureCapture(model, task, sink=lambda n, t: grams.__setitem__(n, linear_gram(t))) as cap:
        with torch.no_grad(), autocast(x.device, precision):
            model(x, task)
    return cap.names, torch.stack([grams[n] for n in cap.names])


def compare_models(model_a, model_b, task: str, batches: Iterable[torch.Tensor], *, device="cpu",
                   precision: str = "fp32", progress: bool = False, total: int | None = None) -> CKAResult:
    """Minibatch CKA of every layer of ``model_a`` against every layer of ``model_b`` (pass the same object
    twice for self-similarity: it then runs once per batch)."""
    from tqdm import tqdm

    device = torch.device(device)
    for m in (model_a, model_b):
        if task not in getattr(m, "tasks", ()):
            raise UsageError(f"a model does not do task {task!r} (it does: {', '.join(getattr(m, 'tasks', ()))})")
    acc = MinibatchCKA()
    names_a = names_b = None
    for x in tqdm(batches, total=total, desc=f"CKA {task}", unit="batch", disable=not progress, leave=False,
                  dynamic_ncols=True):
        x = x.to(device)
        names_a, ka = layer_grams(model_a, task, x, precision)
        if model_b is model_a:
            names_b, kb = names_a, None
        else:
            names_b, kb = layer_grams(model_b, task, x, precision)
        acc.update_grams(ka, kb)
    if names_a is None:
        raise UsageError("no batch to compare (need at least 4 crops per batch)")
    return CKAResult(names_a, names_b, acc.result(), samples=acc.samples, batches=acc.batches,
                     meta={"task": task})
