"""Figures of the analysis (matplotlib, an optional dependency: ``pip install edtir[extras]``), written
atomically. No pyplot: figures are built with the object API and the Agg canvas, so nothing global changes."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from ..data.io import atomic_write_bytes
from ..errors import EdtirError, UsageError

FORMATS = (".png", ".pdf", ".svg", ".jpg", ".jpeg")


def check_out(path, what: str = "--out") -> Path:
    """A figure path with a supported extension, checked before any work is done."""
    path = Path(path)
    if path.suffix.lower() not in FORMATS:
        raise UsageError(f"{what} {path}: unsupported figure format (use one of {', '.join(FORMATS)})")
    if path.is_dir():
        raise UsageError(f"{what} {path}: is a folder")
    return path


def new_figure(width: float, height: float):
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise EdtirError("figures need matplotlib: pip install 'edtir[extras]' (or matplotlib)") from None
    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def save_figure(fig, path, dpi: int = 150) -> Path:
    path = check_out(path)
    fmt = path.suffix.lower().lstrip(".").replace("jpg", "jpeg")
    atomic_write_bytes(path, lambda tmp: fig.savefig(tmp, format=fmt, dpi=dpi))
    return path


def save_json(obj, path) -> Path:
    text = json.dumps(obj, indent=2, allow_nan=False) + "\n"
    atomic_write_bytes(path, lambda tmp: Path(tmp).write_text(text))
    return Path(path)


def tick_labels(ax, names, axis: str, max_labels: int = 70) -> None:
    """Label every layer when there are few; else the stage boundaries, head/tail parts and body."""
    idx = list(range(len(names)))
    if len(names) > max_labels:
        idx = [i for i, n in enumerate(names) if ".block" not in n or n.startswith(("head", "tail"))]
    size = 7 if len(idx) <= 24 else 5
    if axis == "x":
        ax.set_xticks(idx, [names[i] for i in idx], rotation=90, fontsize=size)
    else:
        ax.set_yticks(idx, [names[i] for i in idx], fontsize=size)


def cka_figure(result, path, title: str = "", label_a: str = "A", label_b: str = "B") -> Path:
    """Heatmap of the layer x layer CKA matrix (A down, B across) and the CKA of corresponding layers."""
    m = np.asarray(result.matrix, dtype=np.float64)
    n_a, n_b = m.shape
    side = min(12.0, max(5.0, 0.16 * max(n_a, n_b) + 2.5))
    fig = new_figure(side + 1.5, side + 3.0)
    grid = fig.add_gridspec(2, 1, height_ratios=[side, 2.6])
    ax = fig.add_subplot(grid[0])
    im = ax.imshow(m, vmin=0.0, vmax=1.0, cmap="magma", origin="lower", interpolation="nearest", aspect="auto")
    tick_labels(ax, result.layers_b, "x")
    tick_labels(ax, result.layers_a, "y")
    ax.set_xlabel(f"layers of {label_b}")
    ax.set_ylabel(f"layers of {label_a}")
    ax.set_title(title or f"linear CKA, {result.samples} samples")
    fig.colorbar(im, ax=ax, shrink=0.8, label="CKA")
    pairs = result.corresponding()
    ax2 = fig.add_subplot(grid[1])
    if pairs:
        names, values = zip(*pairs, strict=True)
        ax2.plot(range(len(values)), values, marker="o", ms=3, lw=1)
        tick_labels(ax2, list(names), "x")
        ax2.set_ylim(0.0, 1.05)
        ax2.grid(alpha=0.3)
        ax2.set_ylabel("CKA")
        ax2.set_title(f"CKA of corresponding layers ({label_a} vs {label_b})", fontsize=9)
    else:
        ax2.set_axis_off()
        ax2.text(0.5, 0.5, "no layer names in common", ha="center", va="center")
    return save_figure(fig, path)


def attribution_overlay(attribution: np.ndarray) -> np.ndarray:
    """RGBA layer: red, opacity growing with the square root of the attribution (faint spread stays visible)."""
    a = np.clip(np.asarray(attribution, dtype=np.float64), 0, 1)
    rgba = np.zeros(a.shape + (4,))
    rgba[..., 0] = 1.0
    rgba[..., 3] = np.clip(np.sqrt(a) * 1.2, 0, 0.9)
    return rgba


def lam_figure(result, image: np.ndarray, path, title: str = "") -> Path:
    """Three panels: the output with the explained window, the attribution overlaid on the input (window
    shown at input scale), the attribution map alone with the diffusion index."""
    from matplotlib.patches import Rectangle

    x, y, size = result.window
    s = result.scale
    out = np.clip(result.output.transpose(1, 2, 0), 0, 1)
    img = np.clip(np.asarray(image, dtype=np.float64), 0, 1)
    fig = new_figure(12.0, 4.4)
    axes = fig.subplots(1, 3)
    axes[0].imshow(out)
    axes[0].add_patch(Rectangle((x - 0.5, y - 0.5), size, size, fill=False, ec="red", lw=1.5))
    axes[0].set_title("output and window", fontsize=10)
    axes[1].imshow(img)
    axes[1].imshow(attribution_overlay(result.attribution))
    axes[1].add_patch(Rectangle((x / s - 0.5, y / s - 0.5), size / s, size / s, fill=False, ec="white", lw=1))
    axes[1].set_title("attribution on the input (sqrt scale)", fontsize=10)
    im = axes[2].imshow(result.attribution, cmap="inferno", vmin=0, vmax=1)
    axes[2].set_title(f"LAM, DI = {result.di:.2f}", fontsize=10)
    fig.colorbar(im, ax=axes[2], shrink=0.8)
    for a in axes:
        a.set_xticks([])
        a.set_yticks([])
    if title:
        fig.suptitle(title, fontsize=11)
    return save_figure(fig, path)
