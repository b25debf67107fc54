"""Named models: bundled weights (``zoo/*.safetensors`` listed in ``zoo/registry.json``) and the built-in
baselines that need no weights (``bicubic``, ``identity``)."""

from __future__ import annotations

import json
from pathlib import Path

from ..errors import UsageError

HERE = Path(__file__).parent


def registry() -> dict[str, dict]:
    """name -> {"file": ..., "description": ..., ...} for every bundled model."""
    f = HERE / "registry.json"
    if not f.exists():
        return {}
    return json.loads(f.read_text())


def names() -> list[str]:
    from ..baselines import BASELINES

    return sorted(registry()) + sorted(BASELINES)


def default_model() -> str | None:
    reg = registry()
    for name, entry in reg.items():
        if entry.get("default"):
            return name
    return next(iter(reg), None)


def get_model(model: str | None = None, weights: str | None = None, task: str | None = None, device="cpu"):
    """Resolve ``--model NAME`` (bundled or baseline) or ``--weights FILE`` into a model in eval mode."""
    from ..baselines import BASELINES, get_baseline
    from ..models.checkpoint import load_model

    if weights is not None:
        return load_model(weights, device=device)
    if model is None:
        raise UsageError("name a model with --model NAME or a checkpoint with --weights FILE")
    if model in BASELINES:
        return get_baseline(model, task).to(device)
    reg = registry()
    if model in reg:
        return load_model(HERE / reg[model]["file"], device=device)
    raise UsageError(f"unknown model {model!r}; available: {', '.join(names())} (or --weights FILE)")
