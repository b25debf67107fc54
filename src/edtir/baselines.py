"""Baselines that need no weights: ``bicubic`` (SR) and ``identity`` (any task).

They check the evaluation pipeline against published baseline rows (bicubic x2 Set5 33.66 dB, rainy
Rain100L 26.90 dB), so they must upscale exactly as the field does: MATLAB ``imresize`` on the *uint8* LR
image, rounded to uint8. They look like an EDT model to the inference engine (``model(x, task)``, ``.tasks``,
``.scale``, ``.size_multiple``, ``.info``), so every command that takes ``--model`` accepts them.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from .data.imresize import imresize
from .errors import UsageError
from .models.edt import TASKS, ModelInfo, task_kind, task_scale

BASELINES = {
    "bicubic": "MATLAB-compatible bicubic upscaling of the LR input (super-resolution only)",
    "identity": "returns its input (bicubic-upscaled for super-resolution): the 'do nothing' row of a table",
}

SR_TASKS = tuple(t for t in TASKS if task_kind(t) == "sr")


def on_uint8_grid(x: np.ndarray) -> bool:
    """True when ``x`` (values in the 0-255 scale) holds integers up to float32 error: an image that was
    uint8 before the engine divided it by 255."""
    return bool(x.min() >= -1e-3 and x.max() <= 255 + 1e-3 and np.abs(x - np.round(x)).max() < 1e-3)


def bicubic_upscale(x: torch.Tensor, scale: int) -> torch.Tensor:
    """(B, 3, H, W) in [0, 1] -> (B, 3, sH, sW) by MATLAB imresize. An input on the uint8 grid is resized as
    the uint8 image MATLAB would see (output rounded to uint8); any other input is resized in float,
    unrounded."""
    outs = []
    for img in x.detach().to("cpu", torch.float64).numpy():
        hwc = img.transpose(1, 2, 0) * 255.0
        if on_uint8_grid(hwc):
            up = imresize(np.round(hwc).clip(0, 255).astype(np.uint8), scale).astype(np.float64)
        else:
            up = imresize(hwc, scale)
        outs.append(up.transpose(2, 0, 1) / 255.0)
    return torch.from_numpy(np.stack(outs)).to(device=x.device, dtype=x.dtype if x.is_floating_point()
                                                else torch.float32)


class Baseline(nn.Module):
    """A weightless model with the EDT descriptor interface."""

    arch = "baseline"
    supported: tuple[str, ...] = TASKS

    def __init__(self, tasks: tuple[str, ...] | None = None):
        super().__init__()
        self._tasks = tuple(tasks) if tasks else self.supported

    @property
    def tasks(self) -> tuple[str, ...]:
        return self._tasks

    def _task(self, task: str | None) -> str:
        if task is None:
            if len(self._tasks) != 1:
                raise ValueError(f"{self.arch} serves several tasks ({', '.join(self._tasks)}): "
                                 "pass task=...")
            return self._tasks[0]
        if task not in self._tasks:
            raise ValueError(f"{self.arch} does not do task {task!r} (it does: {', '.join(self._tasks)})")
        return task

    def scale(self, task: str | None = None) -> int:
        return task_scale(self._task(task))

    def size_multiple(self, task: str | None = None) -> int:
        self._task(task)
        return 1

    @property
    def info(self) -> ModelInfo:
        return ModelInfo(arch=self.arch, size=None, tasks=self._tasks,
                         scales={t: task_scale(t) for t in self._tasks},
                         size_multiples={t: 1 for t in self._tasks}, params=0, window_size=(1, 1),
                         upsampler="bicubic (MATLAB imresize)", downsample=False)

    def forward(self, x: torch.Tensor, task: str | None = None) -> torch.Tensor:
        s = self.scale(task)
        return bicubic_upscale(x, s) if s > 1 else x.clone()


class Bicubic(Baseline):
    arch = "bicubic"
    supported = SR_TASKS


class Identity(Baseline):
    arch = "identity"
    supported = TASKS


def get_baseline(name: str, task: str | None = None) -> nn.Module:
    """The baseline ``name`` for ``task`` (or for every task it supports when ``task`` is None)."""
    classes = {"bicubic": Bicubic, "identity": Identity}
    if name not in classes:
        raise UsageError(f"unknown baseline {name!r}; available: {', '.join(BASELINES)}")
    cls = classes[name]
    if task is not None and task not in cls.supported:
        kinds = sorted({task_kind(t) for t in cls.supported})
        raise UsageError(f"baseline {name!r} does not do task {task!r} (it does: {', '.join(kinds)} tasks)")
    return cls((task,) if task else None).eval()
