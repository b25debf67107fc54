"""ONNX export: one task of an EDT model as a graph ``input (N, 3, H, W) -> output (N, 3, sH, sW)``, float32 in
[0, 1] (not clamped), with H and W dynamic: any multiples of the task's size multiple (``model.info``). Callers
pad to the multiple and crop back, as :mod:`edtir.inference` does.

Uses torch's dynamo exporter (``torch.onnx.export(..., dynamo=True)``, which needs ``onnxscript``; install with
``pip install 'edtir[onnx]'``). The model computes its shift masks from tensor ops while exporting, so one file
serves every size. The graph carries its task, scale and size multiple as ONNX metadata.
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .errors import EdtirError, UsageError

log = logging.getLogger(__name__)

#: largest side exported, in size multiples (the graph refuses bigger inputs; tile instead)
MAX_MULTIPLES = 256


class TaskModule(nn.Module):
    """One task of a (multi-task) model as a plain ``x -> y`` module, which is what exporters trace."""

    def __init__(self, model: nn.Module, task: str):
        super().__init__()
        self.model, self.task = model, task

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x, self.task)


def need_onnx() -> None:
    missing = []
    for mod in ("onnx", "onnxscript"):
        try:
            __import__(mod)
        except ImportError:
            missing.append(mod)
    if missing:
        raise EdtirError(f"ONNX export needs {' and '.join(missing)}: pip install 'edtir[onnx]'")


def export_onnx(model: nn.Module, path: str | Path, *, task: str | None = None, opset: int | None = None,
                example_size: tuple[int, int] = (2, 3)) -> Path:
    """Write ``model``'s ``task`` as ONNX at ``path`` (atomically) with dynamic batch, height and width.

    ``example_size``: the traced input's height and width in size multiples (any; the graph is dynamic)."""
    from .data.io import atomic_write_bytes
    from .inference import resolve_task

    need_onnx()
    import onnx
    from torch.export import Dim

    if getattr(model, "arch", "EDT") != "EDT" and not hasattr(model, "cfg"):
        raise UsageError("only EDT models can be exported (the baselines are not networks)")
    try:
        task = resolve_task(model, task)
    except ValueError as e:
        raise UsageError(f"{e} (--task)") from None
    m, s = model.size_multiple(task), model.scale(task)
    module = TaskModule(model.float().eval().cpu(), task).eval()
    x = torch.rand(2, 3, example_size[0] * m, example_size[1] * m)  # batch 2: the exporter fixes a size-1 dim
    hk, wk = Dim("h_multiples", min=1, max=MAX_MULTIPLES), Dim("w_multiples", min=1, max=MAX_MULTIPLES)
    shapes = {"x": {0: Dim("batch", min=1, max=1024), 2: m * hk, 3: m * wk}}
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # the exporter's own deprecation chatter
        try:
            program = torch.onnx.export(module, (x,), dynamo=True, dynamic_shapes=shapes, opset_version=opset,
                                        input_names=["input"], output_names=["output"], verbose=False)
        except Exception as e:  # the exporter fails in many ways; one line is enough
            msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise EdtirError(f"ONNX export failed: {msg[:300]} (EDTIR_DEBUG=1 for the traceback)") from e
    proto = program.model_proto
    meta = {"edtir.task": task, "edtir.scale": str(s), "edtir.size_multiple": str(m),
            "edtir.input": "float32 (N, 3, H, W) in [0, 1], H and W multiples of edtir.size_multiple",
            "edtir.output": f"float32 (N, 3, {s}H, {s}W), not clamped"}
    for k, v in meta.items():
        proto.metadata_props.add(key=k, value=v)
    onnx.checker.check_model(proto)
    atomic_write_bytes(path, lambda tmp: onnx.save(proto, tmp))
    return Path(path)


def onnx_session(path: str | Path):
    try:
        import onnxruntime as ort
    except ImportError:
        raise EdtirError("running an ONNX file needs onnxruntime: pip install 'edtir[onnx]'") from None
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def parity(model: nn.Module, path: str | Path, image: np.ndarray, *, task: str | None = None) -> float:
    """Max abs difference between PyTorch and onnxruntime on ``image`` (HWC uint8, cropped to the size
    multiple), in the [0, 1] scale."""
    from .data.io import uint8_to_tensor
    from .inference import resolve_task

    task = resolve_task(model, task)
    m = model.size_multiple(task)
    h, w = image.shape[0] // m * m, image.shape[1] // m * m
    if not h or not w:
        raise ValueError(f"image {image.shape[:2]} is smaller than the size multiple {m}")
    x = uint8_to_tensor(image[:h, :w])
    with torch.no_grad():
        ref = model.float().eval().cpu()(x, task).numpy()
    out = onnx_session(path).run(None, {"input": x.numpy()})[0]
    if out.shape != ref.shape:
        raise EdtirError(f"ONNX output shape {out.shape} differs from PyTorch's {ref.shape}")
    return float(np.abs(out - ref).max())
