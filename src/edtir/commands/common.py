"""Flags and helpers shared by several subcommands."""

from __future__ import annotations

import argparse

from ..errors import UsageError


def add_model_args(p: argparse.ArgumentParser, required: bool = False) -> None:
    g = p.add_mutually_exclusive_group(required=required)
    g.add_argument("--model", metavar="NAME",
                   help="a bundled model, a baseline (bicubic, identity), or 'default': the task's default "
                        "bundled model, also used when neither --model nor --weights is given (see `edtir models`)")
    g.add_argument("--weights", metavar="FILE", help="a checkpoint: edtir .safetensors or official EDT .pth")


def add_device_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, ... (default: cuda when available)")
    p.add_argument("--precision", choices=("fp32", "bf16"), default="fp32",
                   help="float32, or bfloat16 autocast (GPU; default fp32)")


def add_inference_args(p: argparse.ArgumentParser) -> None:
    """Tiling and self-ensemble flags of every command that runs a model over images (see edtir.restore)."""
    p.add_argument("--self-ensemble", action="store_true", help="average over the 8 flips/rotations (x8 time)")
    p.add_argument("--tile", type=int, metavar="N", help="restore in tiles of N input pixels (bounded memory)")
    p.add_argument("--tile-overlap", type=int, default=32, metavar="N", help="overlap of tiles (default 32)")
    p.add_argument("--tile-batch", type=int, default=1, metavar="N", help="tiles per forward pass (default 1)")


def check_inference_args(args) -> None:
    if args.tile is not None and args.tile <= 0:
        raise UsageError(f"--tile must be a positive number of pixels (got {args.tile})")
    if args.tile_overlap < 0:
        raise UsageError(f"--tile-overlap must be >= 0 (got {args.tile_overlap})")
    if args.tile_batch < 1:
        raise UsageError(f"--tile-batch must be >= 1 (got {args.tile_batch})")


def resolve_device(name: str):
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise UsageError(f"unknown device {name!r} (use cpu, cuda or cuda:N)") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"device {name!r} requested but CUDA is not available on this machine")
    return dev


def parse_tasks(text: str | None) -> list[str] | None:
    from ..models.edt import TASKS

    if text is None:
        return None
    tasks = [t.strip() for t in text.split(",") if t.strip()]
    bad = [t for t in tasks if t not in TASKS]
    if bad:
        raise UsageError(f"unknown task {bad[0]!r}; expected one of: {' '.join(TASKS)}")
    return tasks


def model_from_args(args, task: str | None = None, device=None):
    """The model named by --model / --weights, or the default bundled model of ``task`` (``--model default``
    or neither flag), ready in eval mode on ``device``. ``args.model`` is set to the name resolved, so the
    command can report which model ran."""
    from .. import zoo

    model, weights = getattr(args, "model", None), getattr(args, "weights", None)
    if weights is None and model in (None, "default"):
        if task is None:
            raise UsageError("give --task to use its default bundled model, or --model NAME / --weights FILE")
        model = args.model = zoo.default_for(task)
    return zoo.get_model(model=model, weights=weights, task=task, device=device or "cpu")
