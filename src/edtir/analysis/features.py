"""Intermediate features of an EDT model, by readable layer name, through forward hooks (the model is not
changed and runs as usual through ``model(x, task)``).

The layers the paper compares with CKA, in the order data meets them (stages and blocks count from 1; head and
tail parts carry their index in the task's head/tail, as in the state-dict keys ``head_sr_x2.0`` etc.):

    head.conv0 head.block1 head.block2 head.conv3     convolutional head of the task (encoder)
    stage1.block1.attn                                after the attention residual  x + attn(norm1(x))
    stage1.block1.ffn                                 after the FFN residual (the block's output)
    ...
    stage1                                            stage output (with its residual)
    ...
    body                                              body output (after conv_after_body and the long skip)
    tail.block0 tail.block1 tail.up2 [tail.conv3]     decoder blocks, upsampler (SR), last conv
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from ..errors import UsageError


@dataclass(frozen=True)
class Layer:
    name: str
    module: nn.Module
    #: "output": the module's output (first element of a tuple); "input": the module's first input (used for the
    #: attention residual, which is the input of the block's norm2)
    where: str = "output"


def _model_task(model, task: str | None) -> str:
    from ..inference import resolve_task
    from ..models.edt import EDT

    if not isinstance(model, EDT):
        arch = getattr(getattr(model, "info", None), "arch", type(model).__name__)
        raise UsageError(f"{arch} has no layers to compare (CKA reads the layers of an EDT model)")
    try:
        return resolve_task(model, task)
    except ValueError as e:
        raise UsageError(str(e)) from None


def _part_name(part: nn.Module, i: int) -> str:
    from ..models.edt import HeadBlock, TailBlock

    if isinstance(part, HeadBlock | TailBlock):
        return f"block{i}"
    if isinstance(part, nn.Conv2d):
        return f"conv{i}"
    return f"up{i}"  # the upsampler (conv + pixel shuffle)


def layers(model, task: str | None = None) -> list[Layer]:
    """The layers of ``model`` that ``task`` goes through, in order."""
    from ..models.edt import TASK_KEYS

    task = _model_task(model, task)
    key = TASK_KEYS[task]
    out = [Layer(f"head.{_part_name(m, i)}", m) for i, m in enumerate(getattr(model, "head_" + key))]
    for s, stage in enumerate(model.body.layers, 1):
        for b, blk in enumerate(stage.residual_group.blocks, 1):
            out.append(Layer(f"stage{s}.block{b}.attn", blk.norm2, where="input"))
            out.append(Layer(f"stage{s}.block{b}.ffn", blk))
        out.append(Layer(f"stage{s}", stage))
    out.append(Layer("body", model.body))
    out += [Layer(f"tail.{_part_name(m, i)}", m) for i, m in enumerate(getattr(model, "tail_" + key))]
    return out


def layer_names(model, task: str | None = None) -> list[str]:
    return [layer.name for layer in layers(model, task)]


class FeatureCapture:
    """Context manager: while open, each forward pass of ``model`` calls ``sink(name, tensor)`` for each layer
    (the tensor detached, batch first). The default sink keeps the tensors in ``self.features``.

        with FeatureCapture(model, "sr-x2") as cap:
            model(x, "sr-x2")
        cap.features["stage1.block2.attn"]          # (B, h, w, C)
    """

    def __init__(self, model, task: str | None = None, names: list[str] | None = None,
                 sink: Callable[[str, torch.Tensor], None] | None = None):
        chosen = layers(model, task)
        if names is not None:
            known = {layer.name for layer in chosen}
            bad = [n for n in names if n not in known]
            if bad:
                raise UsageError(f"no layer {bad[0]!r} in this model (it has: {' '.join(sorted(known))})")
            chosen = [layer for layer in chosen if layer.name in set(names)]
        self.layers = chosen
        self.features: dict[str, torch.Tensor] = {}
        self.sink = sink or self.features.__setitem__
        self._handles = []

    @property
    def names(self) -> list[str]:
        return [layer.name for layer in self.layers]

    def __enter__(self) -> FeatureCapture:
        for layer in self.layers:
            if layer.where == "input":
                def hook(_mod, inputs, name=layer.name):
                    self.sink(name, inputs[0].detach())
                self._handles.append(layer.module.register_forward_pre_hook(hook))
            else:
                def hook(_mod, _inputs, output, name=layer.name):
                    self.sink(name, (output[0] if isinstance(output, tuple) else output).detach())
                self._handles.append(layer.module.register_forward_hook(hook))
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()


def capture_features(model, x: torch.Tensor, task: str | None = None,
                     names: list[str] | None = None) -> dict[str, torch.Tensor]:
    """Features of every layer (or of ``names``) for one input batch, in layer order."""
    with torch.no_grad(), FeatureCapture(model, task, names) as cap:
        model(x, task)
    return {n: cap.features[n] for n in cap.names}
