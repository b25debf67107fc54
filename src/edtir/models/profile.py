"""Compute measured, not estimated: multiply-accumulates per input pixel with ``torch.utils.flop_counter``."""

from __future__ import annotations

import torch
from torch.utils.flop_counter import FlopCounterMode

from .edt import reference_mode


def macs_per_pixel(model, task: str | None = None, side: int | None = None) -> float:
    """MACs per input pixel (FLOP total / 2 / pixels) of one forward pass on a ``side`` x ``side`` input.

    The model's arithmetic, counted on the reference formulation: the fast path pads head dims with zeros (to
    16 on the CPU, to a multiple of 8 on CUDA), work the model does not need.
    Window attention makes the cost per pixel independent of the input size (beyond the size multiple)."""
    task = model._task(task)
    side = side or 2 * model.size_multiple(task)
    p = next(model.parameters())
    x = torch.rand(1, 3, side, side, device=p.device, dtype=p.dtype)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), reference_mode(), FlopCounterMode(display=False) as fc:
            model(x, task=task)
    finally:
        model.train(was_training)
    return fc.get_total_flops() / 2 / (side * side)
