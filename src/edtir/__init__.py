"""edtir: EDT image restoration. Models, official-checkpoint loading, evaluation by the field's conventions,
inference with tiling, training with multi-task pre-training and fine-tuning, and bundled models:

    import edtir
    out = edtir.restore("photo.png", task="sr-x4")   # the task's default bundled model; numpy out
"""

from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["EDT", "EDTConfig", "build_model", "load_model", "save_model", "save_official", "imresize", "psnr",
           "ssim", "restore", "__version__"]


def __getattr__(name):
    # Lazy: `import edtir` stays cheap and a missing optional module does not break the others.
    if name in ("EDT", "EDTConfig", "build_model"):
        from .models import edt

        return getattr(edt, name)
    if name in ("load_model", "save_model", "save_official"):
        from .models import checkpoint

        return getattr(checkpoint, name)
    if name == "imresize":
        from .data.imresize import imresize

        return imresize
    if name in ("psnr", "ssim"):
        from . import metrics

        return getattr(metrics, name)
    if name == "restore":
        from .pipeline import restore

        return restore
    raise AttributeError(f"module 'edtir' has no attribute {name!r}")
